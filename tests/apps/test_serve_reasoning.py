"""Reasoning and harmony through ``paw serve``: a tiny model whose tokenizer has the think and
harmony markers as special tokens, under two small templates (DeepSeek-R1's style, opening
``<think>`` in the generation prompt, and gpt-oss's harmony), read by the ``openai`` client.

A scripted engine writes the replies a reasoning model would; the real engine checks that a
forced call is one in each format, and that it is not swallowed as reasoning by a prompt that
opened a think block.
"""

from __future__ import annotations

import json

import jsonschema_rs
import openai
import pytest

import paw_mlx
from apps.serve import harmony
from apps.serve.app import ServeConfig, create_app
from apps.serve.runner import BackgroundServer
from paw_mlx.engine import Engine, EngineConfig, ModelCatalog
from tests.serving import ScriptedEngine

WAIT = 60.0
MARKERS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<|start|>", "<|channel|>", "<|message|>",
           "<|end|>", "<|call|>", "<|return|>", "<|constrain|>"]

#: DeepSeek-R1's distills' structure, shortened: the generation prompt opens the think block;
#: tools as Hermes blocks
THINK_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}"
    "Call as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call><|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message.role }}\n"
    "{% if message.role == 'assistant' %}{% if message.reasoning_content %}<think>\n{{ message.reasoning_content }}"
    "\n</think>\n\n{% endif %}{{ message.content.split('</think>')[-1] }}"
    "{% else %}{{ message.content }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n"
    "{% if enable_thinking is defined and not enable_thinking %}\n</think>\n\n{% endif %}{% endif %}"
)
#: gpt-oss's structure, shortened
HARMONY_TEMPLATE = (
    "{% if tools %}<|start|>developer<|message|>namespace functions {\n{% for tool in tools %}"
    "{{ tool | tojson }}\n{% endfor %}}<|end|>{% endif %}"
    "{% for message in messages %}{% if message.role == 'assistant' %}"
    "{% for call in message.tool_calls or [] %}<|start|>assistant to=functions.{{ call.function.name }}"
    "<|channel|>commentary json<|message|>{{ call.function.arguments | tojson }}<|call|>{% endfor %}"
    "{% if message.content %}<|start|>assistant<|channel|>final<|message|>{{ message.content }}<|end|>{% endif %}"
    "{% else %}<|start|>{{ message.role }}<|message|>{{ message.content }}<|end|>{% endif %}{% endfor %}"
    "{% if reasoning_effort is defined %}<|start|>system<|message|>Reasoning: {{ reasoning_effort }}<|end|>{% endif %}"
    "{% if add_generation_prompt %}<|start|>assistant{% endif %}"
)
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "Weather in Paris?"}]
ARGS = '{"city": "Paris", "unit": "c"}'


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    """The tiny model, its tokenizer with the markers as special tokens, under both templates."""
    from tests.tiny import export_tiny, make_tokenizer, tiny_llama_config

    tokenizer = make_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": MARKERS})
    root = tmp_path_factory.mktemp("reasoning")
    think = export_tiny(tiny_llama_config(vocab_size=400, max_position_embeddings=1024), root / "think",
                        tokenizer=tokenizer)
    catalog = ModelCatalog()
    catalog.add_base(paw_mlx.load(_with_template(think, THINK_TEMPLATE)), name="think")
    harmony = root / "harmony"
    harmony.mkdir()
    for path in think.iterdir():
        (harmony / path.name).symlink_to(path)
    catalog.add_base(paw_mlx.load(_with_template(harmony, HARMONY_TEMPLATE)), name="harmony")
    return catalog


def _with_template(directory, template: str):
    (directory / "chat_template.jinja").unlink(missing_ok=True)
    (directory / "chat_template.jinja").write_text(template, encoding="utf-8")
    return directory


def served(catalog, engine):
    return BackgroundServer(create_app(catalog, engine, ServeConfig(max_tokens=300)))


def client_of(running) -> openai.OpenAI:
    return openai.OpenAI(base_url=running.url + "/v1", api_key="-", max_retries=0, timeout=WAIT)


def streamed(client, **request) -> tuple[str, str, list[dict], str]:
    """(reasoning, content, calls, finish reason) of a streamed reply, its deltas joined."""
    reasoning, content, calls, reason = "", "", {}, None
    for chunk in client.chat.completions.create(stream=True, **request):
        for choice in chunk.choices:
            reasoning += getattr(choice.delta, "reasoning_content", None) or ""
            content += choice.delta.content or ""
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"name": "", "arguments": ""})
                call["name"] += delta.function.name or ""
                call["arguments"] += delta.function.arguments or ""
            reason = choice.finish_reason or reason
    return reasoning, content, [calls[i] for i in sorted(calls)], reason


SCRIPTS = [
    ("think", "The user asks about Paris.\n</think>\n\nIt is sunny.", None,
     ("The user asks about Paris.", "It is sunny.", [], "stop")),
    ("think", "Cut short while thinking", None, ("Cut short while thinking", "", [], "stop")),
    ("think", f'I need the tool.\n</think>\n\n<tool_call>\n{{"name": "get_weather", "arguments": {ARGS}}}\n'
     "</tool_call>", [WEATHER], ("I need the tool.", None, [("get_weather", ARGS)], "tool_calls")),
    ("harmony", "<|channel|>analysis<|message|>Simple question.<|end|><|start|>assistant<|channel|>final"
     "<|message|>It is sunny.<|return|>", None, ("Simple question.", "It is sunny.", [], "stop")),
    ("harmony", "<|channel|>analysis<|message|>Use the tool.<|end|><|start|>assistant<|channel|>commentary "
     f"to=functions.get_weather <|constrain|>json<|message|>{ARGS}<|call|>", [WEATHER],
     ("Use the tool.", None, [("get_weather", ARGS)], "tool_calls")),
]


@pytest.mark.parametrize("model, script, tools, want", SCRIPTS,
                         ids=["think", "think-unterminated", "think-call", "harmony", "harmony-call"])
def test_reasoning_content_and_calls_whole_and_streamed(catalog, model, script, tools, want):
    reasoning, content, calls, reason = want
    engine = ScriptedEngine(catalog.get(model).base.tokenizer, script)
    with served(catalog, engine) as running:
        client = client_of(running)
        request = dict(model=model, messages=ASK, **({"tools": tools} if tools else {}))
        reply = client.chat.completions.create(**request).choices[0]
        message = reply.message
        assert (message.reasoning_content, message.content, reply.finish_reason) == (reasoning, content, reason)
        assert [(c.function.name, c.function.arguments) for c in message.tool_calls or []] == \
            [(name, json.dumps(json.loads(arguments))) for name, arguments in calls]
        got = streamed(client, **request)
        assert got[0] == reasoning and got[1] == (content or "") and got[3] == reason
        assert [(c["name"], json.loads(c["arguments"])) for c in got[2]] == \
            [(name, json.loads(arguments)) for name, arguments in calls]


def test_reasoning_sent_back_reaches_the_template(catalog):
    """A client sends the reply back as it got it: its reasoning_content renders (Qwen3's
    templates show it for the turns of a tool-calling loop)."""
    turn = [*ASK, {"role": "assistant", "content": "It is sunny.", "reasoning_content": "Paris in June."},
            {"role": "user", "content": "Thanks"}]
    model = catalog.get("think")
    ids = model.chat_ids(turn)
    assert "<think>\nParis in June.\n</think>\n\nIt is sunny." in model.base.tokenizer.decode(ids)
    engine = ScriptedEngine(model.base.tokenizer, "Fine.</think>You are welcome.")
    with served(catalog, engine) as running:
        reply = client_of(running).chat.completions.create(model="think", messages=turn)
    assert reply.usage.prompt_tokens == len(ids) and reply.choices[0].message.content == "You are welcome."


@pytest.mark.parametrize("model", ["think", "harmony"])
def test_a_forced_call_is_a_call_in_the_models_format(catalog, model, monkeypatch):
    """The random model under the call grammar: the call parses, fits its schema, and is not
    read as reasoning although the think model's prompt opened a block. (Harmony's grammar lets
    an analysis message come first, which the random model takes: bounded here to what fits in
    ``max_tokens``, so that it must call.)"""
    monkeypatch.setattr(harmony, "ANALYSIS_CHARS", 40)
    if model == "think":
        prompt = catalog.get(model).base.tokenizer.decode(catalog.get(model).chat_ids(ASK), skip_special_tokens=False)
        assert prompt.endswith("<|im_start|>assistant\n<think>\n")
    with served(catalog, Engine(EngineConfig(max_rows=4, prefill_chunk=64))) as running:
        reply = client_of(running).chat.completions.create(
            model=model, messages=ASK, tools=[WEATHER], max_tokens=200,
            tool_choice={"type": "function", "function": {"name": "get_weather"}}).choices[0]
    assert reply.finish_reason == "tool_calls"
    assert len(reply.message.reasoning_content or "") <= (40 if model == "harmony" else 0)
    (call,) = reply.message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema_rs.validate(WEATHER["function"]["parameters"], json.loads(call.function.arguments))


FORCED = [{"type": "function", "function": {"name": "get_weather"}}, "required"]


@pytest.mark.parametrize("choice", FORCED, ids=["named", "required"])
def test_a_forced_harmony_call_may_reason_first(catalog, choice):
    """gpt-oss reasons on the analysis channel before it calls: the call grammar takes the
    script's analysis (the scripted engine checks every token against it), which becomes
    reasoning_content, whole and streamed."""
    script = (f"<|channel|>analysis<|message|>Paris, in Celsius.<|end|><|start|>assistant<|channel|>commentary "
              f"to=functions.get_weather <|constrain|>json<|message|>{ARGS}")
    engine = ScriptedEngine(catalog.get("harmony").base.tokenizer, script)
    with served(catalog, engine) as running:
        client = client_of(running)
        request = dict(model="harmony", messages=ASK, tools=[WEATHER], tool_choice=choice)
        reply = client.chat.completions.create(**request).choices[0]
        assert (reply.message.reasoning_content, reply.message.content, reply.finish_reason) == \
            ("Paris, in Celsius.", None, "tool_calls")
        assert [(c.function.name, json.loads(c.function.arguments)) for c in reply.message.tool_calls] == \
            [("get_weather", json.loads(ARGS))]
        reasoning, content, calls, reason = streamed(client, **request)
        assert (reasoning, content, reason) == ("Paris, in Celsius.", "", "tool_calls")
        assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_weather", json.loads(ARGS))]


@pytest.mark.parametrize("budget", ["max_tokens", "max_completion_tokens"])
def test_a_forced_call_the_budget_cuts_short_is_an_error(catalog, budget):
    """A reply that spent its max_tokens on its analysis has no call to return: a 400 naming the
    budget (streamed: an error event), not a reply that reads as an answer."""
    engine = ScriptedEngine(catalog.get("harmony").base.tokenizer,
                            "<|channel|>analysis<|message|>Let me think about Paris and", finish_reason="length")
    with served(catalog, engine) as running:
        client = client_of(running)
        request = dict(model="harmony", messages=ASK, tools=[WEATHER], tool_choice="required", **{budget: 12})
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(**request)
        assert bad.value.param == budget and "before the forced tool call was complete" in bad.value.message
        with pytest.raises(openai.APIError) as streamed_bad:
            streamed(client, **request)
        assert "before the forced tool call was complete" in streamed_bad.value.message
        auto = client.chat.completions.create(**{**request, "tool_choice": "auto"}).choices[0]
        assert auto.finish_reason == "length" and auto.message.reasoning_content  # not forced: cut short as usual


def test_chat_template_kwargs_and_reasoning_effort_reach_the_template(catalog):
    """Qwen3's ``enable_thinking: false`` closes the think block in the prompt, so the reply is
    all answer; ``reasoning_effort`` reaches gpt-oss's template; paw's own variables are refused."""
    engine = ScriptedEngine(catalog.get("think").base.tokenizer, "It is sunny.")
    with served(catalog, engine) as running:
        client = client_of(running)
        thinking = client.chat.completions.create(model="think", messages=ASK).choices[0].message
        assert (thinking.reasoning_content, thinking.content) == ("It is sunny.", "")
        plain = client.chat.completions.create(model="think", messages=ASK,
                                               extra_body={"chat_template_kwargs": {"enable_thinking": False}})
        message = plain.choices[0].message
        assert message.content == "It is sunny." and getattr(message, "reasoning_content", None) is None
        usage = [client.chat.completions.create(model="harmony", messages=ASK, **effort).usage.prompt_tokens
                 for effort in ({}, {"reasoning_effort": "high"})]
        tokenizer = catalog.get("harmony").base.tokenizer
        added = tokenizer.encode("<|start|>system<|message|>Reasoning: high<|end|>", add_special_tokens=False)
        assert usage[1] - usage[0] == len(added)
        for kwargs in ({"messages": []}, {"add_generation_prompt": False}, {"not a name": 1}):
            with pytest.raises(openai.BadRequestError) as bad:
                client.chat.completions.create(model="think", messages=ASK,
                                               extra_body={"chat_template_kwargs": kwargs})
            assert bad.value.param == "chat_template_kwargs" and "\n" not in bad.value.message
