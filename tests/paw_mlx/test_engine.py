"""The batching engine from Python: rows of many programs in one batch, each as if alone."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import paw_mlx
from interp.errors import OverloadedError, RequestError
from interp.sampling import SamplingParams
from paw_mlx.engine import Engine, EngineConfig, GenerationRequest, ModelCatalog, complete
from tests.serving import INPUTS, compile_programs, greedy_alone, make_catalog

WAIT = 60  # seconds any one wait may take before the test fails


def endless(model) -> SamplingParams:
    """Greedy decoding that never picks an end-of-sequence token (runs to its budget)."""
    return SamplingParams.create(logit_bias={eos: -100 for eos in model.base.eos_token_ids})


@pytest.fixture(scope="module")
def base(tiny_program):
    return paw_mlx.load(tiny_program)


@pytest.fixture(scope="module")
def programs(tiny_program, tmp_path_factory):
    return compile_programs(tiny_program, tmp_path_factory.mktemp("engine-programs"))


@pytest.fixture(scope="module")
def catalog(base, programs):
    return make_catalog(base, programs)


@pytest.fixture(scope="module")
def engine():
    with Engine(EngineConfig(max_rows=8, prefill_chunk=8)) as engine:
        yield engine


def run_concurrently(jobs):
    results = [None] * len(jobs)

    def work(i):
        results[i] = jobs[i]()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert not any(t.is_alive() for t in threads)
    return results


def test_sixteen_requests_for_four_programs_equal_their_functions(engine, catalog, programs, tiny_program):
    jobs, expected = [], []
    for i in range(16):
        name = list(programs)[i % 4]
        text = INPUTS[i % len(INPUTS)]
        f = paw_mlx.function(programs[name], base=tiny_program)
        expected.append((f.call_ids([f.token_ids(text)])[0], f(text)))
        jobs.append(lambda name=name, text=text: complete(engine, catalog.get(name), text, timeout=WAIT))
    results = run_concurrently(jobs)
    assert [(r.tokens, r.text) for r in results] == expected
    assert all(r.cached_tokens >= len(catalog.get(list(programs)[0]).prefix_ids) // 2 for r in results)


def test_base_rows_equal_single_streams_while_others_join_and_leave(engine, catalog, base):
    prompts = INPUTS * 2
    budgets = [3 + (7 * i) % 17 for i in range(len(prompts))]  # rows finish at different steps
    expected = [greedy_alone(base, paw_mlx.prompt_ids(base, p, raw=True), n) for p, n in zip(prompts, budgets,
                                                                                             strict=True)]
    model = catalog.get("tiny")
    results = run_concurrently([lambda p=p, n=n: complete(engine, model, p, max_tokens=n, timeout=WAIT)
                                for p, n in zip(prompts, budgets, strict=True)])
    assert [r.tokens for r in results] == expected
    assert all(r.finish_reason in ("stop", "length") for r in results)


def test_a_chats_next_turn_prefills_only_its_new_tokens(engine, catalog, base):
    model = catalog.get("tiny")
    first = [{"role": "user", "content": "Hello, how are you today?"}]
    reply = complete(engine, model, messages=first, max_tokens=6, timeout=WAIT)
    second = first + [{"role": "assistant", "content": reply.text}, {"role": "user", "content": "The capital?"}]
    again = complete(engine, model, messages=second, max_tokens=6, timeout=WAIT)
    ids = model.chat_ids(second)
    assert again.cached_tokens >= len(model.chat_ids(first))
    assert again.tokens == greedy_alone(base, ids, 6)


def test_cancel_frees_the_row_at_the_next_step(engine, catalog):
    model = catalog.get("tiny")
    handle = engine.submit(GenerationRequest(model, [5, 6, 7], max_tokens=400, sampling=endless(model)))
    events = handle.events(timeout=WAIT)
    next(events)
    handle.cancel()
    last = list(events)[-1]
    assert last.finish_reason == "cancelled" and handle.generated < 400
    deadline = time.monotonic() + WAIT
    while engine.stats()["rows"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stats()["rows"] == 0


def test_full_queue_refuses_and_timeouts_end_requests(catalog):
    model = catalog.get("tiny")
    with Engine(EngineConfig(max_rows=1, max_queue=1, timeout=0.1)) as engine:
        first = engine.submit(GenerationRequest(model, [5, 6, 7], max_tokens=500, sampling=endless(model)))
        deadline = time.monotonic() + WAIT
        while engine.stats()["rows"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        engine.submit(GenerationRequest(model, [5, 6], max_tokens=5))
        with pytest.raises(OverloadedError) as refused:
            engine.submit(GenerationRequest(model, [5], max_tokens=5))
        assert refused.value.retry_after >= 1
        assert list(first.events(timeout=WAIT))[-1].finish_reason == "timeout"


def test_requests_that_cannot_run_are_refused_before_queueing(engine, catalog):
    model = catalog.get("tiny")
    with pytest.raises(RequestError, match="context"):
        engine.submit(GenerationRequest(model, [5] * model.context_length, max_tokens=1))
    with pytest.raises(RequestError, match="empty"):
        engine.submit(GenerationRequest(model, [], max_tokens=1))
    with pytest.raises(RequestError, match="no model named"):
        catalog.get("nope")


class OnlyTokens:
    """A stand-in constraint: only ``allowed`` tokens, done after ``count`` of them."""

    def __init__(self, vocab: int, allowed: list[int], count: int):
        self.mask = np.zeros(vocab, dtype=bool)
        self.mask[allowed] = True
        self.count, self.seen = count, []

    def allowed(self):
        return self.mask

    def advance(self, token: int) -> None:
        self.seen.append(token)

    @property
    def done(self) -> bool:
        return len(self.seen) >= self.count


def test_constrained_rows_take_only_allowed_tokens(engine, catalog, base):
    vocab = base.program.model_info["vocab_size"]
    model = catalog.get("tiny")
    constraints = [OnlyTokens(vocab, [40 + i, 50 + i], 3 + i) for i in range(3)]
    results = run_concurrently([lambda c=c: complete(engine, model, "Hello", max_tokens=20, constraint=c,
                                                     timeout=WAIT) for c in constraints])
    for i, (result, constraint) in enumerate(zip(results, constraints, strict=True)):
        assert len(result.tokens) == 3 + i and set(result.tokens) <= {40 + i, 50 + i}
        assert result.finish_reason == "stop" and constraint.seen == result.tokens


def test_a_failing_constraint_fails_its_batch_not_the_engine(engine, catalog):
    class Broken(OnlyTokens):
        def advance(self, token):
            raise RuntimeError("broken grammar")

    model = catalog.get("tiny")
    handle = engine.submit(GenerationRequest(model, [5, 6], 10, constraint=Broken(384, [7], 5)))
    last = list(handle.events(timeout=WAIT))[-1]
    assert last.finish_reason == "error" and "broken grammar" in last.error
    assert complete(engine, model, "Hello", max_tokens=3, timeout=WAIT).finish_reason in ("stop", "length")
    assert engine.healthy


def test_a_grammar_that_gives_up_ends_its_row_not_its_batch(engine, catalog, base):
    """A request's grammar can fail mid-way (llguidance's limits on a hostile schema): that row
    ends in error, and the rows batched with it go on to their greedy answers."""
    from interp.errors import ConstraintError
    from paw_mlx.constrain import CONSTRAINT_FAILED

    class GivesUp(OnlyTokens):
        def advance(self, token):
            super().advance(token)
            if len(self.seen) == 2:
                raise ConstraintError(f"token {token} breaks the output constraint: parser error: too many items")

    model = catalog.get("tiny")
    vocab = base.program.model_info["vocab_size"]
    others = [engine.submit(GenerationRequest(model, paw_mlx.prompt_ids(base, p, raw=True), 12)) for p in INPUTS[:2]]
    broken = engine.submit(GenerationRequest(model, [5, 6], 12, constraint=GivesUp(vocab, [7, 8], 10)))
    last = list(broken.events(timeout=WAIT))[-1]
    assert last.finish_reason == "error" and last.error.startswith(CONSTRAINT_FAILED), last.error
    for handle, prompt in zip(others, INPUTS[:2], strict=True):
        events = list(handle.events(timeout=WAIT))
        assert events[-1].finish_reason in ("stop", "length"), events[-1].error
        assert [t for e in events for t in e.tokens] == greedy_alone(
            base, paw_mlx.prompt_ids(base, prompt, raw=True), 12)
    assert engine.healthy


def test_seeded_sampling_repeats_and_penalties_apply(engine, catalog):
    model = catalog.get("tiny")
    sampled = SamplingParams(temperature=1.0, seed=11)
    runs = run_concurrently([lambda: complete(engine, model, "Hello", max_tokens=12, sampling=sampled,
                                              timeout=WAIT)] * 3)
    assert runs[0].tokens == runs[1].tokens == runs[2].tokens
    greedy = complete(engine, model, "Hello", max_tokens=12, timeout=WAIT)
    penalized = complete(engine, model, "Hello", max_tokens=12, timeout=WAIT,
                         sampling=SamplingParams(frequency_penalty=2.0, presence_penalty=2.0))
    assert len(set(penalized.tokens)) >= len(set(greedy.tokens))
    assert penalized.tokens != greedy.tokens


def test_two_base_models_run_their_batches_side_by_side(engine, tiny_program, base):
    twin = ModelCatalog()
    first = twin.add_base(base, name="first")
    second = twin.add_base(paw_mlx.load(tiny_program), name="second")  # its own weights: its own batch
    jobs = [lambda m=m, p=p: complete(engine, m, p, max_tokens=6, timeout=WAIT)
            for m in (first, second) for p in INPUTS[:3]]
    results = run_concurrently(jobs)
    want = [greedy_alone(base, paw_mlx.prompt_ids(base, p, raw=True), 6) for p in INPUTS[:3]]
    assert [r.tokens for r in results] == want + want


def test_short_prompts_prefill_together_as_they_would_alone(catalog, base):
    model = catalog.get("tiny")
    chats = [[{"role": "user", "content": INPUTS[i % len(INPUTS)]}] for i in range(12)]
    with Engine(EngineConfig(max_rows=8, prefill_chunk=64)) as engine:
        results = run_concurrently([lambda c=c: complete(engine, model, messages=c, max_tokens=8, timeout=WAIT)
                                    for c in chats])
        assert engine.stats()["prefilled_together"] >= 2
    assert [r.tokens for r in results] == [greedy_alone(base, model.chat_ids(c), 8) for c in chats]


def random_adapter(base, seed: int):
    """A LoRA adapter of random rank-2 updates on every attention projection of the tiny model:
    large enough that each program's greedy outputs differ from the base's and each other's."""
    from interp.lora import linear_sites
    from paw_mlx.programs.adapter import LoraAdapter

    rng = np.random.default_rng(seed)
    modules = {}
    for module, site in linear_sites(base.program).items():
        if "self_attn" in module:
            modules[module] = (rng.normal(0, 0.5, (2, site.in_features)).astype(np.float32),
                               rng.normal(0, 0.5, (site.out_features, 2)).astype(np.float32))
    return LoraAdapter(modules, alpha=2.0)


def test_lora_programs_share_a_batch_with_plain_rows_as_if_alone(base, tiny_program, tmp_path):
    from dataclasses import replace

    from paw_mlx.programs.artifact import read_artifact, write_artifact

    plain = compile_programs(tiny_program, tmp_path / "plain")
    catalog = make_catalog(base, {"options": plain["options"]})
    dirs = {"options": plain["options"]}
    for seed, name in enumerate(("sentiment", "dates")):
        artifact = replace(read_artifact(plain[name]), adapter=random_adapter(base, seed), directory=None)
        dirs[name] = write_artifact(artifact, tmp_path / f"lora-{name}")
        catalog.add_program(dirs[name], name=name)
    assert [catalog.get(n).adapter_index for n in ("options", "sentiment", "dates")] == [0, 1, 2]
    calls = [(("options", "sentiment", "dates")[i % 3], INPUTS[i % len(INPUTS)]) for i in range(12)]
    functions = {name: paw_mlx.function(path, base=tiny_program) for name, path in dirs.items()}
    expected = [functions[name].call_ids([functions[name].token_ids(text)])[0] for name, text in calls]
    with Engine(EngineConfig(max_rows=8, prefill_chunk=8)) as engine:
        results = run_concurrently([lambda name=name, text=text: complete(engine, catalog.get(name), text, timeout=WAIT)
                                    for name, text in calls])
    assert [r.tokens for r in results] == expected
    # the adapters matter: without its adapter, a program answers otherwise
    without = paw_mlx.function(plain["sentiment"], base=tiny_program)
    assert any(without.call_ids([without.token_ids(text)])[0] != want
               for (name, text), want in zip(calls, expected, strict=True) if name == "sentiment")


class SplitLike:
    """A model as a split one looks to the engine (``interp.distributed.driver.Driver``): the plain
    ``model(tokens, cache=...)`` call and its own caches, no slot batches."""

    def __init__(self, model):
        self._model = model
        self.num_layers, self.input_names = model.num_layers, model.input_names
        self.calls = 0

    def make_cache(self):
        return self._model.make_cache()

    def __call__(self, tokens, cache=None, positions=None, key_mask=None, last_only=False):
        self.calls += 1
        return self._model(tokens, cache=cache, positions=positions, key_mask=key_mask, last_only=last_only)


def test_a_model_without_slot_batches_serves_each_row_on_its_own_cache(base):
    from dataclasses import replace

    split = replace(base, model=SplitLike(base.model))
    model = ModelCatalog().add_base(split, name="split")
    prompts = INPUTS[:6]
    budgets = [2 + 3 * i for i in range(len(prompts))]  # rows finish at different steps
    expected = [greedy_alone(base, paw_mlx.prompt_ids(base, p, raw=True), n) for p, n in zip(prompts, budgets,
                                                                                             strict=True)]
    with Engine(EngineConfig(max_rows=4, prefill_chunk=4)) as engine:
        results = run_concurrently([lambda p=p, n=n: complete(engine, model, p, max_tokens=n, timeout=WAIT)
                                    for p, n in zip(prompts, budgets, strict=True)])
        seeded = complete(engine, model, "Hello", max_tokens=6, timeout=WAIT,
                          sampling=SamplingParams.create(temperature=0.9, seed=7))
        again = complete(engine, model, "Hello", max_tokens=6, timeout=WAIT,
                         sampling=SamplingParams.create(temperature=0.9, seed=7))
    assert [r.tokens for r in results] == expected
    assert seeded.tokens == again.tokens
    assert split.model.calls >= sum(budgets)  # one forward pass per row and step
