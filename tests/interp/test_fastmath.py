"""The polynomial exp, sigmoid, SiLU and softmax of interp/ops/fastmath.py, against float64."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from interp import device
from interp.ops import REGISTRY, fastmath


def test_exp_relative_error_over_the_whole_float32_range():
    x = np.linspace(fastmath.EXP_MIN, fastmath.EXP_MAX, 1_000_003).astype(np.float32)
    got = np.array(fastmath.exp(mx.array(x))).astype(np.float64)
    want = np.exp(x.astype(np.float64))
    assert np.max(np.abs(got - want) / want) < 2e-7


def test_exp_edge_values():
    x = mx.array([0.0, -np.inf, np.inf, np.nan, 100.0, -100.0, 88.8, -87.4, 1e-30])
    got = np.array(fastmath.exp(x))
    assert got[0] == 1.0
    assert got[1] == 0.0 and got[5] == 0.0 and got[7] == 0.0  # below float32's normals: 0
    assert np.isposinf(got[2]) and np.isposinf(got[4]) and np.isposinf(got[6])
    assert np.isnan(got[3])
    assert got[8] == 1.0


def test_sigmoid_and_silu_match_float64():
    x = np.linspace(-100, 100, 20_001).astype(np.float32)
    want_sigmoid = 1 / (1 + np.exp(-x.astype(np.float64)))
    np.testing.assert_allclose(np.array(fastmath.sigmoid(mx.array(x))), want_sigmoid, rtol=5e-7, atol=1e-37)
    np.testing.assert_allclose(np.array(fastmath.silu(mx.array(x))), x * want_sigmoid, rtol=5e-7, atol=1e-30)


def test_softmax_matches_float64_with_masked_and_empty_rows():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((4, 3, 700)) * 8).astype(np.float32)
    x[0, 1, 100:] = -np.inf  # a masked tail
    x[2, 2, :] = -np.inf  # a row with nothing to attend to
    got = np.array(fastmath.softmax(mx.array(x)))
    shifted = np.exp(x.astype(np.float64) - np.max(x, axis=-1, keepdims=True).clip(-1e30))
    total = shifted.sum(axis=-1, keepdims=True)
    want = shifted / np.where(total == 0, 1, total)
    # float32 rounds x - max (|x| up to ~40 here) to 2e-6 of itself; so does mx.softmax
    np.testing.assert_allclose(got, want, rtol=5e-6, atol=1e-9)
    precise = np.array(mx.softmax(mx.array(x[:2]), axis=-1, precise=True))
    np.testing.assert_allclose(got[:2], precise, rtol=5e-6, atol=1e-9)
    assert np.all(got[0, 1, 100:] == 0) and np.all(got[2, 2] == 0)


def test_half_precision_in_half_precision_out():
    x = mx.linspace(-10, 10, 5000).astype(mx.bfloat16)
    got = fastmath.exp(x)
    assert got.dtype == mx.bfloat16
    want = np.exp(np.array(x.astype(mx.float32)).astype(np.float64))
    np.testing.assert_allclose(np.array(got.astype(mx.float32)), want, rtol=2**-8)


def test_fast_math_only_for_large_float32_arrays_on_the_cpu():
    assert fastmath.use_fast_math(mx.zeros((fastmath.MIN_ELEMENTS,))) == device.on_cpu()
    assert not fastmath.use_fast_math(mx.zeros((fastmath.MIN_ELEMENTS - 1,)))
    assert not fastmath.use_fast_math(mx.zeros((fastmath.MIN_ELEMENTS,), dtype=mx.int32))
    assert not fastmath.use_fast_math(mx.zeros((fastmath.MIN_ELEMENTS,), dtype=mx.bfloat16))


@pytest.mark.parametrize("op", ["exp", "sigmoid", "silu"])
def test_ops_take_the_fast_path_on_large_arrays_on_the_cpu_and_agree_with_mlx(op):
    """On the CPU the ops are this module's functions; on a GPU they are MLX's own."""
    x = mx.random.normal((3, fastmath.MIN_ELEMENTS), key=mx.random.key(1)) * 5
    got = REGISTRY[op].fn(x)
    want = {"exp": mx.exp, "sigmoid": mx.sigmoid, "silu": lambda v: v * mx.sigmoid(v)}[op](x)
    taken = getattr(fastmath, op)(x) if device.on_cpu() else want
    np.testing.assert_array_equal(np.array(got), np.array(taken))
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("path", ["cpu", "metal"])
def test_fast_math_follows_the_device_predicate(path):
    from tests.fake_mac import device_path

    x = mx.random.normal((3, fastmath.MIN_ELEMENTS), key=mx.random.key(1)) * 5
    fast, mlx_exp = np.array(fastmath.exp(x)), np.array(mx.exp(x))
    assert not np.array_equal(fast, mlx_exp)  # the two paths are told apart by their last bits
    with device_path(path):
        assert fastmath.use_fast_math(x) == (path == "cpu")
        got = np.array(REGISTRY["exp"].fn(x))
    np.testing.assert_array_equal(got, fast if path == "cpu" else mlx_exp)


@pytest.mark.parametrize("dim", [-1, 0, 1])
def test_softmax_op_over_any_axis(dim):
    x = mx.random.normal((64, 80, 3), key=mx.random.key(2)) * 4
    got = REGISTRY["softmax"].fn(x, dim=dim)
    np.testing.assert_allclose(np.array(got), np.array(mx.softmax(x, axis=dim, precise=True)), rtol=1e-6, atol=1e-9)


def test_same_numbers_inside_a_compiled_function():
    x = mx.random.normal((5000,), key=mx.random.key(3)) * 20
    traced = mx.compile(lambda v: fastmath.exp(v * 0.5) + 1.0)
    np.testing.assert_allclose(np.array(traced(x)), np.array(fastmath.exp(x * 0.5) + 1.0), rtol=1e-7)


def test_per_shape_cache_is_bounded_and_stays_correct():
    bounded = fastmath._PerShape(fastmath._exp, limit=3)
    first = bounded._compiled
    for n in range(1, 6):
        x = mx.arange(n, dtype=mx.float32)
        np.testing.assert_allclose(np.array(bounded(x)), np.exp(np.arange(n)), rtol=2e-7)
    assert bounded._compiled is not first  # rebuilt once past the limit
    assert len(bounded._shapes) <= 3


@pytest.mark.parametrize("name", ["exp", "sigmoid", "silu", "softmax"])
def test_gradients_match_mlx(name):
    """Programs are compiled by gradient descent through the model, so the fast functions
    carry their derivatives (MLX cannot differentiate the bit-cast inside exp)."""
    x = mx.random.normal((50, 100), key=mx.random.key(4)) * 4
    w = mx.random.normal((50, 100), key=mx.random.key(5))
    fast = getattr(fastmath, name)
    ref = {"exp": mx.exp, "sigmoid": mx.sigmoid, "silu": lambda v: v * mx.sigmoid(v),
           "softmax": lambda v: mx.softmax(v, axis=-1, precise=True)}[name]
    got = mx.grad(lambda v: (fast(v) * w).sum())(x)
    want = mx.grad(lambda v: (ref(v) * w).sum())(x)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=2e-6, atol=2e-6 * float(mx.abs(want).max()))
