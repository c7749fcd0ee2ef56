"""Lower an ExportedProgram's fx graph into program nodes.

Walks the graph once. Placeholders become consts (parameters, buffers, lifted
constants, named by their module path) or program inputs; every call_function node is
handed to the aten registry (``exporter.aten_ops``), which emits schema ops through
``Lowering.emit``. ``emit`` checks each node against the schema, so the exporter cannot
write a program the interpreter's validator would refuse. A node that reads lifted
constants alone (tensors a forward makes with ``torch.tensor``, such as Gemma 3n's target
sparsity, which it turns into a normal quantile through ``erfinv``) is computed with torch
instead, and its result becomes a const (``_fold``).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind

from interp import schema
from interp.errors import ExportError

INT64_MAX = 2**63 - 1

TORCH_DTYPES = {
    torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.int64: "int64",
    torch.int32: "int32", torch.int16: "int16", torch.int8: "int8", torch.uint8: "uint8", torch.bool: "bool",
    torch.uint16: "uint16", torch.uint32: "uint32",
}

PROGRAM_INPUTS = ("input_ids", "position_ids")


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return TORCH_DTYPES[dtype]
    except KeyError:
        raise ExportError(f"dtype {dtype} has no program equivalent") from None


@dataclass
class Lowering:
    """The program under construction."""

    nodes: list[dict] = field(default_factory=list)
    #: const name -> a tensor, or an ``exporter.lazy.LazyTensor`` computed when it is written
    consts: dict[str, Any] = field(default_factory=dict)
    values: dict[Any, Any] = field(default_factory=dict)  # fx node -> value name(s) / literal
    _counter: int = 0

    def fresh(self) -> str:
        self._counter += 1
        return f"v{self._counter}"

    def ref(self, arg: Any) -> Any:
        """The program value for an fx argument: a name, a literal, or a list of them."""
        if isinstance(arg, torch.fx.Node):
            if arg not in self.values:
                raise ExportError(f"node {arg.name} is used before it is lowered")
            return self.values[arg]
        if isinstance(arg, (list, tuple)):
            return [self.ref(a) for a in arg]
        if isinstance(arg, torch.dtype):
            return dtype_name(arg)
        if isinstance(arg, (int, float, bool)) or arg is None:
            return arg
        raise ExportError(f"cannot represent argument {arg!r} of type {type(arg).__name__}")

    def emit(self, op: str, inputs: list, attrs: dict | None = None, outputs: int = 1) -> Any:
        """Append one schema op; returns its output name (or list of names)."""
        spec = schema.OPS.get(op)
        if spec is None:
            raise ExportError(f"internal: op {op!r} is not in the schema")
        # trailing optional inputs may be left out, as programs written before they existed leave them
        if len(inputs) > len(spec.inputs) or any(arg.kind != schema.OPTIONAL_TENSOR
                                                 for arg in spec.inputs[len(inputs):]):
            raise ExportError(f"internal: op {op!r} takes {len(spec.inputs)} inputs, got {len(inputs)}")
        attrs = {k: v for k, v in (attrs or {}).items()}
        for key in attrs:
            if key not in spec.attr_by_name:
                raise ExportError(f"internal: op {op!r} has no attribute {key!r}")
        names = [self.fresh() for _ in range(outputs)]
        self.nodes.append({"op": op, "inputs": inputs, "attrs": attrs, "outputs": names})
        return names[0] if outputs == 1 else names


#: (state name in the exported program, its tensor) -> the const's value
ConstSource = Callable[[str, torch.Tensor], Any]


def lower(exported: ExportedProgram, strip_prefix: str = "model.",
          const_source: ConstSource | None = None) -> tuple[Lowering, list[str]]:
    """Lower ``exported``; returns the lowering and the names of the graph outputs.

    ``const_source`` supplies each parameter's, buffer's or constant's value; by default
    the tensor the exported program holds (a streamed export supplies lazy tensors read
    from the checkpoint instead: ``exporter.checkpoint``).
    """
    from exporter.aten_ops import ATEN  # the registries; imported here to keep import order simple
    from exporter.complex_ops import COMPLEX, as_pairs, touches_complex

    low = Lowering()
    sig = exported.graph_signature
    state = dict(exported.state_dict)
    state.update(exported.constants)
    user_inputs = iter(PROGRAM_INPUTS)
    placeholder_specs = {spec.arg.name: spec for spec in sig.input_specs}
    known: dict[torch.fx.Node, Any] = {}  # lifted constants and what is computed from them alone

    for node in exported.graph.nodes:
        if node.op == "placeholder":
            spec = placeholder_specs[node.name]
            if spec.kind == InputKind.USER_INPUT:
                low.values[node] = next(user_inputs)
            elif spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
                name = spec.target.removeprefix(strip_prefix)
                tensor = state[spec.target]
                value = const_source(spec.target, tensor) if const_source else tensor.detach()
                low.consts[name] = as_pairs(value)  # a complex const is held as its real pairs
                low.values[node] = name
                if spec.kind == InputKind.CONSTANT_TENSOR and not tensor.is_meta:
                    known[node] = tensor.detach()
            else:
                raise ExportError(f"unsupported graph input kind {spec.kind.name} ({node.name})")
        elif node.op == "call_function" and _fold(low, node, known):
            continue
        elif node.op == "call_function":
            target = node.target
            key = target_name(target)
            on_complex = touches_complex(node)
            handler = (COMPLEX if on_complex else ATEN).get(key)
            if handler is None:
                what = "on complex tensors " if on_complex else ""
                raise ExportError(
                    f"cannot export: op {key} {what}(graph node {node.name}) has no mapping to a paw program op"
                )
            low.values[node] = handler(low, node)
        elif node.op == "output":
            outputs = [low.ref(arg) for arg, spec in zip(node.args[0], sig.output_specs, strict=True)
                       if _is_user_output(exported, spec)]
        else:
            raise ExportError(f"unsupported graph node kind {node.op} ({node.name})")
    return low, outputs


def _fold(low: Lowering, node: torch.fx.Node, known: dict[torch.fx.Node, Any]) -> bool:
    """Compute ``node`` now when it reads lifted constants alone; its tensors become consts.

    Returns whether it did. A node that reads nothing (``aten.zeros``, ``aten.arange``) is left
    to the program (its shape may follow the input's), and so is a seeded random op.
    """
    from exporter.complex_ops import as_pairs

    inputs = node.all_input_nodes
    if not inputs or any(arg not in known for arg in inputs):
        return False
    if isinstance(node.target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in node.target.tags:
        return False
    args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), known.__getitem__)
    with torch.no_grad():
        value = node.target(*args, **kwargs)
    known[node] = value

    def as_const(item: Any, index: str = "") -> Any:
        if isinstance(item, (list, tuple)):
            return [as_const(part, f"{index}.{i}") for i, part in enumerate(item)]
        if not isinstance(item, torch.Tensor):
            return item  # None (an assertion's result) or a number: a literal
        name = f"folded.{node.name}{index}"
        low.consts[name] = as_pairs(item.detach())  # a complex one as its real pairs, as a placeholder's
        return name

    low.values[node] = as_const(value)
    return True


def _is_user_output(exported: ExportedProgram, spec) -> bool:
    """Whether a graph output is the program's; a buffer the forward rewrites is dropped when
    the forward never reads the buffer's old value (Phi-3's longrope picks its frequencies
    from the positions of each call), and refused when it does (state carried across calls).
    """
    if spec.kind == OutputKind.USER_OUTPUT:
        return True
    if spec.kind != OutputKind.BUFFER_MUTATION:
        raise ExportError(f"unsupported graph output kind {spec.kind.name} ({spec.arg.name})")
    old = next(s.arg.name for s in exported.graph_signature.input_specs if s.target == spec.target)
    placeholder = next(n for n in exported.graph.nodes if n.op == "placeholder" and n.name == old)
    if placeholder.users:
        raise ExportError(f"cannot export: the forward updates buffer {spec.target} from its previous value, "
                          "state a program cannot carry between calls")
    return False


def target_name(target: Any) -> str:
    if target is operator.getitem:
        return "getitem"
    if getattr(target, "__module__", None) in ("_operator", "operator"):
        return f"operator.{target.__name__}"
    name = str(target)
    return name


def value_names(value: Any) -> list[str]:
    """The value names a node input or attribute refers to (strings, possibly in lists)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [name for item in value for name in value_names(item)]
    return []


def eliminate_dead_code(low: Lowering, outputs: list[str]) -> None:
    """Drop nodes whose results nothing uses, then consts nothing reads."""
    live: set[str] = set(outputs)

    kept = []
    for node in reversed(low.nodes):
        if not any(out in live for out in node["outputs"]):
            continue
        kept.append(node)
        for value in node["inputs"]:
            live.update(value_names(value))
        for value in node["attrs"].values():
            live.update(value_names(value))
    kept.reverse()
    # Attribute strings such as dtype names land in `live` too; harmless.
    low.nodes = kept
    low.consts = {k: v for k, v in low.consts.items() if k in live}
