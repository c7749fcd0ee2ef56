"""The metal_kernel stand-in refuses what MLX and Metal refuse, and the ternary kernel trains on a Mac.

The stand-in (tests/fake_mac.py) is what lets the suite take the Mac path on a CPU, so
it is held to MLX's behaviour here: argument checks, launch checks, a compile check of
the source MLX would write, and no VJP. The ternary layer wraps the kernel in an
``mx.custom_function`` whose VJP is the affine path's: its gradient is the affine
path's gradient exactly.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from interp.kernels import ternary as tp
from interp.kernels import ternary_mlx
from interp.kernels.ternary_mlx import (
    KERNEL_HEADER,
    KERNEL_NAME,
    KERNEL_SOURCE,
    TernaryWeight,
    metal_matmul,
)
from tests.fake_mac import metal_kernel


def _weight(out_features=12, in_features=70, seed=0, path="metal"):
    rng = np.random.default_rng(seed)
    t = rng.integers(-1, 2, size=(out_features, in_features)).astype(np.int8)
    s = (2.0 ** rng.integers(-2, 2, size=out_features)).astype(np.float32)
    return t, s, TernaryWeight.prepare(tp.pack_ternary(t), s, in_features, out_features, path=path)


def _kernel(source=None):
    return metal_kernel(name=KERNEL_NAME, input_names=["x", "codes", "scale", "dims"], output_names=["out"],
                        source=source or KERNEL_SOURCE.read_text(), header=KERNEL_HEADER.read_text())


def _call(kernel, grid, threadgroup, rows=2, out_features=12, inputs=None):
    _, s, weight = _weight(out_features)
    x = mx.ones((rows, weight.padded_in))
    dims = mx.array([weight.padded_in, out_features, 1], dtype=mx.uint32)
    return kernel(inputs=inputs or [x, weight.codes, weight.scale, dims], template=[("T", mx.float32)], grid=grid,
                  threadgroup=threadgroup, output_shapes=[(rows, out_features)], output_dtypes=[mx.float32])


def test_stand_in_computes_the_exact_product_on_dyadic_inputs(on_mac_path):
    t, s, weight = _weight()
    x = (np.random.default_rng(3).integers(-32, 33, size=(5, 70)) / 4).astype(np.float32)  # sums exact
    got = np.array(weight(mx.array(x)))
    np.testing.assert_array_equal(got, (x @ t.T.astype(np.float32)) * s)


def test_stand_in_checks_the_call_as_mlx_and_metal_do():
    kernel = _kernel()
    (out,) = _call(kernel, (32, 3, 2), (32, 2, 1))
    assert out.shape == (2, 12)
    with pytest.raises(ValueError, match="Expected `inputs` to have size 4 but got size 3"):
        _call(kernel, (32, 3, 2), (32, 2, 1), inputs=[mx.ones((2, 96))] * 3)
    with pytest.raises(ValueError, match=r"Thread group size \(2048\) is greater"):
        _call(kernel, (32, 3, 2), (32, 64, 1))
    with pytest.raises(AssertionError, match="grid y 2 blocks of 4 rows for 12 outputs"):
        _call(kernel, (32, 2, 2), (32, 2, 1))  # a launch that misses the last block of rows
    with pytest.raises(AssertionError, match="grid z 1 for 2 rows"):
        _call(kernel, (32, 3, 1), (32, 2, 1))
    with pytest.raises(AssertionError, match="no reference for Metal kernel 'other'"):
        metal_kernel(name="other", input_names=["x"], output_names=["y"], source="")


def test_stand_in_refuses_a_source_that_would_not_compile():
    broken = KERNEL_SOURCE.read_text().replace("const device T* xrow", "const constant T* xrow")
    with pytest.raises(AssertionError, match="would not compile"):
        _call(_kernel(broken), (32, 3, 2), (32, 2, 1))


def test_stand_in_has_no_vjp_like_mlx(on_mac_path):
    _, _, weight = _weight()
    x = mx.ones((2, weight.padded_in))

    def through_the_bare_kernel(v):
        return metal_matmul(v, weight.codes, weight.scale, weight.out_features).sum()

    with pytest.raises(ValueError, match="vjp.*Not implemented for CustomKernel"):
        mx.grad(through_the_bare_kernel)(x)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_ternary_layer_gradient_on_the_mac_path_is_the_affine_gradient(on_mac_path, monkeypatch, dtype):
    t, s, metal = _weight(out_features=12, in_features=70, seed=5)
    affine = TernaryWeight.prepare(tp.pack_ternary(t), s, 70, 12, path="affine")
    x = mx.random.normal((2, 3, 70), key=mx.random.key(0)).astype(dtype)
    cotangent = mx.random.normal((2, 3, 12), key=mx.random.key(1)).astype(dtype)
    launches = []
    real = ternary_mlx.metal_matmul
    monkeypatch.setattr(ternary_mlx, "metal_matmul", lambda *a: launches.append(a) or real(*a))

    def loss(weight):
        return lambda v: (weight(v) * cotangent).astype(mx.float32).sum()

    got = mx.grad(loss(metal))(x)
    assert launches, "the forward pass ran the Metal kernel"
    want = mx.grad(loss(affine))(x)
    assert got.dtype == dtype and mx.array_equal(got, want).item()
    dense = np.array(cotangent.astype(mx.float32)) @ (t * s[:, None])  # d(x @ W.T) / dx = cotangent @ W
    np.testing.assert_allclose(np.array(got.astype(mx.float32)), dense, rtol=1e-2, atol=1e-2)
