"""The gated delta rule over many positions in chunks: the prefill fast path of ``gated_delta_rule``.

The scan (``interp/ops/delta_rule.py``) runs one step per position. Here positions go in
chunks of C; within a chunk the C delta-rule corrections are condensed into matmuls by the
WY/UT representation (as transformers' ``torch_chunk_gated_delta_rule`` and FLA's chunk
kernels do), and only the state is carried from chunk to chunk, so a prompt of L positions
costs L / C sequential steps instead of L. Per head, with a_t the log-decay summed from the
chunk's start and S the state before the chunk:

    A[s, r] = beta_s * exp(a_s - a_r) * k_s . k_r    for r < s (strictly lower)
    U = (I + A)^-1 (beta * V)        W = (I + A)^-1 (beta * exp(a) * K)
    new = U - W S                    (each position's correction, beta * (v - k . S_before))
    out = (exp(a) * Q) S + ((Q K^T) * exp(a_t - a_s), s <= t) new
    S   = exp(a_C) S + (exp(a_C - a) * K)^T new

With a decay per key channel (Kimi Linear's g [B, L, H, Dk]) a, exp(a) and the dot products
are per channel: exp(a_s - a_r) does not factor into two matmuls without exponents of either
sign (which overflow), so those pair weights are formed as [C, C, Dk] products and sums.
Every exponent is <= 0 (the log-decay g is <= 0), so nothing overflows and the result is the
scan's within float32 rounding. Chunk sizes and the switch: ``chunk_size``
(``PAW_DELTA_CHUNK``), measured in docs/speed.md.
"""

from __future__ import annotations

import os

import mlx.core as mx

from interp.errors import ProgramError

# the fastest chunk sizes for a 512-token prompt (docs/speed.md): a decay per head is matmuls,
# so bigger chunks pay; a decay per key channel forms a [C, C, Dk] weight per chunk, so they cost
CHUNK_PER_HEAD = 16
CHUNK_PER_CHANNEL = 4


def chunk_size(per_channel: bool) -> int:
    """Positions per chunk: ``PAW_DELTA_CHUNK`` (a power of two, 2-1024, for both decay shapes; 0 for the
    scan only) or the measured default for the decay's shape."""
    value = os.environ.get("PAW_DELTA_CHUNK", "").strip()
    if not value:
        return CHUNK_PER_CHANNEL if per_channel else CHUNK_PER_HEAD
    size = int(value) if value.isdecimal() else -1
    if size != 0 and not (2 <= size <= 1024 and size & (size - 1) == 0):
        raise ProgramError(f"PAW_DELTA_CHUNK must be 0 (the scan) or a power of two from 2 to 1024; got {value!r}")
    return size


def _unit_lower_inverse(a: mx.array) -> mx.array:
    """(I + a)^-1 for strictly lower triangular a [..., C, C], C a power of two.

    Built by doubling diagonal blocks: [[P, 0], [X, R]]^-1 = [[P^-1, 0], [-R^-1 X P^-1, R^-1]],
    every block of one size at once, so log2(C) rounds of batched matmuls replace C sequential
    rows of forward substitution."""
    *lead, C, _ = a.shape
    inverse = mx.ones((*lead, C, 1, 1), a.dtype)  # the C diagonal blocks of size 1
    size = 1
    while size < C:
        count = C // (2 * size)
        blocks = a.reshape(*lead, count, 2 * size, count, 2 * size)
        blocks = mx.moveaxis(mx.diagonal(blocks, axis1=-4, axis2=-2), -1, -3)  # [..., count, 2s, 2s]
        lower = blocks[..., size:, :size]
        pairs = inverse.reshape(*lead, count, 2, size, size)
        top, bottom = pairs[..., 0, :, :], pairs[..., 1, :, :]
        corner = -(bottom @ lower @ top)
        zeros = mx.zeros_like(top)
        inverse = mx.concatenate([mx.concatenate([top, zeros], axis=-1),
                                  mx.concatenate([corner, bottom], axis=-1)], axis=-2)
        size *= 2
    return inverse.reshape(*lead, C, C)


def _in_chunks(x: mx.array, size: int) -> mx.array:
    """[B, L, H, ...] zero-padded to whole chunks -> [B, H, chunks, size, ...]."""
    B, L, H = x.shape[:3]
    pad = -L % size
    if pad:
        x = mx.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape(B, (L + pad) // size, size, H, *x.shape[3:])
    return mx.moveaxis(x, 3, 1)


def _pair_weights(q: mx.array, keys_beta: mx.array, k: mx.array, a: mx.array,
                  causal: mx.array) -> tuple[mx.array, mx.array]:
    """(q_t . k_s, beta_s k_t . k_s) weighted by the decay from s to t, for s <= t, else 0: [..., C, C] each.

    a is the log-decay summed within the chunk: [..., C, 1] per head, [..., C, Dk] per key channel."""
    if a.shape[-1] == 1:  # per head: one weight per pair, on two matmuls
        decay = mx.exp(mx.where(causal, a - a.swapaxes(-1, -2), -mx.inf))
        return (q @ k.swapaxes(-1, -2)) * decay, (keys_beta @ k.swapaxes(-1, -2)) * decay
    # per key channel: the weight differs per channel, so the decayed keys are formed per pair (as products
    # and sums: a batched matmul here would be one tiny gemm call per position)
    decay = mx.exp(mx.where(causal[..., None], a[..., :, None, :] - a[..., None, :, :], -mx.inf))  # [.., t, s, Dk]
    decayed_keys = decay * k[..., None, :, :]
    return ((decayed_keys * q[..., :, None, :]).sum(axis=-1),
            (decayed_keys * keys_beta[..., :, None, :]).sum(axis=-1))


def chunked_delta_rule(state: mx.array, q: mx.array, k: mx.array, v: mx.array, g: mx.array, beta: mx.array,
                       size: int) -> tuple[mx.array, mx.array]:
    """The rule over L positions in chunks of ``size`` (a power of two): returns (state after, out [B, L, H, Dv]).

    All float32. state [B, H, Dk, Dv]; q (scale applied), k [B, L, H, Dk] with key heads already
    repeated to the value heads; v [B, L, H, Dv]; g [B, L, H] log-decay per head or [B, L, H, Dk] per
    key channel; beta [B, L, H]. Padded positions (g = 0, beta = 0, k = 0) leave the state as it is."""
    B, L, H, value_size = v.shape
    size = min(size, 1 << max(L - 1, 1).bit_length())  # a short prompt: one chunk just big enough
    q, k, v, beta = (_in_chunks(x, size) for x in (q, k, v, beta))  # [B, H, N, C, D], beta [B, H, N, C]
    g = _in_chunks(g if g.ndim == 4 else g[..., None], size)  # [B, H, N, C, Dk or 1]
    a = mx.cumsum(g, axis=-2)
    causal = mx.tril(mx.ones((size, size), mx.bool_))
    keys_beta = k * beta[..., None]
    within, system = _pair_weights(q, keys_beta, k, a, causal)
    system = mx.where(mx.tril(causal, -1), system, 0.0)  # strictly lower: each position's earlier ones
    inverse = _unit_lower_inverse(system)
    new_base = inverse @ (v * beta[..., None])  # [B, H, N, C, Dv]
    new_from_state = inverse @ (keys_beta * mx.exp(a))  # [B, H, N, C, Dk]
    q = q * mx.exp(a)
    last = a[..., -1:, :]
    k = k * mx.exp(last - a)
    chunk_decay = mx.exp(last).swapaxes(-1, -2)  # [B, H, N, Dk or 1, 1]
    outs = []
    for n in range(q.shape[2]):
        new = new_base[:, :, n] - new_from_state[:, :, n] @ state
        outs.append(q[:, :, n] @ state + within[:, :, n] @ new)
        state = state * chunk_decay[:, :, n] + k[:, :, n].swapaxes(-1, -2) @ new
    out = mx.stack(outs, axis=2).reshape(B, H, -1, value_size)[:, :, :L]
    return state, out.swapaxes(1, 2)  # [B, L, H, Dv]
