"""Fold layout ops applied to stored weights into the stored weights themselves.

Some families reach a weight through a reshape or transpose of the tensor the checkpoint
stores: gpt-oss keeps its experts as [E, in, out] and transposes them on every call, DBRX
stores [E * out, in] and reshapes (and transposes) them. The quantizer
(exporter/quantize.py) and the projection fusion recognise only a const in a weight
slot, so those weights stayed in float. This pass rewrites const -> layout op -> ... into
one const holding the result, under the stored weight's name; the result is a
``LazyTensor`` computed when the writer asks for it (exporter/lazy.py), so a streamed
export still reads one weight at a time.

A const is folded only when every reader is the same layout op with the same attributes
(all of them then read the one folded const: nothing is stored twice). A const read
otherwise as well (a tied weight, two different layout chains) stays as it is:
``unfolded_weights`` names the weights left behind, for the export's note.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from exporter.lazy import LazyTensor, materialize
from exporter.lower import Lowering, value_names


def _slice(x: torch.Tensor, dim: int, start: int = 0, end: int | None = None, step: int = 1) -> torch.Tensor:
    axis = dim % x.ndim
    start, end, step = slice(start, end, step).indices(x.shape[axis])  # clamped as the interpreter clamps
    return x[(slice(None),) * axis + (slice(start, end, step),)]


def _squeeze(x: torch.Tensor, dims: list[int] | tuple[int, ...] = ()) -> torch.Tensor:
    return x.squeeze(tuple(dims)) if dims else x.squeeze()


#: program layout ops -> the same reordering of a torch tensor (interp/ops/shape.py): pure data movement,
#: no arithmetic, so a folded weight holds exactly the values the program would have computed
LAYOUT_OPS: dict[str, Callable[..., torch.Tensor]] = {
    "reshape": lambda x, shape: x.reshape(shape),
    "transpose": lambda x, dim0, dim1: x.transpose(dim0, dim1),
    "permute": lambda x, dims: x.permute(dims),
    "unsqueeze": lambda x, dim: x.unsqueeze(dim),
    "squeeze": _squeeze,
    "slice": _slice,
    "select": lambda x, dim, index: x.select(dim, index),
}

#: (op, input slot) pairs that read a weight: where an unfolded layout chain costs the quantizer a weight
WEIGHT_READERS = {("linear", 1), ("embedding", 0), ("expert_linear", 1), ("matmul", 1)}


def fold_layouts(low: Lowering, outputs: list[str]) -> int:
    """Fold layout ops over consts into the consts, in place; returns how many ops were folded.

    Repeats until no const is read only by one kind of layout op, so a chain
    (transpose then reshape) folds into one const. The folded nodes are removed and
    their readers read the const. Then a ``matmul`` by a 2-D weight becomes a ``linear``
    by its transpose (counted as one fold each).
    """
    folded = 0
    while True:
        renamed: dict[str, str] = {}
        gone: set[int] = set()
        for name, readers in _const_readers(low).items():
            nodes = _single_layout(readers, outputs)
            tensor = _folded(low.consts[name], nodes[0]) if nodes else None
            if tensor is None:
                continue
            low.consts[name] = tensor
            for node in nodes:
                renamed[node["outputs"][0]] = name
                gone.add(id(node))
            folded += len(nodes)
        if not renamed:
            return folded + _matmuls_to_linear(low)
        low.nodes = [node for node in low.nodes if id(node) not in gone]
        for node in low.nodes:
            node["inputs"] = [_rename(value, renamed) for value in node["inputs"]]
            node["attrs"] = {key: _rename(value, renamed) for key, value in node["attrs"].items()}


def _matmuls_to_linear(low: Lowering) -> int:
    """``matmul(x, W)`` with W a 2-D float const read only that way -> ``linear(x, W.T)``; returns how many.

    GPT-2's Conv1D stores [in, out] and Falcon transposes its [out, in] weights before a
    matmul: as ``linear`` weights the quantizer and the projection fusion take them too.
    """
    transposed: set[str] = set()
    for name, readers in _const_readers(low).items():
        weight = low.consts[name]
        if weight.dim() == 2 and weight.is_floating_point() and all(
                node["op"] == "matmul" and node["inputs"][1] == name and node["inputs"][0] != name
                for node, _ in readers):
            transposed.add(name)
    count = 0
    for node in low.nodes:
        if node["op"] == "matmul" and node["inputs"][1] in transposed:
            node.update(op="linear", inputs=[node["inputs"][0], node["inputs"][1], None], attrs={})
            count += 1
    for name in transposed:
        low.consts[name] = _folded(low.consts[name], {"op": "transpose", "attrs": {"dim0": 0, "dim1": 1}})
    return count


def unfolded_weights(low: Lowering) -> list[str]:
    """Consts that still reach a weight slot through layout ops (their fold was unsafe), sorted."""
    producer = {out: node for node in low.nodes for out in node["outputs"]}
    left: set[str] = set()
    for node in low.nodes:
        for slot, value in enumerate(node["inputs"]):
            if (node["op"], slot) not in WEIGHT_READERS or not isinstance(value, str):
                continue
            source = producer.get(value)
            while source is not None and source["op"] in LAYOUT_OPS:
                value = source["inputs"][0]
                source = producer.get(value) if isinstance(value, str) else None
            if isinstance(value, str) and value in low.consts and value != node["inputs"][slot]:
                left.add(value)
    return sorted(left)


def _const_readers(low: Lowering) -> dict[str, list[tuple[dict, bool]]]:
    """Each const's readers: (node, whether it reads the const as a layout op's input)."""
    readers: dict[str, list[tuple[dict, bool]]] = {}
    for node in low.nodes:
        for slot, value in enumerate(node["inputs"]):
            for name in value_names(value):
                if name in low.consts:
                    as_layout = node["op"] in LAYOUT_OPS and slot == 0 and value == name
                    readers.setdefault(name, []).append((node, as_layout))
        for value in node["attrs"].values():
            for name in value_names(value):
                if name in low.consts:
                    readers.setdefault(name, []).append((node, False))
    return readers


def _single_layout(readers: list[tuple[dict, bool]], outputs: list[str]) -> list[dict]:
    """The readers if all are one layout op with one set of attributes (none a graph output), else []."""
    nodes = [node for node, as_layout in readers]
    if not all(as_layout for _, as_layout in readers) or len({id(n) for n in nodes}) != len(nodes):
        return []
    first = nodes[0]
    if any(n["op"] != first["op"] or n["attrs"] != first["attrs"] or len(n["outputs"]) != 1 for n in nodes):
        return []
    if any(n["outputs"][0] in outputs for n in nodes):
        return []
    return nodes


def _folded(source: torch.Tensor | LazyTensor, node: dict) -> LazyTensor | None:
    """``source`` through ``node``'s layout op, computed when written; None where torch refuses the op."""
    apply = LAYOUT_OPS[node["op"]]
    attrs = dict(node["attrs"])
    try:  # the shape, from a tensor with no data
        shape = apply(torch.empty(source.shape, dtype=source.dtype, device="meta"), **attrs).shape
    except (RuntimeError, IndexError, ValueError, TypeError):  # left to the interpreter, which says what is wrong
        return None
    return LazyTensor(shape, source.dtype, lambda: apply(materialize(source), **attrs).contiguous())


def _rename(value: Any, renamed: dict[str, str]) -> Any:
    if isinstance(value, str):
        return renamed.get(value, value)
    if isinstance(value, list):
        return [_rename(item, renamed) for item in value]
    return value
