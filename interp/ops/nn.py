"""Neural-network ops: each boils down to one MLX call (or mx.fast kernel)."""

from __future__ import annotations

import mlx.core as mx

from interp import device
from interp.blas import fast_cpu_gemm
from interp.ops.registry import implementation
from interp.ops.shape import clip_indices


@implementation("embedding")
def embedding(weight, indices):
    # token ids are checked where they enter (interp/token_ids.py); the clip keeps a
    # malformed program from reading past the table
    return mx.take(weight, clip_indices(indices, weight.shape[0]), axis=0)


@implementation("linear")
def linear(x, weight, bias=None):
    if weight.dtype != mx.float32 and half_in_float32(x, weight):
        return float32_product(x, weight.astype(mx.float32), bias)
    if bias is None:
        return x @ weight.T
    return mx.addmm(bias, x, weight.T)


# Rows from which a CPU product of half-precision or quantized weights runs in float32
# through BLAS instead (prefill, batches).
FLOAT32_GEMM_ROWS = 16
# Up to this many weight elements, a half-precision product of fewer rows (a decode step)
# runs in float32 too: the converted weight (at most 8 MB) stays in the CPU's caches, and
# OpenBLAS's gemv beats MLX's own bfloat16 kernel (docs/speed.md). Larger weights (a
# 49152x576 lm_head) convert slower than they multiply, so they keep MLX's kernel.
FLOAT32_MATVEC_ELEMENTS = 2 << 20


def cpu_has_fast_blas() -> bool:
    """Whether MLX runs on the CPU here with an optimized BLAS under it (``interp.blas``)."""
    return fast_cpu_gemm() and device.on_cpu()


def _rows(x: mx.array) -> int:
    return x.size // x.shape[-1] if x.ndim else 0


def gemm_in_float32(x: mx.array) -> bool:
    """Whether a product with ``x`` on the left should be computed as a float32 BLAS gemm.

    On the CPU with OpenBLAS under MLX (``interp.blas``), a float32 gemm is many times
    faster than MLX's own bfloat16 and quantized CPU kernels (docs/speed.md); for many
    rows, converting the weight to float32 on the fly is far cheaper.
    """
    return _rows(x) >= FLOAT32_GEMM_ROWS and cpu_has_fast_blas()


def half_in_float32(x: mx.array, weight: mx.array) -> bool:
    """``gemm_in_float32`` for a half-precision weight, which also pays for one row if small.

    Quantized weights do not: dequantizing costs more than MLX's quantized matvec.
    """
    return (_rows(x) >= FLOAT32_GEMM_ROWS or weight.size <= FLOAT32_MATVEC_ELEMENTS) and cpu_has_fast_blas()


def float32_product(x: mx.array, weight32: mx.array, bias: mx.array | None = None) -> mx.array:
    """``x @ weight32.T (+ bias)`` computed in float32 (BLAS), returned in ``x``'s dtype."""
    out = (x.astype(mx.float32) @ weight32.T).astype(x.dtype)
    return out if bias is None else out + bias


@implementation("matmul")
def matmul(a, b):
    return a @ b


@implementation("lora")
def lora(x, a, b, index=None):
    if index is None or a.shape[0] == 1:
        return (x @ a[0].T) @ b[0].T
    rows = x.shape[0]
    if rows != index.shape[0]:  # a 2-D x holds batch * length rows, batch-major
        index = mx.repeat(index, rows // index.shape[0])
    flat = x.reshape(rows, -1, x.shape[-1])  # [rows, tokens, in]
    low = flat @ a[index].swapaxes(1, 2)  # [rows, tokens, rank]
    return (low @ b[index].swapaxes(1, 2)).reshape(*x.shape[:-1], b.shape[1])


@implementation("layer_norm")
def layer_norm(x, weight=None, bias=None, *, normalized_shape, eps):
    if len(normalized_shape) == 1:
        return mx.fast.layer_norm(x, weight, bias, eps)
    axes = list(range(-len(normalized_shape), 0))
    mean = mx.mean(x, axis=axes, keepdims=True)
    var = mx.var(x, axis=axes, keepdims=True)
    y = (x - mean) * mx.rsqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


@implementation("rms_norm")
def rms_norm(x, weight=None, *, eps):
    return mx.fast.rms_norm(x, weight, eps)
