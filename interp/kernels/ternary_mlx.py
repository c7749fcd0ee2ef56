"""Running packed ternary weights on MLX: paw's Metal kernel or MLX's exact 2-bit affine matmul.

``TernaryWeight.prepare`` lays one ``ternary_linear``'s packed codes and scale out once,
at load time, in MLX's 2-bit quantized layout: our 2-bit rows, padded to a multiple of 32
trits with the code of 0 and read as little-endian uint32 words, *are* that layout (16
codes per word, code i at bits 2i). Both kernels read those same words:

- ``mx.quantized_matmul(bits=2)`` with scales = s and biases = -s per group: the
  dequantized value is s * code - s = s * t exactly, so it computes ``x @ (t * s).T``
  without any float weight in memory (``mx.quantize`` would pick its own scales and is
  not exact for ternary data, so the layout is built here directly). It runs on every
  backend and is the only path on the CPU and on CUDA.
- paw's Metal kernel (``ternary_matmul.metal``): a matrix-vector kernel that needs one
  float per row instead of two per group, so a decode step reads 2 bits per weight
  instead of 2.5 to 4. It runs on a Mac for products of few rows (decode);
  ``use_metal_kernel`` says when, and docs/ternary.md why.

MLX's custom kernels have no VJP, so the Metal kernel is wrapped in an
``mx.custom_function`` whose VJP is that of the affine path: a ternary base can be
prefix-tuned on a Mac.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path

import mlx.core as mx
import numpy as np

from interp import device
from interp.kernels import ternary as packing

KERNEL_SOURCE = Path(__file__).with_name("ternary_matmul.metal")
KERNEL_HEADER = Path(__file__).with_name("ternary_matmul_header.metal")
KERNEL_NAME = "paw_ternary_matmul"
#: Output rows per simdgroup and simdgroups per threadgroup of the Metal kernel (its launch).
KERNEL_ROWS = 4
KERNEL_SIMDGROUPS = 2
#: Token rows up to which the Metal kernel runs; from here MLX's tiled quantized matmul
#: (which reuses each weight tile across rows) takes over. MLX itself switches from its
#: matrix-vector to its tiled kernel at 12-33 rows, by GPU; see docs/ternary.md.
KERNEL_MAX_ROWS = 8
#: ``PAW_TERNARY_KERNEL``: ``auto`` (the rule above), ``paw`` (the Metal kernel for every
#: shape) or ``mlx`` (MLX's quantized matmul for every shape), for benchmarks and checks.
KERNEL_CHOICES = ("auto", "paw", "mlx")
_GROUP_SIZES = (128, 64, 32)
_ROW_ALIGN = 32  # trits: rows padded to this, so every group size divides them


def group_size_for(in_features: int) -> int:
    """The largest MLX group size dividing the (32-padded) row length."""
    padded = -(-in_features // _ROW_ALIGN) * _ROW_ALIGN
    return next(g for g in _GROUP_SIZES if padded % g == 0)


def kernel_choice() -> str:
    """``PAW_TERNARY_KERNEL`` (default ``auto``), checked."""
    choice = os.environ.get("PAW_TERNARY_KERNEL", "auto").strip() or "auto"
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"PAW_TERNARY_KERNEL must be one of {', '.join(KERNEL_CHOICES)}, got {choice!r}")
    return choice


def use_metal_kernel(rows: int) -> bool:
    """Whether a product of ``rows`` token rows runs paw's Metal kernel (else MLX's quantized matmul)."""
    choice = kernel_choice()
    return choice == "paw" or (choice == "auto" and rows <= KERNEL_MAX_ROWS)


@dataclass(frozen=True)
class TernaryWeight:
    """One ternary linear layer in MLX's 2-bit layout, with the kernel choice made at load."""

    in_features: int
    out_features: int
    path: str  # "metal": paw's kernel for few rows, MLX's for many | "affine": MLX's always
    codes: mx.array  # uint32 [out, padded_in / 16]
    scale: mx.array  # float32 [out] or [1]
    group_size: int
    padded_in: int
    #: float32 [out, padded_in / group] scales and biases (-scales) of the affine path: kept
    #: where it runs every call; the Metal path builds them when a prefill or a VJP needs them
    affine: tuple[mx.array, mx.array] | None = None

    @classmethod
    def prepare(cls, packed, scale, in_features: int, out_features: int, packing_kind: str = "2bit",
                path: str | None = None) -> TernaryWeight:
        """Lay out packed codes (uint8 rows) and a scale ([out] or [1]) for ``path`` (default: this device's)."""
        path = path or ("metal" if device.metal_kernels() else "affine")
        if path not in ("metal", "affine"):
            raise ValueError(f"unknown ternary path {path!r}")
        rows = np.asarray(packed, dtype=np.uint8).reshape(out_features, -1)
        if packing_kind == "base3":
            rows = packing.base3_to_2bit(rows, in_features)
        elif packing_kind != "2bit":
            raise ValueError(f"unknown ternary packing {packing_kind!r}")
        if rows.shape[1] != packing.packed_length(in_features, "2bit"):
            raise ValueError(f"packed rows of {rows.shape[1]} bytes do not hold {in_features} trits")
        scale = mx.array(scale) if not isinstance(scale, mx.array) else scale
        if scale.size not in (1, out_features):
            raise ValueError(f"ternary scale must have 1 or {out_features} entries, got {scale.size}")
        group = group_size_for(in_features)
        padded = -(-in_features // _ROW_ALIGN) * _ROW_ALIGN
        if padded != in_features:  # pad with the code of 0 (bit pattern 01 01 01 01)
            wide = np.full((out_features, padded // 4), 0b01010101, dtype=np.uint8)
            wide[:, : rows.shape[1]] = rows
            rows = wide
        codes = mx.array(np.ascontiguousarray(rows).view(np.dtype("<u4")))
        weight = cls(in_features, out_features, path, codes, scale.astype(mx.float32).reshape(-1), group, padded)
        if path == "affine":
            weight = cls(in_features, out_features, path, codes, weight.scale, group, padded, weight.affine_layout())
        mx.eval(weight.codes, weight.scale, weight.affine or ())
        return weight

    def affine_layout(self) -> tuple[mx.array, mx.array]:
        """float32 scales and biases [out, padded_in / group] of MLX's affine 2-bit form."""
        if self.affine is not None:
            return self.affine
        shape = (self.out_features, self.padded_in // self.group_size)
        scales = mx.contiguous(mx.broadcast_to(self.scale.reshape(-1, 1), shape))
        return scales, -scales

    def __call__(self, x: mx.array) -> mx.array:
        """x [..., in_features] -> x @ (t * s).T, [..., out_features], in x's dtype."""
        if self.padded_in != self.in_features:
            pad = [(0, 0)] * (x.ndim - 1) + [(0, self.padded_in - self.in_features)]
            x = mx.pad(x, pad)
        rows = x.size // self.padded_in
        if self.path == "metal" and rows > 0 and use_metal_kernel(rows):
            return self._metal(x, self.codes, self.scale)
        return self.affine_matmul(x)

    def affine_matmul(self, x: mx.array) -> mx.array:
        """MLX's 2-bit quantized matmul of a padded ``x`` [..., padded_in], in x's dtype.

        Always float32: MLX's half-precision quantized matmul accumulates in half on the CPU
        and drifts; in float32 the result is bit-identical to x @ (t * s).T (then rounded).
        """
        scales, biases = self.affine_layout()
        y = mx.quantized_matmul(x.astype(mx.float32), self.codes, scales, biases, transpose=True,
                                group_size=self.group_size, bits=2)
        return y.astype(x.dtype)

    @cached_property
    def _metal(self):
        """The Metal kernel as an ``mx.custom_function`` whose VJP is the affine path's."""

        @mx.custom_function
        def ternary_matmul(x, codes, scale):
            return metal_matmul(x, codes, scale, self.out_features)

        @ternary_matmul.vjp
        def ternary_matmul_vjp(primals, cotangent, output):
            x, codes, scale = primals
            _, (dx,) = mx.vjp(self.affine_matmul, [x], [cotangent])
            return dx, mx.zeros_like(codes), mx.zeros_like(scale)

        return ternary_matmul


@cache
def _metal_kernel():
    return mx.fast.metal_kernel(
        name=KERNEL_NAME,
        input_names=["x", "codes", "scale", "dims"],
        output_names=["out"],
        source=KERNEL_SOURCE.read_text(encoding="utf-8"),
        header=KERNEL_HEADER.read_text(encoding="utf-8"),
    )


def kernel_launch(rows: int, out_features: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """The Metal kernel's (grid, threadgroup) for ``rows`` tokens and ``out_features`` outputs."""
    return (32, -(-out_features // KERNEL_ROWS), rows), (32, KERNEL_SIMDGROUPS, 1)


def metal_matmul(x: mx.array, codes: mx.array, scale: mx.array, out_features: int) -> mx.array:
    """The Metal kernel on a padded ``x`` [..., 16 * codes.shape[1]] (at least one row)."""
    lead = x.shape[:-1]
    in_padded = x.shape[-1]
    rows = x.size // in_padded
    dims = mx.array([in_padded, out_features, 1 if scale.size > 1 else 0], dtype=mx.uint32)
    grid, threadgroup = kernel_launch(rows, out_features)
    (out,) = _metal_kernel()(
        inputs=[x.reshape(rows, in_padded), codes, scale, dims],
        template=[("T", x.dtype)],
        grid=grid,
        threadgroup=threadgroup,
        output_shapes=[(rows, out_features)],
        output_dtypes=[x.dtype],
    )
    return out.reshape(*lead, out_features)


def act_quant(x: mx.array, bits: int = 8) -> mx.array:
    """Symmetric absmax per-token fake quantization, the same float ops as transformers' BitLinear."""
    qmax = 2 ** (bits - 1) - 1
    peak = mx.maximum(mx.max(mx.abs(x), axis=-1, keepdims=True), mx.array(1e-5, dtype=x.dtype))
    # torch evaluates ``127 / t`` as ``t.reciprocal() * 127``; do the same for bitwise parity.
    scale = mx.reciprocal(peak) * mx.array(qmax, dtype=x.dtype)
    q = mx.clip(mx.round(x * scale), -qmax - 1, qmax)
    return q / scale


if sys.byteorder != "little":  # pragma: no cover - every MLX platform is little-endian
    raise ImportError("the ternary 2-bit layout assumes a little-endian machine")
