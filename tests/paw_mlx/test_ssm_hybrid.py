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


def test_a_trim_prefills_the_whole_conversation_again(prog):
    """Regenerating a reply cuts the cache back into the conversation: nothing can be kept."""
    session = ChatSession(prog, max_tokens=6)
    first = "".join(session.send("Hello there"))
    session.messages = session.messages[:-2]  # take back the turn, as a retry does
    again = "".join(session.send("Hello there"))
    assert again == first
    assert session.prefilled == len(prog.tokenizer.encode_chat(session.conversation()[:-1]))
