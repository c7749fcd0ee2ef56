"""Qwen3-Coder's tool calls: XML inside ``<tool_call>`` blocks, values typed by the tool's schema.

The model writes::

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Paris
    </parameter>
    <parameter=days>
    3
    </parameter>
    </function>
    </tool_call>

A value is raw text (no JSON quoting), so its type comes from the tool's parameters schema,
as vLLM's ``qwen3_coder`` parser reads it: ``null`` is null; a string parameter keeps the text;
integers, numbers and booleans are read as such; objects and arrays as JSON; a value that does
not read as its type stays text. The template writes each value between newlines, which are
not part of it.
"""

from __future__ import annotations

import json
import re

from apps.serve.call_format import (
    Special,
    ToolCall,
    ToolFormat,
    Tools,
    alternatives,
    json_rule,
    lark_literal,
    parameters,
    read_blocks,
    text_without,
)

_FUNCTION = re.compile(r"^\s*<function=([^>\n]+)>(.*?)(?:</function>\s*$|$)", re.S)
_PARAMETER = re.compile(r"<parameter=([^>\n]+)>(.*?)(?:</parameter>|(?=<parameter=)|$)", re.S)


def parse_qwen3_coder(text: str, tools: Tools) -> tuple[str, list[ToolCall]]:
    """(text outside the calls, calls); a block that is not a call to an offered tool stays text."""
    return read_blocks(text, lambda block: _read_call(block, tools))


def _read_call(block: str, tools: Tools) -> ToolCall | None:
    function = _FUNCTION.match(block)
    if function is None or function.group(1).strip() not in tools:
        return None
    name = function.group(1).strip()
    schema = tools.get(name) if isinstance(tools, dict) else None
    properties = (schema or {}).get("properties") or {}
    arguments = {}
    for parameter in _PARAMETER.finditer(function.group(2)):
        key = parameter.group(1).strip()
        arguments[key] = typed_value(_unwrap(parameter.group(2)), properties.get(key))
    return ToolCall(name, arguments)


def _unwrap(value: str) -> str:
    """The value without the newline the template writes on each side of it."""
    value = value.removeprefix("\n")
    return value.removesuffix("\n")


def _types(schema: dict | None) -> list[str]:
    if not isinstance(schema, dict):
        return []
    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) else [kind] if isinstance(kind, str) else []
    for option in schema.get("anyOf", []) + schema.get("oneOf", []):
        kinds += _types(option)
    return kinds


def typed_value(text: str, schema: dict | None) -> object:
    """A parameter's raw text as the type its schema gives it (text when it reads as none)."""
    kinds = _types(schema)
    if text.strip() == "null" and (not kinds or "null" in kinds or "string" not in kinds):
        return None
    if "string" in kinds or not kinds and not isinstance(schema, dict):
        return text  # a string parameter, or one the tool does not declare: text, as written
    value = text.strip()
    for kind in kinds:
        if kind == "integer" and re.fullmatch(r"-?\d+", value):
            return int(value)
        if kind == "number":
            try:
                number = float(value)
            except ValueError:
                continue
            return int(number) if re.fullmatch(r"-?\d+", value) else number
        if kind == "boolean" and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if kind in ("object", "array"):
            try:
                return json.loads(value)
            except ValueError:
                continue
    if not kinds:  # a schema without a type (an enum, a const): JSON when the text is JSON
        try:
            return json.loads(value)
        except ValueError:
            return text
    return text


# ----------------------------------------------------------------------------- grammar


#: what ends a value, or the call around it, when a reply is read back: raw text holds none of them
_VALUE_ENDS = ("</parameter>", "<parameter=", "<tool_call>", "</tool_call>")


def _parameter_rules(rule: str, key: str, schema: dict) -> list[str]:
    """Lark rules: ``rule`` is one ``<parameter=KEY>`` element whose value fits ``schema``, as
    ``typed_value`` reads it back: JSON of the schema for a value that is not text, one of the
    values of an enum or const, else raw text (within ``minLength`` and ``maxLength``)."""
    opening, closing = lark_literal(f"<parameter={key}>\n"), lark_literal("\n</parameter>\n")
    kinds = _types(schema)
    if kinds and "string" not in kinds:
        return [f"{rule}: {opening} {rule}_json {closing}", f"{rule}_json: {json_rule(schema)}"]
    values = schema["enum"] if isinstance(schema.get("enum"), list) and schema["enum"] else (
        [schema["const"]] if "const" in schema else None)
    if values is not None:
        written = dict.fromkeys(_written(value, schema) for value in values)
        return [f"{rule}: " + alternatives(f"{opening} {lark_literal(text)} {closing}" for text in written)]
    # the whole element one terminal, so that where the value ends is unambiguous; lazy: it ends at
    # the first closing tag (the only one it can hold), which llguidance cannot always tell by
    # itself (a large maxLength)
    text = text_without(_VALUE_ENDS)
    shortest, longest = schema.get("minLength"), schema.get("maxLength")
    if "string" in kinds and (isinstance(shortest, int) or isinstance(longest, int)):
        low = shortest if isinstance(shortest, int) else 0
        text = f"/(?s:.{{{low},{longest if isinstance(longest, int) else ''}}})/ & {text}"
    return [f"{rule}[lazy]: {rule.upper()}", f"{rule.upper()}: {opening} ({text}) {closing}"]


def _written(value: object, schema: dict) -> str:
    """How an enum's (or const's) value is written raw, so that ``typed_value`` reads it back as
    that value: a string as itself unless it would read as JSON (``"3"`` in an untyped enum is
    written with its quotes), anything else as JSON."""
    if isinstance(value, str) and _same(typed_value(value, schema), value):
        return value
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))


def _same(a: object, b: object) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # 1 and True differ


def grammar_qwen3_coder(special: Special, tools: list[dict], parallel: bool, arguments_key: str) -> str:
    lines, calls = [], []
    for i, tool in enumerate(tools):
        schema = parameters(tool)
        required = set(schema.get("required", []))
        items = []
        for j, (key, value_schema) in enumerate((schema.get("properties") or {}).items()):
            lines += _parameter_rules(f"param_{i}_{j}", key, value_schema if isinstance(value_schema, dict) else {})
            items.append(f"param_{i}_{j}" + ("" if key in required else "?"))
        name = json.dumps(f"\n<function={tool['function']['name']}>\n")
        lines.append(f'call_{i}: {special("<tool_call>")} {name} {" ".join(items)} "</function>\\n" '
                     f'{special("</tool_call>")}')
        calls.append(f"call_{i}")
    more = ' ("\\n" one_call)*' if parallel else ""
    return f"start: one_call{more}\none_call: {alternatives(calls)}\n" + "\n".join(lines) + "\n"


QWEN3_CODER = ToolFormat("qwen3_coder", ("<function=",), "<tool_call>", "<tool_call>", "arguments",
                         ("<tool_call>", "</tool_call>"), parse_qwen3_coder, grammar_qwen3_coder)
