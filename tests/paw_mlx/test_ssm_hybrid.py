"""A state-space program (SSM and conv states, no KV cache: tests/archs.py's tiny Mamba2) on every
path that takes a program: generation and chat run it exactly, the paths that cannot keep its
state refuse it."""

from __future__ import annotations

import mlx.core as mx
import pytest

import paw_mlx
from interp.errors import PawError
from interp.ssm_cache import SSMState
from paw_mlx.chat import ChatSession
from tests.paw_mlx.test_hybrid import fresh_reply


@pytest.fixture(scope="module")
def prog(ssm_program):
    return paw_mlx.load(ssm_program)


def test_generation_through_the_ssm_state_is_greedy_over_the_whole_sequence(prog):
    """Each token paw_mlx generates (prefill, then one step at a time through the conv and SSM
    states) is the argmax of a cache-free pass over everything before it."""
    ids = prog.tokenizer.encode("one two three four")
    got = list(paw_mlx.stream_tokens(prog, ids, max_tokens=8))
    want = []
    for _ in range(len(got)):
        want.append(prog.model(mx.array([ids + want]))[0, -1].argmax().item())
    assert len(got) >= 4 and got == want
    assert paw_mlx.generate(prog, ids, max_tokens=8) == prog.tokenizer.decode(got)


def test_chat_turns_match_a_fresh_run(prog):
    """The SSM state cannot go back: a turn that must cut the cache prefills the conversation again,
    one that only extends it continues the state; the replies are a fresh run's either way."""
    session = ChatSession(prog, max_tokens=6)
    "".join(session.send("Hello there"))
    cached = len(session.cached_ids)
    second = "".join(session.send("The capital of France is Paris."))
    expected, full = fresh_reply(prog, session.conversation()[:-1], 6)
    assert second == expected
    assert session.prefilled in (full, full - cached)
    states = [c for c in session.cache if isinstance(c, SSMState)]
    assert len(states) == 2 and all(state.offset == len(session.cached_ids) for state in states)


def test_a_trim_prefills_the_whole_conversation_again(prog):
    """Regenerating a reply cuts the cache back into the conversation: nothing can be kept."""
    session = ChatSession(prog, max_tokens=6)
    first = "".join(session.send("Hello there"))
    session.messages = session.messages[:-2]  # take back the turn, as a retry does
    again = "".join(session.send("Hello there"))
    assert again == first
    assert session.prefilled == len(prog.tokenizer.encode_chat(session.conversation()[:-1]))


def test_the_serving_engine_refuses_it_in_one_line(prog):
    from paw_mlx.engine.models import ModelCatalog

    with pytest.raises(PawError, match=r"^paw serve's batching engine does not run programs with recurrent state: "
                                       r".* keeps a conv state in 2 layers and an SSM state in 2 layers "
                                       r"\(mamba2\)") as refused:
        ModelCatalog().add_base(prog)
    assert "\n" not in str(refused.value)


def test_programs_as_weights_refuse_it_before_loading(ssm_program, tmp_path):
    with pytest.raises(PawError, match=r"^programs as weights \(paw compile, paw_mlx.function\) does not run programs "
                                       "with recurrent state"):
        paw_mlx.compile("Answer yes.", base=ssm_program, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()
