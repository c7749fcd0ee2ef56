"""LoRA adapters at run time: a load-time rewrite that adds a ``lora`` node after each
targeted linear layer, leaving the base program's files untouched.

    sites = linear_sites(model.program)             # module name -> where its output comes from
    adapted = with_adapters(model, [adapter])       # one adapter, every row
    adapted = with_adapters(model, [a0, a1, None], indexed=True)
    adapted(tokens, cache=..., extra_inputs={"adapter_index": mx.array([0, 2, 1])})

An adapter maps Hugging Face module names (``model.layers.3.self_attn.q_proj``) to a
pair ``(a [rank, in], b [out, rank])`` whose product, scale included, is the module's
weight update ``b @ a``. Names, not program nodes, so one adapter fits a program whether
its exporter fused q/k/v into one product or not: a fused node gets the block form, one
``a`` stacking the modules' ranks and one ``b`` holding each module's rows in its own
columns. With several adapters (``indexed``), each node holds them stacked, ranks padded
with zeros, and each batch row picks its adapter by the ``adapter_index`` input; an
absent adapter is all zeros. The base weights are shared, never copied.

``merged_model`` is the other way to run one adapter: its update added into copies of
the weights it targets. One program's calls then cost what the base's cost, without the
rewrite's extra products (measured in docs/programs.md, "LoRA at run time"); it is used
where it equals the rewrite: float32 weights that nothing else reads.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import mlx.core as mx
import numpy as np

from interp.errors import ArtifactError
from interp.program import Node, Program, names_in

ADAPTER_INPUT = "adapter_index"
#: one adapter: module name -> (a [rank, in], b [out, rank]) with the scale folded into b
Adapter = Mapping[str, tuple[Any, Any]]

_LAYER = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class LinearSite:
    """Where one module's linear layer sits in a program."""

    module: str  # Hugging Face module name, e.g. model.layers.3.self_attn.q_proj
    node: int  # index of the producing node in program.nodes
    rows: tuple[int, int]  # the module's slice of the node's output features (fused nodes hold several)
    in_features: int
    node_out_features: int

    @property
    def out_features(self) -> int:
        return self.rows[1] - self.rows[0]

    @property
    def layer(self) -> int | None:
        """The decoder layer the module belongs to (from its name), or None (an LM head)."""
        found = _LAYER.search(self.module)
        return int(found.group(1)) if found else None


def _shape(program: Program, name: Any) -> list[int] | None:
    meta = program.spec.get("consts", {}).get(name) if isinstance(name, str) else None
    return list(meta["shape"]) if meta else None


def _features(program: Program, node: Node) -> tuple[str, int, int] | None:
    """(weight const name, in, out) of a linear-like node whose weight is a const."""
    if node.op == "linear":
        shape = _shape(program, node.inputs[1])
        return (node.inputs[1], shape[1], shape[0]) if shape and len(shape) == 2 else None
    if node.op == "matmul":  # Conv1D (GPT-2): x @ weight with weight [in, out]
        shape = _shape(program, node.inputs[1])
        if shape and len(shape) == 2 and _shape(program, node.inputs[0]) is None:
            return node.inputs[1], shape[0], shape[1]
        return None
    if node.op == "quantized_linear":
        scales = _shape(program, node.inputs[2])
        return (node.inputs[1], scales[1] * node.attrs["group_size"], scales[0]) if scales else None
    if node.op == "ternary_linear":
        return node.inputs[1], node.attrs["in_features"], node.attrs["out_features"]
    return None


def _module_parts(weight: str) -> list[str]:
    """Module names behind a weight const: ``a.b.q_proj+k_proj.weight`` -> a.b.q_proj, a.b.k_proj."""
    base = weight.removesuffix(".weight")
    head, _, last = base.rpartition(".")
    parts = last.split("+")
    return [f"{head}.{p}" if head else p for p in parts]


def linear_sites(program: Program) -> dict[str, LinearSite]:
    """Every module a LoRA adapter can target in ``program``, by Hugging Face module name."""
    split_of: dict[str, Node] = {}
    for node in program.nodes:
        if node.op == "split" and node.inputs and isinstance(node.inputs[0], str):
            split_of[node.inputs[0]] = node
    sites: dict[str, LinearSite] = {}
    for index, node in enumerate(program.nodes):
        found = _features(program, node)
        if found is None:
            continue
        weight, in_features, out_features = found
        modules = _module_parts(weight)
        sizes = [out_features]
        if len(modules) > 1:
            split = split_of.get(node.outputs[0])
            sizes = list(split.attrs.get("sizes", [])) if split is not None else []
            if len(sizes) != len(modules) or sum(sizes) != out_features:
                modules, sizes = [weight.removesuffix(".weight")], [out_features]
        start = 0
        for module, size in zip(modules, sizes, strict=True):
            sites[module] = LinearSite(module, index, (start, start + size), in_features, out_features)
            start += size
    return sites


def check_adapter(adapter: Adapter, sites: Mapping[str, LinearSite], where: str = "the adapter") -> None:
    """Raise ArtifactError unless every module of ``adapter`` exists with matching shapes."""
    for module, (a, b) in adapter.items():
        site = sites.get(module)
        if site is None:
            raise ArtifactError(f"{where} targets {module}, which the base program does not have")
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ArtifactError(f"{where}: {module} has a {tuple(a.shape)} and b {tuple(b.shape)}, "
                                "not a [rank, in] and b [out, rank]")
        if a.shape[1] != site.in_features or b.shape[0] != site.out_features:
            raise ArtifactError(f"{where}: {module} is {site.out_features} x {site.in_features} in the base program, "
                                f"the adapter's update is {b.shape[0]} x {a.shape[1]}")


def stacked_adapters(program: Program, adapters: Sequence[Adapter | None], dtype: mx.Dtype,
                     sites: Mapping[str, LinearSite] | None = None) -> dict[int, tuple[mx.array, mx.array]]:
    """Per targeted node: (a [n, rank, in], b [n, out, rank]) over the ``n`` adapters, in ``dtype``."""
    sites = sites if sites is not None else linear_sites(program)
    by_node: dict[int, list[list[tuple[LinearSite, Any, Any]]]] = {}
    for j, adapter in enumerate(adapters):
        if adapter is None:
            continue
        check_adapter(adapter, sites)
        for module, (a, b) in adapter.items():
            site = sites[module]
            slots = by_node.setdefault(site.node, [[] for _ in adapters])
            slots[j].append((site, a, b))
    stacks = {}
    for node, slots in by_node.items():
        layouts = [_columns(parts) for parts in slots]
        rank = max(width for _, width in layouts)
        first = next(site for parts in slots for site, _, _ in parts)
        a_stack = np.zeros((len(adapters), rank, first.in_features), dtype=np.float32)
        b_stack = np.zeros((len(adapters), first.node_out_features, rank), dtype=np.float32)
        for j, (parts, (columns, _)) in enumerate(zip(slots, layouts, strict=True)):
            for (site, a, b), column in zip(parts, columns, strict=True):
                r = a.shape[0]
                a_stack[j, column:column + r] = np.asarray(a, dtype=np.float32)
                b_stack[j, site.rows[0]:site.rows[1], column:column + r] = np.asarray(b, dtype=np.float32)
        stacks[node] = (mx.array(a_stack).astype(dtype), mx.array(b_stack).astype(dtype))
    return stacks


def _columns(parts: list) -> tuple[list[int], int]:
    """First rank column of each module of one node, and the node's total rank. Modules that
    share their ``a`` (an adapter trained on the fused product) share its columns too."""
    columns, seen, width = [], [], 0
    for _, a, _ in parts:
        a = np.asarray(a)
        for column, other in seen:
            if other.shape == a.shape and np.array_equal(other, a):
                columns.append(column)
                break
        else:
            columns.append(width)
            seen.append((width, a))
            width += a.shape[0]
    return columns, width


def rewrite_with_lora(
    program: Program, nodes: Sequence[int], *, indexed: bool
) -> tuple[Program, dict[int, tuple[str, str]]]:
    """``program`` with a ``lora`` update added to the output of each of ``nodes``.

    Returns the new program and, per node, the names of the (a, b) consts it reads (to
    be supplied by the caller: as consts, or as trainable inputs).
    """
    targets = set(nodes)
    new_nodes: list[Node] = []
    names: dict[int, tuple[str, str]] = {}
    for index, node in enumerate(program.nodes):
        if index not in targets:
            new_nodes.append(node)
            continue
        out = node.outputs[0]
        a_name, b_name = f"lora.{out}.a", f"lora.{out}.b"
        names[index] = (a_name, b_name)
        x = node.inputs[0]
        new_nodes.append(replace(node, outputs=(f"{out}.base", *node.outputs[1:])))
        new_nodes.append(Node("lora", (x, a_name, b_name, ADAPTER_INPUT if indexed else None), {}, (f"{out}.lora",)))
        new_nodes.append(Node("add", (f"{out}.base", f"{out}.lora"), {}, (out,)))
    spec = dict(program.spec)
    if indexed:
        spec["inputs"] = [*spec["inputs"], {"name": ADAPTER_INPUT, "dtype": "int32", "shape": ["batch"]}]
    return replace(program, spec=spec, nodes=new_nodes), names


def model_dtype(model) -> mx.Dtype:
    """The compute dtype of a loaded graph model (its declared weight dtype)."""
    return getattr(mx, model.program.model_info.get("dtype", "float32"), mx.float32)


def with_adapters(model, adapters: Sequence[Adapter | None], *, indexed: bool = False):
    """A GraphModel running ``model`` with LoRA ``adapters`` (shares the base weights).

    One adapter applies to every row. With ``indexed``, each call takes
    ``extra_inputs={"adapter_index": int32 [batch]}`` choosing the adapter of each row
    (missing: every row uses adapter 0).
    """
    from interp.graph import GraphModel

    if not indexed and len(adapters) != 1:
        raise ValueError("several adapters need indexed=True")
    stacks = stacked_adapters(model.program, adapters, model_dtype(model))
    program, names = rewrite_with_lora(model.program, sorted(stacks), indexed=indexed)
    consts = dict(model.consts)
    for node, (a_name, b_name) in names.items():
        consts[a_name], consts[b_name] = stacks[node]
    return GraphModel(program, consts, compile_decode=model.compile_decode)


def merged_weights(model, adapter: Adapter, sites: Mapping[str, LinearSite] | None = None) -> dict[str, mx.array]:
    """The consts of ``model`` with ``adapter`` added into copies of the weights it targets
    (float ``linear`` and ``matmul`` weights only): the merged alternative to the rewrite.
    ``sites``: the program's ``linear_sites``, already checked against the adapter."""
    if sites is None:
        sites = linear_sites(model.program)
        check_adapter(adapter, sites)
    consts = dict(model.consts)
    for module, (a, b) in adapter.items():
        site = sites[module]
        node = model.program.nodes[site.node]
        if node.op not in ("linear", "matmul"):
            raise ArtifactError(f"cannot merge an adapter into the {node.op} weights of {module}")
        weight = node.inputs[1]
        update = np.zeros((site.node_out_features, site.in_features), dtype=np.float32)
        update[site.rows[0]:site.rows[1]] = np.asarray(b, dtype=np.float32) @ np.asarray(a, dtype=np.float32)
        delta = mx.array(update if node.op == "linear" else update.T)
        consts[weight] = (consts[weight].astype(mx.float32) + delta).astype(consts[weight].dtype)
    return consts


def _const_uses(program: Program) -> Counter:
    """How many times the nodes name each array, in inputs or attributes (a weight named
    twice is shared, e.g. an LM head tied to the embedding)."""
    return Counter(name for node in program.nodes
                   for name in (*names_in(node.inputs), *names_in(list(node.attrs.values()))))


def merged_model(model, adapter: Adapter):
    """A GraphModel running ``model`` with ``adapter`` merged into copies of the weights it
    targets, or None where merging would not equal the rewrite: a targeted weight that is
    not a float32 ``linear`` or ``matmul`` weight (half precision would round the update,
    quantized and ternary weights cannot take it), or one that another node also reads."""
    from interp.graph import GraphModel

    sites = linear_sites(model.program)
    check_adapter(adapter, sites)
    uses = _const_uses(model.program)
    for module in adapter:
        node = model.program.nodes[sites[module].node]
        weight = node.inputs[1] if node.op in ("linear", "matmul") and len(node.inputs) > 1 else None
        if (not isinstance(weight, str) or weight not in model.consts or uses.get(weight) != 1
                or model.consts[weight].dtype != mx.float32):
            return None
    consts = merged_weights(model, adapter, sites)
    mx.eval([v for k, v in consts.items() if v is not model.consts[k]])  # the copies, made once here
    return GraphModel(model.program, consts, compile_decode=model.compile_decode)
