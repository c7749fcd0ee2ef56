"""``paw serve`` on a hybrid program (tests/archs.py's tiny LFM2: conv states beside the KV cache).

Its rows run solo, each on its own state (``paw_mlx/engine/engine.py``): concurrent requests
get exactly what ``paw_mlx.generate`` gives each alone, and everything else the server does
still holds. One loopback server for the module; every wait is bounded.
"""

from __future__ import annotations

import threading

import httpx
import openai
import pytest

import paw_mlx
from apps.serve.app import ServeConfig, create_app
from apps.serve.runner import BackgroundServer
from paw_mlx.engine import Engine, EngineConfig, ModelCatalog
from tests.apps.test_serve import endless_bias, wait_for_rows

WAIT = 60.0
MAX = 12
#: long enough that its prefill runs in several chunks (prefill_chunk below) through the conv states
LONG = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen"


@pytest.fixture(scope="module")
def base(hybrid_program):
    return paw_mlx.load(hybrid_program)


@pytest.fixture(scope="module")
def digits(hybrid_program, tmp_path_factory):
    """A compiled few-shot program on the hybrid base."""
    out = tmp_path_factory.mktemp("hybrid-programs") / "digits"
    examples = [{"input": "one", "output": "1"}, {"input": "two", "output": "2"}, {"input": "three", "output": "3"}]
    paw_mlx.compile("Write the number as digits.", base=hybrid_program, out_dir=out, examples=examples,
                    max_new_tokens=8)
    return out


@pytest.fixture(scope="module")
def server(base, digits):
    catalog = ModelCatalog()
    catalog.add_base(base, name="hybrid")
    catalog.add_program(digits, name="digits")
    engine = Engine(EngineConfig(max_rows=4, prefill_chunk=8, idle_prefill_chunk=8))
    app = create_app(catalog, engine, ServeConfig(max_tokens=400))
    with BackgroundServer(app) as running:
        running.engine = engine
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=WAIT)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=WAIT) as c:
        yield c


def test_it_is_listed(client):
    assert sorted(m.id for m in client.models.list().data) == ["digits", "hybrid"]


def test_two_concurrent_requests_each_get_what_generate_gives_alone(server, base, http):
    prompts = [LONG, "Hello there, how are you?"]
    want = [paw_mlx.generate(base, p, max_tokens=MAX, raw=True) for p in prompts]
    assert want[0] != want[1]
    got: list = [None, None]
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=WAIT)
    steps = server.engine.steps

    def call(i: int) -> None:
        got[i] = client.completions.create(model="hybrid", prompt=prompts[i], max_tokens=MAX).choices[0].text

    threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert got == want
    stats = http.get("/health").json()
    # no prompt cache for a recurrent program: nothing kept, nothing reused
    assert stats["prompt_cache_entries"] == 0 and stats["prompt_cache_hits"] == 0
    assert server.engine.steps > steps


def test_chat_streamed_equals_not_streamed_and_generate(client, base):
    messages = [{"role": "user", "content": LONG}]
    want = paw_mlx.generate(base, LONG, max_tokens=MAX)
    reply = client.chat.completions.create(model="hybrid", messages=messages, max_tokens=MAX)
    assert reply.choices[0].message.content == want
    assert reply.usage.prompt_tokens_details is None or not reply.usage.prompt_tokens_details.cached_tokens
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="hybrid", messages=messages, max_tokens=MAX, stream=True) if c.choices)
    assert streamed == want


def test_stop_strings_max_tokens_and_logprobs(client, base):
    full = paw_mlx.generate(base, LONG, max_tokens=24, raw=True)
    stop = full[5:8]
    cut = full[: full.find(stop)]
    reply = client.completions.create(model="hybrid", prompt=LONG, max_tokens=24, stop=[stop])
    assert reply.choices[0].text == cut and reply.choices[0].finish_reason == "stop"
    short = client.completions.create(model="hybrid", prompt=LONG, max_tokens=3, logprobs=2,
                                      extra_body={"logit_bias": endless_bias(base)})
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"
    assert len(short.choices[0].logprobs.token_logprobs) == 3


def test_response_format_constrains_the_answer(client):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
              "additionalProperties": False}
    reply = client.chat.completions.create(
        model="hybrid", messages=[{"role": "user", "content": "A number?"}], max_tokens=40,
        response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}})
    import json

    assert set(json.loads(reply.choices[0].message.content)) == {"n"}


def test_a_disconnect_mid_stream_frees_the_engine_for_the_next_request(http, client, base):
    body = {"model": "hybrid", "prompt": "Hello", "max_tokens": 200, "stream": True,
            "logit_bias": endless_bias(base)}
    with http.stream("POST", "/v1/completions", json=body) as stream:
        lines = stream.iter_lines()
        for _ in range(4):
            next(lines)
        running = http.get("/health").json()
        assert running["rows"] == 1 and running["kv_bytes"] > 0  # the row's own KV caches and conv states
    wait_for_rows(http, 0)
    want = paw_mlx.generate(base, "Hello", max_tokens=MAX, raw=True)
    assert client.completions.create(model="hybrid", prompt="Hello", max_tokens=MAX).choices[0].text == want


def test_a_compiled_program_answers_as_its_function_from_a_copy_of_its_prefix_state(server, digits, hybrid_program):
    """Requests start from copies of the program's prefix state (its tokens are cached ones), side
    by side, and each answer is the function's."""
    f = paw_mlx.function(digits, base=hybrid_program)
    inputs = ["four five six", "seven", "eight"]
    want = [f(text) for text in inputs]
    assert len(set(want)) > 1
    got: list = [None] * len(inputs)
    cached: list = [None] * len(inputs)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=WAIT)

    def call(i: int) -> None:
        reply = client.chat.completions.create(model="digits", messages=[{"role": "user", "content": inputs[i]}])
        got[i], cached[i] = reply.choices[0].message.content, reply.usage.prompt_tokens_details.cached_tokens

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert got == want
    assert cached == [f.artifact.prefix_length] * len(inputs)
    assert client.completions.create(model="digits", prompt=inputs[0]).choices[0].text == want[0]


def test_paw_serves_catalog_takes_the_hybrid_base_and_its_programs(hybrid_program, digits):
    """What ``paw serve BASE --programs DIR`` loads: the base and the program on it, nothing skipped."""
    from apps.serve.runner import build_catalog

    skipped: list[str] = []
    catalog = build_catalog([hybrid_program], [digits.parent], warn=skipped.append)
    assert sorted(m.name for m in catalog) == ["digits", hybrid_program.name] and skipped == []
    assert catalog.get("digits").prefix_state is not None
