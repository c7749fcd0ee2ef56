"""``paw serve`` on a loopback port, driven by the official ``openai`` client (and raw httpx).

One server per module (tiny model, four compiled programs, an API key); every wait is
bounded, and the server stops when the module ends.
"""

from __future__ import annotations

import gzip
import json
import threading
import time

import httpx
import openai
import pytest

import paw_mlx
from apps.serve.app import ServeConfig, create_app
from apps.serve.runner import BackgroundServer
from paw_mlx.engine import Engine, EngineConfig
from tests.serving import INPUTS, ScriptedEngine, compile_programs, greedy_alone, make_catalog

KEY = "test-key"
SPECS_WITH_CHOICES = "Label the sentiment: positive negative neutral"
WAIT = 60.0
MAX = 10  # tokens per test request


@pytest.fixture(scope="module")
def programs(tiny_program, tmp_path_factory):
    return compile_programs(tiny_program, tmp_path_factory.mktemp("serve-programs"))


@pytest.fixture(scope="module")
def base(tiny_program):
    return paw_mlx.load(tiny_program)


@pytest.fixture(scope="module")
def server(base, programs):
    engine = Engine(EngineConfig(max_rows=16, prefill_chunk=16))
    app = create_app(make_catalog(base, programs), engine, ServeConfig(api_key=KEY, max_tokens=400))
    with BackgroundServer(app) as running:
        running.app_catalog = app.state.catalog
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=WAIT)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=WAIT) as c:
        yield c


def expected_chat(base, text: str, max_tokens: int = MAX) -> str:
    tokens = greedy_alone(base, paw_mlx.prompt_ids(base, text), max_tokens)
    return base.tokenizer.decode_finished(tokens, skip_special_tokens=True)


def expected_completion(base, text: str, max_tokens: int = MAX) -> str:
    tokens = greedy_alone(base, paw_mlx.prompt_ids(base, text, raw=True), max_tokens)
    return base.tokenizer.decode_finished(tokens, skip_special_tokens=True)


def expected_program(path, base_dir, text: str) -> str:
    return paw_mlx.function(path, base=base_dir)(text)


def endless_bias(base) -> dict:
    return {str(t): -100 for t in base.eos_token_ids}


# ---------------------------------------------------------------------- the API


def test_models_lists_the_base_and_every_program(client, programs):
    ids = {m.id for m in client.models.list().data}
    assert ids == {"tiny", *programs}
    assert client.models.retrieve("sentiment").id == "sentiment"


def test_chat_streamed_and_not_equals_paw_run(client, base):
    text = INPUTS[1]
    want = expected_chat(base, text)
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": text}], max_tokens=MAX)
    assert reply.choices[0].message.content == want
    assert reply.usage.completion_tokens <= MAX and reply.usage.prompt_tokens == len(paw_mlx.prompt_ids(base, text))
    pieces, reasons, usage = [], [], None
    for chunk in client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": text}],
                                                max_tokens=MAX, stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            reasons.append(choice.finish_reason)
    assert "".join(pieces) == want
    assert reasons[-1] == reply.choices[0].finish_reason and usage.total_tokens == reply.usage.total_tokens


def test_completions_streamed_and_not_equal_paw_run_raw(client, base):
    text = INPUTS[0]
    want = expected_completion(base, text)
    assert client.completions.create(model="tiny", prompt=text, max_tokens=MAX).choices[0].text == want
    streamed = "".join(c.choices[0].text for c in client.completions.create(model="tiny", prompt=text,
                                                                             max_tokens=MAX, stream=True)
                       if c.choices)
    assert streamed == want
    echoed = client.completions.create(model="tiny", prompt=text, max_tokens=MAX, echo=True).choices[0].text
    assert echoed == text + want


def test_a_compiled_program_is_a_model(client, programs, tiny_program):
    text = INPUTS[2]
    want = expected_program(programs["dates"], tiny_program, text)
    chat = client.chat.completions.create(model="dates", messages=[{"role": "user", "content": text}])
    assert chat.choices[0].message.content == want
    assert chat.usage.prompt_tokens_details.cached_tokens > 0  # the program's prefix
    assert client.completions.create(model="dates", prompt=text).choices[0].text == want


def test_sixteen_requests_for_four_programs_at_once_equal_their_functions(server, programs, tiny_program):
    jobs = [(name, INPUTS[i % len(INPUTS)], i % 2 == 0) for i, name in enumerate(list(programs) * 4)]
    want = [expected_program(programs[name], tiny_program, text) for name, text, _ in jobs]
    got: list = [None] * len(jobs)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=WAIT)

    def call(i: int) -> None:
        name, text, stream = jobs[i]
        messages = [{"role": "user", "content": text}]
        if stream:
            got[i] = "".join(c.choices[0].delta.content or "" for c in
                             client.chat.completions.create(model=name, messages=messages, stream=True) if c.choices)
        else:
            got[i] = client.chat.completions.create(model=name, messages=messages).choices[0].message.content

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert got == want


def test_stop_strings_cut_the_output(client, base):
    text = INPUTS[4]
    full = expected_completion(base, text, 24)
    stop = full[5:8]
    cut = full[: full.find(stop)]
    reply = client.completions.create(model="tiny", prompt=text, max_tokens=24, stop=[stop, "never-there"])
    assert reply.choices[0].text == cut and reply.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt=text, max_tokens=24, stop=stop, stream=True) if c.choices)
    assert streamed == cut


def test_logprobs_of_greedy_tokens_are_the_best(client):
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": INPUTS[3]}],
                                           max_tokens=MAX, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 3
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob, abs=1e-5)
        assert item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob
    legacy = client.completions.create(model="tiny", prompt=INPUTS[3], max_tokens=MAX, logprobs=2)
    assert len(legacy.choices[0].logprobs.token_logprobs) == legacy.usage.completion_tokens
    assert all(len(top) <= 2 for top in legacy.choices[0].logprobs.top_logprobs)


def test_legacy_top_logprobs_hold_each_chosen_tokens_own_logprob(client):
    """The legacy form keys alternatives by text; byte tokens of one character all read U+FFFD,
    and a worse alternative of the same text must not overwrite the chosen token's entry."""
    for prompt in ("Hi", "Hello", INPUTS[3]):
        reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, logprobs=5)
        logprobs = reply.choices[0].logprobs
        for token, lp, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
            assert top[token] == pytest.approx(lp, abs=1e-5) and max(top.values()) == top[token], (prompt, top)
            assert list(top.values()) == sorted(top.values(), reverse=True)


def test_legacy_text_offsets_count_text_held_back(client):
    """Text waits while it could begin a stop string or is half a character; the offsets must
    still be where each token's text starts in the answer."""
    for prompt in ("Hello", "Hi", INPUTS[6]):
        plain = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, logprobs=0).choices[0]
        never = [c + "\x01" for c in dict.fromkeys(plain.text)][:16]  # every character may begin one
        held = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, logprobs=0, stop=never).choices[0]
        assert held.text == plain.text
        assert held.logprobs.text_offset == plain.logprobs.text_offset
        for token, offset in zip(plain.logprobs.tokens, plain.logprobs.text_offset, strict=True):
            if "\ufffd" not in token and not (token.startswith("<|") and token.endswith("|>")):
                assert plain.text[offset:offset + len(token)] == token, (prompt, token, offset)


def test_sampling_controls_reach_the_rows(client):
    messages = [{"role": "user", "content": INPUTS[5]}]
    settings = dict(model="tiny", messages=messages, max_tokens=MAX, temperature=1.0, top_p=0.9, seed=7,
                    extra_body={"top_k": 20, "min_p": 0.01, "repetition_penalty": 1.1})
    a = client.chat.completions.create(**settings).choices[0].message.content
    b = client.chat.completions.create(**settings).choices[0].message.content
    assert a == b
    two = client.chat.completions.create(model="tiny", messages=messages, max_tokens=3, n=2,
                                         logit_bias={"40": 100})
    assert [c.index for c in two.choices] == [0, 1]
    assert all(c.message.content == two.choices[0].message.content for c in two.choices)


SCHEMA = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]},
                                           "count": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["answer", "count"], "additionalProperties": False}


def test_response_format_json_schema_always_parses(client):
    for stream in (False, True):
        settings = dict(model="tiny", messages=[{"role": "user", "content": INPUTS[7]}], max_tokens=60,
                        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}})
        if stream:
            text = "".join(c.choices[0].delta.content or "" for c in
                           client.chat.completions.create(stream=True, **settings) if c.choices)
        else:
            reply = client.chat.completions.create(**settings)
            assert reply.choices[0].finish_reason == "stop"
            text = reply.choices[0].message.content
        value = json.loads(text)
        assert value["answer"] in ("yes", "no") and 0 <= value["count"] <= 9 and set(value) == {"answer", "count"}
    opened = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                            response_format={"type": "json_object"})
    assert opened.choices[0].message.content.startswith("{")


def test_json_schema_keys_come_out_in_the_schemas_order(client):
    """As OpenAI's structured outputs and paw call write them, not sorted."""
    schema = {"type": "object", "properties": {"zeta": {"enum": ["z"]}, "alpha": {"enum": ["a"]}},
              "required": ["zeta", "alpha"], "additionalProperties": False}
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=30,
                                           response_format={"type": "json_schema",
                                                            "json_schema": {"name": "order", "schema": schema}})
    assert reply.choices[0].message.content == '{"zeta": "z", "alpha": "a"}'


def test_only_small_schemas_are_kept_compiled(client):
    """Requests repeat their schemas, so compiled ones are kept; a big one is not, or a client
    could fill the server's memory with them (a 2.6 MB enum kept about 12 MB)."""
    from apps.serve import prepare

    def ask(values: int) -> str:
        schema = {"enum": [f"value {i} " + "x" * 30 for i in range(values)]}
        return client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=60,
            response_format={"type": "json_schema", "json_schema": {"name": "e", "schema": schema}}).choices[0]

    kept = prepare._grammar.cache_info().currsize
    assert ask(3000).message.content.startswith('"value ')  # 130 KB of schema: used, not kept
    assert prepare._grammar.cache_info().currsize == kept
    ask(5)
    assert prepare._grammar.cache_info().currsize == kept + 1


def test_row_constraints_are_built_off_the_event_loop(client, monkeypatch):
    """Each choice compiles its grammar: with n=16 and a big schema that stalled every stream
    when it ran on the event loop's thread (docs/reliability.md)."""
    from apps.serve.prepare import Prepared

    threads = []
    requests = Prepared.requests

    def recorded(self):
        threads.append(threading.current_thread().name)
        return requests(self)

    monkeypatch.setattr(Prepared, "requests", recorded)
    client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5, n=2,
                                   response_format={"type": "json_object"})
    assert threads and "paw-serve" not in threads  # BackgroundServer's event loop thread


def test_a_whole_response_is_built_and_serialized_off_the_event_loop(client, monkeypatch):
    """n=16 with 20 alternatives per token is a body of megabytes: built on the event loop, it
    stalled every stream (docs/reliability.md)."""
    from fastapi.responses import JSONResponse

    from apps.serve.completions import Generation

    threads = []
    body, render = Generation.body, JSONResponse.render

    def recorded_body(self):
        threads.append(("body", threading.current_thread().name))
        return body(self)

    def recorded_render(self, content):
        if isinstance(content, dict) and "choices" in content:
            threads.append(("render", threading.current_thread().name))
        return render(self, content)

    monkeypatch.setattr(Generation, "body", recorded_body)
    monkeypatch.setattr(JSONResponse, "render", recorded_render)
    client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5, n=2,
                                   logprobs=True, top_logprobs=3)
    assert {what for what, _ in threads} == {"body", "render"}
    assert all(name != "paw-serve" for _, name in threads), threads


def test_a_constraint_that_fails_while_generating_ends_only_its_own_request(client, base):
    """A valid pattern whose automaton outgrows llguidance's limits a few tokens in: a 400,
    not an output cut short, and the row streaming beside it goes on."""
    text = INPUTS[6]
    want = expected_chat(base, text, 40)
    got = {}

    def stream_beside() -> None:
        got["text"] = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": text}], max_tokens=40, stream=True) if c.choices)

    beside = threading.Thread(target=stream_beside)
    beside.start()
    blowup = {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "string",
                                                                             "pattern": "(a|b)*" * 2000}}}
    with pytest.raises(openai.BadRequestError, match="output constraint failed") as failed:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": INPUTS[2]}],
                                       max_tokens=30, response_format=blowup)
    assert failed.value.param == "response_format"
    beside.join(WAIT)
    assert got["text"] == want


def test_a_programs_stored_returns_constrain_its_answers(server, tiny_program, tmp_path):
    from paw_mlx.engine.models import ServedModel

    art = paw_mlx.compile(SPECS_WITH_CHOICES, base=tiny_program, out_dir=tmp_path / "label",
                          returns=["positive", "negative", "neutral"])
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=WAIT)
    catalog = server.app_catalog
    model = catalog.add(ServedModel("label", catalog.get("tiny").base, artifact=art))
    try:
        for text in INPUTS[:3]:
            got = client.chat.completions.create(model="label", messages=[{"role": "user", "content": text}])
            assert got.choices[0].message.content == paw_mlx.function(tmp_path / "label", base=tiny_program)(text)
            assert got.choices[0].message.content in ("positive", "negative", "neutral")
    finally:
        catalog.remove(model.name)


#: (input, output) examples: outputs spelled alike with or without a space before them, and
#: words the tiny tokenizer spells shorter after a space (so the program has both leads)
EXAMPLE_SETS = {"upper": [(w, w.upper()) for w in ["cat", "dog", "sun", "red"]],
                "animals": [("cat", "dog"), ("dog", "cat"), ("capital", "dog"), ("bird", "cat")]}


@pytest.mark.parametrize(("candidate", "examples"), [("fewshot", "upper"), ("lora", "upper"), ("fewshot", "animals")])
def test_a_program_compiled_from_examples_answers_chat_as_its_function(server, tiny_program, tmp_path, candidate,
                                                                       examples):
    """Its prefix holds the examples as demonstration turns: a chat request continues them, each
    turn after its lead as the demonstrations' (``PromptLayout``), the reply read without it."""
    from paw_mlx.engine.models import ServedModel
    from paw_mlx.programs.select import SelectOptions
    from paw_mlx.programs.train import TrainOptions

    rows = [{"input": i, "output": o} for i, o in EXAMPLE_SETS[examples]]
    options = SelectOptions(candidates=(candidate,), folds=2, lora=TrainOptions(steps=2, layers=1, rank=2))
    art = paw_mlx.compile("Upper.", base=tiny_program, examples=rows, options=options, out_dir=tmp_path / "upper")
    assert len(art.demos) == 4 and (art.adapter is not None) == (candidate == "lora")
    assert art.layout.output_lead == (" " if examples == "animals" else "")
    assert (art.copy_rule is not None) == (examples == "upper")  # its outputs are its inputs, in capitals
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=WAIT)
    catalog = server.app_catalog
    model = catalog.add(ServedModel("upper", catalog.get("tiny").base, artifact=art))
    try:
        f = paw_mlx.function(tmp_path / "upper", base=tiny_program)
        for text in INPUTS[:2]:
            got = client.chat.completions.create(model="upper", messages=[{"role": "user", "content": text}])
            assert got.choices[0].message.content == f(text)
            assert got.usage.prompt_tokens_details.cached_tokens >= art.prefix_length
            assert client.completions.create(model="upper", prompt=text).choices[0].text == f(text)
    finally:
        catalog.remove(model.name)


# ---------------------------------------------------------------------- refusals


def test_the_api_key_is_required(server):
    for key in ("wrong", None):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        r = httpx.get(server.url + "/v1/models", headers=headers, timeout=WAIT)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(server.url + "/health", timeout=WAIT).json()["status"] == "ok"
    assert httpx.head(server.url + "/health", timeout=WAIT).status_code == 200
    keyed = {"Authorization": f"Bearer {KEY}"}
    assert httpx.head(server.url + "/v1/models", headers=keyed, timeout=WAIT).status_code == 200


BAD_REQUESTS = [
    ("unknown model", {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ("wrong type", {"model": "tiny", "messages": "hi"}, 400, "messages"),
    ("content of neither form", {"model": "tiny", "messages": [{"role": "user", "content": 5}]}, 400,
     "messages.0.content"),
    ("negative max_tokens", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -3},
     400, "max_tokens"),
    ("boolean max_tokens", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": True},
     400, "max_tokens"),
    ("string n", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": "2"}, 400, "n"),
    ("huge max_tokens", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**9},
     400, "max_tokens"),
    ("huge max_completion_tokens", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                    "max_completion_tokens": 10**9}, 400, "max_completion_tokens"),
    ("prompt longer than the context", {"model": "tiny", "messages": [{"role": "user", "content": "Hello " * 400}]},
     400, "messages"),
    ("bad role", {"model": "tiny", "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role"),
    ("tool without a function", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                 "tools": [{"type": "function"}]}, 400, "tools.0.function"),
    ("tool_choice without tools", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                   "tool_choice": "required"}, 400, "tool_choice"),
    ("a named function", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                          "tool_choice": {"type": "function", "function": {"name": "f"}}}, 400, "tool_choice"),
    ("audio", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "modalities": ["text", "audio"],
               "audio": {"voice": "alloy", "format": "wav"}}, 400, "modalities"),
    ("logit bias token", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                          "logit_bias": {"99999": 1}}, 400, "logit_bias"),
    ("logit bias token twice", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                "logit_bias": {"5": 100, "05": 100}}, 400, "logit_bias"),
    ("logit bias key in other digits", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                        "logit_bias": {"\u0663": 1}}, 400, "logit_bias"),
    ("logit bias key with a space", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                     "logit_bias": {" 5": 1}}, 400, "logit_bias"),
    ("system message to a program", {"model": "dates", "messages": [{"role": "system", "content": "x"},
                                                                     {"role": "user", "content": "hi"}]}, 400, None),
    ("invalid JSON schema", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                             "response_format": {"type": "json_schema",
                                                 "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     400, "response_format"),
]


@pytest.mark.parametrize("name, body, status, param", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_an_openai_error(http, name, body, status, param):
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"] and "\n" not in error["message"]
    if param is not None:
        assert error["param"] == param


def test_a_field_of_several_forms_names_them_all(client):
    """Not the first form's complaint: a list prompt with a string in it is not 'a valid string'."""
    for prompt in ([1, "a"], [True], 5):
        with pytest.raises(openai.BadRequestError) as bad:
            client.completions.create(model="tiny", prompt=prompt, max_tokens=2)
        assert bad.value.param == "prompt" and bad.value.message.endswith(
            "'prompt' must be a string, an array of strings, an array of token ids or an array of arrays of token ids")
    with pytest.raises(openai.BadRequestError, match="'stop' must be a string or an array of strings$"):
        client.completions.create(model="tiny", prompt="Hi", max_tokens=2, extra_body={"stop": 5})


def test_malformed_json_and_unknown_routes(http):
    r = http.post("/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    body = json.dumps({"model": "tiny", "prompt": "Hello", "max_tokens": 2}).encode()
    for content, headers, status, says in [
        (b"", {"Content-Type": "application/json"}, 400, "the request body is empty"),
        (b"[1]", {"Content-Type": "application/json"}, 400, "must be a JSON object"),
        (gzip.compress(body), {"Content-Type": "application/json", "Content-Encoding": "gzip"}, 415, "gzip"),
    ]:
        r = http.post("/v1/completions", content=content, headers=headers)
        assert r.status_code == status and says in r.json()["error"]["message"], r.text
    r = http.get("/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["type"]
    with pytest.raises(openai.NotFoundError) as missing:
        openai.OpenAI(base_url=http.base_url.join("/v1").__str__(), api_key=KEY, max_retries=0).chat.completions.create(
            model="nope", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.code == "model_not_found" and missing.value.type == "invalid_request_error"  # as OpenAI's


def test_a_request_that_is_not_http_gets_an_openai_error(server, caplog):
    import socket

    chunked = b" HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"  # a head, then a broken chunk
    for garbage in (b"GARBAGE\r\n\r\n", b"POST /v1/completions" + chunked, b"GET /v1/models" + chunked):
        with socket.create_connection((server.host, server.port)) as sock:
            sock.sendall(garbage)
            answer, _ = read_until_closed(sock, WAIT)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400") and b"content-type: application/json" in head.lower()
        assert json.loads(body)["error"]["message"] == "the request is not valid HTTP/1.1"
    # the route the head reached answers into a closed connection: dropped, not a traceback
    assert http_ok(server) and not [r for r in caplog.records if r.levelname == "ERROR"]


def http_ok(server) -> bool:
    return httpx.get(server.url + "/health", timeout=WAIT).status_code == 200


def test_a_json_object_is_read_whatever_content_type_it_came_with(http, base):
    """curl -d sends application/x-www-form-urlencoded; scripts send text/plain or nothing."""
    body = json.dumps({"model": "tiny", "prompt": INPUTS[0], "max_tokens": 4}).encode()
    want = expected_completion(base, INPUTS[0], 4)
    for content_type in ("application/x-www-form-urlencoded", "text/plain", None):
        headers = {"Content-Type": content_type} if content_type else {}
        r = http.post("/v1/completions", content=body, headers=headers)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == want, (content_type, r.text)
    form = http.post("/v1/completions", data={"model": "tiny", "prompt": "Hello"})  # a real form: not JSON
    assert form.status_code == 400 and "not valid JSON" in form.json()["error"]["message"], form.text
    upload = http.post("/v1/completions", files={"file": ("a.json", body)})
    assert upload.status_code == 415 and "multipart/form-data" in upload.json()["error"]["message"], upload.text


@pytest.mark.parametrize("content, says", [
    (b'{"model": "tiny", "prompt": "Hi", "max_tokens": ' + b"9" * 5000 + b"}", "an integer has more than"),
    (b'{"model": "tiny", "prompt": "Hi", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nested too deeply"),
    (b'{"model": "tiny", "prompt": "\xff"}', "can't decode byte 0xff"),
    (b'{"model": "tiny", "prompt": "Hi", "temperature": NaN}', "NaN is not a JSON number"),
    (b'{"model": "tiny", "prompt": "Hi", "logit_bias": {"5": -Infinity}}', "-Infinity is not a JSON number"),
], ids=["5000 digits", "nested 5000 deep", "not UTF-8", "NaN", "-Infinity"])
def test_an_unusable_json_body_is_a_400_naming_the_problem(http, content, says):
    r = http.post("/v1/completions", content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and "\n" not in error["message"]
    assert error["message"].startswith("the request body is not usable JSON: ") and says in error["message"], error


def test_openai_endpoints_paw_lacks_say_what_it_serves(client, http):
    for call in (lambda: client.embeddings.create(model="tiny", input="hi"),
                 lambda: client.responses.create(model="tiny", input="hi")):
        with pytest.raises(openai.NotFoundError, match="this server's API is GET /v1/models") as missing:
            call()
        assert missing.value.type == "invalid_request_error"
    with pytest.raises(openai.APIStatusError, match="DELETE is not allowed on /v1/models/tiny: use GET, HEAD$") as \
            wrong:
        client.models.delete("tiny")
    assert wrong.value.status_code == 405
    assert wrong.value.response.headers["allow"] == "GET, HEAD"  # RFC 9110: every method the route takes
    body = json.dumps({"model": "tiny", "prompt": "Hello", "max_tokens": 2}).encode()
    assert http.post("/v1/completions", content=body, headers={"Content-Encoding": ""}).status_code == 200


def test_bad_requests_never_disturb_running_rows(http, base):
    text = INPUTS[6]
    want = expected_chat(base, text, 40)
    body = {"model": "tiny", "messages": [{"role": "user", "content": text}], "max_tokens": 40, "stream": True}
    pieces = []
    with http.stream("POST", "/v1/chat/completions", json=body) as stream:
        for i, line in enumerate(stream.iter_lines()):
            if i % 8 == 0:
                for _, bad, _, _ in BAD_REQUESTS[:4]:
                    assert http.post("/v1/chat/completions", json=bad).status_code in (400, 404)
            if line.startswith("data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    pieces.append(choice["delta"].get("content") or "")
    assert "".join(pieces) == want


def wait_for_rows(http, rows: int) -> None:
    deadline = time.monotonic() + WAIT
    while http.get("/health").json()["rows"] != rows:
        assert time.monotonic() < deadline, "the rows did not drain"
        time.sleep(0.02)


def test_a_client_that_disconnects_frees_its_row(http, base):
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 400, "stream": True, "logit_bias": endless_bias(base)}
    with http.stream("POST", "/v1/completions", json=body) as stream:
        lines = stream.iter_lines()
        for _ in range(4):
            next(lines)
        assert http.get("/health").json()["rows"] == 1
    wait_for_rows(http, 0)


@pytest.mark.parametrize("api_key", [None, KEY])
def test_cors_only_for_the_origins_allowed(base, programs, api_key):
    """A browser's preflight carries no credentials (the Fetch standard): it is answered with a key set too."""
    app = create_app(make_catalog(base, programs), Engine(),
                     ServeConfig(allow_origins=("http://localhost:3000",), api_key=api_key))
    with BackgroundServer(app) as server:
        # what the openai JS client asks for in a browser: its X-Stainless-* headers too
        asked = "authorization,content-type,x-stainless-os,x-stainless-retry-count,x-stainless-timeout"
        preflight = {"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": asked}
        r = httpx.options(server.url + "/v1/chat/completions", headers=preflight, timeout=WAIT)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:3000"
        assert r.headers["access-control-allow-headers"].lower() == asked
        other = httpx.get(server.url + "/v1/models", headers={"Origin": "http://evil.example"}, timeout=WAIT)
        assert "access-control-allow-origin" not in other.headers


def slow_engine(**config) -> Engine:
    """An engine whose decode steps take 20 ms each: the tiny model decodes 500 tokens in well under a second,
    too fast for a test to catch a request running or queued."""
    engine = Engine(EngineConfig(**config))
    decode = engine._decode

    def slow_decode(group) -> None:
        time.sleep(0.02)
        decode(group)

    engine._decode = slow_decode
    return engine


def test_a_full_queue_answers_429_with_retry_after(base, programs):
    engine = slow_engine(max_rows=1, max_queue=4)
    app = create_app(make_catalog(base, programs), engine, ServeConfig(max_tokens=500))
    # one row and four places in the queue: a stream of four choices leaves one place
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 500, "logit_bias": endless_bias(base)}
    with BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=WAIT) as http:
        r = http.post("/v1/completions", json=dict(body, n=3, prompt=["Hello", "Hi"]))  # 6 choices: never fit
        assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text
        with http.stream("POST", "/v1/completions", json=dict(body, n=4, stream=True)) as running:
            lines = running.iter_lines()  # kept: a dropped line iterator, once collected, closes the stream
            next(lines)
            r = http.post("/v1/completions", json=dict(body, n=2))
            assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
            assert r.json()["error"]["type"] == "rate_limit_error"
        wait_for_rows(http, 0)
        assert http.post("/v1/completions", json=dict(body, n=2, max_tokens=3)).status_code == 200


def test_a_request_past_the_timeout_is_a_504_the_client_does_not_retry(base, programs):
    engine = slow_engine(max_rows=2, timeout=0.3)
    submitted, submit = [], engine.submit

    def counted_submit(request, on_event=None):
        submitted.append(request)
        return submit(request, on_event=on_event)

    engine.submit = counted_submit
    app = create_app(make_catalog(base, programs), engine, ServeConfig(max_tokens=400))
    with BackgroundServer(app) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="-", timeout=WAIT)  # retries as by default
        with pytest.raises(openai.APIStatusError, match="ran past the server's timeout of 0.3 s") as late:
            client.completions.create(model="tiny", prompt="Hello", max_tokens=400, logit_bias=endless_bias(base))
        assert late.value.status_code == 504 and late.value.code == "request_timeout"
        assert len(submitted) == 1  # not three: retrying would run as long again
        with pytest.raises(openai.APIError, match="ran past the server's timeout"):  # streamed: an error event
            for _ in client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                    max_tokens=400, logit_bias=endless_bias(base), stream=True):
                pass


def test_a_request_abandoned_while_queued_leaves_the_queue(base, programs):
    engine = slow_engine(max_rows=1)
    app = create_app(make_catalog(base, programs), engine, ServeConfig(max_tokens=400))
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 400, "logit_bias": endless_bias(base)}
    with BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=WAIT) as http:
        with http.stream("POST", "/v1/completions", json=dict(body, stream=True)) as running:
            lines = running.iter_lines()
            next(lines)
            prefilled = http.get("/health").json()["prefill_chunks"]
            with pytest.raises(httpx.ReadTimeout):  # queued behind the running row, then given up
                httpx.post(server.url + "/v1/completions", json=body, timeout=1.0)
            deadline = time.monotonic() + WAIT
            while (health := http.get("/health").json())["queued"]:
                assert time.monotonic() < deadline, "the abandoned request stayed queued"
                time.sleep(0.02)
            assert health["rows"] == 1  # the running one goes on
            # it left the queue as its client left, not when a row freed up for it: it never ran
            assert health["prefill_chunks"] == prefilled
            assert next(line for line in lines if line.startswith("data: {"))  # the running row still streams


def test_requests_the_server_stops_end_with_an_error_not_a_finish(base, programs):
    """A shutdown cuts running requests short: a client must not read them as finished answers."""
    engine = slow_engine(max_rows=4)
    app = create_app(make_catalog(base, programs), engine, ServeConfig(max_tokens=400))
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 400, "logit_bias": endless_bias(base)}
    with BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=WAIT) as http:
        whole: dict = {}
        waiting = threading.Thread(target=lambda: whole.update(r=http.post("/v1/completions", json=body)))
        with http.stream("POST", "/v1/completions", json=dict(body, stream=True)) as stream:
            lines = stream.iter_lines()
            next(lines)
            waiting.start()
            wait_for_rows(http, 2)
            engine.stop()
            events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        waiting.join(WAIT)
    assert "error" in events[-1] and "shutting down" in events[-1]["error"]["message"], events[-1]
    assert not any(c.get("finish_reason") for e in events for c in e.get("choices", []))
    assert whole["r"].status_code == 503 and "shutting down" in whole["r"].json()["error"]["message"]


def test_the_catalog_serves_every_usable_program_and_warns_of_the_rest(tiny_program, programs, tmp_path):
    import shutil

    from apps.serve.runner import build_catalog

    root = tmp_path / "programs"
    shutil.copytree(programs["dates"], root / "tasks" / "dates")
    (root / "broken").mkdir()
    (root / "broken" / "program.json").write_text("{not json")
    warnings: list[str] = []
    catalog = build_catalog([tiny_program], [root], warn=warnings.append)
    assert {m.name for m in catalog} == {tiny_program.name, "tasks/dates"}
    assert len(warnings) == 1 and "broken" in warnings[0]


def read_until_closed(sock, limit_s: float) -> tuple[bytes, float]:
    """What the server sends on ``sock`` until it closes it, and after how many seconds."""
    start = time.monotonic()
    sock.settimeout(limit_s)
    got = b""
    while chunk := sock.recv(4096):
        got += chunk
    return got, time.monotonic() - start


def test_bodies_are_bounded_in_size_and_in_time_however_they_arrive(base, programs):
    import socket

    config = ServeConfig(max_body_bytes=1000, read_timeout=0.5)
    app = create_app(make_catalog(base, programs), Engine(), config)
    with BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=WAIT) as http:
        chunked = http.post("/v1/completions", content=iter([b"x" * 600] * 3))  # no Content-Length to check
        assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "request_too_large"
        small = json.dumps({"model": "tiny", "prompt": "Hello", "max_tokens": 2}).encode()
        assert http.post("/v1/completions", content=iter([small]),
                         headers={"Content-Type": "application/json"}).status_code == 200
        head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        with socket.create_connection((server.host, server.port)) as stalled:  # half a body, then nothing
            stalled.sendall(head + b"Content-Length: 500\r\n\r\n" + small[:20])
            answer, seconds = read_until_closed(stalled, WAIT)
        assert answer.startswith(b"HTTP/1.1 408") and b"read-timeout" in answer and seconds < 5
        with socket.create_connection((server.host, server.port)) as stalled:  # half a request head
            stalled.sendall(head)
            answer, seconds = read_until_closed(stalled, WAIT)
        assert answer == b"" and seconds < 5
        after = http.post("/v1/completions", content=small, headers={"Content-Type": "application/json"})
        assert after.status_code == 200


def test_characters_split_across_tokens_stream_whole(base):
    """An emoji is four byte tokens of the tiny tokenizer: no piece of a stream holds half of one
    (a U+FFFD), and a stop string that spans tokens still cuts the text where it begins."""
    text = "Hi 😀 naïve 日本語 👍🏽 end"
    engine = ScriptedEngine(base.tokenizer, text)
    assert len(engine.tokens) > len(text)
    with BackgroundServer(create_app(make_catalog(base, {}), engine, ServeConfig())) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0, timeout=WAIT)
        for stop, want in ((None, text), ("語 👍", "Hi 😀 naïve 日本")):
            pieces = [chunk.choices[0].delta.content for chunk in client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "x"}], stream=True, stop=stop)
                if chunk.choices and chunk.choices[0].delta.content]
            assert "".join(pieces) == want and not any("\ufffd" in piece for piece in pieces)
            texts = [chunk.choices[0].text for chunk in client.completions.create(
                model="tiny", prompt="x", stream=True, stop=stop)]
            assert "".join(texts) == want and not any("\ufffd" in piece for piece in texts)


def test_the_character_u_fffd_streams_as_it_comes(base):
    """U+FFFD is three byte tokens of the tiny tokenizer, and text often holds it (mojibake): a
    run of it streams a character at a time, not held back to the end as if half a character
    (which also decoded a growing window every step)."""
    text = "ok " + "\ufffd" * 40 + " end 日本"
    engine = ScriptedEngine(base.tokenizer, text)
    with BackgroundServer(create_app(make_catalog(base, {}), engine, ServeConfig())) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0, timeout=WAIT)
        pieces = [chunk.choices[0].text for chunk in client.completions.create(model="tiny", prompt="x", stream=True)]
    assert "".join(pieces) == text and max(piece.count("\ufffd") for piece in pieces) == 1


def test_a_reply_cut_inside_a_character_ends_before_it(base):
    """max_tokens ran out two bytes into an emoji (four byte tokens of the tiny tokenizer): the
    reply ends before it, streamed or not, chat or completion, not with U+FFFD."""
    engine = ScriptedEngine(base.tokenizer, "Hi \U0001F600", finish_reason="length")
    engine.tokens = engine.tokens[:-2]
    assert base.tokenizer.decode(engine.tokens) == "Hi \ufffd"
    with BackgroundServer(create_app(make_catalog(base, {}), engine, ServeConfig())) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0, timeout=WAIT)
        chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}])
        assert chat.choices[0].message.content == "Hi " and chat.choices[0].finish_reason == "length"
        streamed = [chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "x"}], stream=True) if chunk.choices]
        assert "".join(streamed) == "Hi "
        text = client.completions.create(model="tiny", prompt="x")
        assert text.choices[0].text == "Hi " and text.choices[0].finish_reason == "length"
        pieces = [chunk.choices[0].text for chunk in client.completions.create(model="tiny", prompt="x", stream=True)]
        assert "".join(pieces) == "Hi "


def recorded_encodes(monkeypatch, tokenizer) -> list[int]:
    """The length of every text ``tokenizer.encode`` is called on, from now on."""
    lengths: list[int] = []
    encode = tokenizer.encode

    def recording(text, *args, **kwargs):
        lengths.append(len(text))
        return encode(text, *args, **kwargs)

    monkeypatch.setattr(tokenizer, "encode", recording)
    return lengths


def test_a_prompt_too_large_to_fit_is_refused_without_tokenizing_it(http, base, monkeypatch):
    """Its size alone proves it longer than the context (no token stands for more than
    max_token_bytes of text): refused at once, as the whole check after tokenizing refuses it;
    a prompt one byte inside that bound is tokenized as before."""
    tokenizer = base.tokenizer
    span, context = tokenizer.max_token_bytes, base.context_length
    assert span and context
    framing = len(tokenizer.apply_chat_template([{"role": "user", "content": ""}]).encode())
    fits = (context - 1) * span  # bytes of text that may still be context - 1 tokens
    encoded = recorded_encodes(monkeypatch, tokenizer)
    for size, refused_at_once in ((fits - framing, False), (fits - framing + 1, True), (3_000_000, True)):
        encoded.clear()
        r = http.post("/v1/chat/completions",
                      json={"model": "tiny", "messages": [{"role": "user", "content": "a" * size}]})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
        assert (max(encoded, default=0) < size) == refused_at_once, (size, encoded)
    for prompt, model in ((["hi", "a" * (fits + 1)], "tiny"), ("a" * (fits + 1), "tiny"), ("a" * (fits + 1), "dates")):
        encoded.clear()
        r = http.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 2})
        error = r.json()["error"]
        assert r.status_code == 400 and error["code"] == "context_length_exceeded" and error["param"] == "prompt"
        assert max(encoded, default=0) < fits, encoded
    encoded.clear()
    r = http.post("/v1/chat/completions",
                  json={"model": "dates", "messages": [{"role": "user", "content": "a" * fits}]})
    assert r.json()["error"]["code"] == "context_length_exceeded" and max(encoded, default=0) < fits
    monkeypatch.undo()
    r = http.post("/v1/completions", json={"model": "tiny", "prompt": "Hello", "max_tokens": 2})
    assert r.status_code == 200
