"""The ops fusion and quantization produce, against torch / dequantized references.

(Kept here until the shared tests/interp/test_op_parity.py CASES table exists in this branch.)
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch

from interp import device
from interp.graph import RunContext
from interp.ops import REGISTRY


def _hf_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, mscale: float) -> torch.Tensor:
    freqs = positions[:, :, None].float() * inv_freq[None, None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = (emb.cos() * mscale)[:, None], (emb.sin() * mscale)[:, None]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


@pytest.mark.parametrize("offset", [0, 5, 300])
@pytest.mark.parametrize("mscale", [1.0, 0.75])
def test_rope_fast_and_explicit_paths_match_hf(offset, mscale):
    rng = np.random.default_rng(offset)
    x = rng.standard_normal((2, 3, 4, 16)).astype(np.float32)
    inv_freq = (1.0 / (10000 ** (np.arange(0, 16, 2) / 16))).astype(np.float32)
    inv_freq[-2:] *= 0.25  # a "scaled" frequency table (llama3-style) must stay exact
    pos = np.broadcast_to(np.arange(offset, offset + 4), (2, 4)).astype(np.int32)
    ref = _hf_rope(torch.tensor(x), torch.tensor(pos), torch.tensor(inv_freq), mscale).numpy()
    rope = REGISTRY["rope"].fn
    for ctx_offset in (offset, mx.array(offset, dtype=mx.int32), None):
        got = rope(RunContext(cache=None, offset=ctx_offset), mx.array(x), mx.array(pos), mx.array(inv_freq),
                   mscale=mscale)
        np.testing.assert_allclose(np.array(got), ref, atol=2e-5, rtol=0)


def test_rope_explicit_path_handles_rows_at_different_positions():
    x = np.random.default_rng(1).standard_normal((2, 1, 3, 8)).astype(np.float32)
    inv_freq = (1.0 / (10000 ** (np.arange(0, 8, 2) / 8))).astype(np.float32)
    pos = np.array([[0, 1, 2], [7, 8, 9]], dtype=np.int32)
    ref = _hf_rope(torch.tensor(x), torch.tensor(pos), torch.tensor(inv_freq), 1.0).numpy()
    got = REGISTRY["rope"].fn(RunContext(cache=None, offset=None), mx.array(x), mx.array(pos), mx.array(inv_freq))
    np.testing.assert_allclose(np.array(got), ref, atol=2e-5, rtol=0)


def test_rope_table_is_computed_once_per_call_and_shared_by_layers():
    """On the CPU every layer's queries and keys reuse one cos/sin table per call."""
    inv_freq = mx.array((1.0 / (10000 ** (np.arange(0, 8, 2) / 8))).astype(np.float32))
    ctx = RunContext(cache=None, offset=3)
    rope = REGISTRY["rope"].fn
    q, k = mx.ones((1, 4, 2, 8)), mx.ones((1, 2, 2, 8))
    first, second = rope(ctx, q, None, inv_freq), rope(ctx, k, None, inv_freq)
    assert len(ctx.shared) == (1 if device.on_cpu() else 0)  # a GPU takes mx.fast.rope: no table
    explicit = REGISTRY["rope"].fn(RunContext(cache=None, offset=None), k, mx.array([[3, 4]]), inv_freq)
    np.testing.assert_allclose(np.array(second), np.array(explicit), atol=1e-6)
    np.testing.assert_allclose(np.array(first[:, :2]), np.array(second), atol=0)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_linear_and_embedding_match_dequantized_weights(bits):
    w = mx.random.normal((48, 128), key=mx.random.key(bits))
    q, scales, biases = mx.quantize(w, group_size=64, bits=bits)
    dense = mx.dequantize(q, scales, biases, group_size=64, bits=bits)
    x = mx.random.normal((2, 5, 128), key=mx.random.key(3))
    bias = mx.arange(48, dtype=mx.float32)
    got = REGISTRY["quantized_linear"].fn(x, q, scales, biases, bias, group_size=64, bits=bits)
    np.testing.assert_allclose(np.array(got), np.array(x @ dense.T + bias), atol=1e-4, rtol=1e-5)
    ids = mx.array([[3, 0, 47], [5, 5, 1]])
    rows = REGISTRY["quantized_embedding"].fn(q, scales, biases, ids, group_size=64, bits=bits)
    np.testing.assert_array_equal(np.array(rows), np.array(mx.take(dense, ids, axis=0)))


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (9, 3), (8, 1)])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("length", [1, 6])  # a decode step, and a chunk of prompt after 31 cached keys
def test_explicit_attention_matches_fast_sdpa(heads, kv_heads, masked, length):
    """The written-out attention (grouped heads as a broadcast axis, fast softmax on the CPU)
    computes what mx.fast's SDPA does, with causality, key masks and grouped-query heads."""
    from interp.ops.attention import causal_mask, explicit_attention

    keys = 37
    rng = np.random.default_rng(heads * 10 + kv_heads + length)
    q = mx.array(rng.standard_normal((2, heads, length, 16)).astype(np.float32))
    k = mx.array(rng.standard_normal((2, kv_heads, keys, 16)).astype(np.float32))
    v = mx.array(rng.standard_normal((2, kv_heads, keys, 16)).astype(np.float32))
    mask = causal_mask(length, keys)[None, None] if length > 1 else None
    if masked:  # row 1 is padded: its first 5 keys are not real
        real = mx.array(np.arange(keys)[None, :] >= np.array([[0], [5]]))[:, None, None, :]
        mask = real if mask is None else mask & real
    got = explicit_attention(q, k, v, scale=0.25, mask=mask)
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask)
    assert got.shape == want.shape == (2, heads, length, 16)
    np.testing.assert_allclose(np.array(got), np.array(want), atol=2e-6, rtol=0)
    if masked:  # and the padded keys really are ignored
        alone_mask = mask[1:, :, :, 5:] if length > 1 else None
        alone = explicit_attention(q[1:], k[1:, :, 5:], v[1:, :, 5:], scale=0.25, mask=alone_mask)
        np.testing.assert_allclose(np.array(got[1:]), np.array(alone), atol=2e-6, rtol=0)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("chunk", [0, 16])
def test_long_prompt_attention_in_query_blocks_matches_fast_sdpa(padded, chunk, monkeypatch):
    """A prompt longer than a block (here 3.3 blocks, after 20 cached keys) is attended in
    blocks that each skip the keys after their last query: the same result. Chunks count
    positions, which in a padded row start after its pads."""
    import interp.ops.attention as attention_module

    monkeypatch.setattr(attention_module, "QUERY_BLOCK", 30)
    rng = np.random.default_rng(7)
    length, total = 100, 120
    q = mx.array(rng.standard_normal((2, 6, length, 8)).astype(np.float32))
    k, v = (mx.array(rng.standard_normal((2, 2, total, 8)).astype(np.float32)) for _ in range(2))
    pads = np.array([[0], [9]]) if padded else np.array([[0], [0]])
    key_mask = mx.array(np.arange(total)[None, :] >= pads) if padded else None
    got = REGISTRY["attention"].fn(RunContext(cache=None, key_mask=key_mask), q, k, v, layer=0, scale=0.4,
                                   chunk=chunk)
    mask = attention_module.causal_mask(length, total)[None, None]
    if chunk:
        positions = np.arange(total)[None, :] - pads  # [2, total]
        rows = positions[:, None, -length:, None] // chunk
        mask = mask & mx.array(rows == positions[:, None, None, :] // chunk)
    if padded:
        mask = mask & key_mask[:, None, None, :]
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.4, mask=mask)
    np.testing.assert_allclose(np.array(got), np.array(want), atol=2e-6, rtol=0)


@pytest.mark.parametrize("length", [1, 5])
def test_attention_op_on_half_precision_matches_float32(length):
    """bfloat16 attention (products in float32 for a prompt, in bfloat16 for a decode row)
    stays within bfloat16's rounding of the float32 result."""
    rng = np.random.default_rng(length)
    q, k, v = (mx.array(rng.standard_normal((1, 6, n, 8)).astype(np.float32)) for n in (length, 9, 9))
    attention = REGISTRY["attention"].fn
    want = attention(RunContext(cache=None), q, k[:, :2], v[:, :2], layer=0, scale=0.3)
    half = [a.astype(mx.bfloat16) for a in (q, k[:, :2], v[:, :2])]
    got = attention(RunContext(cache=None), *half, layer=0, scale=0.3)
    assert got.dtype == mx.bfloat16
    np.testing.assert_allclose(np.array(got.astype(mx.float32)), np.array(want), atol=0.05, rtol=0)


@pytest.mark.parametrize("tokens", [1, 40])  # a decode row, and a prefill over the threshold
@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_linear_both_paths_match_dequantized_weights(bits, tokens, monkeypatch):
    """Many rows take the float32 BLAS route (dequantize, then gemm), one row MLX's own
    quantized kernel; both compute x @ dequantize(w).T + bias."""
    import interp.ops.nn as nn

    w = mx.random.normal((96, 128), key=mx.random.key(bits + tokens))
    q, scales, biases = mx.quantize(w, group_size=64, bits=bits)
    dense = mx.dequantize(q, scales, biases, group_size=64, bits=bits)
    x = mx.random.normal((1, tokens, 128), key=mx.random.key(7))
    bias = mx.arange(96, dtype=mx.float32)
    want = np.array(x @ dense.T + bias)
    route = nn.gemm_in_float32(x)
    assert route == (tokens >= nn.FLOAT32_GEMM_ROWS and nn.cpu_has_fast_blas())
    got = REGISTRY["quantized_linear"].fn(x, q, scales, biases, bias, group_size=64, bits=bits)
    np.testing.assert_allclose(np.array(got), want, atol=1e-4, rtol=1e-5)
    monkeypatch.setattr(nn, "FLOAT32_GEMM_ROWS", 10**9)  # force MLX's own kernel: same numbers
    own = REGISTRY["quantized_linear"].fn(x, q, scales, biases, bias, group_size=64, bits=bits)
    np.testing.assert_allclose(np.array(own), want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("tokens", [1, 20])  # a decode row (small weight), and a prefill
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_half_precision_linear_runs_in_float32_and_matches(dtype, tokens, monkeypatch):
    import interp.ops.nn as nn

    w = mx.random.normal((64, 96), key=mx.random.key(1)).astype(dtype)
    x = mx.random.normal((2, tokens, 96), key=mx.random.key(2)).astype(dtype)
    bias = mx.random.normal((64,), key=mx.random.key(3)).astype(dtype)
    want = (x.astype(mx.float32) @ w.astype(mx.float32).T + bias.astype(mx.float32))
    assert nn.half_in_float32(x, w) == nn.cpu_has_fast_blas()
    got = REGISTRY["linear"].fn(x, w, bias)
    assert got.dtype == dtype
    tol = 0.1 if dtype == mx.bfloat16 else 0.02  # one rounding of the output to half precision
    np.testing.assert_allclose(np.array(got.astype(mx.float32)), np.array(want), atol=tol, rtol=0.02)
    monkeypatch.setattr(nn, "FLOAT32_GEMM_ROWS", 10**9)
    monkeypatch.setattr(nn, "FLOAT32_MATVEC_ELEMENTS", 0)
    assert not nn.half_in_float32(x, w)
    own = REGISTRY["linear"].fn(x, w, bias)
    np.testing.assert_allclose(np.array(own.astype(mx.float32)), np.array(want), atol=tol, rtol=0.02)


def test_large_half_precision_weight_keeps_mlx_kernel_for_one_row(monkeypatch):
    """Converting a large weight costs more than MLX's bfloat16 matvec; many rows still convert."""
    import interp.ops.nn as nn

    monkeypatch.setattr(nn, "FLOAT32_MATVEC_ELEMENTS", 64 * 95)
    w = mx.zeros((64, 96), dtype=mx.bfloat16)
    assert not nn.half_in_float32(mx.zeros((1, 1, 96), dtype=mx.bfloat16), w)
    assert nn.half_in_float32(mx.zeros((1, 16, 96), dtype=mx.bfloat16), w) == nn.cpu_has_fast_blas()


def test_a_key_mask_over_real_keys_keeps_their_positions():
    """Keys hidden from a row but real (paw_mlx/programs/train.py hides a row's own demonstration)
    keep their positions when the caller gives them: a window counts them; without
    ``key_positions`` masked keys are padding, which takes no position."""
    from interp.ops.attention import causal_mask, explicit_attention

    rng = np.random.default_rng(3)
    total, length, window = 12, 3, 4
    q = mx.array(rng.standard_normal((1, 2, length, 8)).astype(np.float32))
    k, v = (mx.array(rng.standard_normal((1, 2, total, 8)).astype(np.float32)) for _ in range(2))
    hidden = mx.array(~np.isin(np.arange(total), [7, 8]))[None]  # two keys hidden, just before the queries
    attention = REGISTRY["attention"].fn
    columns = mx.arange(total)[None]
    kept = attention(RunContext(cache=None, key_mask=hidden, key_positions=columns), q, k, v, layer=0, scale=0.3,
                     window=window)
    causal = causal_mask(length, total, window)[None, None] & hidden[:, None, None, :]
    np.testing.assert_allclose(np.array(kept), np.array(explicit_attention(q, k, v, scale=0.3, mask=causal)),
                               atol=2e-6, rtol=0)
    padding = attention(RunContext(cache=None, key_mask=hidden), q, k, v, layer=0, scale=0.3, window=window)
    # as padding the two hidden keys take no position: the window reaches two keys further back
    wider = causal_mask(length, total, window + 2)[None, None] & hidden[:, None, None, :]
    np.testing.assert_allclose(np.array(padding), np.array(explicit_attention(q, k, v, scale=0.3, mask=wider)),
                               atol=2e-6, rtol=0)
