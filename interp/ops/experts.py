"""Mixture-of-experts projections: each token multiplies only its routed experts' weights.

``expert_linear`` is ``mx.gather_mm`` (``gather_qmm`` for quantized weights): per (token,
expert) pair, one row times one expert's matrix, so a decode step reads top_k experts
instead of all of them. Many pairs (a prompt) are first grouped by expert, as mlx-lm's
``SwitchGLU`` does, so each expert's matrix is read once per group rather than once per
pair; the results are put back in the pairs' order.
"""

from __future__ import annotations

import math

import mlx.core as mx

from interp import device
from interp.ops.registry import implementation

#: Routed (token, expert) pairs from which they are sorted by expert first (mlx-lm's threshold).
SORT_FROM = 64


def _routed(x: mx.array, indices: mx.array, multiply) -> mx.array:
    """``multiply(rows [..., 1, in], rhs_indices, sorted_indices)`` over every (x row, index) pair."""
    batch = list(_broadcast(x.shape[:-1], indices.shape))
    indices = indices.astype(mx.uint32)  # gather_mm's index type; the graph's topk gives int64
    if math.prod(batch) < SORT_FROM:
        return multiply(_single_rows(x), indices, False).squeeze(-2)
    lead = x.shape[:-1]
    rows = mx.broadcast_to(mx.arange(math.prod(lead)).reshape(lead), batch).flatten()
    experts = mx.broadcast_to(indices, batch).flatten()
    order = mx.argsort(experts)
    gathered = x.reshape(-1, 1, x.shape[-1])[rows[order]]  # [pairs, 1, in], by expert (see _single_rows)
    out = multiply(gathered, experts[order], True)[:, 0, :]
    return out[mx.argsort(order)].reshape(*batch, out.shape[-1])


def _single_rows(x: mx.array) -> mx.array:
    """``x`` [..., in] as [..., 1, in] by reshaping, never ``expand_dims``: MLX gives an
    inserted axis stride 1 and keeps the array's row-contiguous flag, and its sorted
    ``gather_mm`` on CUDA (0.32.4; on Metal before 0.32.1) takes the stride of the rows'
    axis as the distance between rows, so such a view multiplied the wrong rows."""
    return x.reshape(*x.shape[:-1], 1, x.shape[-1])


def _broadcast(a: tuple, b: tuple) -> tuple:
    rank = max(len(a), len(b))
    a, b = (1,) * (rank - len(a)) + tuple(a), (1,) * (rank - len(b)) + tuple(b)
    return tuple(max(i, j) for i, j in zip(a, b, strict=True))


@implementation("expert_linear")
def expert_linear(x, weight, indices, bias=None):
    transposed = mx.swapaxes(weight, -1, -2)  # [E, in, out], a view

    def multiply(rows, rhs, sort):
        if weight.dtype != mx.float32 and device.computes_on_cpu():
            # MLX's CPU gather_mm takes float32 only. A few pairs (a decode step) convert just
            # their experts; as many pairs as experts or more convert the stack once, so the
            # float32 copy is never larger than the stack.
            if rhs.size < weight.shape[0]:
                picked = mx.swapaxes(mx.take(weight, rhs, axis=0), -1, -2).astype(mx.float32)
                return (rows.astype(mx.float32) @ picked).astype(rows.dtype)
            out = mx.gather_mm(rows.astype(mx.float32), transposed.astype(mx.float32), rhs_indices=rhs,
                               sorted_indices=sort)
            return out.astype(rows.dtype)
        return mx.gather_mm(rows, transposed, rhs_indices=rhs, sorted_indices=sort)

    out = _routed(x, indices, multiply)
    return out if bias is None else out + mx.take(bias, indices, axis=0)


@implementation("quantized_expert_linear")
def quantized_expert_linear(x, weight, scales, biases, indices, bias=None, *, group_size, bits):
    def multiply(rows, rhs, sort):
        return mx.gather_qmm(rows, weight, scales, biases, rhs_indices=rhs, transpose=True, group_size=group_size,
                             bits=bits, sorted_indices=sort)

    out = _routed(x, indices, multiply)
    return out if bias is None else out + mx.take(bias, indices, axis=0)
