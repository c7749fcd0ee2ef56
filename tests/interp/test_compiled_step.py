"""The whole decode step as one mx.compile: same logits as the plain interpreter, every step."""

from __future__ import annotations

from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest

from interp import compiled_step
from interp.cache import KVCache
from interp.graph import GraphModel
from interp.program import read_program

PROMPT = [[5, 17, 42, 99, 7], [3, 120, 77, 8, 64]]


@pytest.fixture()
def small_steps(monkeypatch):
    """Grow caches 4 positions at a time so a short decode crosses several capacities."""
    monkeypatch.setattr(KVCache, "step", 4)


def _models(path) -> tuple[GraphModel, GraphModel]:
    program = read_program(path)
    return GraphModel.from_program(program), GraphModel.from_program(program, compile_decode=False)


def _count_whole_steps(model: GraphModel) -> list[int]:
    """Make ``model`` record each call that takes the whole-step path."""
    decoder = model._compiled()
    assert decoder.whole_step is not None
    calls: list[int] = []
    run = decoder.whole_step.run

    def counted(inputs, cache, offset):
        calls.append(offset)
        return run(inputs, cache, offset)

    decoder.whole_step.run = counted
    return calls


def _decode(model: GraphModel, cache: list, token: mx.array, steps: int) -> list[np.ndarray]:
    """Greedy steps from ``token``; returns each step's logits."""
    out = []
    for _ in range(steps):
        logits = model(token, cache=cache)[:, -1, :]
        out.append(np.array(logits))
        token = mx.argmax(logits, axis=-1)[:, None]
    return out


def test_whole_step_matches_eager_across_cache_growth(tiny_program, small_steps):
    compiled, eager = _models(tiny_program)
    calls = _count_whole_steps(compiled)
    ids = mx.array(PROMPT)
    results = []
    for model in (compiled, eager):
        cache = model.make_cache()
        first = model(ids, cache=cache)[:, -1, :]
        results.append(_decode(model, cache, mx.argmax(first, axis=-1)[:, None], 13))
    assert calls == list(range(5, 18))  # every decode step, through capacities 8, 12, 16 and 20
    for step, (got, want) in enumerate(zip(*results, strict=True)):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=f"step {step}")


def test_trimmed_and_copied_caches_stay_correct(tiny_program, small_steps):
    """Positions past a trim are stale in the buffer but masked; a copy never writes into its source."""
    compiled, eager = _models(tiny_program)
    calls = _count_whole_steps(compiled)
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
    assert len(calls) == 11


def test_other_caches_take_the_segment_path(tiny_program):
    """An mlx-lm-style cache object is not paw's KVCache: segments run, the result is the same."""

    class ForeignCache(KVCache):
        pass

    compiled, eager = _models(tiny_program)
    calls = _count_whole_steps(compiled)
    assert not compiled_step.CompiledStep.accepts([ForeignCache()])
    ids = mx.array(PROMPT)
    foreign = [ForeignCache() for _ in range(compiled.num_layers)]
    plain = eager.make_cache()
    compiled(ids, cache=foreign)
    eager(ids, cache=plain)
    token = mx.array([[9], [10]])
    np.testing.assert_allclose(np.array(compiled(token, cache=foreign)), np.array(eager(token, cache=plain)),
                               atol=1e-5, rtol=0)
    assert calls == []


@pytest.mark.parametrize(("attrs", "expected"), [
    ({"layer": 0, "scale": 0.125}, True),
    ({"layer": 0, "scale": 0.125, "window": 0, "softcap": 0.0}, True),
    ({"layer": 0, "scale": 0.125, "window": 4096}, False),
    ({"layer": 0, "scale": 0.125, "softcap": 50.0}, False),
    ({"layer": 0, "scale": 0.125, "alibi_max_bias": 8.0}, False),
])
def test_only_plain_causal_attention_is_compiled_whole(attrs, expected):
    program = SimpleNamespace(nodes=[SimpleNamespace(op="linear", attrs={}), SimpleNamespace(op="attention", attrs=attrs)])
    assert compiled_step.supports(program) is expected
