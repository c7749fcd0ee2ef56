"""Hybrid programs (tests/archs.py's tiny LFM2: conv states beside the KV cache; its tiny Qwen3.5: conv
and delta states) on every path that takes a program: chat runs them exactly, the paths that cannot
keep their state refuse them."""

from __future__ import annotations

import mlx.core as mx
import pytest

import paw_mlx
from interp.conv_cache import ConvState
from interp.errors import PawError
from paw_mlx.chat import ChatSession

#: fixture of each hybrid program -> what the refusals say it keeps
HYBRIDS = {"hybrid_program": r"a conv state in 3 layers \(lfm2\)",
           "gated_delta_program": r"a conv state in 3 layers and a delta state in 3 layers \(qwen3_5_text\)"}


@pytest.fixture(scope="module", params=list(HYBRIDS))
def hybrid(request) -> tuple:
    """(the program's directory, the loaded program, what the refusals say it keeps)."""
    directory = request.getfixturevalue(request.param)
    return directory, paw_mlx.load(directory), HYBRIDS[request.param]


def fresh_reply(prog, messages, max_tokens) -> tuple[str, int]:
    """Greedy reply to the whole conversation with a new cache: the reference."""
    ids = prog.tokenizer.encode_chat(messages)
    return prog.tokenizer.decode(list(paw_mlx.stream_tokens(prog, ids, max_tokens=max_tokens))), len(ids)


def test_generation_through_the_recurrent_states_is_greedy_over_the_whole_sequence(hybrid):
    """Each token paw_mlx generates (prefill, then one step at a time through the KV caches and
    recurrent states) is the argmax of a cache-free pass over everything before it."""
    _, prog, _ = hybrid
    ids = prog.tokenizer.encode("one two three four")
    got = list(paw_mlx.stream_tokens(prog, ids, max_tokens=8))
    want = []
    for _ in range(len(got)):
        want.append(prog.model(mx.array([ids + want]))[0, -1].argmax().item())
    assert len(got) >= 4 and got == want


@pytest.mark.parametrize("depth", [ConvState.depth, 0])
def test_chat_turns_match_a_fresh_run(hybrid, monkeypatch, depth):
    """With the conv state's depth (and no delta state) the cache goes back to the common prefix; with
    none, or a delta state, which never goes back, the whole conversation is prefilled again: the
    replies are a fresh run's either way."""
    _, prog, _ = hybrid
    monkeypatch.setattr(ConvState, "depth", depth)
    session = ChatSession(prog, max_tokens=6)
    "".join(session.send("Hello there"))
    second = "".join(session.send("The capital of France is Paris."))
    expected, full = fresh_reply(prog, session.conversation()[:-1], 6)
    assert second == expected
    if depth and not prog.program.delta_layers:
        assert 0 < session.prefilled < full
    else:
        assert session.prefilled == full
    assert session.cache[0].offset == len(session.cached_ids)
    assert all(state.offset == len(session.cached_ids) for state in session.cache[prog.program.num_layers :])


def test_the_serving_engine_refuses_it_in_one_line(hybrid):
    from paw_mlx.engine.models import ModelCatalog

    _, prog, keeps = hybrid
    with pytest.raises(PawError, match=r"^paw serve's batching engine does not run programs with recurrent state: "
                                       r".* keeps " + keeps) as refused:
        ModelCatalog().add_base(prog)
    assert "\n" not in str(refused.value)


def test_programs_as_weights_refuse_it_before_loading(hybrid, tmp_path):
    directory, _, _ = hybrid
    with pytest.raises(PawError, match=r"^programs as weights \(paw compile, paw_mlx.function\) does not run programs "
                                       "with recurrent state"):
        paw_mlx.compile("Answer yes.", base=directory, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()
