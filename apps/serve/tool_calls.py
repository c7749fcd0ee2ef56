"""Tool calls as chat templates write them: which format a template uses, reading the calls
out of a reply, and the grammar that makes a reply a call.

Three formats cover the templates served most (the one a template uses is read from the
markers its text contains, as vLLM's parsers are chosen per model family):

- ``hermes``: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``, one block per
  call, text around them (Qwen2.5, Qwen3, SmolLM3, Hermes; also any template that takes
  tools without a marker this module knows);
- ``llama3``: the whole reply is ``{"name": ..., "parameters": {...}}``, possibly after
  ``<|python_tag|>`` and possibly several separated by ``;`` (Llama 3.1 to 3.3);
- ``mistral``: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`` after any text
  (Mistral, Mixtral; the older ``[TOOL_CALLS]`` + JSON array form).

A call naming a tool that was not offered, or whose JSON does not parse, is not a call:
it stays in the reply's text.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from collections.abc import Callable, Collection
from dataclasses import dataclass

from paw_mlx.constrain import JSON_OPTIONS


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
    parse: Callable[[str, Collection[str]], tuple[str, list[ToolCall]]]
    grammar: Callable[[str, list[dict], bool, str], str]

    def new_id(self) -> str:
        """An id for a call, as the format's templates accept them back in ``tool_call_id``."""
        if self.name == "mistral":  # Mistral's templates refuse ids other than 9 letters and digits
            return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))
        return "call_" + secrets.token_hex(12)


# ----------------------------------------------------------------------------- reading calls


def _call(value: object, names: Collection[str]) -> ToolCall | None:
    """The call a parsed JSON value describes, or None when it is not a call to an offered tool."""
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    return ToolCall(value["name"], arguments) if isinstance(arguments, dict) else None


def _json_call(text: str, names: Collection[str]) -> ToolCall | None:
    try:
        return _call(json.loads(text), names)
    except ValueError:
        return None


#: a block ends at its closing tag, the next block (a decoder left a special closing tag out) or the end
_HERMES_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|(?=<tool_call>)|$)", re.S)


def parse_hermes(text: str, names: Collection[str]) -> tuple[str, list[ToolCall]]:
    """(text outside the calls, calls); a block that is not a call stays in the text. A last
    block left open (the model ended after its JSON) still counts."""
    calls, outside, at = [], [], 0
    for block in _HERMES_BLOCK.finditer(text):
        call = _json_call(block.group(1).strip(), names)
        if call is not None:
            outside.append(text[at:block.start()])
            at = block.end()
            calls.append(call)
    outside.append(text[at:])
    return "".join(outside), calls


def _json_values(text: str, separators: str) -> list | None:
    """The JSON values ``text`` is made of, separated by whitespace or ``separators``; None if it is not."""
    decoder, values, at = json.JSONDecoder(), [], 0
    while True:
        while at < len(text) and (text[at].isspace() or text[at] in separators):
            at += 1
        if at == len(text):
            return values
        try:
            value, at = decoder.raw_decode(text, at)
        except ValueError:
            return None
        values.append(value)


def _split(text: str, marker: str, bare_start: str) -> tuple[str, str] | None:
    """(text before the calls, the calls' text): after ``marker``, or the whole reply when it
    opens with ``bare_start`` (the marker is a special token a decoder may have left out)."""
    if marker in text:
        before, _, after = text.partition(marker)
        return before, after
    if text.lstrip().startswith(bare_start):
        return "", text
    return None


def parse_llama3(text: str, names: Collection[str]) -> tuple[str, list[ToolCall]]:
    """(text, calls): the part after ``<|python_tag|>`` (or the whole reply) as calls, if every
    JSON object in it is one; otherwise the reply is text."""
    parts = _split(text, "<|python_tag|>", "{")
    values = _json_values(parts[1], ";") if parts else None
    calls = [_call(v, names) for v in values or []]
    if not calls or None in calls:
        return text, []
    return parts[0], calls


def parse_mistral(text: str, names: Collection[str]) -> tuple[str, list[ToolCall]]:
    """(text, calls): the JSON array (or object) after ``[TOOL_CALLS]`` as calls, if all are."""
    parts = _split(text, "[TOOL_CALLS]", "[")
    values = _json_values(parts[1], "") if parts else None
    if values and len(values) == 1 and isinstance(values[0], list):
        values = values[0]
    calls = [_call(v, names) for v in values or []]
    if not calls or None in calls:
        return text, []
    return parts[0], calls


# ----------------------------------------------------------------------------- grammars


def _call_json(tools: list[dict], arguments_key: str) -> str:
    """A Lark ``%json`` rule for one call to any of ``tools``: name first, then the arguments
    their parameter schema allows (the order templates show the model)."""
    options = []
    for tool in tools:
        function = tool["function"]
        parameters = function.get("parameters") or {"type": "object"}
        options.append({"type": "object", "properties": {"name": {"const": function["name"]},
                                                          arguments_key: parameters},
                        "required": ["name", arguments_key], "additionalProperties": False})
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    return "%json " + json.dumps({**schema, "x-guidance": JSON_OPTIONS})


def _lark(text: str) -> str:
    return json.dumps(text)  # a Lark string literal is a JSON string


def grammar_hermes(marker: str, tools: list[dict], parallel: bool, arguments_key: str) -> str:
    call = f'{marker} "\\n" call_json "\\n</tool_call>"'
    more = ' ("\\n" one_call)*' if parallel else ""
    return (f"start: one_call{more}\none_call: {call}\ncall_json: {_call_json(tools, arguments_key)}\n")


def grammar_llama3(marker: str, tools: list[dict], parallel: bool, arguments_key: str) -> str:
    # Llama 3's templates describe one call per reply in this form
    return f"start: call_json\ncall_json: {_call_json(tools, arguments_key)}\n"


def grammar_mistral(marker: str, tools: list[dict], parallel: bool, arguments_key: str) -> str:
    more = ' (", " call_json)*' if parallel else ""
    # Mistral's templates write "[TOOL_CALLS] [" (a SentencePiece model reads the space into "▁[")
    return f'start: {marker} " "? "[" call_json{more} "]"\ncall_json: {_call_json(tools, arguments_key)}\n'


HERMES = ToolFormat("hermes", ("<tool_call>",), "<tool_call>", "<tool_call>", "arguments",
                    ("<tool_call>", "</tool_call>"), parse_hermes, grammar_hermes)
LLAMA3 = ToolFormat("llama3", ("<|python_tag|>", "Environment: ipython"), "<|python_tag|>", "{", "parameters",
                    ("<|python_tag|>",), parse_llama3, grammar_llama3)
MISTRAL = ToolFormat("mistral", ("[TOOL_CALLS]",), "[TOOL_CALLS]", "[", "arguments", ("[TOOL_CALLS]",),
                     parse_mistral, grammar_mistral)
#: checked in this order; a template with tools and none of these signs gets HERMES
FORMATS = (MISTRAL, LLAMA3, HERMES)


def detect_format(template: str) -> ToolFormat:
    """The tool-call format a chat template's text shows."""
    return next((f for f in FORMATS if any(sign in template for sign in f.signs)), HERMES)


def call_grammar(fmt: ToolFormat, tools: list[dict], parallel: bool, marker_token: int | None) -> str:
    """A Lark grammar (llguidance's dialect) whose every sentence is one call, or several when
    ``parallel``, to one of ``tools`` in ``fmt``, arguments valid for the tool's schema.
    ``marker_token``: the id of the marker when it is one token (it is then emitted as that token,
    as the model was trained to write it)."""
    marker = f"<[{marker_token}]>" if marker_token is not None else _lark(fmt.marker)
    return fmt.grammar(marker, tools, parallel, fmt.arguments_key)
