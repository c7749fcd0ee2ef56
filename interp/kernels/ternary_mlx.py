"""Running packed ternary weights on MLX: a Metal kernel on Macs, MLX's 2-bit layout elsewhere.

``TernaryWeight.prepare`` turns one ``ternary_linear``'s packed codes and scale into
what the chosen path needs, once, at load time:

- Metal (``mx.metal.is_available()``): the 2-bit bytes as they are; the kernel in
  ``ternary_matmul.metal`` unpacks them in registers inside the matvec/matmul.
- Everywhere else: MLX's affine 2-bit quantized layout, which is exact for ternary data.
  Our 2-bit rows read as little-endian uint32 words *are* that layout (16 codes per word,
  code i at bits 2i); with scales = s and biases = -s per group the dequantized value is
  s * code - s = s * t exactly, so ``mx.quantized_matmul`` computes ``x @ (t * s).T``
  without any float weight in memory. (``mx.quantize`` would pick its own scales and is
  not exact for ternary data, so the layout is built here directly.)
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import mlx.core as mx
import numpy as np

from interp.kernels import ternary as packing

KERNEL_SOURCE = Path(__file__).with_name("ternary_matmul.metal")
_GROUP_SIZES = (128, 64, 32)


def metal_available() -> bool:
    try:
        return bool(mx.metal.is_available())
    except Exception:  # pragma: no cover - builds without the metal module
        return False


def group_size_for(in_features: int) -> int:
    """The largest MLX group size dividing the (32-padded) row length."""
    padded = -(-in_features // 32) * 32
    return next(g for g in _GROUP_SIZES if padded % g == 0)


@dataclass(frozen=True)
class TernaryWeight:
    """One ternary linear layer, laid out for the execution path chosen at load."""

    in_features: int
    out_features: int
    path: str  # "metal" | "affine"
    codes: mx.array  # metal: uint8 [out, ceil(in/4)]; affine: uint32 [out, padded_in/16]
    scale: mx.array  # metal: [out] or [1]; affine: float32 scales [out, padded_in/G]
    biases: mx.array | None = None  # affine only: -scales (float32)
    group_size: int = 0
    padded_in: int = 0

    @classmethod
    def prepare(cls, packed, scale, in_features: int, out_features: int, packing_kind: str = "2bit",
                path: str | None = None) -> TernaryWeight:
        """Lay out packed codes (uint8 rows) and a scale ([out] or [1]) for ``path``."""
        path = path or ("metal" if metal_available() else "affine")
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
        if path == "metal":
            return cls(in_features, out_features, "metal", mx.array(rows), scale.reshape(-1))
        group = group_size_for(in_features)
        padded = -(-in_features // group) * group
        if padded != in_features:  # pad with the code of 0 (bit pattern 01 01 01 01)
            wide = np.full((out_features, padded // 4), 0b01010101, dtype=np.uint8)
            wide[:, : rows.shape[1]] = rows
            rows = wide
        words = mx.array(np.ascontiguousarray(rows).view(np.dtype("<u4")))
        scales = mx.broadcast_to(scale.astype(mx.float32).reshape(-1, 1), (out_features, padded // group))
        scales = mx.contiguous(scales)
        mx.eval(words, scales)
        return cls(in_features, out_features, "affine", words, scales, -scales, group, padded)

    def __call__(self, x: mx.array) -> mx.array:
        """x [..., in_features] -> x @ (t * s).T, [..., out_features], in x's dtype."""
        if self.path == "metal":
            return metal_matmul(x, self.codes, self.scale, self.in_features, self.out_features)
        if self.padded_in != self.in_features:
            pad = [(0, 0)] * (x.ndim - 1) + [(0, self.padded_in - self.in_features)]
            x = mx.pad(x, pad)
        # Always float32: MLX's half-precision quantized matmul accumulates in half and
        # drifts; in float32 the result is bit-identical to x @ (t * s).T (then rounded).
        y = mx.quantized_matmul(x.astype(mx.float32), self.codes, self.scale, self.biases, transpose=True,
                                group_size=self.group_size, bits=2)
        return y.astype(x.dtype)


@cache
def _metal_kernel():
    return mx.fast.metal_kernel(
        name="paw_ternary_matmul",
        input_names=["x", "packed", "scale", "dims"],
        output_names=["out"],
        source=KERNEL_SOURCE.read_text(encoding="utf-8"),
    )


def metal_matmul(x: mx.array, codes: mx.array, scale: mx.array, in_features: int, out_features: int) -> mx.array:
    """The Metal kernel: unpacks 2-bit codes in registers; grid (32, N, M)."""
    lead = x.shape[:-1]
    rows = int(np.prod(lead)) if lead else 1
    x2 = x.reshape(rows, in_features)
    dims = mx.array([in_features, out_features, codes.shape[1], 1 if scale.size > 1 else 0], dtype=mx.uint32)
    (out,) = _metal_kernel()(
        inputs=[x2, codes, scale, dims],
        template=[("T", x.dtype)],
        grid=(32, out_features, rows),
        threadgroup=(32, 1, 1),
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
