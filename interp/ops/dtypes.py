"""Mapping between schema dtype names and MLX dtypes."""

from __future__ import annotations

import mlx.core as mx

MLX_DTYPES: dict[str, mx.Dtype] = {
    "float32": mx.float32,
    "float16": mx.float16,
    "bfloat16": mx.bfloat16,
    "int64": mx.int64,
    "int32": mx.int32,
    "int16": mx.int16,
    "int8": mx.int8,
    "uint32": mx.uint32,
    "uint16": mx.uint16,
    "uint8": mx.uint8,
    "bool": mx.bool_,
}
DTYPE_NAMES: dict[mx.Dtype, str] = {v: k for k, v in MLX_DTYPES.items()}


def to_mlx(name: str) -> mx.Dtype:
    return MLX_DTYPES[name]
