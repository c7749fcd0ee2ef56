"""A state-space program (SSM and conv states, no KV cache: tests/archs.py's tiny Mamba2) where its
state differs from the others: a chat turn that must go back cannot keep any of it. (Generation, chat,
serving and programs on it: tests/paw_mlx/test_hybrid.py, parametrized over every hybrid.)"""

from __future__ import annotations

import pytest

import paw_mlx
from paw_mlx.chat import ChatSession


@pytest.fixture(scope="module")
def prog(ssm_program):
    return paw_mlx.load(ssm_program)


def test_a_retry_goes_back_to_the_checkpoint_at_the_start_of_the_reply(prog):
    """Regenerating a reply cuts the SSM states back into the conversation, which they cannot do: the
    copy kept at the start of the reply is restored, and only the prompt's last token is fed again."""
    session = ChatSession(prog, max_tokens=6)
    first = "".join(session.send("Hello there"))
    session.messages = session.messages[:-2]  # take back the turn, as a retry does
    again = "".join(session.send("Hello there"))
    assert again == first
    assert session.prefilled == 1 < len(prog.tokenizer.encode_chat(session.conversation()[:-1]))
