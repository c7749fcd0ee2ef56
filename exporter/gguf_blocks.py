"""Keep a GGUF file's Q4_0, Q4_1 and Q8_0 weights as they are: MLX affine blocks, bit-exact.

The three formats store groups of 32 weights as integer codes and float16 constants, and
each maps exactly onto MLX's affine layout with ``group_size`` 32 (w = code * scale + bias):

| GGUF | block | MLX bits | code | scale | bias |
| --- | --- | --- | --- | --- | --- |
| Q4_0 | d, 16 bytes of nibbles | 4 | q (0..15) | d | -8 d |
| Q4_1 | d, m, 16 bytes of nibbles | 4 | q (0..15) | d | m |
| Q8_0 | d, 32 signed bytes | 8 | q + 128 | d | -128 d |

A GGUF block keeps elements 0-15 in the low nibbles of its 16 bytes and 16-31 in the
high ones; MLX packs consecutive elements from the lowest bits up, so the nibbles are
reordered, never changed. In a float32 or float16 program the scales and biases are the
GGUF's float16 constants exactly (``8 d`` and ``128 d`` are exact), so every weight
dequantizes to the same bits as gguf's own dequantization; a bfloat16 program rounds
the scales to bfloat16. Rows move as transformers' tensor processor moves them (Llama's
q/k un-permutation), found by passing it row numbers; a processor that does anything
but reorder rows leaves the tensor to be dequantized as before.
"""

from __future__ import annotations

import numpy as np
import torch

from exporter.lazy import derive
from exporter.lower import Lowering
from exporter.quantize import quantized_weight_candidates, use_quantized_weights
from interp.errors import ExportError

GROUP_SIZE = 32
Q4_0, Q4_1, Q8_0 = 2, 3, 8  # ggml type ids
BITS = {Q4_0: 4, Q4_1: 4, Q8_0: 8}
BLOCK_BYTES = {Q4_0: 18, Q4_1: 20, Q8_0: 34}
NAMES = {Q4_0: "Q4_0", Q4_1: "Q4_1", Q8_0: "Q8_0"}


def affine_from_blocks(raw: np.ndarray, ggml_type: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes uint32 [rows, cols * bits / 32], scales float32 [rows, cols / 32], biases float32) of raw blocks.

    ``raw``: uint8 [rows, blocks * block bytes], as the file stores the tensor.
    """
    rows = raw.shape[0]
    blocks = raw.reshape(rows, -1, BLOCK_BYTES[ggml_type])
    d = blocks[..., 0:2].copy().view("<f2")[..., 0].astype(np.float32)
    if ggml_type == Q8_0:
        codes = (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        packed = codes.reshape(rows, -1)
        bias = -128 * d
    else:
        nibbles = blocks[..., 4:] if ggml_type == Q4_1 else blocks[..., 2:]
        codes = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1)  # [rows, blocks, 32] in element order
        packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).reshape(rows, -1)
        bias = blocks[..., 2:4].copy().view("<f2")[..., 0].astype(np.float32) if ggml_type == Q4_1 else -8 * d
    words = np.ascontiguousarray(packed).view("<u4")
    return words, np.ascontiguousarray(d), np.ascontiguousarray(bias)


def keep_gguf_blocks(low: Lowering, checkpoint) -> tuple[int, dict[str, int]]:
    """Turn linear and embedding weights read from Q4_0/Q4_1/Q8_0 GGUF tensors into kept blocks.

    Returns (weights kept, count of the other GGUF types left to dequantization by name).
    """
    kept: dict[str, tuple[tuple[str, str, str], dict]] = {}
    others: dict[str, int] = {}
    for name in quantized_weight_candidates(low):
        reader = checkpoint.gguf_tensor(name)
        if reader is None:
            continue
        ggml_type = int(reader.tensor_type)
        rows = reader.shape[0] if len(reader.shape) == 2 else 0
        order = _row_order(reader, rows) if ggml_type in BITS and rows else None
        if order is None or tuple(low.consts[name].shape) != reader.shape:
            type_name = NAMES.get(ggml_type, getattr(reader.tensor_type, "name", str(ggml_type)))
            others[type_name] = others.get(type_name, 0) + 1
            continue
        base = name.removesuffix(".weight")
        names = (f"{base}.qweight", f"{base}.scales", f"{base}.biases")
        dtype = low.consts.pop(name).dtype
        for new, tensor in zip(names, _lazy_blocks(reader, ggml_type, order, dtype), strict=True):
            low.consts[new] = tensor
        kept[name] = (names, {"group_size": GROUP_SIZE, "bits": BITS[ggml_type]})
    use_quantized_weights(low, kept)
    return len(kept), others


def _row_order(reader, rows: int) -> np.ndarray | None:
    """Where each output row comes from after transformers' processing, or None if it does more than reorder."""
    numbers = np.arange(rows, dtype=np.float64).reshape(rows, 1)
    try:
        moved = np.asarray(reader.processed(numbers))
    except Exception:  # a processor that needs real weights: leave this tensor to dequantization
        return None
    if moved.shape != (rows, 1):
        return None
    order = moved.reshape(-1)
    if not np.array_equal(np.sort(order), np.arange(rows)):
        return None
    return order.astype(np.int64)


def _lazy_blocks(reader, ggml_type: int, order: np.ndarray, dtype: torch.dtype):
    columns = reader.shape[1]
    if columns % GROUP_SIZE:
        raise ExportError(f"GGUF tensor {reader.name} has {columns} columns, not whole blocks of {GROUP_SIZE}")
    rows = reader.shape[0]
    identity = np.array_equal(order, np.arange(rows))

    def compute() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raw = reader.raw()
        words, scales, biases = affine_from_blocks(raw if identity else raw[order], ggml_type)
        return (torch.from_numpy(words.copy()), torch.from_numpy(scales).to(dtype), torch.from_numpy(biases).to(dtype))

    codes = ([rows, columns * BITS[ggml_type] // 32], torch.uint32)
    groups = ([rows, columns // GROUP_SIZE], dtype)
    return derive([], compute, [codes, groups, groups])
