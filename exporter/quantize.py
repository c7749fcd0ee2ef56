"""Affine weight quantization at export (``--quantize 4|8``): MLX's own layout, made by MLX.

Linear weights become ``quantized_linear``, embedding tables ``quantized_embedding``
(a tied lm_head shares the embedding's quantized tensors, as mlx-lm does) and stacked
expert weights ``quantized_expert_linear``. The codes,
scales and biases come from ``mx.quantize`` itself, so they are bit-identical to what
``mlx_lm.convert -q`` writes and to what ``mx.quantized_matmul`` expects: the exporter
imports MLX for this one transform rather than re-deriving MLX's rounding in torch.
Weights a model reaches through a reshape or transpose (gpt-oss's and DBRX's experts) are
folded into plain consts first (exporter/fold.py), so they are quantized too.
"""

from __future__ import annotations

import numpy as np
import torch

from exporter.lazy import LazyTensor, derive
from exporter.lower import Lowering
from interp.errors import ExportError

BITS = (2, 3, 4, 5, 6, 8)


def _quantizable(weight: torch.Tensor | LazyTensor, group_size: int) -> bool:
    """A 2-D weight, or an expert stack [E, out, in], of floats whose rows split into whole groups."""
    return weight.dim() in (2, 3) and weight.is_floating_point() and weight.shape[-1] % group_size == 0


def _mlx_quantize(weight: torch.Tensor, group_size: int, bits: int) -> tuple[torch.Tensor, ...]:
    import mlx.core as mx

    dtype = {torch.float32: mx.float32, torch.bfloat16: mx.bfloat16, torch.float16: mx.float16}[weight.dtype]
    w = mx.array(weight.detach().float().numpy()).astype(dtype)
    q, scales, biases = mx.quantize(w, group_size=group_size, bits=bits)
    packed = torch.from_numpy(np.array(q, copy=True))
    as_torch = [torch.from_numpy(np.array(a.astype(mx.float32), copy=True)).to(weight.dtype) for a in (scales, biases)]
    return packed, as_torch[0], as_torch[1]


def lazy_quantize(weight: torch.Tensor | LazyTensor, group_size: int, bits: int) -> list[LazyTensor]:
    """(codes, scales, biases) of ``weight`` [..., in] in MLX's affine layout, computed when written."""
    *rows, columns = weight.shape
    codes = ([*rows, columns * bits // 32], torch.uint32)
    groups = ([*rows, columns // group_size], weight.dtype)
    return derive([weight], lambda w: _mlx_quantize(w, group_size, bits), [codes, groups, groups])


#: (op, input slot) pairs that read a weight a quantized op can take instead
WEIGHT_SLOTS = {("linear", 1): "quantized_linear", ("embedding", 0): "quantized_embedding",
                ("expert_linear", 1): "quantized_expert_linear"}


def quantized_weight_candidates(low: Lowering) -> list[str]:
    """Consts read only as the weight of ops that have a quantized twin, sorted."""
    readers: dict[str, set[str]] = {}
    for node in low.nodes:
        for i, value in enumerate(node["inputs"]):
            if isinstance(value, str) and value in low.consts:
                role = "weight" if (node["op"], i) in WEIGHT_SLOTS else "other"
                readers.setdefault(value, set()).add(role)
    return sorted(name for name, roles in readers.items() if roles == {"weight"})


def use_quantized_weights(low: Lowering, packed: dict[str, tuple[tuple[str, str, str], dict]]) -> None:
    """Point every op reading a weight in ``packed`` at its (codes, scales, biases) and quantization attrs."""
    for node in low.nodes:
        if node["op"] == "linear" and node["inputs"][1] in packed:
            x, w, bias = node["inputs"]
            names, attrs = packed[w]
            node.update(op="quantized_linear", inputs=[x, *names, bias], attrs=dict(attrs))
        elif node["op"] == "embedding" and node["inputs"][0] in packed:
            w, indices = node["inputs"]
            names, attrs = packed[w]
            node.update(op="quantized_embedding", inputs=[*names, indices], attrs=dict(attrs))
        elif node["op"] == "expert_linear" and node["inputs"][1] in packed:
            x, w, indices, bias = node["inputs"]
            names, attrs = packed[w]
            node.update(op="quantized_expert_linear", inputs=[x, *names, indices, bias], attrs=dict(attrs))


def quantize_weights(low: Lowering, bits: int, group_size: int) -> int:
    """Quantize every linear/embedding weight whose input width divides into groups.

    A const read by any other kind of op stays in floating point. Returns the number of
    weights quantized.
    """
    if bits not in BITS:
        raise ExportError(f"--quantize takes {', '.join(map(str, BITS))} bits or keep, not {bits}")
    if group_size not in (32, 64, 128):
        raise ExportError(f"--group-size must be 32, 64 or 128, not {group_size}")
    attrs = {"group_size": group_size, "bits": bits}
    packed: dict[str, tuple[tuple[str, str, str], dict]] = {}
    for name in quantized_weight_candidates(low):
        if not _quantizable(low.consts[name], group_size):
            continue
        base = name.removesuffix(".weight")
        names = (f"{base}.qweight", f"{base}.scales", f"{base}.biases")
        for new, tensor in zip(names, lazy_quantize(low.consts.pop(name), group_size, bits), strict=True):
            low.consts[new] = tensor
        packed[name] = (names, attrs)
    use_quantized_weights(low, packed)
    return len(packed)
