"""Tool calls through ``paw serve``: a tiny random model whose template takes tools (Hermes
style, as Qwen's), driven by the ``openai`` client and raw httpx on a loopback port.

A random model never calls a tool by itself, so these tests use what makes its reply a
call anyway: ``tool_choice`` "required" or a named function constrain decoding to the
call grammar, and the call must then parse and its arguments validate.
"""

from __future__ import annotations

import json

import httpx
import jsonschema_rs
import openai
import pytest

import paw_mlx
from apps.serve.app import ServeConfig, create_app
from apps.serve.runner import BackgroundServer
from paw_mlx.engine import Engine, EngineConfig
from tests.serving import ScriptedEngine, compile_programs, export_hermes, make_catalog

WAIT = 60.0

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Time in a zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 6}},
                   "required": ["zone"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def hermes_program(tiny_tokenizer, tmp_path_factory):
    """A tiny random model with a chat template that takes tools, and room for their
    descriptions (the tiny tokenizer spells JSON almost a character a token)."""
    return export_hermes(tiny_tokenizer, tmp_path_factory.mktemp("hermes") / "hermes")


@pytest.fixture(scope="module")
def catalog(tiny_program, hermes_program, tmp_path_factory):
    base = paw_mlx.load(tiny_program)
    programs = compile_programs(tiny_program, tmp_path_factory.mktemp("tool-programs"))
    catalog = make_catalog(base, {"dates": programs["dates"]})
    catalog.add_base(paw_mlx.load(hermes_program), name="hermes")
    return catalog


@pytest.fixture(scope="module")
def server(catalog):
    app = create_app(catalog, Engine(EngineConfig(max_rows=8, prefill_chunk=64)), ServeConfig(max_tokens=400))
    with BackgroundServer(app) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0, timeout=WAIT)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=WAIT) as c:
        yield c


def assert_valid_call(name: str, arguments: str) -> dict:
    assert name in SCHEMAS
    parsed = json.loads(arguments)
    jsonschema_rs.validate(SCHEMAS[name], parsed)
    return parsed


def streamed(client, **request) -> tuple[str, list[dict], str]:
    """(content, calls, finish reason) of a streamed reply, its deltas joined as clients join them."""
    content, calls, reason = "", {}, None
    for chunk in client.chat.completions.create(stream=True, **request):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
                if delta.id:
                    assert delta.type == "function"
                    call["id"] = delta.id
                call["name"] += delta.function.name or ""
                call["arguments"] += delta.function.arguments or ""
            reason = choice.finish_reason or reason
    return content, [calls[i] for i in sorted(calls)], reason


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}],
                         ids=["required", "named"])
def test_a_required_call_parses_and_its_arguments_fit_the_schema(client, choice):
    request = dict(model="hermes", messages=ASK, tools=TOOLS, tool_choice=choice, parallel_tool_calls=False)
    reply = client.chat.completions.create(**request)
    message = reply.choices[0].message
    assert reply.choices[0].finish_reason == "tool_calls" and message.content is None
    assert len(message.tool_calls) == 1
    call = message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    arguments = assert_valid_call(call.function.name, call.function.arguments)
    if isinstance(choice, dict):
        assert call.function.name == "get_time"
    content, calls, reason = streamed(client, **request)
    assert (content, reason) == ("", "tool_calls")
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [(call.function.name, arguments)]
    assert calls[0]["id"].startswith("call_")


def test_parallel_calls_each_fit_their_schema(client):
    """The random model goes on calling until max_tokens: every complete block is a call."""
    reply = client.chat.completions.create(model="hermes", messages=ASK, tools=TOOLS, tool_choice="required",
                                           max_tokens=240)
    calls = reply.choices[0].message.tool_calls
    assert len(calls) >= 2 and len({c.id for c in calls}) == len(calls)
    for call in calls:
        assert_valid_call(call.function.name, call.function.arguments)


def test_a_call_and_its_result_render_as_the_template_expects(client, catalog):
    arguments = {"city": "Paris", "unit": "c"}
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps(arguments)}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"}]
    model = catalog.get("hermes")
    ids = model.chat_ids(messages, tools=TOOLS)
    prompt = model.base.tokenizer.decode(ids)
    # the arguments reach the template as a dict: written once as JSON, not as a quoted string
    assert '"arguments": {"city": "Paris", "unit": "c"}' in prompt
    assert "<tool_response>\n18 C, sunny\n</tool_response>" in prompt and '"name": "get_time"' in prompt
    reply = client.chat.completions.create(model="hermes", messages=messages, tools=TOOLS, max_tokens=4)
    assert reply.usage.prompt_tokens == len(ids)
    messages[1]["tool_calls"][0]["function"]["arguments"] = arguments  # an object, as some clients send it
    reply = client.chat.completions.create(model="hermes", messages=messages, tools=TOOLS, max_tokens=4)
    assert reply.usage.prompt_tokens == len(ids)


def test_tool_choice_none_leaves_the_tools_out(client, catalog):
    reply = client.chat.completions.create(model="hermes", messages=ASK, tools=TOOLS, tool_choice="none",
                                           max_tokens=4)
    assert reply.usage.prompt_tokens == len(catalog.get("hermes").chat_ids(ASK))
    assert reply.choices[0].message.tool_calls is None and reply.choices[0].finish_reason != "tool_calls"


def test_auto_streams_the_same_reply_it_answers_whole(client):
    request = dict(model="hermes", messages=ASK, tools=TOOLS, max_tokens=24)
    whole = client.chat.completions.create(**request).choices[0]
    content, calls, reason = streamed(client, **request)
    assert (content, reason) == (whole.message.content, whole.finish_reason) and not calls


BAD = [
    ("tool without function", {"tools": [{"type": "function"}]}, "tools.0.function", "is required"),
    ("tool of another type", {"tools": [{"type": "retrieval", "function": WEATHER["function"]}]}, "tools.0.type",
     "'function'"),
    ("function name with a space", {"tools": [{"type": "function", "function": {"name": "get weather"}}]},
     "tools.0.function.name", "pattern"),
    ("parameters not an object", {"tools": [{"type": "function", "function": {"name": "f", "parameters": 3}}]},
     "tools.0.function.parameters", "dictionary"),
    ("two tools of one name", {"tools": [WEATHER, WEATHER]}, "tools", "two tools are named 'get_weather'"),
    ("unknown named function", {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice", "names function 'nope', which is not among the tools"),
    ("unknown tool_choice", {"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "'tool_choice'"),
    ("required without tools", {"tool_choice": "required"}, "tool_choice", "the request offers none"),
    ("response_format with a required call", {"tools": TOOLS, "tool_choice": "required",
                                               "response_format": {"type": "json_object"}}, "response_format",
     "two different replies"),
    ("a schema llguidance refuses", {"tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "nonsense"}}}}}],
        "tool_choice": "required"}, "tools", "Invalid type: nonsense"),
    ("a schema whose grammar gives up while generating", {"tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"$ref": "#"}}}], "tool_choice": "required", "max_tokens": 20}, "tools",
     "the output constraint failed"),  # llguidance's item limit, mid-reply: was a 500 failing the whole batch
    ("arguments that are not JSON", {"messages": [*ASK, {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_time", "arguments": "{zone"}}]}]}, "messages",
     "messages[1].tool_calls[0].function.arguments is not JSON"),
    ("a tool result without its call id", {"messages": [*ASK, {"role": "tool", "content": "x"}]}, "messages",
     "needs the tool_call_id it answers"),
]


@pytest.mark.parametrize("name, fields, param, says", BAD, ids=[b[0] for b in BAD])
def test_malformed_tools_are_a_400_naming_the_field(http, name, fields, param, says):
    r = http.post("/v1/chat/completions", json={"model": "hermes", "messages": ASK, "max_tokens": 2, **fields})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and says in error["message"] and "\n" not in error["message"]


@pytest.mark.parametrize("model, says", [("tiny", "this model's chat template does not take tools"),
                                         ("dates", "tools are served on base models only")])
def test_a_model_that_cannot_take_tools_is_a_400(client, model, says):
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, max_tokens=2)
    assert bad.value.param == "tools" and says in bad.value.message


SCRIPT = ('Let me look. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n'
          '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>')


def test_template_variables_on_a_compiled_program_are_a_400(client):
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="dates", messages=ASK, max_tokens=2,
                                       extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert bad.value.param == "chat_template_kwargs" and "base models only" in bad.value.message


def test_auto_reads_the_calls_a_model_writes_streamed_and_not(catalog):
    engine = ScriptedEngine(catalog.get("hermes").base.tokenizer, SCRIPT)
    with BackgroundServer(create_app(catalog, engine, ServeConfig())) as running:
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="-", max_retries=0, timeout=WAIT)
        request = dict(model="hermes", messages=ASK, tools=TOOLS)
        reply = client.chat.completions.create(**request).choices[0]
        assert reply.finish_reason == "tool_calls" and reply.message.content == "Let me look."
        want = [("get_weather", {"city": "Paris", "unit": "c"}), ("get_time", {"zone": "CET"})]
        assert [(c.function.name, json.loads(c.function.arguments)) for c in reply.message.tool_calls] == want
        content, calls, reason = streamed(client, **request)
        assert (content, reason) == ("Let me look. ", "tool_calls")
        assert [(c["name"], json.loads(c["arguments"])) for c in calls] == want
        one = client.chat.completions.create(**request, parallel_tool_calls=False).choices[0].message.tool_calls
        assert [c.function.name for c in one] == ["get_weather"]
        text = client.chat.completions.create(**request, tool_choice="none").choices[0]
        assert text.message.content == SCRIPT and text.message.tool_calls is None and text.finish_reason == "stop"
