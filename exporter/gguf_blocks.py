"""Keep a GGUF file's Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K and Q5_K weights as they are: MLX affine blocks.

Each of these formats maps exactly onto MLX's affine layout with ``group_size`` 32
(exporter/gguf_affine.py has the table and what rounds in which program dtype); other
types (Q6_K, whose scales cover 16 weights; F16; ...) are dequantized in ``--dtype`` as
before, so a Q4_K_M file (Q4_K with some Q6_K tensors) comes out partly kept, partly
float. Rows move as transformers' tensor processor moves them (Llama's q/k
un-permutation), found by passing it row numbers; a processor that does anything but
reorder rows leaves the tensor to be dequantized as before.
"""

from __future__ import annotations

import numpy as np
import torch

from exporter.gguf_affine import FORMATS, GROUP_SIZE, affine_from_blocks
from exporter.lazy import derive
from exporter.lower import Lowering
from exporter.quantize import quantized_weight_candidates, use_quantized_weights
from interp.errors import ExportError

#: the kept types' names, for messages
NAMES = {ggml_type: fmt.name for ggml_type, fmt in FORMATS.items()}


def keep_gguf_blocks(low: Lowering, checkpoint) -> tuple[int, dict[str, int]]:
    """Turn linear and embedding weights read from GGUF tensors of a kept type (``FORMATS``) into blocks.

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
        order = _row_order(reader, rows) if ggml_type in FORMATS and rows else None
        if order is None or tuple(low.consts[name].shape) != reader.shape:
            type_name = NAMES.get(ggml_type, getattr(reader.tensor_type, "name", str(ggml_type)))
            others[type_name] = others.get(type_name, 0) + 1
            continue
        base = name.removesuffix(".weight")
        names = (f"{base}.qweight", f"{base}.scales", f"{base}.biases")
        dtype = low.consts.pop(name).dtype
        for new, tensor in zip(names, _lazy_blocks(reader, ggml_type, order, dtype), strict=True):
            low.consts[new] = tensor
        kept[name] = (names, {"group_size": GROUP_SIZE, "bits": FORMATS[ggml_type].bits})
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
        in_dtype = (_in_dtype(values, dtype, reader.name) for values in (scales, biases))
        return torch.from_numpy(words.copy()), *in_dtype

    codes = ([rows, columns * FORMATS[ggml_type].bits // 32], torch.uint32)
    groups = ([rows, columns // GROUP_SIZE], dtype)
    return derive([], compute, [codes, groups, groups])


def _in_dtype(values: np.ndarray, dtype: torch.dtype, name: str) -> torch.Tensor:
    """Block scales or biases in the program's dtype; refuses one that overflows it (a float16 d times 63)."""
    converted = torch.from_numpy(values).to(dtype)
    if bool((torch.isinf(converted) & torch.from_numpy(np.isfinite(values))).any()):
        raise ExportError(f"GGUF tensor {name} has block scales beyond {str(dtype).removeprefix('torch.')}'s "
                          "range; export it with --dtype float32")
    return converted
