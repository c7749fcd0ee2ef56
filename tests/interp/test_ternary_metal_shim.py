"""The Metal ternary kernel, verified without a Mac: its body compiled as C++ and run on the CPU.

interp/kernels/ternary_matmul.metal is the body given to ``mx.fast.metal_kernel``.
g++ compiles the same text through interp/kernels/metal_shim.h (address spaces defined
away, the thread position a loop variable, simd_sum emulated across 32 lane threads) and
interp/kernels/ternary_matmul_shim.cpp runs it over the kernel's whole grid
(32 lanes x N rows x M tokens). The results are compared bit for bit with references:

- inputs whose every partial sum is exact in float32 (small dyadic numbers, power-of-two
  scales): the result must equal the plain unpacked reference whatever the order of sums;
- random floats: the result must equal a numpy model of the kernel's summation order
  (lane l adds bytes l, l + 32, ... in order; simd_sum adds lanes 0..31 in order).

The real kernel runs only where Metal exists; that single test skips elsewhere.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import mlx.core as mx
import numpy as np
import pytest

from interp.kernels import ternary as tp
from interp.kernels.ternary_mlx import KERNEL_SOURCE, TernaryWeight, metal_available

KERNELS = KERNEL_SOURCE.parent
SHAPES = [(1, 64, 128), (1, 96, 576), (3, 40, 100), (5, 17, 1536), (2, 8, 3)]  # (M tokens, N out, K in)


@pytest.fixture(scope="module")
def shim(tmp_path_factory):
    gxx = shutil.which("g++")
    assert gxx is not None, "g++ is required to verify the Metal kernel on the CPU"
    build = tmp_path_factory.mktemp("metal-shim")
    lib = build / "libternary_shim.so"
    cmd = [gxx, "-std=c++20", "-O1", "-Wall", "-Werror", "-shared", "-fPIC", "-pthread", f"-I{KERNELS}",
           str(KERNELS / "ternary_matmul_shim.cpp"), "-o", str(lib)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    so = ctypes.CDLL(str(lib))
    fn = so.ternary_matmul_grid
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_uint32]

    def run(x: np.ndarray, packed: np.ndarray, scale: np.ndarray, k: int, n: int) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        packed = np.ascontiguousarray(packed, dtype=np.uint8)
        scale = np.ascontiguousarray(scale, dtype=np.float32)
        dims = np.array([k, n, packed.shape[1], 1 if scale.size > 1 else 0], dtype=np.uint32)
        out = np.full((x.shape[0], n), np.nan, dtype=np.float32)
        fn(x.ctypes.data, packed.ctypes.data, scale.ctypes.data, dims.ctypes.data, out.ctypes.data, x.shape[0])
        return out

    return run


def _kernel_order_reference(x: np.ndarray, t: np.ndarray, s: np.ndarray) -> np.ndarray:
    """numpy model of the kernel: per-lane float32 sums in its order, lanes added 0..31, times s."""
    m_count, k = x.shape
    n_count = t.shape[0]
    row_bytes = -(-k // 4)
    out = np.zeros((m_count, n_count), dtype=np.float32)
    scale = np.broadcast_to(s.astype(np.float32), (n_count,))
    for m in range(m_count):
        for n in range(n_count):
            total = np.float32(0.0)
            for lane in range(32):
                acc = np.float32(0.0)
                for b in range(lane, row_bytes, 32):
                    for k_index in range(4 * b, min(4 * b + 4, k)):
                        trit = t[n, k_index]
                        if trit:
                            acc = np.float32(acc + (x[m, k_index] if trit > 0 else -x[m, k_index]))
                        else:
                            acc = np.float32(acc + np.float32(0.0))
                total = np.float32(total + acc)
            out[m, n] = np.float32(total * scale[n])
    return out


@pytest.mark.parametrize(("m", "n", "k"), SHAPES)
@pytest.mark.parametrize("per_row", [True, False])
def test_shim_equals_exact_reference_on_dyadic_inputs(shim, m, n, k, per_row):
    rng = np.random.default_rng(k + n)
    t = rng.integers(-1, 2, size=(n, k)).astype(np.int8)
    x = (rng.integers(-64, 65, size=(m, k)) / 8).astype(np.float32)  # sums stay exact in float32
    s = (2.0 ** rng.integers(-3, 3, size=n if per_row else 1)).astype(np.float32)
    got = shim(x, tp.pack_ternary(t), s, k, n)
    reference = (x.astype(np.float64) @ t.T.astype(np.float64) * s.reshape(1, -1)).astype(np.float32)
    np.testing.assert_array_equal(got, reference)


@pytest.mark.parametrize(("m", "n", "k"), [(1, 24, 576), (3, 9, 100), (2, 5, 1536)])
def test_shim_equals_kernel_order_model_on_random_floats(shim, m, n, k):
    rng = np.random.default_rng(7)
    t = rng.integers(-1, 2, size=(n, k)).astype(np.int8)
    x = rng.standard_normal((m, k)).astype(np.float32)
    s = (rng.random(n) + 0.1).astype(np.float32)
    got = shim(x, tp.pack_ternary(t), s, k, n)
    np.testing.assert_array_equal(got, _kernel_order_reference(x, t, s))
    # and it is the matmul it claims to be
    np.testing.assert_allclose(got, x @ (t * s[:, None]).T, rtol=1e-5, atol=1e-5)


def test_shim_reads_base3_weights_after_the_load_time_repack(shim):
    rng = np.random.default_rng(9)
    t = rng.integers(-1, 2, size=(12, 77)).astype(np.int8)
    x = (rng.integers(-16, 17, size=(2, 77)) / 4).astype(np.float32)
    s = np.array([0.5], dtype=np.float32)
    repacked = tp.base3_to_2bit(tp.pack_ternary_base3(t), 77)
    np.testing.assert_array_equal(shim(x, repacked, s, 77, 12), (x @ t.T.astype(np.float32)) * 0.5)


@pytest.mark.skipif(not metal_available(), reason="needs Metal (mx.metal.is_available() is False on this machine)")
def test_real_metal_kernel():
    rng = np.random.default_rng(11)
    for m, n, k in SHAPES:
        t = rng.integers(-1, 2, size=(n, k)).astype(np.int8)
        s_exact = (2.0 ** rng.integers(-3, 3, size=n)).astype(np.float32)
        x_dyadic = (rng.integers(-64, 65, size=(m, k)) / 8).astype(np.float32)
        exact = TernaryWeight.prepare(tp.pack_ternary(t), s_exact, k, n, path="metal")
        want = (x_dyadic @ t.T.astype(np.float32)) * s_exact
        np.testing.assert_array_equal(np.array(exact(mx.array(x_dyadic))), want)
        s = (rng.random(n) + 0.1).astype(np.float32)
        weight = TernaryWeight.prepare(tp.pack_ternary(t), s, k, n, path="metal")
        x = rng.standard_normal((m, k)).astype(np.float32)
        np.testing.assert_allclose(np.array(weight(mx.array(x))), x @ (t * s[:, None]).T, rtol=1e-5, atol=1e-5)
