"""Probe a chat template with a small conversation before any real one is rendered with it.

A model's chat template is code, and a broken one (a syntax error, a ``raise_exception`` on
every conversation, a loop that forgets the message's content) only shows when something
renders it. ``check_chat_template`` is the one test of "can this template carry a user's
message to the model": the tokenizer runs it before its first rendering, and ``paw export``
runs it before the export's heavy work, so both refuse exactly the same templates.

What many working templates do is not refused: Gemma's raise on a system message, Mistral's
merge it into the first user turn. ``chat_template_notes`` says what a template leaves out,
and the exporter shows it as notes.
"""

from __future__ import annotations

from collections.abc import Callable

from interp.errors import TemplateError

#: renders (messages, add_generation_prompt) with the template under test, raising TemplateError
Render = Callable[[list[dict], bool], str]

# plain words without outer spaces: templates may trim or escape a message's content
PROBE_SYSTEM = "You answer in one word."
PROBE_USER = "What colour is the sky?"
PROBE_ASSISTANT = "Blue."
PROBE_FOLLOW_UP = "And the grass?"


def _user(text: str = PROBE_USER) -> dict:
    return {"role": "user", "content": text}


def _system() -> dict:
    return {"role": "system", "content": PROBE_SYSTEM}


def check_chat_template(render: Render) -> None:
    """TemplateError unless the template renders one user message, with the generation prompt,
    into text that holds the message (with a system message first when it insists on one)."""
    try:
        text = render([_user()], True)
    except TemplateError as alone:
        try:  # a template may require a system message: run time renders one when given
            text = render([_system(), _user()], True)
        except TemplateError:
            raise TemplateError(f"{alone} (rendering one user message)") from None
    if PROBE_USER not in text:
        raise TemplateError(f"the chat template drops the user's message: rendering {PROBE_USER!r} as the "
                            f"user's message gave text without it ({text[:80]!r})")


def chat_template_notes(render: Render) -> list[str]:
    """What a template that passes ``check_chat_template`` does not carry through: a system
    message refused or dropped, a conversation without one refused, earlier turns refused or
    dropped. Never raises. (Ignoring ``add_generation_prompt`` is no fault: Mistral's ``[/INST]``
    opens the assistant's turn by itself.)"""
    notes = []

    def attempt(what: str, messages: list[dict]) -> str | None:
        try:
            return render(messages, True)
        except TemplateError as exc:
            notes.append(f"fails on {what}: {str(exc).removeprefix('the chat template failed: ')}")
            return None

    attempt("a conversation without a system message", [_user()])
    with_system = attempt("a system message", [_system(), _user()])
    if with_system is not None and PROBE_SYSTEM not in with_system:
        notes.append("leaves out a system message")
    turns = attempt("a conversation of several turns",
                    [_user(), {"role": "assistant", "content": PROBE_ASSISTANT}, _user(PROBE_FOLLOW_UP)])
    if turns is not None and not all(text in turns for text in (PROBE_USER, PROBE_ASSISTANT, PROBE_FOLLOW_UP)):
        notes.append("leaves out earlier turns of a conversation")
    return notes
