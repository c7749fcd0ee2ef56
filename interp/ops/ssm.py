"""The selective state-space scan op: a Mamba2 layer's recurrence, with its SSM state.

Per head h (of group g, which serves heads / groups heads) and new position t:
state = state * exp(dt[t, h] * A[h]) + dt[t, h] * x[t, h, :, None] * B[t, g, None, :] and
y[t, h] = state @ C[t, g]. Everything runs in float32, as transformers keeps the state.
A decode step (one position) is one vectorised update over every head; a longer input is
a sequential scan over its positions (its cost per token: docs/speed.md). The SSM state
(``interp/ssm_cache.py``) starts at zeros and keeps the state after the last position.
"""

from __future__ import annotations

import mlx.core as mx

from interp.errors import ProgramError
from interp.ops.registry import implementation
from interp.ssm_cache import SSMState


@implementation("ssm_scan", needs_context=True)
def ssm_scan(ctx, x, dt, A, B, C, *, layer):
    if x.ndim != 4 or dt.ndim != 3 or A.ndim != 1 or B.ndim != 4 or B.shape != C.shape:
        raise ProgramError(f"ssm_scan needs x [B, L, H, P], dt [B, L, H], A [H], B and C [B, L, G, N]; got "
                           f"{x.shape}, {dt.shape}, {A.shape}, {B.shape}, {C.shape}")
    batch, length, heads, size = x.shape
    groups, state_size = B.shape[2], B.shape[3]
    if tuple(dt.shape) != (batch, length, heads) or A.shape[0] != heads or B.shape[:2] != x.shape[:2] \
            or heads % groups:
        raise ProgramError(f"ssm_scan: x {x.shape}, dt {dt.shape}, A {A.shape} and B {B.shape} disagree")
    if ctx.key_mask is not None or ctx.query_columns is not None:
        # padding or rows at their own lengths would enter every later row's state
        raise ProgramError("ssm_scan runs on whole, unpadded rows; padded and slot batches are not supported")
    x, dt, A = x.astype(mx.float32), dt.astype(mx.float32), A.astype(mx.float32)
    B = mx.repeat(B.astype(mx.float32), heads // groups, axis=2)  # [B, L, H, N]: group g serves heads g*r .. g*r+r-1
    C = mx.repeat(C.astype(mx.float32), heads // groups, axis=2)
    decay = mx.exp(dt * A)[..., None, None]  # [B, L, H, 1, 1]
    scaled = dt[..., None] * x  # [B, L, H, P]
    shape = (batch, heads, size, state_size)
    holder = None if ctx.cache is None else ctx.cache[layer]
    if holder is not None and not isinstance(holder, SSMState):
        raise ProgramError(f"cache entry {layer} is a {type(holder).__name__}, not an SSM state")
    state = mx.zeros(shape, mx.float32) if holder is None else holder.fetch(shape)
    outputs = []
    for t in range(length):
        state = state * decay[:, t] + scaled[:, t, :, :, None] * B[:, t, :, None, :]  # [B, H, P, N]
        outputs.append((state @ C[:, t, :, :, None])[..., 0])  # [B, H, P]
    if holder is not None:
        holder.update(state, length)
    return mx.stack(outputs, axis=1)
