"""Tool calls as chat templates write them: which format a template uses, reading the calls
out of a reply, and the grammar that makes a reply a call.

The format a template uses is read from the markers its text contains, as vLLM's parsers
are chosen per model family:

- ``hermes``: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``, one block per
  call, text around them (Qwen2.5, Qwen3, SmolLM3, Hermes; also any template that takes
  tools without a marker this module knows);
- ``qwen3_coder``: the same blocks holding ``<function=NAME>`` and ``<parameter=KEY>`` XML
  (``xml_calls.py``);
- ``llama3``: the whole reply is ``{"name": ..., "parameters": {...}}``, possibly after
  ``<|python_tag|>`` and possibly several separated by ``;`` (Llama 3.1 to 3.3);
- ``mistral``: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`` after any text
  (Mistral, Mixtral; the older ``[TOOL_CALLS]`` + JSON array form);
- ``mistral_v11``: ``[TOOL_CALLS]NAME[ARGS]{...}``, once per call, an optional
  ``[CALL_ID]id`` before ``[ARGS]`` (tokenizer v11 and later: Mistral Small 3.2, Devstral,
  Magistral);
- ``harmony``: gpt-oss's messages, a call being one to ``functions.NAME`` on the
  commentary channel (``harmony.py``).

A call naming a tool that was not offered, or whose JSON does not parse, is not a call:
it stays in the reply's text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

from apps.serve.call_format import (
    Special,
    ToolCall,
    ToolFormat,
    Tools,
    alternatives,
    call_from_json,
    checked_call,
    json_rule,
    lark_literal,
    parameters,
    read_blocks,
)
from apps.serve.harmony import HARMONY
from apps.serve.xml_calls import QWEN3_CODER

__all__ = ["FORMATS", "ToolCall", "ToolFormat", "call_grammar", "detect_format"]


# ----------------------------------------------------------------------------- reading calls


def _json_call(text: str, names: Tools) -> ToolCall | None:
    try:
        return call_from_json(json.loads(text), names)
    except ValueError:
        return None


def parse_hermes(text: str, names: Tools) -> tuple[str, list[ToolCall]]:
    """(text outside the calls, calls); a block that is not a call stays in the text. A last
    block left open (the model ended after its JSON) still counts."""
    return read_blocks(text, lambda block: _json_call(block.strip(), names))


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


def parse_llama3(text: str, names: Tools) -> tuple[str, list[ToolCall]]:
    """(text, calls): the part after ``<|python_tag|>`` (or the whole reply) as calls, if every
    JSON object in it is one; otherwise the reply is text."""
    parts = _split(text, "<|python_tag|>", "{")
    values = _json_values(parts[1], ";") if parts else None
    calls = [call_from_json(v, names) for v in values or []]
    if not calls or None in calls:
        return text, []
    return parts[0], calls


def parse_mistral(text: str, names: Tools) -> tuple[str, list[ToolCall]]:
    """(text, calls): the JSON array (or object) after ``[TOOL_CALLS]`` as calls, if all are."""
    parts = _split(text, "[TOOL_CALLS]", "[")
    values = _json_values(parts[1], "") if parts else None
    if values and len(values) == 1 and isinstance(values[0], list):
        values = values[0]
    calls = [call_from_json(v, names) for v in values or []]
    if not calls or None in calls:
        return text, []
    return parts[0], calls


#: one v11 call: the name, an optional call id, the arguments' JSON up to the next call or the end
_V11_CALL = re.compile(r"\[TOOL_CALLS\]\s*([A-Za-z0-9_.-]+)\s*(?:\[CALL_ID\]\s*[A-Za-z0-9]*\s*)?\[ARGS\]")


def parse_mistral_v11(text: str, names: Tools) -> tuple[str, list[ToolCall]]:
    """(text, calls): every ``[TOOL_CALLS]NAME[ARGS]{...}`` after the reply's text, if all are calls;
    the older JSON-array form is read too (a v11 model may still write it)."""
    heads = list(_V11_CALL.finditer(text))
    if not heads:
        return parse_mistral(text, names)
    calls = []
    for head, after in zip(heads, [*heads[1:], None], strict=True):
        body = text[head.end():after.start() if after else len(text)]
        values = _json_values(body, "")
        call = checked_call(head.group(1), values[0]) if values and len(values) == 1 else None
        if call is None or call.name not in names:
            return text, []
        calls.append(call)
    return text[:heads[0].start()], calls


# ----------------------------------------------------------------------------- grammars


def _call_json(tools: list[dict], arguments_key: str) -> str:
    """A Lark ``%json`` rule for one call to any of ``tools``: name first, then the arguments
    their parameter schema allows (the order templates show the model)."""
    options = [{"type": "object", "properties": {"name": {"const": tool["function"]["name"]},
                                                 arguments_key: parameters(tool)},
                "required": ["name", arguments_key], "additionalProperties": False} for tool in tools]
    return json_rule(options[0] if len(options) == 1 else {"anyOf": options})


def grammar_hermes(special: Special, tools: list[dict], parallel: bool, arguments_key: str) -> str:
    call = f'{special("<tool_call>")} "\\n" call_json "\\n" {special("</tool_call>")}'
    more = ' ("\\n" one_call)*' if parallel else ""
    return (f"start: one_call{more}\none_call: {call}\ncall_json: {_call_json(tools, arguments_key)}\n")


def grammar_llama3(special: Special, tools: list[dict], parallel: bool, arguments_key: str) -> str:
    # Llama 3's templates describe one call per reply in this form
    return f"start: call_json\ncall_json: {_call_json(tools, arguments_key)}\n"


def grammar_mistral(special: Special, tools: list[dict], parallel: bool, arguments_key: str) -> str:
    more = ' (", " call_json)*' if parallel else ""
    # Mistral's templates write "[TOOL_CALLS] [" (a SentencePiece model reads the space into "▁[")
    return (f'start: {special("[TOOL_CALLS]")} " "? "[" call_json{more} "]"\n'
            f"call_json: {_call_json(tools, arguments_key)}\n")


def grammar_mistral_v11(special: Special, tools: list[dict], parallel: bool, arguments_key: str) -> str:
    rules = [f'call_{i}: {special("[TOOL_CALLS]")} {lark_literal(tool["function"]["name"])} {special("[ARGS]")} '
             f"args_{i}\nargs_{i}: {json_rule(parameters(tool))}" for i, tool in enumerate(tools)]
    calls = alternatives(f"call_{i}" for i in range(len(tools)))
    return f"start: one_call{'+' if parallel else ''}\none_call: {calls}\n" + "\n".join(rules) + "\n"


HERMES = ToolFormat("hermes", ("<tool_call>",), "<tool_call>", "<tool_call>", "arguments",
                    ("<tool_call>", "</tool_call>"), parse_hermes, grammar_hermes)
LLAMA3 = ToolFormat("llama3", ("<|python_tag|>", "Environment: ipython"), "<|python_tag|>", "{", "parameters",
                    ("<|python_tag|>",), parse_llama3, grammar_llama3)
MISTRAL = ToolFormat("mistral", ("[TOOL_CALLS]",), "[TOOL_CALLS]", "[", "arguments", ("[TOOL_CALLS]",),
                     parse_mistral, grammar_mistral)
MISTRAL_V11 = ToolFormat("mistral_v11", ("[ARGS]",), "[TOOL_CALLS]", "[TOOL_CALLS]", "arguments",
                         ("[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"), parse_mistral_v11, grammar_mistral_v11)
#: checked in this order (a v11 template also has [TOOL_CALLS], Qwen3-Coder's also <tool_call>);
#: a template with tools and none of these signs gets HERMES
FORMATS = (HARMONY, MISTRAL_V11, MISTRAL, LLAMA3, QWEN3_CODER, HERMES)


def detect_format(template: str) -> ToolFormat:
    """The tool-call format a chat template's text shows."""
    return next((f for f in FORMATS if any(sign in template for sign in f.signs)), HERMES)


def call_grammar(fmt: ToolFormat, tools: list[dict], parallel: bool,
                 token_id: Callable[[str], int | None] = lambda text: None) -> str:
    """A Lark grammar (llguidance's dialect) whose every sentence is one call, or several when
    ``parallel``, to one of ``tools`` in ``fmt``, arguments valid for the tool's schema.
    ``token_id``: a marker's token id when it is one token (it is then emitted as that token,
    as the model was trained to write it), else None."""

    def special(text: str) -> str:
        token = token_id(text)
        return f"<[{token}]>" if token is not None else lark_literal(text)

    return fmt.grammar(special, tools, parallel, fmt.arguments_key)
