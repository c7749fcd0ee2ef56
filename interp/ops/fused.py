"""Ops the exporter's fusion and quantization passes produce: one mx.fast / quantized call each.

``rope`` takes the fast path (``mx.fast.rope``) when the graph model knows every batch
row's positions run contiguously from one offset (it made them itself); with positions
given by the caller (padded batches) it computes the rotation explicitly, so any
positions stay correct.
"""

from __future__ import annotations

import mlx.core as mx

from interp import device
from interp.ops.nn import float32_product, gemm_in_float32
from interp.ops.registry import implementation
from interp.ops.shape import clip_indices


@implementation("rope", needs_context=True)
def rope(ctx, x, positions, inv_freq, *, mscale=1.0):
    dims = 2 * inv_freq.shape[-1]
    offset = getattr(ctx, "offset", None)
    contiguous = offset is not None and x.shape[-1] == dims
    if contiguous and device.on_gpu():
        # mx.fast.rope wants wavelengths (1 / inv_freq), as mlx-lm's scaled RoPEs pass them.
        out = mx.fast.rope(x, dims, traditional=False, base=None, scale=1.0, offset=offset,
                           freqs=1.0 / inv_freq.astype(mx.float32))
        return out * mscale if mscale != 1.0 else out
    if contiguous:
        cos, sin = rope_table(ctx, x.shape[2], offset, inv_freq, mscale)
    else:  # the caller's positions, per row: [batch, 1, length, dims / 2] angles, once per call
        key = ("rope-rows", id(positions), id(inv_freq), mscale)
        if key not in ctx.shared:
            angle = positions.astype(mx.float32)[:, None, :, None] * inv_freq.astype(mx.float32)
            ctx.shared[key] = (mx.cos(angle) * mscale, mx.sin(angle) * mscale, positions)
        cos, sin, _ = ctx.shared[key]
    return rotate_half(x, cos, sin)


def rope_table(ctx, length: int, offset, inv_freq: mx.array, mscale: float) -> tuple[mx.array, mx.array]:
    """float32 [length, dims / 2] cos and sin (times ``mscale``) at ``offset + arange(length)``.

    On the CPU, ``mx.fast.rope`` falls back to about ten ops per call, computing the same
    cos/sin for every layer's queries and keys (SmolLM2: 60 times a token). The table is
    computed once per call and kept in the run context for the other layers.
    """
    key = ("rope", id(inv_freq), length, mscale)
    if key not in ctx.shared:
        positions = mx.arange(length, dtype=mx.float32) + mx.array(offset).astype(mx.float32)
        angle = positions[:, None] * inv_freq.astype(mx.float32)
        ctx.shared[key] = (mx.cos(angle) * mscale, mx.sin(angle) * mscale)
    return ctx.shared[key]


def rotate_half(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """HF's rotate-half RoPE (pairs i and i + dims / 2) in float32, given cos and sin of the
    angles ([..., dims / 2], broadcasting against ``x``'s halves); returns ``x``'s dtype."""
    half = cos.shape[-1]
    x32 = x.astype(mx.float32)
    first, second = x32[..., :half], x32[..., half:]
    out = mx.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return out.astype(x.dtype)


@implementation("quantized_linear")
def quantized_linear(x, weight, scales, biases, bias=None, *, group_size, bits):
    if gemm_in_float32(x):
        full = mx.dequantize(weight, scales, biases, group_size=group_size, bits=bits)
        return float32_product(x, full.astype(mx.float32), bias)
    out = mx.quantized_matmul(x, weight, scales, biases, transpose=True, group_size=group_size, bits=bits)
    return out if bias is None else out + bias


@implementation("quantized_embedding")
def quantized_embedding(weight, scales, biases, indices, *, group_size, bits):
    if not weight.shape[0] == scales.shape[0] == biases.shape[0]:
        raise ValueError(f"weight, scales and biases have {weight.shape[0]}, {scales.shape[0]} and "
                         f"{biases.shape[0]} rows")
    indices = clip_indices(indices, weight.shape[0])
    rows = mx.take(weight, indices, axis=0)
    return mx.dequantize(rows, mx.take(scales, indices, axis=0), mx.take(biases, indices, axis=0),
                         group_size=group_size, bits=bits)
