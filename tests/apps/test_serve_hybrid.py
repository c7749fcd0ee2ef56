"""``paw serve`` on programs with recurrent state, one per kind (tests/archs.py's tiny LFM2: conv
states beside the KV cache; Qwen3.5: conv and delta states; Mamba2: conv and SSM states, no attention).

Each prompt is prefilled alone on its own states, then its row decodes in the batch beside the
others (``paw_mlx/engine/engine.py``): concurrent requests get exactly what ``paw_mlx.generate``
gives each alone, and everything else the server does still holds. A conversation's next turn
starts from the prompt cache's snapshot of the whole cache list after the previous reply and
prefills only its new tokens. One loopback server per kind; every wait is bounded.
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
from paw_mlx.programs.select import SelectOptions
from tests.apps.test_serve import endless_bias, wait_for_rows

WAIT = 60.0
MAX = 12
#: long enough that its prefill runs in several chunks (prefill_chunk below) through the conv states
LONG = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen"


def alone(base, text: str, max_tokens: int = MAX, **controls) -> str:
    """A completion of ``text`` as the server writes it, from the plain generation path alone
    (greedy; special tokens skipped, as the server's text skips them)."""
    ids = paw_mlx.prompt_ids(base, text, raw=True)
    tokens = list(paw_mlx.stream_tokens(base, ids, max_tokens=max_tokens, **controls))
    return base.tokenizer.decode_finished(tokens, skip_special_tokens=True)


def together(call, items: list) -> list:
    """``call(item)`` for every item at once, each in its own thread; the results in order."""
    results: list = [None] * len(items)

    def run(i: int) -> None:
        results[i] = call(items[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(items))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    return results


def complete_together(client, prompts: list[str]) -> list[str]:
    """Each prompt's completion text, the requests sent at once."""
    return together(lambda prompt: client.completions.create(model="hybrid", prompt=prompt,
                                                               max_tokens=MAX).choices[0].text, prompts)


@pytest.fixture(scope="module", params=["hybrid_program", "gated_delta_program", "ssm_program"],
                ids=["lfm2", "qwen3_5", "mamba2"])
def hybrid_program(request):
    """The recurrent program under test (this module's server runs once per state kind)."""
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def base(hybrid_program):
    return paw_mlx.load(hybrid_program)


@pytest.fixture(scope="module")
def digits(hybrid_program, tmp_path_factory):
    """A compiled few-shot program on the hybrid base."""
    out = tmp_path_factory.mktemp("hybrid-programs") / "digits"
    examples = [{"input": "one", "output": "1"}, {"input": "two", "output": "2"}, {"input": "three", "output": "3"}]
    paw_mlx.compile("Write the number as digits.", base=hybrid_program, out_dir=out, examples=examples,
                    max_new_tokens=8, options=SelectOptions(candidates=("spec", "fewshot")))
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


def test_concurrent_requests_of_different_lengths_each_get_what_generate_gives_alone(server, base, http):
    prompts = [LONG, "Hello there, how are you?", "seven", "one two three four five six"]
    want = [alone(base, p) for p in prompts]
    assert len(set(want)) > 1
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=WAIT)
    steps = server.engine.steps
    assert complete_together(client, prompts) == want
    # each request left snapshots (a token before its prompt's end, after its reply) in the prompt cache
    assert http.get("/health").json()["prompt_cache_entries"] >= len(prompts)
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


def test_requests_join_a_decoding_row_and_its_disconnect_frees_it(http, client, base, server):
    """Rows join while another decodes, in one batch with it; each gets what it gets alone; the
    decoding row's client leaves and its row is freed while the others' outputs are unchanged."""
    bias = endless_bias(base)
    first = alone(base, "Hello", 40, logit_bias=bias)
    prompts = [LONG, "seven"]
    want = [alone(base, p) for p in prompts]
    widest = server.engine.widest_step
    server.engine.widest_step = 0
    body = {"model": "hybrid", "prompt": "Hello", "max_tokens": 200, "stream": True, "logit_bias": bias}
    try:
        with http.stream("POST", "/v1/completions", json=body) as stream:
            import json

            lines = (line for line in stream.iter_lines() if line.startswith("data: {"))
            streamed = "".join(json.loads(next(lines)[6:])["choices"][0]["text"] for _ in range(4))
            assert http.get("/health").json()["rows"] == 1
            got = complete_together(client, prompts)
            streamed += json.loads(next(lines)[6:])["choices"][0]["text"]  # it still streams
            joined = server.engine.widest_step
    finally:
        server.engine.widest_step = max(widest, server.engine.widest_step)
    wait_for_rows(http, 0)
    assert got == want
    assert first.startswith(streamed) and len(streamed) > 0
    assert joined >= 2  # the joining rows decoded in one step with the streaming one


def test_a_compiled_program_answers_as_its_function_from_a_copy_of_its_prefix_state(server, digits, hybrid_program):
    """Requests start from copies of the program's prefix state (its tokens are cached ones), side
    by side, and each answer is the function's."""
    f = paw_mlx.function(digits, base=hybrid_program)
    inputs = ["four five six", "The capital of France", "2024-01-05 is a date."]
    want = [f(text) for text in inputs]
    assert len(set(want)) > 1
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=WAIT)
    replies = together(lambda text: client.chat.completions.create(
        model="digits", messages=[{"role": "user", "content": text}]), inputs)
    assert [reply.choices[0].message.content for reply in replies] == want
    assert [reply.usage.prompt_tokens_details.cached_tokens for reply in replies] == [f.artifact.prefix_length] * 3
    assert client.completions.create(model="digits", prompt=inputs[0]).choices[0].text == want[0]


def test_paw_serves_catalog_takes_the_hybrid_base_and_its_programs(hybrid_program, digits):
    """What ``paw serve BASE --programs DIR`` loads: the base and the program on it, nothing skipped."""
    from apps.serve.runner import build_catalog

    skipped: list[str] = []
    catalog = build_catalog([hybrid_program], [digits.parent], warn=skipped.append)
    assert sorted(m.name for m in catalog) == ["digits", hybrid_program.name] and skipped == []
    assert catalog.get("digits").prefix_state is not None



# ---------------------------------------------------------------------- the prompt cache's snapshots


def tokens_alone(base, ids: list[int], max_tokens: int = MAX, **controls) -> list[int]:
    """The plain generation path's tokens for ``ids`` (greedy)."""
    return list(paw_mlx.stream_tokens(base, ids, max_tokens=max_tokens, **controls))


def cached(reply) -> int:
    details = reply.usage.prompt_tokens_details
    return 0 if details is None else details.cached_tokens or 0


def turn(client, http, base, ids: list[int], **body) -> tuple[int, int, int, list[int]]:
    """Complete ``ids`` and check its text against the plain path's; returns the tokens the row ran
    (the prompt, and every generated token but a last one cut by length), the tokens its prefill
    ran, its ``cached_tokens`` and the generated tokens."""
    want = tokens_alone(base, ids, logit_bias=body.get("logit_bias"))
    before = http.get("/health").json()["prefilled_tokens"]
    reply = client.completions.create(model="hybrid", prompt=ids, max_tokens=MAX,
                                      **({"extra_body": body} if body else {}))
    assert reply.choices[0].text == base.tokenizer.decode_finished(want, skip_special_tokens=True)
    fed = len(ids) + len(want) - (reply.choices[0].finish_reason == "length")
    return fed, http.get("/health").json()["prefilled_tokens"] - before, cached(reply), want


def words(base, text: str) -> list[int]:
    return base.tokenizer.encode(text, add_special_tokens=False)


def test_a_conversations_next_turn_prefills_only_its_new_tokens(client, http, base):
    """The second request resends the first's prompt and reply, then a new turn: it starts from the
    snapshot kept after the reply and prefills only the new tokens, with the tokens generate gives."""
    first = paw_mlx.prompt_ids(base, "Tell me a story about a cat and a dog", raw=True)
    fed, prefilled, _, reply = turn(client, http, base, first)
    assert prefilled == len(first)
    second = first + reply + words(base, " And then what happened?")
    _, prefilled, hit, _ = turn(client, http, base, second)
    assert hit == fed and prefilled == len(second) - fed < len(second) - len(first)


def test_a_prompt_that_leaves_a_snapshot_part_way_reuses_none_of_it(client, http, base):
    """A recurrent state exists only at its snapshot's end: a prompt sharing half of one starts afresh."""
    ids = paw_mlx.prompt_ids(base, "alpha beta gamma delta epsilon zeta eta theta", raw=True)
    turn(client, http, base, ids)
    branch = ids[: len(ids) // 2] + words(base, " iota kappa lambda")
    _, prefilled, hit, _ = turn(client, http, base, branch)
    assert hit == 0 and prefilled == len(branch)
    # the branch's own snapshot now serves its next turn, and the first prompt's (a token before its
    # end) still serves its own
    _, _, hit, _ = turn(client, http, base, ids + words(base, " mu nu"))
    assert hit >= len(ids) - 1


def test_next_turns_sent_at_once_each_start_from_their_own_snapshot(client, http, base, server):
    """Turn 2 of three conversations at once: each prefills only its new tokens, decodes in the batch
    beside the others, and gets what generate gives it alone."""
    starts = [paw_mlx.prompt_ids(base, text, raw=True)
              for text in ("Where is the red house", "seven eight nine", "Hello, who are you?")]
    firsts = [turn(client, http, base, ids) for ids in starts]
    seconds = [ids + first[3] + words(base, " Go on.") for ids, first in zip(starts, firsts, strict=True)]
    want = [base.tokenizer.decode_finished(tokens_alone(base, ids), skip_special_tokens=True) for ids in seconds]
    # a row that decodes throughout, so the three join a batch however the threads are scheduled
    anchor = {"model": "hybrid", "prompt": "Hello", "max_tokens": 200, "stream": True,
              "logit_bias": endless_bias(base)}
    widest = server.engine.widest_step
    server.engine.widest_step = 0
    try:
        with http.stream("POST", "/v1/completions", json=anchor) as stream:
            lines = (line for line in stream.iter_lines() if line.startswith("data: {"))
            next(lines)  # decoding
            before = http.get("/health").json()["prefilled_tokens"]
            replies = together(lambda ids: client.completions.create(model="hybrid", prompt=ids, max_tokens=MAX),
                               seconds)
            prefilled = http.get("/health").json()["prefilled_tokens"] - before
            joined = server.engine.widest_step
    finally:
        server.engine.widest_step = max(widest, server.engine.widest_step)
    wait_for_rows(http, 0)
    assert [reply.choices[0].text for reply in replies] == want
    assert [cached(reply) for reply in replies] == [first[0] for first in firsts]
    assert prefilled == sum(len(ids) - first[0] for ids, first in zip(seconds, firsts, strict=True))
    assert joined >= 2


def test_snapshots_are_evicted_least_recently_used_first_within_the_budget(client, http, base, server):
    """With room for one conversation's snapshots, the next conversation's push the older ones out:
    its next turn prefills everything again (and is still exact); the newer one's reuses its own."""
    bias = endless_bias(base)  # every reply MAX tokens long: both conversations' snapshots weigh the same
    cache = server.engine.prompt_cache
    a = paw_mlx.prompt_ids(base, "one plus one is two and two plus two is", raw=True)
    b = a[:1] + a[:0:-1]
    assert b[1] != a[1]
    limit = cache.max_bytes
    cache.clear()
    try:
        _, _, _, reply_a = turn(client, http, base, a, logit_bias=bias)
        # the reply's last event reaches the client before the worker keeps its snapshot (the worker
        # takes no other request meanwhile): read the cache once the row is gone
        wait_for_rows(http, 0)
        cache.max_bytes = cache.nbytes  # room for A's two snapshots, in its prompt and after its reply
        fed_b, _, _, reply_b = turn(client, http, base, b, logit_bias=bias)
        wait_for_rows(http, 0)
        assert 0 < cache.nbytes <= cache.max_bytes and len(cache) == 2
        _, _, hit, _ = turn(client, http, base, b + reply_b + words(base, " Yes."), logit_bias=bias)
        assert hit == fed_b
        second = a + reply_a + words(base, " Yes.")
        _, prefilled, hit, _ = turn(client, http, base, second, logit_bias=bias)
        assert hit == 0 and prefilled == len(second)
    finally:
        cache.max_bytes = limit


def test_a_chat_clients_second_turn_takes_at_least_the_first_prompt_from_the_cache(client, base):
    """Through chat completions: the second turn's rendering starts with the first turn's prompt (and,
    where the reply's text tokenizes back to its tokens, its reply), so it reuses that much (the
    prompt's snapshot is a token before its end), exactly."""
    model = ModelCatalog().add_base(base, name="hybrid")
    first = [{"role": "user", "content": "Where do the birds go in winter?"}]
    reply = client.chat.completions.create(model="hybrid", messages=first, max_tokens=MAX)
    second = [*first, {"role": "assistant", "content": reply.choices[0].message.content},
              {"role": "user", "content": "And in summer?"}]
    ids = model.chat_ids(second)
    assert ids[: len(model.chat_ids(first))] == model.chat_ids(first)
    again = client.chat.completions.create(model="hybrid", messages=second, max_tokens=MAX)
    assert cached(again) >= len(model.chat_ids(first)) - 1
    assert again.choices[0].message.content == base.tokenizer.decode_finished(tokens_alone(base, ids),
                                                                              skip_special_tokens=True)


def test_the_same_prompt_again_prefills_only_its_last_token(client, http, base):
    """A retry, a regenerate, or one request's n choices: each starts from the snapshot kept a token
    before the prompt's end and prefills only the last token, with generate's tokens and the
    log-probabilities the whole prompt's prefill gave."""
    ids = paw_mlx.prompt_ids(base, "Once more: what do the rivers carry to the sea", raw=True)
    text = base.tokenizer.decode_finished(tokens_alone(base, ids), skip_special_tokens=True)

    def complete(**body) -> tuple[object, int]:
        before = http.get("/health").json()["prefilled_tokens"]
        reply = client.completions.create(model="hybrid", prompt=ids, max_tokens=MAX, logprobs=2, **body)
        return reply, http.get("/health").json()["prefilled_tokens"] - before

    first, prefilled = complete()
    assert first.choices[0].text == text and cached(first) == 0 and prefilled == len(ids)
    retry, prefilled = complete()
    assert retry.choices[0].text == text and cached(retry) == len(ids) - 1 and prefilled == 1
    choices, prefilled = complete(n=3)
    assert [choice.text for choice in choices.choices] == [text] * 3
    assert cached(choices) == len(ids) - 1 and prefilled == 3
    whole = first.choices[0].logprobs.token_logprobs
    for reply in (retry, choices):
        for choice in reply.choices:
            assert choice.logprobs.token_logprobs == pytest.approx(whole, abs=1e-4)
