"""What every tool-call format shares: the call and format records, reading a call out of
parsed JSON, the pieces of the call grammars, and held-back marker starts in a stream.

The formats themselves live beside it: ``tool_calls.py`` (JSON formats and detection),
``xml_calls.py`` (Qwen3-Coder), ``harmony.py`` (gpt-oss).
"""

from __future__ import annotations

import json
import re
import secrets
import string
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass

from paw_mlx.constrain import JSON_OPTIONS

#: the tools a reply may call: function name -> its parameters' JSON schema (a set of names
#: does for formats whose arguments are JSON: only membership is asked of it)
Tools = Mapping[str, dict] | Collection[str]
#: a marker's text -> its token in a Lark grammar (``<[id]>`` when it is one token, else a literal)
Special = Callable[[str], str]


#: a ``<tool_call>`` block (Hermes, Qwen3-Coder) ends at its closing tag, at the next block (a
#: decoder left a special closing tag out) or at the end of the reply
TOOL_CALL_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|(?=<tool_call>)|$)", re.S)


@dataclass(frozen=True)
class ToolCall:
    """One call read from a reply: the function's name and its arguments (a JSON object)."""

    name: str
    arguments: dict


@dataclass(frozen=True)
class ToolFormat:
    """How one family of templates writes tool calls."""

    name: str
    signs: tuple[str, ...]  # text in a chat template that says it uses this format
    marker: str  # the text that opens the calls
    bare_start: str  # a reply opening with this (after whitespace) may be calls whose marker was left out
    arguments_key: str  # what the template's prompt tells the model to name the arguments
    kept: tuple[str, ...]  # markers kept in decoded text where they are special tokens
    parse: Callable[[str, Tools], tuple[str, list[ToolCall]]]
    grammar: Callable[[Special, list[dict], bool, str], str]

    def new_id(self) -> str:
        """An id for a call, as the format's templates accept them back in ``tool_call_id``."""
        if self.name.startswith("mistral"):  # Mistral's templates refuse ids other than 9 letters and digits
            return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))
        return "call_" + secrets.token_hex(12)


def call_from_json(value: object, names: Tools) -> ToolCall | None:
    """The call a parsed JSON value describes, or None when it is not a call to an offered tool."""
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    return checked_call(value["name"], value.get("arguments", value.get("parameters", {})))


def checked_call(name: str, arguments: object) -> ToolCall | None:
    """A call with ``arguments`` as an object (a JSON string of one is read), or None."""
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    return ToolCall(name, arguments) if isinstance(arguments, dict) else None


def json_arguments(text: str) -> dict | None:
    """``text`` as a JSON object, or None when it is not one."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


# ----------------------------------------------------------------------------- grammars


def json_rule(schema: dict) -> str:
    """A Lark ``%json`` rule body for ``schema``, with the JSON options every grammar of paw uses."""
    return "%json " + json.dumps({**schema, "x-guidance": JSON_OPTIONS})


def parameters(tool: dict) -> dict:
    """A tool's parameters schema (any object when it gives none)."""
    return tool["function"].get("parameters") or {"type": "object"}


def lark_literal(text: str) -> str:
    return json.dumps(text)  # a Lark string literal is a JSON string


def alternatives(rules: Iterable[str]) -> str:
    return " | ".join(rules)


def regex_text(text: str) -> str:
    """``text`` as a regular expression matching it alone (every non-word character escaped as a code point)."""
    return "".join(ch if ch.isascii() and (ch.isalnum() or ch == "_") else f"\\x{{{ord(ch):X}}}" for ch in text)


def text_without(excluded: Iterable[str], longest: int | None = None) -> str:
    """A Lark terminal's body (llguidance's ``&`` and ``~``) matching any text, up to ``longest``
    characters, that holds none of ``excluded``: free text that cannot end, or be mistaken for,
    the markers around it."""
    anything = "/(?s:.*)/" if longest is None else f"/(?s:.{{0,{longest}}})/"
    return f"{anything} & ~/(?s:.*)({'|'.join(regex_text(text) for text in excluded)})(?s:.*)/"


# ----------------------------------------------------------------------------- streams


def marker_start(text: str, markers: Iterable[str]) -> int:
    """How many trailing characters of ``text`` could begin one of ``markers`` (held back in a
    stream until the next characters say whether it is one)."""
    longest = 0
    for marker in markers:
        for size in range(min(len(marker) - 1, len(text)), longest, -1):
            if marker.startswith(text[-size:]):
                longest = size
                break
    return longest


def read_blocks(text: str, read: Callable[[str], ToolCall | None]) -> tuple[str, list[ToolCall]]:
    """(text outside the calls, calls) of a reply's ``<tool_call>`` blocks, each read by ``read``;
    a block that is not a call (``read`` gives None) stays in the text."""
    calls, outside, at = [], [], 0
    for block in TOOL_CALL_BLOCK.finditer(text):
        call = read(block.group(1))
        if call is not None:
            outside.append(text[at:block.start()])
            at = block.end()
            calls.append(call)
    outside.append(text[at:])
    return "".join(outside), calls
