"""Hybrid programs on every path that takes a program: tests/archs.py's tiny LFM2 (conv states beside
the KV cache), Qwen3.5 (conv and delta states), Mamba2 (conv and SSM states, no KV cache at all),
Jamba (Mamba 1's conv and SSM states, a decay per state column, beside the KV cache) and
RecurrentGemma (conv and LRU states beside a windowed KV cache).
Generation, chat, the serving engine and programs as weights run them exactly (trained programs on them:
tests/paw_mlx/test_hybrid_training.py)."""

from __future__ import annotations

import mlx.core as mx
import pytest

import paw_mlx
from interp.conv_cache import ConvState
from paw_mlx.chat import ChatSession

#: the fixtures of the hybrid programs (tests/conftest.py), one of each recurrent state kind, and the SSM
#: state of Mamba 1 layers beside attention
HYBRIDS = ("hybrid_program", "gated_delta_program", "ssm_program", "jamba_program", "recurrent_gemma_program")


@pytest.fixture(scope="module", params=HYBRIDS)
def hybrid(request) -> tuple:
    """(the program's directory, the loaded program)."""
    directory = request.getfixturevalue(request.param)
    return directory, paw_mlx.load(directory)


def fresh_reply(prog, messages, max_tokens) -> tuple[str, int]:
    """Greedy reply to the whole conversation with a new cache: the reference."""
    ids = prog.tokenizer.encode_chat(messages)
    return prog.tokenizer.decode_finished(list(paw_mlx.stream_tokens(prog, ids, max_tokens=max_tokens))), len(ids)


def test_generation_through_the_recurrent_states_is_greedy_over_the_whole_sequence(hybrid):
    """Each token paw_mlx generates (prefill, then one step at a time through the KV caches and
    recurrent states) is the argmax of a cache-free pass over everything before it."""
    _, prog = hybrid
    ids = prog.tokenizer.encode("one two three four")
    got = list(paw_mlx.stream_tokens(prog, ids, max_tokens=8))
    want = []
    for _ in range(len(got)):
        want.append(prog.model(mx.array([ids + want]))[0, -1].argmax().item())
    assert len(got) >= 4 and got == want


@pytest.mark.parametrize("depth", [ConvState.depth, 0])
def test_chat_turns_match_a_fresh_run(hybrid, monkeypatch, depth):
    """With the conv state's depth (and no delta or SSM state) the cache goes back to the common prefix;
    with none, or a state that never goes back, the turn continues the cache where it only extends it, else
    goes back to the checkpoint at the start of the last reply: the replies are a fresh run's either way."""
    _, prog = hybrid
    monkeypatch.setattr(ConvState, "depth", depth)
    session = ChatSession(prog, max_tokens=6)
    "".join(session.send("Hello there"))
    cached, reply_start = len(session.cached_ids), len(session.prompt) - 1
    second = "".join(session.send("The capital of France is Paris."))
    expected, full = fresh_reply(prog, session.conversation()[:-1], 6)
    assert second == expected
    if depth and set(prog.program.recurrent_states) == {"conv"}:
        assert 0 < session.prefilled < full
    else:  # a state that cannot go back: continued where the turn extends the cache, else from the checkpoint
        assert session.prefilled in (full - reply_start, full - cached)
    assert session.cache[0].offset == len(session.cached_ids)
    assert all(state.offset == len(session.cached_ids) for state in session.cache[prog.program.num_layers :])


def test_a_turn_that_cuts_into_the_last_reply_prefills_from_its_start(hybrid, monkeypatch):
    """Each turn keeps the recurrent states at the start of its reply: a reply recorded unlike the tokens
    generated makes the next turn cut into it, and the cache goes back to that checkpoint instead of
    prefilling the whole conversation; the reply is a fresh run's."""
    _, prog = hybrid
    monkeypatch.setattr(ConvState, "depth", 0)  # the conv state cannot go back either: only checkpoints can
    session = ChatSession(prog, max_tokens=6)
    "".join(session.send("Hello there"))
    reply_start = len(session.prompt) - 1  # the last prompt id is fed by the first decoding step
    session.split_reply("Hi.", "")  # the conversation now differs from the cache inside the reply
    second = "".join(session.send("The capital of France is Paris."))
    expected, full = fresh_reply(prog, session.conversation()[:-1], 6)
    assert second == expected
    assert session.prefilled == full - reply_start < full - 1
    assert session.stats.prompt_tokens == session.prefilled
    assert all(state.offset == len(session.cached_ids) for state in session.cache)


def test_going_back_past_a_checkpoint_drops_it(hybrid, monkeypatch):
    """Undoing a turn goes back to the checkpoint before it, and the later one (holding positions the new
    turn replaces) is forgotten: every reply stays a fresh run's."""
    _, prog = hybrid
    monkeypatch.setattr(ConvState, "depth", 0)
    session = ChatSession(prog, max_tokens=5)
    "".join(session.send("Hello there"))
    "".join(session.send("one two three"))
    assert len(session._checkpoints) == 2
    del session.messages[-2:]  # /undo
    third = "".join(session.send("four five six"))
    assert third == fresh_reply(prog, session.conversation()[:-1], 5)[0]
    assert [offset for offset, _ in session._checkpoints][-1] == len(session.prompt) - 1
    assert all(offset <= len(session.cached_ids) for offset, _ in session._checkpoints)
    del session.messages[-2:]
    fourth = "".join(session.send("seven eight"))
    assert fourth == fresh_reply(prog, session.conversation()[:-1], 5)[0]


@pytest.mark.parametrize("batch", [True, False], ids=["batched", "solo"])
def test_the_serving_engine_prefills_each_row_alone_and_decodes_them_together(hybrid, batch):
    """Each prompt is prefilled on its own cache list, then its states join a row of the batch's
    (``batch_recurrent``; off: each row's step its own pass, the reference): requests at once each
    get the plain generation path's tokens. Each conversation's next turn then starts from the
    snapshot its row left after its reply (the whole cache list) and prefills only the new tokens."""
    from paw_mlx.engine import Engine, EngineConfig, GenerationRequest, ModelCatalog

    _, prog = hybrid
    model = ModelCatalog().add_base(prog)
    prompts = [prog.tokenizer.encode(text) for text in ("one two three four five six", "Hello there", "seven")]
    want = [list(paw_mlx.stream_tokens(prog, ids, max_tokens=8)) for ids in prompts]
    more = prog.tokenizer.encode(" and then", add_special_tokens=False)
    with Engine(EngineConfig(prefill_chunk=4, idle_prefill_chunk=4, batch_recurrent=batch)) as engine:

        def run(prompts: list) -> tuple[list, list]:
            handles = [engine.submit(GenerationRequest(model, ids, 8)) for ids in prompts]
            tokens = [[t for event in handle.events(timeout=60) for t in event.tokens] for handle in handles]
            return tokens, [handle.cached_tokens for handle in handles]

        got, _ = run(prompts)
        assert engine.prompt_cache.hits == 0 and len(engine.prompt_cache) >= len(prompts)
        assert (engine.widest_step >= 2) == batch  # the rows overlap: 8 tokens each, prefills of 1-2 chunks
        seconds = [ids + tokens + more for ids, tokens in zip(prompts, want, strict=True)]
        before = engine.prefilled_tokens
        again, hits = run(seconds)
        prefilled = engine.prefilled_tokens - before
    assert got == want and want[0] != want[1]
    assert again == [list(paw_mlx.stream_tokens(prog, ids, max_tokens=8)) for ids in seconds]
    # a row ran its prompt and its tokens but the last (cut by length) or up to its EOS
    fed = [len(ids) + len(tokens) - (len(tokens) == 8) for ids, tokens in zip(prompts, want, strict=True)]
    assert hits == fed and prefilled == sum(len(ids) for ids in seconds) - sum(fed)


@pytest.mark.parametrize("batch", [True, False], ids=["batched", "solo"])
def test_the_same_prompt_again_prefills_only_its_last_token(hybrid, batch):
    """The engine keeps a prompt's snapshot one token before its end, so the same prompt sent again
    (a retry, a regenerate, n choices at once) starts there and runs only its last token, with the
    plain generation path's tokens; a prompt extending it starts there too."""
    from paw_mlx.engine import Engine, EngineConfig, GenerationRequest, ModelCatalog

    _, prog = hybrid
    model = ModelCatalog().add_base(prog)
    ids = prog.tokenizer.encode("one two three four five six seven")
    want = list(paw_mlx.stream_tokens(prog, ids, max_tokens=6))
    longer = ids + prog.tokenizer.encode(" eight", add_special_tokens=False)
    with Engine(EngineConfig(prefill_chunk=4, idle_prefill_chunk=4, batch_recurrent=batch)) as engine:

        def run(prompts: list) -> tuple[list, list, int]:
            before = engine.prefilled_tokens
            handles = [engine.submit(GenerationRequest(model, p, 6)) for p in prompts]
            tokens = [[t for event in handle.events(timeout=60) for t in event.tokens] for handle in handles]
            return tokens, [handle.cached_tokens for handle in handles], engine.prefilled_tokens - before

        assert run([ids]) == ([want], [0], len(ids))
        assert run([ids]) == ([want], [len(ids) - 1], 1)
        # three at once (a request's n choices): the first prefills, the others start from its snapshot
        assert run([ids, ids, ids]) == ([want] * 3, [len(ids) - 1] * 3, 3)
        tokens, hits, prefilled = run([longer])
    assert tokens == [list(paw_mlx.stream_tokens(prog, longer, max_tokens=6))]
    assert hits == [len(ids) - 1] and prefilled == len(longer) - len(ids) + 1


EXAMPLES = [{"input": "one", "output": "1"}, {"input": "two", "output": "2"}, {"input": "three", "output": "3"}]


@pytest.fixture(scope="module")
def fewshot(hybrid):
    """A few-shot program compiled from examples on the hybrid base."""
    from paw_mlx.programs.select import SelectOptions

    return paw_mlx.compile("Write the number as digits.", base=hybrid[0], examples=EXAMPLES, max_new_tokens=6,
                           options=SelectOptions(candidates=("spec", "fewshot")))


def test_a_program_call_equals_its_prompt_through_generate_and_calls_do_not_leak(hybrid, fewshot):
    """Each call starts from a copy of the prefix's whole state (KV caches and recurrent states); a
    list runs row by row; what one call fed never reaches the next."""
    directory, prog = hybrid
    f = paw_mlx.function(fewshot, base=directory)
    inputs = ["seven", "x", "seven"]  # the first two give different replies on every tiny base
    want = [prog.tokenizer.decode_finished(list(paw_mlx.stream_tokens(prog, fewshot.prefix_ids + f.token_ids(text),
                                                             max_tokens=6)), skip_special_tokens=True)
            for text in inputs]
    assert [f(text) for text in inputs] == want and want[0] != want[1]
    assert f(inputs) == want


@pytest.mark.parametrize("base", ["hybrid_program", "gated_delta_program", "jamba_program"])
def test_a_prefix_the_base_does_not_compute_is_refused(base, request):
    """A tuned prefix's recurrent state is not stored and cannot be rebuilt: one line, not a wrong answer.
    (Checked on the bases with attention layers, whose stored keys and values the base's run must give.)"""
    from dataclasses import replace

    from interp.errors import ArtifactError
    from paw_mlx.programs.select import SelectOptions

    directory = request.getfixturevalue(base)
    program = paw_mlx.compile("Write the number as digits.", base=directory, examples=EXAMPLES, max_new_tokens=6,
                              options=SelectOptions(candidates=("spec", "fewshot")))
    tuned = replace(program, prefix=[(k + 0.5, v) for k, v in program.prefix])
    with pytest.raises(ArtifactError, match="not its base model's own run .* --candidates spec,fewshot,lora"):
        paw_mlx.function(tuned, base=directory)("one")


def test_a_chat_program_turn_equals_the_call(hybrid, fewshot, tmp_path):
    from paw_mlx.programs.artifact import write_artifact

    directory, prog = hybrid
    path = write_artifact(fewshot, tmp_path / "digits")
    session = ChatSession(prog, max_tokens=6)
    session.use_program(path)
    assert "".join(session.send("four five six")) == paw_mlx.function(path, base=directory)("four five six")


def test_an_artifact_without_keys_and_values_round_trips(fewshot, tmp_path):
    """A base whose every layer is recurrent (a pure state-space model) has no KV prefix: its
    program's prefix.safetensors holds no tensors and reads back as such."""
    from dataclasses import replace

    from paw_mlx.programs.artifact import read_artifact, write_artifact

    path = write_artifact(replace(fewshot, prefix=[]), tmp_path / "no-kv")
    again = read_artifact(path, verify=True)
    assert again.prefix == [] and again.prefix_ids == fewshot.prefix_ids


def test_generate_batch_refuses_rows_together_on_a_recurrent_base(hybrid, fewshot):
    from paw_mlx.programs.batch import generate_batch

    with pytest.raises(ValueError, match="one row at a time"):
        generate_batch(hybrid[1], fewshot.prefix, [[1, 2], [3]], max_new_tokens=2)
