"""A hybrid program (conv state beside the KV cache, tests/archs.py's tiny LFM2) on every path
that takes a program: chat and the serving engine run it exactly, the paths that cannot keep its
state refuse it."""

from __future__ import annotations

import mlx.core as mx
import pytest

import paw_mlx
from interp.conv_cache import ConvState
from interp.errors import PawError
from paw_mlx.chat import ChatSession


@pytest.fixture(scope="module")
def prog(hybrid_program):
    return paw_mlx.load(hybrid_program)


def fresh_reply(prog, messages, max_tokens) -> tuple[str, int]:
    """Greedy reply to the whole conversation with a new cache: the reference."""
    ids = prog.tokenizer.encode_chat(messages)
    return prog.tokenizer.decode(list(paw_mlx.stream_tokens(prog, ids, max_tokens=max_tokens))), len(ids)


def test_generation_through_the_conv_state_is_greedy_over_the_whole_sequence(prog):
    """Each token paw_mlx generates (prefill, then one step at a time through the KV caches and conv
    states) is the argmax of a cache-free pass over everything before it."""
    ids = prog.tokenizer.encode("one two three four")
    got = list(paw_mlx.stream_tokens(prog, ids, max_tokens=8))
    want = []
    for _ in range(len(got)):
        want.append(prog.model(mx.array([ids + want]))[0, -1].argmax().item())
    assert len(got) >= 4 and got == want


@pytest.mark.parametrize("depth", [ConvState.depth, 0])
def test_chat_turns_match_a_fresh_run(prog, monkeypatch, depth):
    """With the conv state's depth the cache goes back to the common prefix; with none it cannot,
    and the whole conversation is prefilled again: the replies are a fresh run's either way."""
    monkeypatch.setattr(ConvState, "depth", depth)
    session = ChatSession(prog, max_tokens=6)
    "".join(session.send("Hello there"))
    second = "".join(session.send("The capital of France is Paris."))
    expected, full = fresh_reply(prog, session.conversation()[:-1], 6)
    assert second == expected
    if depth:
        assert 0 < session.prefilled < full
    else:
        assert session.prefilled == full
    assert session.cache[0].offset == len(session.cached_ids)
    assert all(state.offset == len(session.cached_ids) for state in session.cache[prog.program.num_layers :])


def test_the_serving_engine_runs_it_solo_with_each_rows_own_state(prog):
    """Rows of a recurrent program take no slot batch: each prefills and decodes on its own
    cache list, so two requests at once each get the plain generation path's tokens."""
    from paw_mlx.engine import Engine, EngineConfig, GenerationRequest, ModelCatalog

    model = ModelCatalog().add_base(prog)
    prompts = [prog.tokenizer.encode(text) for text in ("one two three four five six", "Hello there")]
    want = [list(paw_mlx.stream_tokens(prog, ids, max_tokens=8)) for ids in prompts]
    with Engine(EngineConfig(prefill_chunk=4, idle_prefill_chunk=4)) as engine:
        handles = [engine.submit(GenerationRequest(model, ids, 8)) for ids in prompts]
        got = [[t for event in handle.events(timeout=60) for t in event.tokens] for handle in handles]
        assert engine.prompt_cache.hits == 0 and len(engine.prompt_cache) == 0
    assert got == want and want[0] != want[1]


EXAMPLES = [{"input": "one", "output": "1"}, {"input": "two", "output": "2"}, {"input": "three", "output": "3"}]


@pytest.fixture(scope="module")
def fewshot(hybrid_program):
    """A program compiled from examples on the hybrid base: its default candidates narrowed to
    spec and fewshot, with a note saying so."""
    return paw_mlx.compile("Write the number as digits.", base=hybrid_program, examples=EXAMPLES,
                           max_new_tokens=6)


def test_compiling_on_it_tries_only_the_untrained_candidates(fewshot):
    assert [c["name"] for c in fewshot.selection["candidates"]] == ["spec", "fewshot"]
    assert "recurrent state" in fewshot.selection["note"] and fewshot.tuning is None


def test_a_program_call_equals_its_prompt_through_generate_and_calls_do_not_leak(prog, fewshot, hybrid_program):
    """Each call starts from a copy of the prefix's whole state (KV caches and conv states); a
    list runs row by row; what one call fed never reaches the next."""
    f = paw_mlx.function(fewshot, base=hybrid_program)
    inputs = ["four five six", "seven", "four five six"]
    want = [prog.tokenizer.decode(list(paw_mlx.stream_tokens(prog, fewshot.prefix_ids + f.token_ids(text),
                                                             max_tokens=6)), skip_special_tokens=True)
            for text in inputs]
    assert [f(text) for text in inputs] == want and want[0] != want[1]
    assert f(inputs) == want


def test_a_prefix_the_base_does_not_compute_is_refused(fewshot, hybrid_program):
    """A tuned prefix's recurrent state is not stored and cannot be rebuilt: one line, not a wrong answer."""
    from dataclasses import replace

    from interp.errors import ArtifactError

    tuned = replace(fewshot, prefix=[(k + 0.5, v) for k, v in fewshot.prefix])
    with pytest.raises(ArtifactError, match="not its base model's own run .* --candidates spec,fewshot"):
        paw_mlx.function(tuned, base=hybrid_program)("one")


def test_trained_candidates_are_refused_before_loading(hybrid_program, tmp_path):
    from paw_mlx.programs.select import SelectOptions

    with pytest.raises(PawError, match=r"^candidate lora cannot be trained on .*key mask.* spec and fewshot work"):
        paw_mlx.compile("Answer yes.", base=hybrid_program, out_dir=tmp_path / "out", examples=EXAMPLES,
                        options=SelectOptions(candidates=("fewshot", "lora")))
    assert not (tmp_path / "out").exists()


def test_a_chat_program_turn_equals_the_call(prog, fewshot, hybrid_program, tmp_path):
    from paw_mlx.programs.artifact import write_artifact

    path = write_artifact(fewshot, tmp_path / "digits")
    session = ChatSession(prog, max_tokens=6)
    session.use_program(path)
    assert "".join(session.send("four five six")) == paw_mlx.function(path, base=hybrid_program)("four five six")


def test_an_artifact_without_keys_and_values_round_trips(fewshot, tmp_path):
    """A base whose every layer is recurrent (a pure state-space model) has no KV prefix: its
    program's prefix.safetensors holds no tensors and reads back as such."""
    from dataclasses import replace

    from paw_mlx.programs.artifact import read_artifact, write_artifact

    path = write_artifact(replace(fewshot, prefix=[]), tmp_path / "no-kv")
    again = read_artifact(path, verify=True)
    assert again.prefix == [] and again.prefix_ids == fewshot.prefix_ids


def test_generate_batch_refuses_rows_together_on_a_recurrent_base(prog, fewshot):
    from paw_mlx.programs.batch import generate_batch

    with pytest.raises(ValueError, match="one row at a time"):
        generate_batch(prog, fewshot.prefix, [[1, 2], [3]], max_new_tokens=2)
