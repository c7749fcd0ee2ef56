"""The selective state-space scan op: a Mamba2 or Mamba 1 layer's recurrence, with its SSM state.

Per head h (of group g, which serves heads / groups heads) and new position t:
state = state * exp(dt[t, h] * A[h]) + dt[t, h] * x[t, h, :, None] * B[t, g, None, :] and
y[t, h] = state @ C[t, g]. A is [H] (Mamba2: one decay per head) or [H, N] (Mamba 1: one
decay per head and state column, with one channel per head, P = 1, and one group).
Everything runs in float32, as transformers keeps the state. A decode step (one position)
is one vectorised update over every head. With a decay per head, a longer input is scanned
``CHUNK`` positions at a time in the recurrence's matrix form (as transformers'
full-sequence Mamba2 path computes it): within a chunk, y is a causal, decay-weighted
product of C with B and x, plus the state before the chunk decayed to each position; one
update per chunk carries the state on. ``PAW_SSM_SCAN=sequential`` scans position by
position instead, the plain reference. With a decay per state column (Mamba 1) every input
is scanned position by position: the matrix form would need a [Q, Q] matrix per column, and
a parallel prefix by doubling was no faster (``docs/speed.md``). The SSM state
(``interp/ssm_cache.py``) starts at zeros and keeps the state after the last position.
"""

from __future__ import annotations

import os

import mlx.core as mx

from interp.errors import ProgramError
from interp.ops.registry import implementation
from interp.recurrent import check_whole_rows
from interp.ssm_cache import SSMState

#: positions one matrix-form step of a prefill covers (its decay matrix is [B, H, CHUNK, CHUNK])
CHUNK = 32


def use_chunked_scan(length: int) -> bool:
    """Whether a scan over ``length`` new positions takes the matrix form (not for one position,
    nor under ``PAW_SSM_SCAN=sequential``)."""
    mode = os.environ.get("PAW_SSM_SCAN", "").strip() or "chunked"
    if mode not in ("chunked", "sequential"):
        raise ProgramError(f"PAW_SSM_SCAN must be chunked (the default) or sequential; got {mode!r}")
    return length > 1 and mode == "chunked"


def _sequential(state, decay, scaled, B, C):
    """Position by position: state [B, H, P, N]; decay [B, L, H, 1 or N]; scaled (dt * x) [B, L, H, P];
    B, C [B, L, H, N]. Returns (y [B, L, H, P], the last state)."""
    outputs = []
    for t in range(scaled.shape[1]):
        state = state * decay[:, t, :, None, :] + scaled[:, t, :, :, None] * B[:, t, :, None, :]  # [B, H, P, N]
        outputs.append((state @ C[:, t, :, :, None])[..., 0])  # [B, H, P]
    return mx.stack(outputs, axis=1), state


def _chunk(state, log_decay, scaled, B, C):
    """One chunk in matrix form; log_decay = dt * A [B, Q, H, 1]; the rest as ``_sequential``'s."""
    length = scaled.shape[1]
    cumulative = mx.cumsum(log_decay[..., 0].transpose(0, 2, 1), axis=-1)  # [B, H, Q]: log decay from the start
    Bh, Ch, xh = (a.transpose(0, 2, 1, 3) for a in (B, C, scaled))  # [B, H, Q, N or P]
    causal = mx.tril(mx.ones((length, length), dtype=mx.bool_))
    # decay from position s to t (s <= t); the masked entries would overflow exp
    gaps = mx.where(causal, cumulative[..., :, None] - cumulative[..., None, :], -mx.inf)
    weights = (Ch @ Bh.swapaxes(-1, -2)) * mx.exp(gaps)  # [B, H, Q, Q]
    y = weights @ xh + (Ch @ state.swapaxes(-1, -2)) * mx.exp(cumulative)[..., None]  # [B, H, Q, P]
    to_end = mx.exp(cumulative[..., -1:] - cumulative)[..., None]  # [B, H, Q, 1]
    state = state * mx.exp(cumulative[..., -1])[..., None, None] + (xh * to_end).swapaxes(-1, -2) @ Bh
    return y.transpose(0, 2, 1, 3), state


@implementation("ssm_scan", needs_context=True)
def ssm_scan(ctx, x, dt, A, B, C, *, layer):
    if x.ndim != 4 or dt.ndim != 3 or A.ndim not in (1, 2) or B.ndim != 4 or B.shape != C.shape:
        raise ProgramError(f"ssm_scan needs x [B, L, H, P], dt [B, L, H], A [H] or [H, N], B and C [B, L, G, N]; "
                           f"got {x.shape}, {dt.shape}, {A.shape}, {B.shape}, {C.shape}")
    batch, length, heads, size = x.shape
    groups, state_size = B.shape[2], B.shape[3]
    if tuple(dt.shape) != (batch, length, heads) or A.shape[0] != heads or B.shape[:2] != x.shape[:2] \
            or heads % groups or (A.ndim == 2 and A.shape[1] != state_size):
        raise ProgramError(f"ssm_scan: x {x.shape}, dt {dt.shape}, A {A.shape} and B {B.shape} disagree")
    check_whole_rows(ctx, length, "ssm_scan")
    x, dt, A = x.astype(mx.float32), dt.astype(mx.float32), A.astype(mx.float32)
    B = mx.repeat(B.astype(mx.float32), heads // groups, axis=2)  # [B, L, H, N]: group g serves heads g*r .. g*r+r-1
    C = mx.repeat(C.astype(mx.float32), heads // groups, axis=2)
    log_decay = dt[..., None] * (A if A.ndim == 2 else A[:, None])  # [B, L, H, 1 or N]
    scaled = dt[..., None] * x  # [B, L, H, P]
    shape = (batch, heads, size, state_size)
    holder = None if ctx.cache is None else ctx.cache[layer]
    if holder is not None and not isinstance(holder, SSMState):
        raise ProgramError(f"cache entry {layer} is a {type(holder).__name__}, not an SSM state")
    state = mx.zeros(shape, mx.float32) if holder is None else holder.fetch(shape)
    if use_chunked_scan(length) and A.ndim == 1:
        pieces = []
        for start in range(0, length, CHUNK):
            piece = slice(start, start + CHUNK)
            y, state = _chunk(state, log_decay[:, piece], scaled[:, piece], B[:, piece], C[:, piece])
            pieces.append(y)
        y = pieces[0] if len(pieces) == 1 else mx.concatenate(pieces, axis=1)
    else:
        y, state = _sequential(state, mx.exp(log_decay), scaled, B, C)
    if holder is not None:
        holder.update(state, length)
    return y
