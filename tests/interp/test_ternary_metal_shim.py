"""The Metal ternary kernel, verified without a Mac: its body compiled as C++ and run on the CPU.

interp/kernels/ternary_matmul.metal is the body given to ``mx.fast.metal_kernel`` (with
ternary_matmul_header.metal as its header). g++ compiles the same text through
interp/kernels/metal_shim.h (address spaces defined away, the thread position a loop
variable, simd_sum emulated across 32 lane threads) and
interp/kernels/ternary_matmul_shim.cpp runs it over the kernel's whole grid (32 lanes x
row blocks x M tokens), on the layout ``TernaryWeight.prepare`` builds. The results are
compared bit for bit with references:

- inputs whose every partial sum is exact in float32 (small dyadic numbers, power-of-two
  scales): the result must equal the plain unpacked reference whatever the order of sums;
- random floats: the result must equal a numpy model of the kernel's summation order
  (lane l adds words l, l + 32, ... in order; simd_sum adds lanes 0..31 in order).

The address spaces MLX gives the inputs are checked by test_metal_address_spaces.py; the
kernel's launch and VJP on the Mac path by test_mac_path.py (fake-Mac stand-in). The real
kernel runs only where Metal exists; that single test skips elsewhere.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import mlx.core as mx
import numpy as np
import pytest

from interp.kernels import ternary as tp
from interp.kernels.ternary_mlx import KERNEL_ROWS, KERNEL_SOURCE, TernaryWeight, kernel_launch
from tests.fake_mac import REAL_METAL

# No test here reaches a device predicate (interp/device.py), checked by instrumenting them
# (docs/devices.md): the fake-Mac pass would run the same branches again, so it leaves them out.
pytestmark = pytest.mark.not_fake_mac_pass

KERNELS = KERNEL_SOURCE.parent
SHAPES = [(1, 64, 128), (1, 96, 576), (3, 40, 100), (5, 17, 1536), (2, 8, 3), (1, 1, 5)]  # (M tokens, N out, K in)
PRESCALE = np.array([1.0, 0.25, 0.0625, 0.015625] * 4, dtype=np.float32)  # 4^-(i % 4)


def _build_shim(tmp_path_factory, element: str = "float"):
    """The kernel compiled as C++ for activations of type ``element``; returns run(x, packed, scale, k, n)."""
    gxx = shutil.which("g++")
    assert gxx is not None, "g++ is required to verify the Metal kernel on the CPU"
    build = tmp_path_factory.mktemp("metal-shim")
    lib = build / f"libternary_shim_{element}.so"
    cmd = [gxx, "-std=c++20", "-O1", "-fno-strict-aliasing", "-Wall", "-Werror", "-shared", "-fPIC", "-pthread",
           f"-DSHIM_T={element}", f"-I{KERNELS}", str(KERNELS / "ternary_matmul_shim.cpp"), "-o", str(lib)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    fn = ctypes.CDLL(str(lib)).ternary_matmul_grid
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_uint32] * 2
    storage = {"float": np.float32, "half": np.float16, "bfloat16_t": np.uint16}[element]

    def run(x: np.ndarray, packed: np.ndarray, scale: np.ndarray, k: int, n: int) -> np.ndarray:
        weight = TernaryWeight.prepare(packed, scale, k, n, path="metal")
        codes = np.ascontiguousarray(np.array(weight.codes))
        x = np.ascontiguousarray(np.pad(np.asarray(x), [(0, 0), (0, weight.padded_in - k)]).astype(storage))
        scale = np.ascontiguousarray(scale, dtype=np.float32)
        dims = np.array([weight.padded_in, n, 1 if scale.size > 1 else 0], dtype=np.uint32)
        (_, row_blocks, _), _ = kernel_launch(x.shape[0], n)
        out = np.zeros((x.shape[0], n), dtype=storage)
        fn(x.ctypes.data, codes.ctypes.data, scale.ctypes.data, dims.ctypes.data, out.ctypes.data, x.shape[0],
           row_blocks)
        return out

    return run


@pytest.fixture(scope="module")
def shim(tmp_path_factory):
    return _build_shim(tmp_path_factory)


def _to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, rounded to nearest even (as Metal and the shim convert)."""
    words = np.asarray(values, np.float32).view(np.uint32).astype(np.uint64)
    return ((words + 0x7FFF + ((words >> 16) & 1)) >> 16).astype(np.uint16)


def _from_bfloat16_bits(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _kernel_order_reference(x: np.ndarray, t: np.ndarray, s: np.ndarray) -> np.ndarray:
    """numpy model of the kernel: per-lane float32 sums in its order, lanes added 0..31,
    sum(x * code) - sum(x), times s (float32 throughout; every m and n at once)."""
    m_count, k = x.shape
    n_count = t.shape[0]
    padded = -(-k // 32) * 32
    xp = np.zeros((m_count, padded), np.float32)
    xp[:, :k] = x
    codes = np.ones((n_count, padded), np.float32)  # padding trits: code 1 (t = 0)
    codes[:, :k] = t + 1
    codes *= np.array([1, 4, 16, 64] * (padded // 4), np.float32)  # masked in place, not shifted
    acc_total = np.zeros((m_count, n_count), np.float32)
    xsum_total = np.zeros((m_count, 1), np.float32)
    for lane in range(32):
        acc = np.zeros((m_count, n_count), np.float32)
        xsum = np.zeros((m_count, 1), np.float32)
        for w in range(lane, padded // 16, 32):
            chunk = xp[:, 16 * w: 16 * w + 16]
            part = np.zeros((m_count, 1), np.float32)
            for i in range(4):
                a, b, c, d = (chunk[:, 4 * i + j: 4 * i + j + 1] for j in range(4))
                part = part + ((a + b) + (c + d))
            xsum = xsum + part
            xs = chunk * PRESCALE
            dot = np.zeros((m_count, n_count), np.float32)
            for byte in range(4):
                terms = [xs[:, None, 4 * byte + j] * codes[None, :, 16 * w + 4 * byte + j] for j in range(4)]
                dot = dot + (((terms[0] + terms[1]) + terms[2]) + terms[3])
            acc = acc + dot
        acc_total = acc_total + acc
        xsum_total = xsum_total + xsum
    scale = np.broadcast_to(s.astype(np.float32), (n_count,))
    return ((acc_total - xsum_total) * scale).astype(np.float32)


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


@pytest.mark.parametrize("element", ["half", "bfloat16_t"])
def test_half_precision_loaders_follow_the_same_order(tmp_path_factory, element):
    """The half and bfloat16 activation loaders: the kernel's float32 sums of the converted
    activations, rounded once to the output type."""
    run = _build_shim(tmp_path_factory, element)
    rng = np.random.default_rng(13)
    m, n, k = 3, 9, 100
    t = rng.integers(-1, 2, size=(n, k)).astype(np.int8)
    s = (rng.random(n) + 0.1).astype(np.float32)
    x32 = rng.standard_normal((m, k)).astype(np.float32)
    if element == "half":
        x = x32.astype(np.float16)
        got = run(x, tp.pack_ternary(t), s, k, n)
        want = _kernel_order_reference(x.astype(np.float32), t, s).astype(np.float16)
    else:
        bits = _to_bfloat16_bits(x32)
        got = run(bits, tp.pack_ternary(t), s, k, n)
        want = _to_bfloat16_bits(_kernel_order_reference(_from_bfloat16_bits(bits), t, s))
    np.testing.assert_array_equal(got, want)
    assert np.count_nonzero(got) > got.size // 2  # real results, not an untouched output buffer


def test_shim_reads_base3_weights_after_the_load_time_repack(shim):
    rng = np.random.default_rng(9)
    t = rng.integers(-1, 2, size=(12, 77)).astype(np.int8)
    x = (rng.integers(-16, 17, size=(2, 77)) / 4).astype(np.float32)
    s = np.array([0.5], dtype=np.float32)
    repacked = tp.base3_to_2bit(tp.pack_ternary_base3(t), 77)
    np.testing.assert_array_equal(shim(x, repacked, s, 77, 12), (x @ t.T.astype(np.float32)) * 0.5)


def test_launch_covers_every_output_row_once():
    for n in (1, 3, 4, 5, 8, 17, 576):
        (lanes, row_blocks, tokens), threadgroup = kernel_launch(3, n)
        assert lanes == 32 and tokens == 3 and threadgroup[0] == 32
        assert (row_blocks - 1) * KERNEL_ROWS < n <= row_blocks * KERNEL_ROWS


@pytest.mark.skipif(not REAL_METAL, reason="needs Metal (this MLX has no Metal GPU)")
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
