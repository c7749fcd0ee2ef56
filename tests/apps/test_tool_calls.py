"""Tool-call formats on fixed texts: detection from a template, parsing, streaming hold-back,
and the grammars that make a constrained reply a call."""

from __future__ import annotations

import json

import pytest

from apps.serve.tool_calls import HERMES, LLAMA3, MISTRAL, ToolCall, call_grammar, detect_format
from apps.serve.tools import CallScanner, ToolPlan
from interp.tokenizer import Tokenizer
from paw_mlx.constrain import compile_returns
from paw_mlx.engine.text import TextStream

NAMES = {"get_weather", "get_time"}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time"}}]
WEATHER = ToolCall("get_weather", {"city": "Paris"})


@pytest.mark.parametrize("template, fmt", [
    ("{% for tool in tools %}...<tool_call>\\n{...}</tool_call>", HERMES),
    ('{{- "<|python_tag|>" + tool_call.name }} {% if tools %}', LLAMA3),
    ('{{- "Environment: ipython\\n" }}{% for t in tools %}', LLAMA3),
    ("{%- if tools %}[AVAILABLE_TOOLS]{{ tools|tojson }}[/AVAILABLE_TOOLS]{% endif %}[TOOL_CALLS]", MISTRAL),
    ("{% if tools %}{{ tools | tojson }}{% endif %}", HERMES),  # takes tools, no known marker
])
def test_the_format_is_read_from_the_template(template, fmt):
    assert detect_format(template) is fmt


@pytest.mark.parametrize("fmt, text, content, calls", [
    (HERMES, 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     "Let me check.\n", [WEATHER]),
    (HERMES, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n<tool_call>\n'
     '{"name": "get_time", "arguments": {}}\n</tool_call>', "\n", [WEATHER, ToolCall("get_time", {})]),
    (HERMES, '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}', "", [WEATHER]),
    (HERMES, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n<tool_call>\n'  # closers dropped
     '{"name": "get_time", "arguments": {}}', "", [WEATHER, ToolCall("get_time", {})]),
    (LLAMA3, '{"name": "get_weather", "parameters": {"city": "Paris"}}', "", [WEATHER]),
    (LLAMA3, '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}', "", [WEATHER]),
    (LLAMA3, '{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "parameters": {}}', "",
     [WEATHER, ToolCall("get_time", {})]),
    (MISTRAL, '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]', "", [WEATHER]),
    (MISTRAL, 'Sure.[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, '
     '{"name": "get_time", "arguments": {}}]', "Sure.", [WEATHER, ToolCall("get_time", {})]),
    (MISTRAL, '[{"name": "get_weather", "arguments": {"city": "Paris"}}]', "", [WEATHER]),  # marker decoded away
])
def test_each_format_parses_its_calls(fmt, text, content, calls):
    assert fmt.parse(text, NAMES) == (content, calls)


@pytest.mark.parametrize("fmt, text", [
    (HERMES, '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>'),  # a tool not offered
    (HERMES, '<tool_call>\n{"name": "get_weather", "arguments": {"city": \n</tool_call>'),  # broken JSON
    (HERMES, "No tools needed: the answer is 4."),
    (LLAMA3, '{"name": "get_weather", "parameters": {"city": "Paris"}} and then some text'),
    (LLAMA3, '{"answer": 4}'),
    (MISTRAL, '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "nope"}]'),
    (MISTRAL, "[1, 2, 3] are the numbers."),
])
def test_what_is_not_a_call_stays_text(fmt, text):
    assert fmt.parse(text, NAMES) == (text, [])


def plan(fmt, parallel: bool = True) -> ToolPlan:
    return ToolPlan(fmt, TOOLS, frozenset(NAMES), parallel, {})


def scan(fmt, text: str) -> tuple[list[str], str, list[dict]]:
    """(what streamed while the text came a character at a time, what finish added, calls)."""
    scanner = CallScanner(plan(fmt))
    shown = [scanner.add(ch) for ch in text]
    rest, calls = scanner.finish()
    return shown, rest, calls


def test_a_stream_shows_text_before_a_call_and_holds_the_call():
    text = 'Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    shown, rest, calls = scan(HERMES, text)
    assert "".join(shown) == "Let me check. " and rest == ""
    assert not any("<" in piece for piece in shown)  # the call never streamed as text
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
        [("get_weather", {"city": "Paris"})]
    assert calls[0]["id"].startswith("call_") and calls[0]["type"] == "function"


def test_a_marker_start_is_held_only_until_it_is_known_not_to_be_one():
    shown, rest, calls = scan(HERMES, "a <tool shed> b")
    assert not calls and "".join(shown) + rest == "a <tool shed> b"
    # "<tool" was held back: it came out with the character that ruled the marker out
    assert shown[:8] == ["a", " ", "", "", "", "", "", "<tool "]


def test_a_reply_opening_like_a_call_is_held_to_its_end():
    shown, rest, calls = scan(LLAMA3, '{"answer": 4}')
    assert "".join(shown) == "" and rest == '{"answer": 4}' and not calls
    shown, rest, calls = scan(LLAMA3, '  {"name": "get_time", "parameters": {}}')
    assert "".join(shown) + rest == "" and calls[0]["function"] == {"name": "get_time", "arguments": "{}"}
    shown, _, _ = scan(MISTRAL, "Hello [x]")
    assert "".join(shown) == "Hello [x]"


def test_without_parallel_calls_only_the_first_counts():
    text = ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, '
            '{"name": "get_time", "arguments": {}}]')
    _, calls = plan(MISTRAL, parallel=False).read(text)
    assert [c["function"]["name"] for c in calls] == ["get_weather"]
    assert len(MISTRAL.new_id()) == 9 and MISTRAL.new_id().isalnum()  # Mistral's templates want these ids


@pytest.mark.parametrize("fmt, good, bad", [
    (HERMES, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n<tool_call>\n'
     '{"name": "get_time", "arguments": {}}\n</tool_call>',
     '<tool_call>\n{"name": "get_weather", "arguments": {"town": "Paris"}}\n</tool_call>'),
    (LLAMA3, '{"name": "get_time", "parameters": {}}', '{"name": "get_time", "arguments": {}}'),
    (MISTRAL, '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", '
     '"arguments": {}}]', '[TOOL_CALLS][{"name": "get_date", "arguments": {}}]'),
])
def test_the_call_grammar_takes_calls_and_only_calls(tiny_program, fmt, good, bad):
    tokenizer = Tokenizer(tiny_program)
    grammar = compile_returns({"lark": call_grammar(fmt, TOOLS, True)}, tokenizer, 384)
    assert grammar.matches(good) and not grammar.matches(bad)
    one = compile_returns({"lark": call_grammar(fmt, TOOLS, False)}, tokenizer, 384)
    assert not one.matches(good) or fmt is LLAMA3  # one call only


def test_a_marker_that_is_one_token_is_emitted_as_that_token(tiny_program):
    tokenizer = Tokenizer(tiny_program)
    marker = tokenizer.token_to_id("<|im_start|>")  # a special token standing in for [TOOL_CALLS]
    token_id = {"[TOOL_CALLS]": marker}.get
    grammar = compile_returns({"lark": call_grammar(MISTRAL, TOOLS, True, token_id)}, tokenizer, 384)
    assert grammar.start().allowed().nonzero()[0].tolist() == [marker]


def test_a_text_stream_keeps_the_special_tokens_it_is_told_to(tiny_program):
    tokenizer = Tokenizer(tiny_program)
    marker = tokenizer.token_to_id("<|im_start|>")
    ids = [*tokenizer.encode("Hello", add_special_tokens=False), marker, *tokenizer.encode("[1]",
                                                                                          add_special_tokens=False)]
    plain, kept = TextStream(tokenizer), TextStream(tokenizer, keep={marker: "<|im_start|>"})
    assert plain.add(ids) + plain.finish() == "Hello[1]"
    assert "".join(kept.add([i]) for i in ids) + kept.finish() == "Hello<|im_start|>[1]"
