"""The diagonal linear recurrence op: an RG-LRU layer's scan (RecurrentGemma), with its LRU state.

Per channel and new position t: h = a[t] * h + x[t], the output is h; the gates, the decay
and the input's normalisation are ordinary ops before it (``exporter/rg_lru.py``). Everything
runs in float32, as transformers keeps the state, position by position in the order
transformers adds: a decode step is one multiply-add over every channel, a prefill one per
position (exact; each step is two element-wise ops on [B, D]). The LRU state
(``interp/lru_state.py``) starts at zeros and keeps h after the last position.
"""

from __future__ import annotations

import mlx.core as mx

from interp.errors import ProgramError
from interp.lru_state import LRUState
from interp.ops.registry import implementation
from interp.recurrent import check_whole_rows


@implementation("lru_scan", needs_context=True)
def lru_scan(ctx, a, x, *, layer):
    if x.ndim != 3 or tuple(a.shape) != tuple(x.shape):
        raise ProgramError(f"lru_scan needs a and x of one shape [B, L, D]; got {a.shape} and {x.shape}")
    batch, length, width = x.shape
    check_whole_rows(ctx, length, "lru_scan")
    a, x = a.astype(mx.float32), x.astype(mx.float32)
    holder = None if ctx.cache is None else ctx.cache[layer]
    if holder is not None and not isinstance(holder, LRUState):
        raise ProgramError(f"cache entry {layer} is a {type(holder).__name__}, not an LRU state")
    state = mx.zeros((batch, width), mx.float32) if holder is None else holder.fetch((batch, width))
    outputs = []
    for t in range(length):
        state = a[:, t] * state + x[:, t]
        outputs.append(state)
    if holder is not None:
        holder.update(state, length)
    return outputs[0][:, None] if length == 1 else mx.stack(outputs, axis=1)
