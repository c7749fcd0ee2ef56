"""Neural-network ops: each boils down to one MLX call (or mx.fast kernel)."""

from __future__ import annotations

import math

import mlx.core as mx

from interp.blas import fast_cpu_gemm
from interp.ops.registry import implementation


@implementation("embedding")
def embedding(weight, indices):
    return mx.take(weight, indices, axis=0)


@implementation("linear")
def linear(x, weight, bias=None):
    if weight.dtype != mx.float32 and half_in_float32(x, weight):
        return float32_product(x, weight.astype(mx.float32), bias)
    if bias is None:
        return x @ weight.T
    return mx.addmm(bias, x, weight.T)


# Rows from which a CPU product of half-precision or quantized weights runs in float32
# through BLAS instead (prefill, batches).
FLOAT32_GEMM_ROWS = 16
# Up to this many weight elements, a half-precision product of fewer rows (a decode step)
# runs in float32 too: the converted weight (at most 8 MB) stays in the CPU's caches, and
# OpenBLAS's gemv reads it 3-4x faster than MLX's own bfloat16 kernel runs (SmolLM2's
# 3072x576 gate/up: 0.53 vs 1.78 ms). Larger weights (a 49152x576 lm_head) convert slower
# than they multiply, so they keep MLX's kernel.
FLOAT32_MATVEC_ELEMENTS = 2 << 20


def _cpu_blas() -> bool:
    return fast_cpu_gemm() and mx.default_device() == mx.cpu


def _rows(x: mx.array) -> int:
    return x.size // x.shape[-1] if x.ndim else 0


def gemm_in_float32(x: mx.array) -> bool:
    """Whether a product with ``x`` on the left should be computed as a float32 BLAS gemm.

    On the CPU with OpenBLAS under MLX (``interp.blas``), a float32 gemm runs at 70-130
    GFLOP/s here while MLX's own bfloat16 and quantized CPU kernels run at 2-5 GFLOP/s; for
    many rows, converting the weight to float32 on the fly (a few ms) is far cheaper.
    """
    return _rows(x) >= FLOAT32_GEMM_ROWS and _cpu_blas()


def half_in_float32(x: mx.array, weight: mx.array) -> bool:
    """``gemm_in_float32`` for a half-precision weight, which also pays for one row if small.

    Quantized weights do not: dequantizing costs more than MLX's quantized matvec.
    """
    return (_rows(x) >= FLOAT32_GEMM_ROWS or weight.size <= FLOAT32_MATVEC_ELEMENTS) and _cpu_blas()


def float32_product(x: mx.array, weight32: mx.array, bias: mx.array | None = None) -> mx.array:
    """``x @ weight32.T (+ bias)`` computed in float32 (BLAS), returned in ``x``'s dtype."""
    out = (x.astype(mx.float32) @ weight32.T).astype(x.dtype)
    return out if bias is None else out + bias


@implementation("matmul")
def matmul(a, b):
    return a @ b


@implementation("layer_norm")
def layer_norm(x, weight=None, bias=None, *, normalized_shape, eps):
    if len(normalized_shape) == 1:
        return mx.fast.layer_norm(x, weight, bias, eps)
    axes = list(range(-len(normalized_shape), 0))
    mean = mx.mean(x, axis=axes, keepdims=True)
    var = mx.var(x, axis=axes, keepdims=True)
    y = (x - mean) * mx.rsqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


@implementation("rms_norm")
def rms_norm(x, weight=None, *, eps):
    return mx.fast.rms_norm(x, weight, eps)


@implementation("attention", needs_context=True)
def attention(ctx, q, k, v, *, layer, scale, window=0, softcap=0.0, alibi_max_bias=0.0):
    cache = ctx.cache[layer] if ctx.cache is not None else None
    if cache is not None:
        k, v = cache.update_and_fetch(k, v)
    length = q.shape[2]
    if length == 1 and window <= 0 and softcap <= 0 and alibi_max_bias <= 0 and mx.default_device() == mx.cpu:
        return decode_attention(q, k, v, scale=scale, key_mask=ctx.key_mask)
    if ctx.key_mask is not None:
        # Padded batch: causality and the per-row mask of real keys, as one boolean mask.
        mask = causal_mask(length, k.shape[2], window)[None, None] & ctx.key_mask[:, None, None, :]
        if softcap <= 0 and alibi_max_bias <= 0:
            return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
        alibi = alibi_slopes(q.shape[1], alibi_max_bias) if alibi_max_bias > 0 else None
        return _attention_explicit(q, k, v, scale=scale, window=window, softcap=softcap, mask=mask, alibi=alibi)
    if alibi_max_bias > 0:
        return _attention_explicit(q, k, v, scale=scale, window=window, softcap=softcap,
                                   alibi=alibi_slopes(q.shape[1], alibi_max_bias))
    if window <= 0 and softcap <= 0:
        # mx.fast's "causal" aligns the mask to the end, which is what decoding with a
        # cache needs (torch's is_causal aligns to the start).
        mask = "causal" if length > 1 else None
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    return _attention_explicit(q, k, v, scale=scale, window=window, softcap=softcap)


def decode_attention(q, k, v, *, scale, key_mask=None):
    """One query position against every cached key, as two batched matmuls.

    On the CPU, ``mx.fast.scaled_dot_product_attention`` falls back to a generic path that
    costs about 1.5x this for a decode step (9.2 vs 5-7 ms per SmolLM2 token at 512 keys,
    23 vs 15 ms at 1500), and decode attention is the part of a token that grows with the
    context. Grouped-query heads are folded into the rows of each KV head's matmul
    (query head h reads KV head h // group), so K and V are never repeated.
    """
    batch, heads, _, dim = q.shape
    kv_heads = k.shape[1]
    rows = q.reshape(batch, kv_heads, heads // kv_heads, dim)
    scores = (rows * scale) @ k.swapaxes(-1, -2)  # [batch, kv_heads, group, keys]
    if key_mask is not None:
        scores = mx.where(key_mask[:, None, None, :], scores, mx.array(-mx.inf, dtype=scores.dtype))
    weights = mx.softmax(scores, axis=-1, precise=True)
    return (weights @ v).reshape(batch, heads, 1, v.shape[-1])


def causal_mask(length: int, total: int, window: int = 0) -> mx.array:
    """Boolean [length, total] mask: query i (at absolute position total-length+i) sees key j."""
    rows = mx.arange(total - length, total)[:, None]
    cols = mx.arange(total)[None, :]
    mask = cols <= rows
    if window > 0:
        mask = mask & (cols > rows - window)
    return mask


def alibi_slopes(heads: int, max_bias: float) -> mx.array:
    """ALiBi's per-head slopes (Press et al.; BLOOM uses max_bias 8), float32 [heads]."""
    closest = 2 ** math.floor(math.log2(heads))
    base = 2.0 ** (-max_bias / closest)
    slopes = [base**i for i in range(1, closest + 1)]
    if closest != heads:
        extra = 2.0 ** (-max_bias / (2 * closest))
        slopes += [extra**i for i in range(1, 1 + 2 * min(closest, heads - closest), 2)]
    return mx.array(slopes, dtype=mx.float32)


def _attention_explicit(q, k, v, *, scale, window, softcap, alibi=None, mask=None):
    """Attention with a sliding window, logit soft-capping and/or ALiBi, in float32 scores."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = mx.repeat(k, groups, axis=1)
        v = mx.repeat(v, groups, axis=1)
    scores = (q.astype(mx.float32) * scale) @ k.astype(mx.float32).swapaxes(-1, -2)
    if softcap > 0:
        scores = mx.tanh(scores / softcap) * softcap
    if alibi is not None:
        # slope * key position; the query's own position would add a per-row constant,
        # which softmax ignores.
        scores = scores + alibi[:, None, None] * mx.arange(k.shape[2], dtype=mx.float32)
    if mask is None:
        mask = causal_mask(q.shape[2], k.shape[2], window)
    scores = mx.where(mask, scores, mx.array(-mx.inf, dtype=mx.float32))
    weights = mx.softmax(scores, axis=-1).astype(v.dtype)
    return weights @ v
