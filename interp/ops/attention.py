"""The attention op: scaled dot-product attention of new queries over the KV cache.

On a GPU, plain causal attention is one ``mx.fast`` kernel. On the CPU that kernel is a
generic fallback with MLX's scalar ``exp`` in its softmax, so every CPU attention is
written out (``explicit_attention``): the scores as BLAS matmuls, the polynomial-``exp``
softmax of ``interp/ops/fastmath.py``, then the weighted values (docs/speed.md). The GPU
takes the written-out form too for what ``mx.fast`` cannot do: sliding windows, logit
soft-capping and ALiBi. Attention sinks (gpt-oss) go to ``mx.fast`` on a GPU and into the
written-out softmax on the CPU.
"""

from __future__ import annotations

import math

import mlx.core as mx

from interp import device
from interp.errors import ProgramError
from interp.limits import check_shape
from interp.ops import fastmath
from interp.ops.nn import cpu_has_fast_blas
from interp.ops.registry import implementation

#: Queries per block of a long prompt's attention (see ``attention``).
QUERY_BLOCK = 64


def check_attention_shapes(q: mx.array, k: mx.array, v: mx.array) -> None:
    """q [B, Hq, L, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv] with Hq a multiple of Hkv."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ProgramError(f"attention needs 4-D q, k, v; got {q.shape}, {k.shape}, {v.shape}")
    if (k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]
            or k.shape[1] == 0 or q.shape[1] % k.shape[1]):
        raise ProgramError(f"attention shapes do not fit together: q {q.shape}, k {k.shape}, v {v.shape}")


@implementation("attention", needs_context=True)
def attention(ctx, q, k, v, sinks=None, *, layer, scale, window=0, softcap=0.0, alibi_max_bias=0.0):
    check_attention_shapes(q, k, v)
    cache = ctx.cache[layer] if ctx.cache is not None else None
    if cache is not None:
        k, v = cache.update_and_fetch(k, v)
    length, total = q.shape[2], k.shape[2]
    # the largest temporary: one block's float32 scores
    check_shape([q.shape[0], q.shape[1], min(length, QUERY_BLOCK), total], 4, "its block of scores")
    special = window > 0 or softcap > 0 or alibi_max_bias > 0
    on_cpu = device.on_cpu()
    # else the keys are whole buffers: the compiled step's (queries from query_start) or a
    # slot batch's (each row's queries at its own query_columns)
    end_aligned = ctx.query_start is None and ctx.query_columns is None
    if not on_cpu and not special and ctx.key_mask is None and end_aligned:
        # mx.fast's "causal" aligns the mask to the end, which is what decoding with a
        # cache needs (torch's is_causal aligns to the start).
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal" if length > 1 else None,
                                                    sinks=_sinks_for(sinks, q))
    mask = None
    if ctx.query_columns is not None:
        mask = row_causal_mask(ctx.query_columns, total, window)
    elif length > 1 or window > 0 or not end_aligned:
        mask = causal_mask(length, total, window, start=ctx.query_start)
    if ctx.key_mask is not None:  # a padded batch
        keys = ctx.key_mask[:, None, None, :]
        mask = keys if mask is None else mask & keys
    if not on_cpu and not special:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask, sinks=_sinks_for(sinks, q))
    alibi = alibi_slopes(q.shape[1], alibi_max_bias) if alibi_max_bias > 0 else None
    if length <= QUERY_BLOCK:
        return explicit_attention(q, k, v, scale=scale, mask=mask, softcap=softcap, alibi=alibi, sinks=sinks)
    # A long prompt in blocks of queries: each block's scores are all that is alive at once
    # (peak memory, docs/speed.md), and a block skips the keys after its last query, which
    # causality masks.
    blocks = []
    for start in range(0, length, QUERY_BLOCK):
        stop = min(start + QUERY_BLOCK, length)
        seen = total - length + stop if end_aligned else total
        blocks.append(explicit_attention(q[:, :, start:stop], k[:, :, :seen], v[:, :, :seen], scale=scale,
                                         mask=mask[..., start:stop, :seen], softcap=softcap, alibi=alibi,
                                         sinks=sinks))
    return mx.concatenate(blocks, axis=2)


def _sinks_for(sinks: mx.array | None, q: mx.array) -> mx.array | None:
    """``sinks`` [heads] as ``mx.fast`` takes them: in the queries' dtype."""
    if sinks is None:
        return None
    if sinks.shape != (q.shape[1],):
        raise ProgramError(f"attention sinks have shape {sinks.shape}; the queries have {q.shape[1]} heads")
    return sinks.astype(q.dtype)


def explicit_attention(q, k, v, *, scale, mask=None, softcap=0.0, alibi=None, sinks=None):
    """Attention with its scores written out, softmax in float32.

    ``q`` is [batch, heads, length, dim], ``k`` and ``v`` [batch, kv_heads, keys, dim];
    ``mask`` (True = attend) broadcasts to [batch, heads, length, keys]; ``alibi`` holds
    one slope per query head, ``sinks`` one softmax-denominator logit per query head (a
    column that takes weight and gives no value). Grouped-query heads get their own axis, so query head ``h``
    reads KV head ``h // group`` as a broadcast and K and V are never repeated. For one
    query (a decode step) that makes each head's scores one matrix-vector product, which
    the BLAS shim sends to gemv (faster than a small gemm per KV head: docs/speed.md).
    Products run in float32, except one-query products of half-precision caches on the
    CPU, where converting the whole cache every token would cost more than it saves.
    """
    batch, heads, length, dim = q.shape
    kv_heads, keys = k.shape[1], k.shape[2]
    group = heads // kv_heads
    rows = q.reshape(batch, kv_heads, group, length, dim)
    k, v = k[:, :, None], v[:, :, None]
    on_cpu = device.on_cpu()
    upcast = q.dtype != mx.float32 and not (length == 1 and on_cpu)
    if upcast:
        rows, k = rows.astype(mx.float32), k.astype(mx.float32)
    scores = ((rows * scale) @ k.swapaxes(-1, -2)).astype(mx.float32)  # [b, kv, group, length, keys]
    if softcap > 0:
        scores = mx.tanh(scores / softcap) * softcap
    if alibi is not None:
        # slope * key position; the query's own position would add a per-row constant,
        # which softmax ignores.
        scores = scores + alibi.reshape(kv_heads, group, 1, 1) * mx.arange(keys, dtype=mx.float32)
    if mask is not None:
        if mask.ndim == 4:  # [batch, heads or 1, length, keys]: split the heads as the queries are
            split = (kv_heads, group) if mask.shape[1] == heads else (1, 1)
            mask = mask.reshape(mask.shape[0], *split, *mask.shape[2:])
        scores = mx.where(mask, scores, mx.array(-mx.inf, dtype=mx.float32))
    if sinks is not None:
        _sinks_for(sinks, q)  # checks the shape
        column = mx.broadcast_to(sinks.astype(mx.float32).reshape(1, kv_heads, group, 1, 1), (*scores.shape[:-1], 1))
        scores = mx.concatenate([scores, column], axis=-1)
    weights = fastmath.softmax(scores) if fastmath.use_fast_math(scores) else mx.softmax(scores, axis=-1)
    if sinks is not None:
        weights = weights[..., :-1]
    if upcast and cpu_has_fast_blas():
        out = (weights @ v.astype(mx.float32)).astype(v.dtype)
    else:
        out = weights.astype(v.dtype) @ v
    return out.reshape(batch, heads, length, v.shape[-1])


def causal_mask(length: int, total: int, window: int = 0, start: int | mx.array | None = None) -> mx.array:
    """Boolean [length, total] mask: query i, at key index ``start + i``, sees key j.

    ``start`` defaults to ``total - length`` (the queries are the last keys); an array
    start (the compiled step's offset) builds the same mask without retracing.
    """
    if start is None:
        start = total - length
    rows = (mx.arange(length) + start)[:, None]
    cols = mx.arange(total)[None, :]
    mask = cols <= rows
    if window > 0:
        mask = mask & (cols > rows - window)
    return mask


def row_causal_mask(columns: mx.array, total: int, window: int = 0) -> mx.array:
    """Boolean [batch, 1, length, total] mask for rows whose queries sit at their own columns.

    ``columns`` ([batch, length] ints) is where each row's queries are in the cache: a
    query sees the keys at or before its column (and, with a window, less than
    ``window`` before it). Keys past a row's column are never seen, whatever they hold.
    """
    rows = columns[:, None, :, None]
    cols = mx.arange(total)[None, None, None, :]
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
