"""The causal convolution op: a hybrid model's short convolution, with its conv state.

K is small (LFM2: 3), so the convolution is written as K shifted multiply-adds over the
rows (the state's K - 1, then the new ones), in the input's dtype; the conv state keeps the
last K - 1 rows (``interp/conv_cache.py``).
"""

from __future__ import annotations

import mlx.core as mx

from interp.conv_cache import ConvState
from interp.errors import ProgramError
from interp.ops.registry import implementation
from interp.recurrent import check_whole_rows


@implementation("causal_conv1d", needs_context=True)
def causal_conv1d(ctx, x, weight, bias=None, *, layer):
    if x.ndim != 3 or weight.ndim != 3 or weight.shape[0] != x.shape[2] or weight.shape[1] != 1:
        raise ProgramError(f"causal_conv1d needs x [B, L, C] and weight [C, 1, K]; got {x.shape}, {weight.shape}")
    check_whole_rows(ctx, x.shape[1], "causal_conv1d")
    length, width = x.shape[1], weight.shape[2] - 1
    if ctx.cache is None:
        rows = mx.concatenate([mx.zeros((x.shape[0], width, x.shape[2]), x.dtype), x], axis=1)
    else:
        state = ctx.cache[layer]
        if not isinstance(state, ConvState):
            raise ProgramError(f"cache entry {layer} is a {type(state).__name__}, not a conv state")
        rows = state.update_and_fetch(x, width)  # [B, K - 1 + L, C]
    taps = weight[:, 0, :].astype(x.dtype)  # [C, K]
    out = rows[:, 0:length] * taps[:, 0]
    for k in range(1, width + 1):
        out = out + rows[:, k : k + length] * taps[:, k]
    return out if bias is None else out + bias.astype(x.dtype)
