"""OpenAI's deprecated ``functions`` / ``function_call`` through ``paw serve``, as older clients
send them: served on the tools path, answered in the legacy form (``apps/serve/legacy.py``).

The tiny Hermes-style model of ``test_serve_tools.py``; a named ``function_call`` constrains
decoding to a call, and a scripted engine stands in for a model that calls by itself.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest

import paw_mlx
from apps.serve.app import ServeConfig, create_app
from apps.serve.runner import BackgroundServer
from paw_mlx.engine import Engine, EngineConfig, ModelCatalog
from tests.apps.test_serve_tools import ASK, SCRIPT, TOOLS, WAIT, assert_valid_call
from tests.serving import ScriptedEngine, export_hermes

FUNCTIONS = [tool["function"] for tool in TOOLS]
CALLED = {"role": "assistant", "content": None,
          "function_call": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}}
RESULT = {"role": "function", "name": "get_weather", "content": "18 C, sunny"}


@pytest.fixture(scope="module")
def catalog(tiny_tokenizer, tmp_path_factory):
    catalog = ModelCatalog()
    catalog.add_base(paw_mlx.load(export_hermes(tiny_tokenizer, tmp_path_factory.mktemp("legacy") / "hermes")),
                     name="hermes")
    return catalog


@pytest.fixture(scope="module")
def server(catalog):
    app = create_app(catalog, Engine(EngineConfig(max_rows=4, prefill_chunk=64)), ServeConfig(max_tokens=400))
    with BackgroundServer(app) as running:
        yield running


def client_of(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0, timeout=WAIT)


def streamed(client, **request) -> tuple[str, dict | None, str, list]:
    """(content, the function call joined from its deltas, finish reason, the chunks' tool_calls)."""
    content, call, reason, tool_calls = "", None, None, []
    for chunk in client.chat.completions.create(stream=True, **request):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            tool_calls += choice.delta.tool_calls or []
            if choice.delta.function_call is not None:
                call = call or {"name": "", "arguments": ""}
                call["name"] += choice.delta.function_call.name or ""
                call["arguments"] += choice.delta.function_call.arguments or ""
            reason = choice.finish_reason or reason
    return content, call, reason, tool_calls


def test_a_named_function_call_is_answered_as_function_call(server):
    client = client_of(server)
    request = dict(model="hermes", messages=ASK, functions=FUNCTIONS, function_call={"name": "get_time"})
    choice = client.chat.completions.create(**request).choices[0]
    assert choice.finish_reason == "function_call"
    assert choice.message.tool_calls is None and choice.message.content is None
    call = choice.message.function_call
    assert call.name == "get_time"
    arguments = assert_valid_call(call.name, call.arguments)
    content, joined, reason, tool_calls = streamed(client, **request)
    assert (content, reason, tool_calls) == ("", "function_call", [])
    assert joined["name"] == "get_time" and json.loads(joined["arguments"]) == arguments


def test_auto_returns_the_first_call_a_model_writes(catalog):
    """The model writes two calls; the legacy reply holds one, streamed and not."""
    engine = ScriptedEngine(catalog.get("hermes").base.tokenizer, SCRIPT)
    with BackgroundServer(create_app(catalog, engine, ServeConfig())) as running:
        client = client_of(running)
        for function_call in ({}, {"function_call": "auto"}):
            request = dict(model="hermes", messages=ASK, functions=FUNCTIONS, **function_call)
            choice = client.chat.completions.create(**request).choices[0]
            assert choice.finish_reason == "function_call" and choice.message.content == "Let me look."
            assert choice.message.tool_calls is None
            assert choice.message.function_call.name == "get_weather"
            assert json.loads(choice.message.function_call.arguments) == {"city": "Paris", "unit": "c"}
            content, call, reason, tool_calls = streamed(client, **request)
            assert (content, reason, tool_calls) == ("Let me look. ", "function_call", [])
            assert (call["name"], json.loads(call["arguments"])) == ("get_weather", {"city": "Paris", "unit": "c"})
        text = client.chat.completions.create(model="hermes", messages=ASK, functions=FUNCTIONS,
                                              function_call="none").choices[0]
        assert text.message.content == SCRIPT and text.finish_reason == "stop"
        assert text.message.function_call is None and text.message.tool_calls is None


def test_legacy_calls_and_results_render_as_tool_calls_and_results(server, catalog):
    modern = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": CALLED["function_call"]}]},
        {"role": "tool", "tool_call_id": "call_1", "content": RESULT["content"]}]
    model = catalog.get("hermes")
    ids = model.chat_ids(modern, tools=TOOLS)
    prompt = model.base.tokenizer.decode(ids)
    assert '"arguments": {"city": "Paris", "unit": "c"}' in prompt and "<tool_response>\n18 C, sunny\n" in prompt
    reply = client_of(server).chat.completions.create(model="hermes", messages=[*ASK, CALLED, RESULT],
                                                      functions=FUNCTIONS, max_tokens=2)
    assert reply.usage.prompt_tokens == len(ids)


BAD = [
    ("tools and functions", {"tools": TOOLS, "functions": FUNCTIONS}, "functions",
     "send either tools or the deprecated functions, not both"),
    ("tool_choice and function_call", {"functions": FUNCTIONS, "function_call": "auto", "tool_choice": "auto"},
     "function_call", "send either tool_choice or the deprecated function_call, not both"),
    ("a function not offered", {"functions": FUNCTIONS, "function_call": {"name": "nope"}}, "function_call",
     "names function 'nope', which is not among the functions"),
    ("a named function without functions", {"function_call": {"name": "get_time"}}, "function_call",
     "the request offers no functions"),
    ("an unknown function_call", {"functions": FUNCTIONS, "function_call": "required"}, "function_call",
     "function_call"),
    ("a schema llguidance refuses", {"functions": [{"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "nonsense"}}}}], "function_call": {"name": "f"}}, "functions",
     "Invalid type: nonsense"),  # the tools path's refusals name the field sent
    ("a schema whose grammar gives up while generating", {"functions": [{"name": "f", "parameters": {"$ref": "#"}}],
                                                          "function_call": {"name": "f"}, "max_tokens": 20},
     "functions", "the output constraint failed"),
    ("a function without a name", {"functions": [{"parameters": {}}]}, "functions.0.name", "required"),
    ("a result without its function's name", {"messages": [*ASK, CALLED, {"role": "function", "content": "x"}]},
     "messages", "messages[2] has role function and needs the name"),
    ("a user message with a call", {"messages": [{**CALLED, "role": "user", "content": "hi"}]}, "messages",
     "only an assistant message calls a function"),
    ("a message with both kinds of call", {"messages": [*ASK, {**CALLED, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]}]}, "messages",
     "has both tool_calls and the deprecated function_call"),
]


@pytest.mark.parametrize("name, fields, param, says", BAD, ids=[b[0] for b in BAD])
def test_bad_legacy_requests_are_a_400_naming_the_field_sent(server, name, fields, param, says):
    body = {"model": "hermes", "messages": ASK, "max_tokens": 2, **fields}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=WAIT)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and says in error["message"] and "\n" not in error["message"]


def test_an_empty_list_of_either_kind_is_no_contradiction(server):
    """Some clients send ``functions: []`` or ``tools: []`` by default, beside the other kind."""
    client = client_of(server)
    modern = client.chat.completions.create(model="hermes", messages=ASK, tools=TOOLS, functions=[],
                                            tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert modern.choices[0].finish_reason == "tool_calls" and modern.choices[0].message.function_call is None
    legacy = client.chat.completions.create(model="hermes", messages=ASK, functions=FUNCTIONS, tools=[],
                                            function_call={"name": "get_time"})
    assert legacy.choices[0].finish_reason == "function_call" and legacy.choices[0].message.tool_calls is None
