"""The attention op: scaled dot-product attention of new queries over the KV cache.

On a GPU, plain causal attention is one ``mx.fast`` kernel. On the CPU that kernel is a
generic fallback with MLX's scalar ``exp`` in its softmax, so every CPU attention is
written out (``explicit_attention``): the scores as BLAS matmuls, the polynomial-``exp``
softmax of ``interp/ops/fastmath.py``, then the weighted values (docs/speed.md). The GPU
takes the written-out form too for what ``mx.fast`` cannot do: sliding windows, chunks,
logit soft-capping and ALiBi. Attention sinks (gpt-oss) go to ``mx.fast`` on a GPU and into the
written-out softmax on the CPU. An indexer's ``keep`` mask (``interp/ops/indexer.py``) joins the
causal mask: the query attends only to the keys it marks.
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
def attention(ctx, q, k, v, sinks=None, keep=None, *, layer, scale, window=0, softcap=0.0, alibi_max_bias=0.0,
              chunk=0):
    check_attention_shapes(q, k, v)
    cache = ctx.cache[layer] if ctx.cache is not None else None
    if cache is not None:
        k, v = cache.update_and_fetch(k, v)
    length, total = q.shape[2], k.shape[2]
    # the largest temporary: one block's float32 scores
    check_shape([q.shape[0], q.shape[1], min(length, QUERY_BLOCK), total], 4, "its block of scores")
    special = window > 0 or softcap > 0 or alibi_max_bias > 0 or chunk > 0
    on_cpu = device.on_cpu()
    # else the keys are whole buffers: the compiled step's (queries from query_start) or a
    # slot batch's (each row's queries at its own query_columns)
    end_aligned = ctx.query_start is None and ctx.query_columns is None
    if not on_cpu and not special and ctx.key_mask is None and end_aligned and keep is None:
        # mx.fast's "causal" aligns the mask to the end, which is what decoding with a
        # cache needs (torch's is_causal aligns to the start).
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal" if length > 1 else None,
                                                    sinks=_sinks_for(sinks, q))
    # Windows, chunks and ALiBi count positions. A key's cache column is its position, except
    # in a batch with a key mask, where the positions come with the mask (``key_positions``).
    counts = window > 0 or chunk > 0 or alibi_max_bias > 0
    positions = key_positions(ctx, q.shape[0], total) if ctx.key_mask is not None and counts else None
    mask = visible_keys(ctx, length, total, window=window, chunk=chunk, positions=positions)
    if keep is not None:  # an indexer's choice of keys (index_topk)
        if keep.shape != (q.shape[0], length, total):
            raise ProgramError(f"attention's keep mask has shape {keep.shape}; expected {(q.shape[0], length, total)}")
        mask = keep[:, None] if mask is None else mask & keep[:, None]
    if not on_cpu and not special:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask, sinks=_sinks_for(sinks, q))
    alibi = alibi_slopes(q.shape[1], alibi_max_bias) if alibi_max_bias > 0 else None
    if length <= QUERY_BLOCK:
        return explicit_attention(q, k, v, scale=scale, mask=mask, softcap=softcap, alibi=alibi, sinks=sinks,
                                  positions=positions)
    # A long prompt in blocks of queries: each block's scores are all that is alive at once
    # (peak memory, docs/speed.md), and a block skips the keys after its last query, which
    # causality masks.
    blocks = []
    for start in range(0, length, QUERY_BLOCK):
        stop = min(start + QUERY_BLOCK, length)
        seen = total - length + stop if end_aligned else total
        blocks.append(explicit_attention(q[:, :, start:stop], k[:, :, :seen], v[:, :, :seen], scale=scale,
                                         mask=mask[..., start:stop, :seen], softcap=softcap, alibi=alibi,
                                         sinks=sinks, positions=None if positions is None else positions[:, :seen]))
    return mx.concatenate(blocks, axis=2)


def visible_keys(ctx, length: int, total: int, *, window: int = 0, chunk: int = 0,
                 positions: mx.array | None = None) -> mx.array | None:
    """Boolean mask (True = may attend) of this call's ``length`` queries over ``total`` cache columns.

    Causal, limited by ``window`` and ``chunk``, with a padded batch's key mask; it is
    [length, total] or [batch, 1, length, total], or None when every query sees every key
    (one end-aligned query with no window, chunk or key mask). ``positions`` ([batch, total],
    ``key_positions``) places the keys of a batch with a key mask for windows and chunks.
    """
    end_aligned = ctx.query_start is None and ctx.query_columns is None
    mask = None
    if positions is not None:
        columns = query_columns(ctx, length, total)  # [batch or 1, length]
        rows = mx.take_along_axis(positions, mx.broadcast_to(columns, (positions.shape[0], length)), axis=-1)
        causal = (mx.arange(total) <= columns[..., None])[:, None]  # [batch or 1, 1, length, total]
        mask = limit_positions(causal, rows[:, None, :, None], positions[:, None, None, :], window, chunk)
    elif ctx.query_columns is not None:
        mask = row_causal_mask(ctx.query_columns, total, window, chunk)
    elif length > 1 or window > 0 or chunk > 0 or not end_aligned:
        mask = causal_mask(length, total, window, start=ctx.query_start, chunk=chunk)
    if ctx.key_mask is not None:  # a padded batch
        keys = ctx.key_mask[:, None, None, :]
        mask = keys if mask is None else mask & keys
    return mask


def key_positions(ctx, batch: int, total: int) -> mx.array:
    """Int [batch, total]: the position of every key of a call with a key mask.

    ``ctx.key_positions`` when the caller gave them; else a masked key is padding that
    takes no position, so a key's position is the number of real keys before it (the
    layout of a left-padded batch, paw_mlx/programs/batch.py: each row sees the positions
    it would alone). Computed once per call (``ctx.shared``).
    """
    if "key_positions" not in ctx.shared:
        if ctx.key_positions is not None:
            positions = ctx.key_positions.astype(mx.int32)
        else:
            real = ctx.key_mask.astype(mx.int32)
            positions = mx.cumsum(real, axis=-1) - real
        if positions.ndim != 2 or positions.shape[-1] != total or positions.shape[0] not in (1, batch):
            raise ProgramError(f"the key positions have shape {positions.shape}; attention has {batch} rows "
                               f"of {total} keys")
        ctx.shared["key_positions"] = mx.broadcast_to(positions, (batch, total))
    return ctx.shared["key_positions"]


def query_columns(ctx, length: int, total: int) -> mx.array:
    """Int [batch or 1, length]: the cache column of every query (``RunContext``'s placements)."""
    if ctx.query_columns is not None:
        return ctx.query_columns
    start = total - length if ctx.query_start is None else ctx.query_start
    return (mx.arange(length) + start)[None]


def _sinks_for(sinks: mx.array | None, q: mx.array) -> mx.array | None:
    """``sinks`` [heads] as ``mx.fast`` takes them: in the queries' dtype."""
    if sinks is None:
        return None
    if sinks.shape != (q.shape[1],):
        raise ProgramError(f"attention sinks have shape {sinks.shape}; the queries have {q.shape[1]} heads")
    return sinks.astype(q.dtype)


def explicit_attention(q, k, v, *, scale, mask=None, softcap=0.0, alibi=None, sinks=None, positions=None):
    """Attention with its scores written out, softmax in float32.

    ``q`` is [batch, heads, length, dim], ``k`` and ``v`` [batch, kv_heads, keys, dim];
    ``mask`` (True = attend) broadcasts to [batch, heads, length, keys]; ``alibi`` holds
    one slope per query head, ``sinks`` one softmax-denominator logit per query head (a
    column that takes weight and gives no value); ``positions`` ([batch or 1, keys] ints, or
    None for the key indices) are the key positions ALiBi's bias counts. Grouped-query heads
    get their own axis, so query head ``h`` reads KV head ``h // group`` as a broadcast
    and K and V are never repeated. For one query (a decode step) that makes each head's
    scores one matrix-vector product, which the BLAS shim sends to gemv (faster than a
    small gemm per KV head: docs/speed.md).
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
        at = mx.arange(keys) if positions is None else positions[:, None, None, None, :]  # [b, 1, 1, 1, keys]
        scores = scores + alibi.reshape(kv_heads, group, 1, 1) * at.astype(mx.float32)
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


def limit_positions(mask: mx.array, rows, cols, window: int = 0, chunk: int = 0) -> mx.array:
    """``mask`` (True = attend) where query positions ``rows`` may also see key positions ``cols``.

    ``window`` > 0 keeps only the last ``window`` positions; ``chunk`` > 0 only those of the
    query's own chunk (``position // chunk`` equal). Broadcasts; ``mask`` itself when both are 0.
    """
    if window > 0:
        mask = mask & (cols > rows - window)
    if chunk > 0:
        mask = mask & (cols // chunk == rows // chunk)
    return mask


def causal_mask(length: int, total: int, window: int = 0, start: int | mx.array | None = None,
                chunk: int = 0) -> mx.array:
    """Boolean [length, total] mask: query i, at key index ``start + i``, sees key j.

    ``start`` defaults to ``total - length`` (the queries are the last keys); an array
    start (the compiled step's offset) builds the same mask without retracing. Columns are
    positions for ``window`` and ``chunk`` (``limit_positions``).
    """
    if start is None:
        start = total - length
    rows = (mx.arange(length) + start)[:, None]
    cols = mx.arange(total)[None, :]
    return limit_positions(cols <= rows, rows, cols, window, chunk)


def row_causal_mask(columns: mx.array, total: int, window: int = 0, chunk: int = 0) -> mx.array:
    """Boolean [batch, 1, length, total] mask for rows whose queries sit at their own columns.

    ``columns`` ([batch, length] ints) is where each row's queries are in the cache, which
    is also their position (a slot batch, interp/slots.py): a query sees the keys at or
    before its column, limited by ``window`` and ``chunk`` as ``limit_positions`` says.
    Keys past a row's column are never seen, whatever they hold.
    """
    rows = columns[:, None, :, None]
    cols = mx.arange(total)[None, None, None, :]
    return limit_positions(cols <= rows, rows, cols, window, chunk)


def alibi_slopes(heads: int, max_bias: float) -> mx.array:
    """ALiBi's per-head slopes (Press et al.; BLOOM uses max_bias 8), float32 [heads]."""
    closest = 2 ** math.floor(math.log2(heads))
    base = 2.0 ** (-max_bias / closest)
    slopes = [base**i for i in range(1, closest + 1)]
    if closest != heads:
        extra = 2.0 ** (-max_bias / (2 * closest))
        slopes += [extra**i for i in range(1, 1 + 2 * min(closest, heads - closest), 2)]
    return mx.array(slopes, dtype=mx.float32)
