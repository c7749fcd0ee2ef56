"""Tool-call formats on fixed texts: detection from a template, parsing, streaming hold-back,
and the grammars that make a constrained reply a call."""

from __future__ import annotations

import json

import pytest

from apps.serve.harmony import ANALYSIS_CHARS, HARMONY, parse_harmony
from apps.serve.tool_calls import HERMES, LLAMA3, MISTRAL, MISTRAL_V11, ToolCall, call_grammar, detect_format
from apps.serve.tools import CallScanner, ToolPlan
from apps.serve.xml_calls import QWEN3_CODER
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
    ("{{- '[TOOL_CALLS]' + tool_call.function.name }}{{- '[ARGS]' + arguments|tojson }}", MISTRAL_V11),
    ("<tool_call>\n<function={{ tool_call.name }}>\n<parameter={{ name }}>", QWEN3_CODER),
    ("<|start|>assistant to=functions.{{ name }}<|channel|>commentary json<|message|>", HARMONY),
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


V11 = 'Sure.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}'


@pytest.mark.parametrize("text, content, calls", [
    (V11, "Sure.", [WEATHER]),
    ('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{}', "",
     [WEATHER, ToolCall("get_time", {})]),
    ('[TOOL_CALLS]get_time[CALL_ID]a1B2c3D4e[ARGS]{}', "", [ToolCall("get_time", {})]),  # Magistral's call ids
    ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]', "", [WEATHER]),  # the older form
])
def test_mistral_v11_calls_parse(text, content, calls):
    assert MISTRAL_V11.parse(text, NAMES) == (content, calls)


@pytest.mark.parametrize("text", [
    '[TOOL_CALLS]rm_rf[ARGS]{}',  # not offered
    '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{"zone"',  # one broken: none
    '[TOOL_CALLS]get_weather[ARGS]["Paris"]',  # arguments not an object
])
def test_what_is_not_a_mistral_v11_call_stays_text(text):
    assert MISTRAL_V11.parse(text, NAMES) == (text, [])


FORECAST = {"type": "object", "properties": {
    "city": {"type": "string"}, "days": {"type": "integer"}, "hourly": {"type": "boolean"},
    "threshold": {"type": "number"}, "tags": {"type": "array", "items": {"type": "string"}},
    "where": {"type": "object"}, "note": {"type": ["string", "null"]}, "unit": {"enum": ["c", "f"]}}}


def xml_call(name: str, **values: str) -> str:
    parameters = "".join(f"<parameter={key}>\n{value}\n</parameter>\n" for key, value in values.items())
    return f"<tool_call>\n<function={name}>\n{parameters}</function>\n</tool_call>"


def test_qwen3_coder_values_are_typed_by_the_schema():
    text = "Checking.\n" + xml_call("forecast", city="2024", days="3", hourly="True", threshold="0.5",
                                       tags='["a", "b"]', where='{"lat": 1}', note="null", unit="c", extra="x")
    content, calls = QWEN3_CODER.parse(text, {"forecast": FORECAST})
    assert content == "Checking.\n"
    assert calls == [ToolCall("forecast", {"city": "2024", "days": 3, "hourly": True, "threshold": 0.5,
                                           "tags": ["a", "b"], "where": {"lat": 1}, "note": None, "unit": "c",
                                           "extra": "x"})]


def test_qwen3_coder_keeps_multiline_text_and_reads_parallel_calls():
    code = "def f(x):\n    return x < 1\n"
    text = xml_call("forecast", city=code, days="seven") + "\n" + xml_call("get_time")
    _, calls = QWEN3_CODER.parse(text, {"forecast": FORECAST, "get_time": {}})
    # a value that does not read as its type stays text
    assert calls == [ToolCall("forecast", {"city": code, "days": "seven"}), ToolCall("get_time", {})]
    unclosed = "<tool_call>\n<function=get_time>\n<parameter=zone>\nCET"  # the model stopped after its value
    assert QWEN3_CODER.parse(unclosed, {"get_time": {}}) == ("", [ToolCall("get_time", {"zone": "CET"})])
    not_offered = xml_call("rm_rf", path="/")
    assert QWEN3_CODER.parse(not_offered, {"get_time": {}}) == (not_offered, [])


@pytest.mark.parametrize("fmt, text, before", [
    (MISTRAL_V11, V11, "Sure."),
    (QWEN3_CODER, "Let me look. " + xml_call("get_weather", city="Paris"), "Let me look. "),
])
def test_new_formats_stream_text_and_hold_the_call(fmt, text, before):
    shown, rest, calls = scan(fmt, text)
    assert "".join(shown) == before and rest == ""
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
        [("get_weather", {"city": "Paris"})]
    if fmt is MISTRAL_V11:
        assert len(calls[0]["id"]) == 9 and calls[0]["id"].isalnum()


@pytest.mark.parametrize("fmt, good, bad", [
    (MISTRAL_V11, '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{}',
     '[TOOL_CALLS]get_weather[ARGS]{"town": "Paris"}'),
    (QWEN3_CODER, xml_call("get_weather", city="Paris") + "\n" + xml_call("get_time"),
     xml_call("get_weather", town="Paris")),
    (HARMONY, '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}',
     '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{}'),
])
def test_new_call_grammars_take_calls_and_only_calls(tiny_program, fmt, good, bad):
    tokenizer = Tokenizer(tiny_program)
    grammar = compile_returns({"lark": call_grammar(fmt, TOOLS, fmt is not HARMONY)}, tokenizer, 384)
    assert grammar.matches(good) and not grammar.matches(bad)


def test_qwen3_coder_grammar_types_each_value(tiny_program):
    tools = [{"type": "function", "function": {"name": "forecast", "parameters": {**FORECAST, "required": ["city"]}}}]
    grammar = compile_returns({"lark": call_grammar(QWEN3_CODER, tools, False)}, Tokenizer(tiny_program), 384)
    assert grammar.matches(xml_call("forecast", city="Paris", days="3", unit="f"))
    assert not grammar.matches(xml_call("forecast", city="Paris", days="three"))
    assert not grammar.matches(xml_call("forecast", city="Paris", unit="k"))
    assert not grammar.matches(xml_call("forecast", days="3"))  # city is required


CODE = {"type": "object", "properties": {
    "path": {"type": "string", "maxLength": 12}, "body": {"type": "string", "maxLength": 5000},  # bounds small, large
    "level": {"enum": [1, "3"]}, "mode": {"const": "fast"}, "note": {"type": ["string", "null"]}}, "required": ["body"]}
CODE_TOOLS = [{"type": "function", "function": {"name": "write", "parameters": CODE}}]
SOURCE = "if x < 1 and y <= 2:\n    print('<b>', \"</param\")\n\n"


@pytest.mark.parametrize("values, arguments", [
    ({"body": SOURCE}, {"body": SOURCE}),
    ({"path": "a<b.py", "body": "<parameter", "note": "null"}, {"path": "a<b.py", "body": "<parameter", "note": None}),
    ({"body": "x", "level": "1", "mode": "fast"}, {"body": "x", "level": 1, "mode": "fast"}),
    ({"body": "x", "level": '"3"'}, {"body": "x", "level": "3"}),  # "3" would read back as the number
])
def test_qwen3_coder_grammar_takes_any_text_a_value_reads_back_as(tiny_program, values, arguments):
    """A string value is any text but what ends it when the reply is read back (it was text
    without "<"); enums and consts of any type are written so that they read back as themselves."""
    grammar = compile_returns({"lark": call_grammar(QWEN3_CODER, CODE_TOOLS, False)}, Tokenizer(tiny_program), 384)
    text = xml_call("write", **values)
    assert grammar.matches(text)
    assert QWEN3_CODER.parse(text, {"write": CODE}) == ("", [ToolCall("write", arguments)])


@pytest.mark.parametrize("values", [
    {"body": "a </parameter> b"}, {"body": "a <parameter=path> b"}, {"body": "<tool_call>"}, {"body": "</tool_call>"},
    {"path": "much/too/long.py", "body": "x"}, {"body": "x", "level": "3"}, {"body": "x", "level": "2"},
    {"body": "x", "mode": "slow"},
], ids=["closing", "next parameter", "call", "call end", "maxLength", "3 untyped", "not in enum", "const"])
def test_qwen3_coder_grammar_refuses_values_that_would_not_read_back(tiny_program, values):
    grammar = compile_returns({"lark": call_grammar(QWEN3_CODER, CODE_TOOLS, False)}, Tokenizer(tiny_program), 384)
    assert not grammar.matches(xml_call("write", **values))


HARMONY_CALL = '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}'


def analysis(text: str) -> str:
    return f"<|channel|>analysis<|message|>{text}<|end|><|start|>assistant"


@pytest.mark.parametrize("text, takes", [
    (HARMONY_CALL, True),
    (analysis("The user wants the weather: x < y, a|b, <|message") + HARMONY_CALL, True),
    (analysis("x" * ANALYSIS_CHARS) + HARMONY_CALL, True),
    (analysis("x" * (ANALYSIS_CHARS + 1)) + HARMONY_CALL, False),  # bounded
    (analysis("a") + analysis("b") + HARMONY_CALL, False),  # one analysis message at most
    (analysis("a"), False),  # the call is still forced
    (analysis("a <|start|>assistant b") + HARMONY_CALL, False),  # would read back as two messages
    ("<|channel|>final<|message|>Sunny.<|end|><|start|>assistant" + HARMONY_CALL, False),
], ids=["call", "analysis", "longest", "too long", "two", "no call", "marker inside", "final"])
def test_a_forced_harmony_call_may_follow_one_analysis_message(tiny_program, text, takes):
    """gpt-oss reasons on the analysis channel before it calls; a forced call lets it, once."""
    grammar = compile_returns({"lark": call_grammar(HARMONY, TOOLS, False)}, Tokenizer(tiny_program), 384)
    assert grammar.matches(text) is takes


def test_a_model_that_would_reason_forever_is_made_to_call(tiny_program):
    """Tokens picked as a model that never ends its analysis would pick them (text, not markers,
    whenever the grammar allows): the grammar ends the analysis at its bound and the reply is
    the reasoning and a call."""
    tokenizer = Tokenizer(tiny_program)
    unit = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"unit": {"enum": ["c", "f"]}}, "required": ["unit"],
        "additionalProperties": False}}}]  # arguments of bounded length
    constraint = compile_returns({"lark": call_grammar(HARMONY, unit, False)}, tokenizer, 384).start()
    text_tokens = [t for t in range(384) if "<" not in tokenizer.decode([t]) and "|" not in tokenizer.decode([t])]
    first = tokenizer.encode("<|channel|>analysis<|message|>", add_special_tokens=False)
    ids = []
    for _ in range(3 * ANALYSIS_CHARS):
        allowed = constraint.allowed()
        token = next((t for t in first[len(ids):len(ids) + 1] if allowed[t]), None)
        if token is None:
            token = next((t for t in text_tokens[::-1] if allowed[t]), int(allowed.nonzero()[0][0]))
        constraint.advance(token)
        ids.append(token)
        if constraint.done:
            break
    assert constraint.done and constraint.failure is None
    text = tokenizer.decode(ids)
    reader_text, calls = parse_harmony(text, {"get_weather"})
    assert len(calls) == 1 and reader_text == ""
    body = text.split("<|message|>", 1)[1].split("<|end|>", 1)[0]
    assert len(body) == ANALYSIS_CHARS
