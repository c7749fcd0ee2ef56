"""The index_topk op: which earlier keys a lightning indexer keeps for each query.

DeepSeek Sparse Attention (DeepSeek-V3.2, GLM-5) scores every query against every key it
may see with a small multi-head "indexer", keeps the ``topk`` best keys per query and lets
the layer's attention see only those (the ``keep`` input of ``attention``). The indexer's
keys are kept per position as attention's are, so they live in a KV cache slot of their
own (keys only, zero-width values): trimming, copying and prefixes treat them as they
treat any layer's keys and values.
"""

from __future__ import annotations

import mlx.core as mx

from interp.errors import ProgramError
from interp.limits import check_shape
from interp.ops.attention import QUERY_BLOCK, visible_keys
from interp.ops.registry import implementation


@implementation("index_topk", needs_context=True)
def index_topk(ctx, q, k, weights, *, layer, topk, scale):
    if q.ndim != 4 or k.ndim != 3 or weights.ndim != 3 or k.shape[:2] != q.shape[:2] or k.shape[2] != q.shape[3] \
            or weights.shape != q.shape[:3]:
        raise ProgramError(f"index_topk shapes do not fit together: q {q.shape}, k {k.shape}, weights {weights.shape}")
    keys = k[:, None]  # [B, 1, L, D]
    cache = ctx.cache[layer] if ctx.cache is not None else None
    if cache is not None:
        keys, _ = cache.update_and_fetch(keys, keys[..., :0])
    batch, length, heads, _ = q.shape
    total = keys.shape[2]
    check_shape([batch, min(length, QUERY_BLOCK), heads, total], 4, "its block of indexer scores")
    mask = visible_keys(ctx, length, total)
    if mask is not None and mask.ndim == 4:
        mask = mask[:, 0]  # [batch, length, total]
    keys = keys.astype(mx.float32).swapaxes(-1, -2)  # [B, 1, D, T]
    blocks = []
    for start in range(0, length, QUERY_BLOCK):
        stop = min(start + QUERY_BLOCK, length)
        rows = q[:, start:stop].astype(mx.float32)  # [B, l, H, D]
        scores = mx.maximum((rows @ keys) * scale, 0.0)  # [B, l, H, T]
        weighed = (weights[:, start:stop, None].astype(mx.float32) @ scores).squeeze(2)  # [B, l, T]
        if mask is not None:
            weighed = mx.where(mask[..., start:stop, :], weighed, mx.array(-mx.inf, dtype=mx.float32))
        blocks.append(keep_largest(weighed, topk))
    return blocks[0] if len(blocks) == 1 else mx.concatenate(blocks, axis=1)


def keep_largest(scores: mx.array, topk: int) -> mx.array:
    """Bool like ``scores``: True at each row's ``topk`` largest entries (last axis), ties at the k-th kept."""
    if scores.shape[-1] <= topk:
        return mx.ones(scores.shape, dtype=mx.bool_)
    kth = mx.topk(scores, topk, axis=-1).min(axis=-1, keepdims=True)
    return scores >= kth
