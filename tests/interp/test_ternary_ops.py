"""The ternary ops on MLX: the exact affine 2-bit path, the Mac path within its tolerance, act_quant parity.

"Exact" here means bit-identical to the reference MLX computes in float32 for the float
weights the trits stand for: ``x @ (t * s[:, None]).T`` with the same x on the same
device, rounded to x's dtype at the end (max |difference| == 0.0).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from interp import device
from interp.kernels import ternary as tp
from interp.kernels.ternary_mlx import TernaryWeight, group_size_for
from interp.ops import REGISTRY


def _case(out_features, in_features, per_row, seed=0):
    rng = np.random.default_rng(seed)
    t = rng.integers(-1, 2, size=(out_features, in_features)).astype(np.int8)
    s = (rng.random(out_features if per_row else 1) + 0.05).astype(np.float32)
    return t, s


SHAPES = [(96, 576, True), (64, 1536, True), (48, 128, False), (17, 70, True), (5, 33, False)]


@pytest.mark.cpu_path  # MLX's CPU quantized matmul sums in order; a GPU's does not
@pytest.mark.parametrize("packing", ["2bit", "base3"])
@pytest.mark.parametrize(("out_features", "in_features", "per_row"), SHAPES)
@pytest.mark.parametrize("tokens", [1, 7])
def test_affine_path_is_exact(packing, out_features, in_features, per_row, tokens):
    t, s = _case(out_features, in_features, per_row)
    x = mx.array(np.random.default_rng(1).standard_normal((2, tokens, in_features)).astype(np.float32))
    scale = mx.array(s)
    weight = TernaryWeight.prepare(tp.pack(t, packing), scale, in_features, out_features, packing, path="affine")
    y = weight(x)
    w = np.array(mx.array(t.astype(np.float32)) * scale.reshape(-1, 1))
    assert y.shape == (2, tokens, out_features)
    assert np.array_equal(np.array(y), _sequential_matmul(np.array(x), w))


def _sequential_matmul(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x @ w.T in float32, summing over the inner axis strictly in order (one rounding per
    multiply and per add). BLAS libraries reorder and fuse that sum, so they are no
    reference for bit-exactness."""
    acc = np.zeros((*x.shape[:-1], w.shape[0]), dtype=np.float32)
    for k in range(x.shape[-1]):
        acc += x[..., k:k + 1] * w[:, k]
    return acc


#: How far the Metal path may be from the exact product, relative to the largest |output|:
#: its simdgroup sums add in another order than the affine path's sequential float32 sum
#: (float32), and the result is rounded once to the activations' type (float16, bfloat16).
MAC_TOLERANCE = {mx.float32: 1e-5, mx.float16: 1e-3, mx.bfloat16: 1e-2}


@pytest.mark.parametrize("packing", ["2bit", "base3"])
@pytest.mark.parametrize(("out_features", "in_features", "per_row"), SHAPES)
@pytest.mark.parametrize("tokens", [1, 7])  # 2 rows: paw's Metal kernel; 14 rows: MLX's quantized matmul
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_op_on_the_mac_path_is_within_the_metal_tolerance(on_mac_path, packing, out_features, in_features, per_row,
                                                          tokens, dtype):
    t, s = _case(out_features, in_features, per_row)
    x = mx.array(np.random.default_rng(1).standard_normal((2, tokens, in_features)).astype(np.float32)).astype(dtype)
    y = REGISTRY["ternary_linear"].fn(x, mx.array(tp.pack(t, packing)), mx.array(s), None, in_features=in_features,
                                      out_features=out_features, packing=packing)
    assert y.shape == (2, tokens, out_features) and y.dtype == dtype
    exact = _sequential_matmul(np.array(x.astype(mx.float32)), t.astype(np.float32) * s.reshape(-1, 1))
    error = np.abs(np.array(y.astype(mx.float32)) - exact).max()
    assert error <= MAC_TOLERANCE[dtype] * np.abs(exact).max()


def test_op_on_this_machine_is_exact_on_the_cpu_and_within_the_tolerance_elsewhere():
    t, s = _case(24, 96, True)
    x = mx.array(np.random.default_rng(1).standard_normal((3, 96)).astype(np.float32))
    y = REGISTRY["ternary_linear"].fn(x, mx.array(tp.pack_ternary(t)), mx.array(s), None, in_features=96,
                                      out_features=24)
    exact = _sequential_matmul(np.array(x), t.astype(np.float32) * s.reshape(-1, 1))
    if device.on_cpu():
        np.testing.assert_array_equal(np.array(y), exact)
    else:  # Metal (either kernel) or CUDA: the GPU's sum order
        np.testing.assert_allclose(np.array(y), exact, rtol=0, atol=MAC_TOLERANCE[mx.float32] * np.abs(exact).max())


@pytest.mark.cpu_path
def test_affine_path_is_exact_in_float16_with_bias():
    t, s = _case(64, 256, True)
    scale = mx.array(s).astype(mx.float16)
    bias = mx.array(np.random.default_rng(2).standard_normal(64).astype(np.float16))
    x = mx.array(np.random.default_rng(3).standard_normal((3, 256)).astype(np.float16))
    weight = TernaryWeight.prepare(tp.pack_ternary(t), scale, 256, 64, path="affine")
    y = weight(x) + bias
    w = mx.array(t.astype(np.float32)) * scale.astype(mx.float32).reshape(-1, 1)
    reference = (x.astype(mx.float32) @ w.T).astype(mx.float16) + bias  # float32 accumulation, then rounded
    assert y.dtype == mx.float16
    assert mx.abs(y - reference).max().item() == 0.0


def test_prepared_layout_is_the_packed_bytes_read_as_words():
    t, s = _case(8, 64, True)
    packed = tp.pack_ternary(t)
    for path in ("affine", "metal"):  # both kernels read the same words
        weight = TernaryWeight.prepare(packed, s, 64, 8, path=path)
        assert weight.codes.dtype == mx.uint32 and weight.codes.shape == (8, 4)
        np.testing.assert_array_equal(np.array(weight.codes).view(np.uint8), packed)
        assert (weight.affine is not None) == (path == "affine")  # the Metal path builds them on demand
    odd = TernaryWeight.prepare(tp.pack_ternary(t[:, :33]), s, 33, 8, path="metal")
    assert odd.padded_in == 64 and odd.codes.shape == (8, 4)
    np.testing.assert_array_equal(np.array(odd.codes).view(np.uint8)[:, 9:], 0b01010101)  # padding: t = 0
    assert group_size_for(64) == 64 and group_size_for(576) == 64 and group_size_for(70) == 32


def test_wrong_scale_size_is_refused():
    t, _ = _case(8, 64, True)
    with pytest.raises(ValueError, match="1 or 8 entries"):
        TernaryWeight.prepare(tp.pack_ternary(t), np.ones(3, np.float32), 64, 8)


def test_act_quant_matches_torch_bitnet_quantizer():
    import torch  # an export (dev) dependency, always installed with the tests

    from exporter.ternary import paw_act_quant  # the torch reference of the op

    rng = np.random.default_rng(4)
    x = (rng.standard_normal((2, 5, 96)) * rng.random((2, 5, 1)) * 4).astype(np.float32)
    x[0, 0] = 0.0  # an all-zero token takes the 1e-5 floor
    want = paw_act_quant(torch.from_numpy(x), 8).numpy()
    got = np.array(REGISTRY["act_quant"].fn(mx.array(x), bits=8))
    np.testing.assert_array_equal(got, want)
    # at most 256 distinct levels per token
    assert max(len(np.unique(row)) for row in got.reshape(-1, 96)) <= 256


def test_act_quant_matches_transformers_bitlinear():
    import torch  # an export (dev) dependency, always installed with the tests
    from transformers.integrations.bitnet import BitLinear

    x = torch.from_numpy(np.random.default_rng(5).standard_normal((3, 64)).astype(np.float32))
    with torch._dynamo.config.patch(disable=True):
        q, scale = BitLinear.activation_quant(None, x)
    want = (q.float() / scale).numpy()
    got = np.array(REGISTRY["act_quant"].fn(mx.array(x.numpy()), bits=8))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
