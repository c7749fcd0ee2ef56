"""The compiled decode step against the plain interpreter (``GraphModel.run``), step by step.

Caches grow 4 positions at a time here, so a short decode crosses several buffer
capacities (each a retrace); the architectures' sliding windows (tests/archs.py) are
shorter than the prompt, so every step slides them.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from interp.cache import KVCache
from interp.compiled_step import CompiledStep
from interp.graph import GraphModel
from interp.program import read_program
from tests.archs import ARCHS, PROMPT_LEN

PROMPT = [[5, 17, 42, 99, 7], [3, 120, 77, 8, 64]]
#: decode steps per architecture: at offsets 8 and 12 the buffers grow (to 12, then 16)
ARCH_STEPS = 5


@pytest.fixture()
def small_steps(monkeypatch):
    """Grow caches 4 positions at a time so a short decode crosses several capacities."""
    monkeypatch.setattr(KVCache, "step", 4)


@pytest.fixture()
def compiled_calls(monkeypatch) -> list[int]:
    """The offset of every call that takes the compiled step, in order."""
    calls: list[int] = []
    run = CompiledStep.run

    def counted(self, inputs, cache, offset):
        calls.append(offset)
        return run(self, inputs, cache, offset)

    monkeypatch.setattr(CompiledStep, "run", counted)
    return calls


def _plain(model: GraphModel) -> GraphModel:
    """A model over the same program and weights that never compiles."""
    return GraphModel(model.program, model.consts, compile_decode=False)


def _models(path) -> tuple[GraphModel, GraphModel]:
    model = GraphModel.from_program(read_program(path))
    return model, _plain(model)


def _decode(model: GraphModel, cache: list, token: mx.array, steps: int) -> tuple[list[np.ndarray], list]:
    """Greedy steps from ``token``; returns each step's last logits and the tokens chosen."""
    logits_seen, tokens = [], []
    for _ in range(steps):
        logits = model(token, cache=cache)[:, -1, :]
        token = mx.argmax(logits, axis=-1)[:, None]
        logits_seen.append(np.array(logits))
        tokens.append(np.array(token).ravel().tolist())
    return logits_seen, tokens


def _prefill_and_decode(model: GraphModel, prompt: mx.array, steps: int) -> tuple[list[np.ndarray], list]:
    cache = model.make_cache()
    first = model(prompt, cache=cache)[:, -1, :]
    return _decode(model, cache, mx.argmax(first, axis=-1)[:, None], steps)


def test_whole_step_matches_eager_across_cache_growth(tiny_program, small_steps, compiled_calls):
    compiled, eager = _models(tiny_program)
    ids = mx.array(PROMPT)
    (got, got_tokens), (want, want_tokens) = (_prefill_and_decode(m, ids, 13) for m in (compiled, eager))
    assert compiled_calls == list(range(5, 18))  # every decode step, through capacities 8, 12, 16 and 20
    assert got_tokens == want_tokens
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=0, err_msg=f"step {step}")


def test_nothing_is_in_flight_while_mlx_traces_a_step(tiny_program, small_steps, compiled_calls, monkeypatch):
    """MLX's trace reads a program's evaluated scalars twice and crashed when one became ready in
    between (the previous step's async_eval): the step waits for pending work before each new trace
    (a new cache capacity), and only then."""
    waits: list[int] = []
    synchronize = mx.synchronize
    monkeypatch.setattr(mx, "synchronize", lambda *a, **k: (waits.append(len(compiled_calls)), synchronize(*a, **k)))
    compiled, _ = _models(tiny_program)
    _prefill_and_decode(compiled, mx.array(PROMPT), 13)
    assert compiled_calls == list(range(5, 18))  # capacities 8 (offsets 5-7), 12, 16 and 20
    assert waits == [1, 4, 8, 12]  # the first call at each capacity, counted when it is made


def test_trimmed_and_copied_caches_stay_correct(tiny_program, small_steps, compiled_calls):
    """Positions past a trim are stale in the buffer but masked; a copy never writes into its source."""
    compiled, eager = _models(tiny_program)
    ids = mx.array(PROMPT[:1])
    token = mx.array([[11]])
    base = compiled.make_cache()
    compiled(ids, cache=base)
    before = np.array(compiled(token, cache=[c.copy() for c in base])[:, -1, :])
    _decode(compiled, [c.copy() for c in base], token, 6)  # a copy decodes past its source's capacity
    _decode(compiled, base, token, 3)
    for c in base:
        assert c.trim(3) == 3
    after = np.array(compiled(token, cache=base)[:, -1, :])
    reference = eager.make_cache()
    eager(ids, cache=reference)
    want = np.array(eager(token, cache=reference)[:, -1, :])
    np.testing.assert_allclose(before, want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(after, want, atol=1e-5, rtol=0)
    assert len(compiled_calls) == 11


def test_other_caches_and_an_empty_cache_run_the_plain_interpreter(tiny_program, compiled_calls):
    """An mlx-lm-style cache object is not paw's KVCache, and a first step has nothing to
    read at capacity: both run ``GraphModel.run``, with the same result."""

    class ForeignCache(KVCache):
        pass

    compiled, eager = _models(tiny_program)
    assert not CompiledStep.accepts([ForeignCache()])
    assert not CompiledStep.accepts(compiled.make_cache())
    assert not CompiledStep.accepts(None)
    ids = mx.array(PROMPT)
    foreign = [ForeignCache() for _ in range(compiled.num_layers)]
    plain = eager.make_cache()
    compiled(ids, cache=foreign)
    eager(ids, cache=plain)
    token = mx.array([[9], [10]])
    np.testing.assert_allclose(np.array(compiled(token, cache=foreign)), np.array(eager(token, cache=plain)),
                               atol=1e-5, rtol=0)
    first = compiled(token, cache=compiled.make_cache())
    np.testing.assert_allclose(np.array(first), np.array(eager(token, cache=eager.make_cache())), atol=1e-5, rtol=0)
    assert compiled_calls == []


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_decodes_the_same_compiled(arch_cases, arch, small_steps, compiled_calls):
    """Sliding windows, soft-capping, ALiBi, MoE routing, ...: each compiled step's logits are
    the plain interpreter's over the same tokens (one ``GraphModel.run`` of the whole
    sequence), and so is each greedy choice, while the windows slide and the buffers grow."""
    case = arch_cases(arch)
    prompt = mx.array(case.ids.numpy()[:, :PROMPT_LEN])
    cache = case.model.make_cache()
    first = mx.argmax(case.model(prompt, cache=cache)[:, -1, :], axis=-1)[:, None]
    got, tokens = _decode(case.model, cache, first, ARCH_STEPS)
    assert compiled_calls == list(range(PROMPT_LEN, PROMPT_LEN + ARCH_STEPS))
    fed = mx.concatenate([prompt, first, mx.array(tokens[:-1], dtype=mx.int32).T], axis=1)
    want = np.array(_plain(case.model)(fed)[:, PROMPT_LEN:, :])
    np.testing.assert_array_equal(np.array(tokens).T, want.argmax(axis=-1))
    for step, logits in enumerate(got):
        np.testing.assert_allclose(logits, want[:, step], atol=1e-4, rtol=0, err_msg=f"{arch}, step {step}")


def _after_prefix(model: GraphModel, prompt: mx.array) -> list:
    cache = model.make_cache()
    mx.eval(model(prompt, cache=cache))
    return cache


def _short_input(model: GraphModel, cache: list, tokens: mx.array, last_only: bool) -> np.ndarray:
    """Logits of ``tokens`` after a copy of ``cache`` (so the prefix can be reused)."""
    return np.array(model(tokens, cache=[c.copy() for c in cache], last_only=last_only))


def test_a_short_input_after_a_prefix_is_traced_the_second_time_its_shape_is_seen(tiny_program, monkeypatch):
    """A program call's input after its cached prefix: the first sight of a shape runs the plain
    interpreter, the second traces it; both give the plain interpreter's logits, the last
    position's alone with ``last_only``, and the cache continues where the input ended."""
    compiled, eager = _models(tiny_program)
    traced: list[tuple] = []
    prefill = CompiledStep.prefill

    def counted(self, inputs, cache, offset, last_only=False):
        outputs = prefill(self, inputs, cache, offset, last_only)
        traced.append((inputs["input_ids"].shape[1], last_only, outputs is not None))
        return outputs

    monkeypatch.setattr(CompiledStep, "prefill", counted)
    prompt = mx.array(PROMPT)
    cache, reference = _after_prefix(compiled, prompt), _after_prefix(eager, prompt)
    tokens = mx.array([[11, 12, 13], [21, 22, 23]])
    for last_only in (True, False, True, False):
        want = _short_input(eager, reference, tokens, last_only)
        got = _short_input(compiled, cache, tokens, last_only)
        assert got.shape == want.shape == (2, 1 if last_only else 3, want.shape[-1])
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert traced == [(3, True, False), (3, False, False), (3, True, True), (3, False, True)]
    # the cache after a traced input decodes like the plain interpreter's
    grown, plain = [c.copy() for c in cache], [c.copy() for c in reference]
    compiled(tokens, cache=grown)
    eager(tokens, cache=plain)
    assert grown[0].offset == plain[0].offset == 8
    step = mx.array([[5], [6]])
    np.testing.assert_allclose(np.array(compiled(step, cache=grown)), np.array(eager(step, cache=plain)),
                               atol=1e-5, rtol=0)


def test_long_inputs_and_too_many_shapes_stay_with_the_plain_interpreter(tiny_program, monkeypatch):
    import interp.compiled_step as compiled_step

    monkeypatch.setattr(compiled_step, "SHORT_PREFILL", 4)
    monkeypatch.setattr(compiled_step, "MAX_PREFILL_TRACES", 1)
    compiled, eager = _models(tiny_program)
    cache, reference = _after_prefix(compiled, mx.array(PROMPT)), _after_prefix(eager, mx.array(PROMPT))
    step = compiled._compiled()
    for length in (5, 2, 3):  # too long; traced (the one shape allowed); over the cap
        tokens = mx.array([[7] * length, [8] * length])
        for _ in range(3):
            got = _short_input(compiled, cache, tokens, True)
            np.testing.assert_allclose(got, _short_input(eager, reference, tokens, True), atol=1e-5, rtol=0)
    assert [(batch, length) for batch, length, _, _ in step._traced] == [(2, 2)]


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_runs_a_short_input_the_same_traced(arch_cases, arch, small_steps):
    """A short input after a cached prompt, traced (its second sight), against the plain
    interpreter over the whole sequence: the same last-position logits, for every
    architecture's attention, positions and head."""
    case = arch_cases(arch)
    ids = case.ids.numpy()
    prompt, tokens = mx.array(ids[:, :PROMPT_LEN - 3]), mx.array(ids[:, PROMPT_LEN - 3:PROMPT_LEN])
    cache = _after_prefix(case.model, prompt)
    want = np.array(_plain(case.model)(mx.array(ids[:, :PROMPT_LEN]))[:, -1:, :])
    for _ in range(2):  # plain, then traced
        np.testing.assert_allclose(_short_input(case.model, cache, tokens, True), want, atol=1e-4, rtol=0,
                                   err_msg=arch)
    batch = ids.shape[0]
    assert any(shape[:2] == (batch, 3) and shape[3] for shape in case.model._compiled()._traced), arch
