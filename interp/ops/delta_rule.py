"""The gated delta rule: a Gated DeltaNet layer's linear attention, with its delta state.

Per head, a memory matrix S [Dk, Dv] is decayed by exp(g), corrected towards the new
value by the delta rule and read by the query, one position after the other
(``interp/delta_state.py`` keeps S between calls). Everything runs in float32, as
transformers' and FLA's kernels accumulate the state. A call over L new positions is a
sequential scan of L steps, each one fused step for every head at once (``_step``, an
``mx.compile``d function); a decode step (L = 1) is a single step. Several positions take
the chunked form instead (``interp/ops/delta_chunks.py``), which the
scan stays the reference for. Prefill cost per token: docs/speed.md.
"""

from __future__ import annotations

import mlx.core as mx

from interp.delta_state import DeltaState
from interp.errors import ProgramError
from interp.ops.delta_chunks import chunk_size, chunked_delta_rule
from interp.ops.registry import implementation
from interp.recurrent import check_whole_rows


@mx.compile
def _step(state: mx.array, q: mx.array, k: mx.array, v: mx.array, decay: mx.array,
          beta: mx.array) -> tuple[mx.array, mx.array]:
    """One position for every head: state [B, H, Dk, Dv]; q, k [B, H, Dk]; v [B, H, Dv];
    decay [B, H, 1 or Dk, 1] (exp of the log-decay); beta [B, H, 1]. Returns (new state, out [B, H, Dv])."""
    state = state * decay
    remembered = (state * k[..., None]).sum(axis=-2)  # what the memory holds for k: [B, H, Dv]
    delta = (v - remembered) * beta
    state = state + k[..., None] * delta[..., None, :]
    return state, (state * q[..., None]).sum(axis=-2)


def _check_shapes(q: mx.array, k: mx.array, v: mx.array, g: mx.array, beta: mx.array) -> None:
    shapes_fit = q.ndim == k.ndim == v.ndim == 4 and g.ndim in (3, 4) and beta.ndim == 3
    if shapes_fit:
        B, L, key_heads, key_size = k.shape
        heads = v.shape[2]
        gate = (B, L, heads) if g.ndim == 3 else (B, L, heads, key_size)
        shapes_fit = (q.shape == k.shape and v.shape[:2] == (B, L) and heads % key_heads == 0
                      and tuple(g.shape) == gate and tuple(beta.shape) == (B, L, heads))
    if not shapes_fit:
        raise ProgramError(f"gated_delta_rule needs q, k [B, L, Hk, Dk], v [B, L, H, Dv] (H a multiple of Hk), "
                           f"g [B, L, H] or [B, L, H, Dk] and beta [B, L, H]; got {q.shape}, {k.shape}, {v.shape}, "
                           f"{g.shape}, {beta.shape}")


@implementation("gated_delta_rule", needs_context=True)
def gated_delta_rule(ctx, q, k, v, g, beta, *, layer, scale):
    _check_shapes(q, k, v, g, beta)
    check_whole_rows(ctx, q.shape[1], "gated_delta_rule")
    B, L, heads, value_size = v.shape
    group = heads // k.shape[2]  # each query/key head serves `group` consecutive value heads
    f32 = mx.float32
    q, k = (mx.repeat(x, group, axis=2) if group > 1 else x for x in (q.astype(f32) * scale, k.astype(f32)))
    state = ctx.cache[layer] if ctx.cache is not None else DeltaState()
    if not isinstance(state, DeltaState):
        raise ProgramError(f"cache entry {layer} is a {type(state).__name__}, not a delta state")
    matrix = state.fetch((B, heads, k.shape[3], value_size))
    size = chunk_size(g.ndim == 4) if L > 1 else 0  # a decode step stays the one compiled step
    if size:
        matrix, out = chunked_delta_rule(matrix, q, k, v.astype(f32), g.astype(f32), beta.astype(f32), size)
    else:
        matrix, out = _scan(matrix, q, k, v.astype(f32), g, beta)
    if ctx.cache is not None:
        state.update(matrix, L)
    return out.astype(v.dtype)  # [B, L, H, Dv]


def _scan(matrix: mx.array, q: mx.array, k: mx.array, v: mx.array, g: mx.array,
          beta: mx.array) -> tuple[mx.array, mx.array]:
    """The rule one position after the other (``_step``): returns (state after, out [B, L, H, Dv])."""
    decay = mx.exp(g.astype(mx.float32))
    decay = decay[..., None, None] if g.ndim == 3 else decay[..., None]  # [B, L, H, 1 or Dk, 1]
    beta = beta.astype(mx.float32)[..., None]
    outs = []
    for t in range(q.shape[1]):
        matrix, out = _step(matrix, q[:, t], k[:, t], v[:, t], decay[:, t], beta[:, t])
        outs.append(out)
    return matrix, (outs[0][:, None] if len(outs) == 1 else mx.stack(outs, axis=1))
