"""Ternary weights in export: post-hoc ternarization and exact import of BitNet checkpoints.

Two jobs, both ending in the same weight-transform pass over the lowered program:

- ``--weights ternary`` (or ``ternary-base3``): every linear layer's weight W becomes
  trits t = clip(round(W / s), -1, 1) with BitNet b1.58's absmean scale s = mean(|W|),
  taken per output row (one scale per row costs 2 bytes per row and tracks rows of very
  different magnitude much better than one scale per tensor). Embeddings, norms and the
  output projection (lm_head, including a tied one) stay float: they are a small share of
  the bytes of a large model and the most sensitive to rounding.
- BitNet checkpoints (transformers' ``BitLinear`` / ``AutoBitLinear`` layers, packed or
  not): the trits and the scale are read back exactly, and the layer's int8 absmax
  per-token activation quantization becomes the program op ``act_quant``.

The pass replaces each such ``linear`` node by ``ternary_linear`` with two consts:
``<layer>.ternary_packed`` (uint8 rows, see interp/kernels/ternary.py) and
``<layer>.ternary_scale`` (the program's float dtype, [out] or [1]).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from exporter.aten_ops import ATEN, aten
from exporter.lazy import derive
from exporter.lower import Lowering, eliminate_dead_code
from interp.errors import ExportError
from interp.kernels import ternary as packing

WEIGHT_MODES = ("float", "ternary", "ternary-base3")


@torch.library.custom_op("paw::act_quant", mutates_args=())
def paw_act_quant(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Reference semantics of the program's ``act_quant`` op (BitNet's activation quantizer)."""
    qmax = 2 ** (bits - 1) - 1
    scale = qmax / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    return (x * scale).round().clamp(-qmax - 1, qmax) / scale


@paw_act_quant.register_fake
def _paw_act_quant_fake(x, bits):
    return torch.empty_like(x)


@aten("paw.act_quant.default")
def _act_quant(low: Lowering, node):
    return low.emit("act_quant", [low.ref(node.args[0])], {"bits": int(node.args[1])})


if "aten.square.default" not in ATEN:  # BitNet's relu2 activation; the general table may gain it too

    @aten("aten.square.default")
    def _square(low: Lowering, node):
        x = low.ref(node.args[0])
        return low.emit("mul", [x, x])


class _CapturedTernaryLinear(torch.nn.Module):
    """Stands in for a BitNet layer during capture: act_quant, then a plain linear on t * s."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, rms_norm: torch.nn.Module | None):
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.rms_norm = rms_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rms_norm is not None:
            x = self.rms_norm(x)
        return torch.nn.functional.linear(torch.ops.paw.act_quant(x, 8), self.weight, self.bias)


def _hf_unpack(packed: torch.Tensor, out_features: int) -> np.ndarray:
    """Trits from transformers' BitNet packing (rows r, r + R, r + 2R, r + 3R share byte row r)."""
    p = packed.to(torch.uint8).numpy()
    parts = [((p >> (2 * i)) & 3).astype(np.int8) - 1 for i in range(4)]
    return np.concatenate(parts, axis=0)[:out_features]


def _bitnet_trits(module: torch.nn.Module) -> tuple[np.ndarray, np.ndarray]:
    """(trits [out, in], scale [1]) of a transformers BitLinear / AutoBitLinear, exactly."""
    kind = type(module).__name__
    if kind == "BitLinear":
        t = _hf_unpack(module.weight, module.out_features)
        # BitLinear divides by weight_scale after the matmul: W = t / weight_scale.
        s = (1.0 / module.weight_scale.detach().float()).numpy().reshape(-1)
        return t, s.astype(np.float32)
    w = module.weight.detach().float()
    if getattr(module, "online_quant", False):
        inv = 1.0 / w.abs().mean().clamp(min=1e-5)
        t = (w * inv).round().clamp(-1, 1)
        return t.numpy().astype(np.int8), (1.0 / inv).reshape(1).numpy().astype(np.float32)
    if not torch.all((w == -1) | (w == 0) | (w == 1)):
        raise ExportError(f"{kind} weights are not ternary; cannot import them exactly")
    return w.numpy().astype(np.int8), module.weight_scale.detach().float().numpy().reshape(-1)


@dataclass
class TernaryPlan:
    """What the ternary pass will do for one export."""

    mode: str = "float"  # one of WEIGHT_MODES
    per_row: bool = True
    exact: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # const name -> (t, s)

    @property
    def packing(self) -> str:
        return "base3" if self.mode == "ternary-base3" else "2bit"

    @property
    def active(self) -> bool:
        return self.mode != "float" or bool(self.exact)


@contextlib.contextmanager
def ternary_capture(model: torch.nn.Module, mode: str = "float") -> Iterator[TernaryPlan]:
    """Swap BitNet layers for capturable stand-ins for the duration of the block; yield the plan."""
    if mode not in WEIGHT_MODES:
        raise ExportError(f"unknown weights mode {mode!r}; choose one of {', '.join(WEIGHT_MODES)}")
    plan = TernaryPlan(mode=mode)
    swapped: list[tuple[str, torch.nn.Module]] = []
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    try:
        for name, module in list(model.named_modules()):
            if type(module).__name__ not in ("BitLinear", "AutoBitLinear"):
                continue
            t, s = _bitnet_trits(module)
            weight = torch.from_numpy(t.astype(np.float32) * s.reshape(-1, 1)).to(dtype)
            stand_in = _CapturedTernaryLinear(weight, module.bias, getattr(module, "rms_norm", None))
            model.set_submodule(name, stand_in)
            swapped.append((name, module))
            plan.exact[f"{name}.weight"] = (t, s)
        yield plan
    finally:
        for name, module in swapped:
            model.set_submodule(name, module)


def ternarize_program(low: Lowering, outputs: list[str], plan: TernaryPlan) -> int:
    """Replace linear-layer ``linear`` nodes by ``ternary_linear``; returns how many weights were packed."""
    if not plan.active:
        return 0
    other_uses = _non_linear_weight_uses(low)
    logits = outputs[0] if outputs else None
    made: dict[str, tuple[str, str, int, int]] = {}
    for index, node in enumerate(low.nodes):
        if node["op"] != "linear" or node["outputs"][0] == logits:
            continue
        x, w, bias = node["inputs"]
        if not isinstance(w, str) or w not in low.consts or w in other_uses or low.consts[w].ndim != 2:
            continue
        if w not in made:
            if w not in plan.exact and plan.mode == "float":
                continue
            made[w] = _add_packed_consts(low, w, plan)
        packed, scale, out_features, in_features = made[w]
        low.nodes[index] = {
            "op": "ternary_linear",
            "inputs": [x, packed, scale, bias],
            "attrs": {"in_features": in_features, "out_features": out_features, "packing": plan.packing},
            "outputs": node["outputs"],
        }
    missing = sorted(set(plan.exact) - set(made))
    if missing:
        raise ExportError(f"BitNet layers {', '.join(missing[:3])} did not lower to linear ops; cannot pack them")
    eliminate_dead_code(low, outputs)
    return len(made)


def _non_linear_weight_uses(low: Lowering) -> set[str]:
    """Const names read by anything other than a linear's weight slot (tied embeddings, ...)."""
    used: set[str] = set()
    for node in low.nodes:
        for position, value in enumerate(node["inputs"]):
            if node["op"] == "linear" and position == 1:
                continue
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, str) and item in low.consts:
                    used.add(item)
    return used


def _add_packed_consts(low: Lowering, name: str, plan: TernaryPlan) -> tuple[str, str, int, int]:
    """Add the packed trits and scales of weight ``name`` (computed when written); returns their names and sizes."""
    base = name.removesuffix(".weight")
    packed_name, scale_name = f"{base}.ternary_packed", f"{base}.ternary_scale"
    weight = low.consts[name]
    out_features, in_features = weight.shape
    exact = plan.exact.get(name)  # a BitNet layer's own trits and scale
    if exact is not None:
        scale_rows = exact[1].reshape(-1).shape[0]
    else:
        scale_rows = out_features if plan.per_row else 1

    def packed(t: np.ndarray, s: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        scale = torch.from_numpy(np.ascontiguousarray(s, dtype=np.float32)).to(weight.dtype)
        return torch.from_numpy(packing.pack(t, plan.packing)), scale

    def ternarized(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return packed(*packing.ternarize_absmean(values.detach().float().numpy(), per_row=plan.per_row))

    outputs = [([out_features, packing.packed_length(in_features, plan.packing)], torch.uint8),
               ([scale_rows], weight.dtype)]
    if exact is not None:
        low.consts[packed_name], low.consts[scale_name] = derive([], lambda: packed(*exact), outputs)
    else:
        low.consts[packed_name], low.consts[scale_name] = derive([weight], ternarized, outputs)
    return packed_name, scale_name, int(out_features), int(in_features)


def reference_weights(t: np.ndarray, s: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight t * s a ternary layer stands for (scale rounded to ``dtype`` first), for tests."""
    scale = torch.from_numpy(np.asarray(s, dtype=np.float32)).to(dtype).float().numpy().reshape(-1, 1)
    return torch.from_numpy(t.astype(np.float32) * scale).to(dtype)
