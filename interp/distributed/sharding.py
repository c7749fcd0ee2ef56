"""Tensor parallelism planned from the graph: which weights to split, how, and where to sum.

Megatron's scheme, found in the program instead of written per model. A projection whose
input is whole on every rank becomes *column-parallel* (each rank computes some of its
output features); the ops after it run on their share (attention on its heads, an MLP's
activation on its width); the projection that consumes the share becomes *row-parallel*
(each rank multiplies its share of the input features and holds a partial sum), and an
``all_sum`` node makes the value whole where an op needs it whole (the residual add).

One pass over the nodes gives each value a placement: whole on every rank (``None``),
split along one axis (``Split``), a partial sum (``Partial``) or a const seen through
transposes (``Weight``, an expert's weight on its way to a matmul). Split axes are
variables that the ops relate (sections of a fused projection, a reshape into heads,
attention's grouped heads); ``_Axes`` solves them into an owning rank per coordinate:
each attention's KV heads are dealt out contiguously, whatever is tied to them follows,
other widths split evenly. A projection whose share reaches an op that needs the whole
axis (a softmax over a router's experts, a norm over the full width) is left whole, or
only the offending section of a fused projection is, and the pass runs again until
nothing conflicts. Shapes come from one lazy trace of the graph on placeholder weights
(nothing is evaluated). Nothing here branches on the model's family.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import mlx.core as mx
import numpy as np

from interp import schema
from interp.compiled import references
from interp.errors import DistributedError
from interp.program import Node, Program

ALL = -1  #: owner of a coordinate every rank holds (a replicated section of a fused projection)

_UNARY = {"neg", "abs", "exp", "log", "sqrt", "rsqrt", "reciprocal", "sin", "cos", "tanh", "sigmoid", "silu",
          "relu", "erf", "logical_not", "gelu", "clamp", "cast", "full_like"}
_BINARY = {"add", "sub", "mul", "div", "pow", "maximum", "minimum", "eq", "ne", "lt", "le", "gt", "ge",
           "logical_and", "logical_or", "where"}
#: ops through which a partial sum stays a partial sum (they are linear in it)
_LINEAR_IN_PARTIAL = {"neg", "cast", "reshape", "transpose", "permute", "squeeze", "unsqueeze", "expand", "flip",
                      "tile", "repeat_interleave", "slice", "select", "split", "sum", "mean"}
_PROJECTIONS = {"linear", "quantized_linear", "matmul"}


@dataclass(frozen=True)
class Split:
    """Each rank holds its coordinates of axis ``axis``; ``var`` names that axis's split."""

    axis: int
    var: int
    sources: frozenset  #: the column-parallel projections this share comes from
    section: tuple | None = None  #: (split node, output) when it is one section of a fused projection


@dataclass(frozen=True)
class Partial:
    """Each rank holds a partial sum; the whole value is their sum."""

    sources: frozenset


@dataclass(frozen=True)
class Weight:
    """A const seen through transposes: axis i of the value is axis ``perm[i]`` of the const."""

    const: str
    perm: tuple


class _Conflict(Exception):
    def __init__(self, reason: str, sources: frozenset = frozenset(), section: tuple | None = None):
        super().__init__(reason)
        self.sources, self.section = sources, section


UNKNOWN = -2


@dataclass
class _Axes:
    """Split-axis variables, the relations the ops put between them, and their solution.

    A relation is a *view* (``part`` is coordinates ``start..`` of ``whole``: a section of
    a fused projection, a slice, a piece of a concatenation) or an *expansion* (``fine[i]``
    belongs with ``coarse[i // factor]``: a head's coordinates, a KV head's query heads).
    """

    size: list = field(default_factory=list)
    parent: list = field(default_factory=list)
    views: list = field(default_factory=list)  # (whole, part, start)
    expand: list = field(default_factory=list)  # (fine, coarse, factor)
    unit: dict = field(default_factory=dict)  # root -> coordinates that must stay together
    heads: set = field(default_factory=set)  # KV-head axes, dealt out first
    whole: set = field(default_factory=set)  # sections every rank holds whole

    def new(self, size: int) -> int:
        self.size.append(size)
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, var: int) -> int:
        while self.parent[var] != var:
            self.parent[var] = self.parent[self.parent[var]]
            var = self.parent[var]
        return var

    def same(self, a: int, b: int, sources: frozenset) -> None:
        a, b = self.find(a), self.find(b)
        if a == b:
            return
        if self.size[a] != self.size[b]:
            raise _Conflict(f"split axes of {self.size[a]} and {self.size[b]} meet", sources)
        self.parent[b] = a
        self.unit[a] = math.lcm(self.unit.get(a, 1), self.unit.pop(b, 1))

    def need_unit(self, var: int, unit: int) -> None:
        root = self.find(var)
        self.unit[root] = math.lcm(self.unit.get(root, 1), unit)

    def solve(self, ranks: int) -> dict[int, np.ndarray]:
        """An owner per coordinate of every axis variable (raises _Conflict when impossible)."""
        roots = sorted({self.find(v) for v in range(len(self.size))})
        owner = {root: np.full(self.size[root], UNKNOWN, dtype=np.int64) for root in roots}
        views = [(self.find(w), self.find(p), start) for w, p, start in self.views]
        expands = [(self.find(f), self.find(c), k) for f, c, k in self.expand]

        def fill(target: np.ndarray, values: np.ndarray) -> bool:
            known = values != UNKNOWN
            clash = known & (target != UNKNOWN) & (target != values)
            if clash.any():
                raise _Conflict("the ops split one axis two ways")
            new = known & (target == UNKNOWN)
            target[new] = values[new]
            return bool(new.any())

        def propagate() -> None:
            changed = True
            while changed:
                changed = False
                for whole, part, start in views:
                    size = self.size[part]
                    changed |= fill(owner[part], owner[whole][start:start + size])
                    changed |= fill(owner[whole][start:start + size], owner[part])
                for fine, coarse, factor in expands:
                    changed |= fill(owner[fine], np.repeat(owner[coarse], factor))
                    blocks = owner[fine].reshape(-1, factor)
                    firsts = blocks.max(axis=1)
                    mixed = ((blocks != UNKNOWN) & (blocks != firsts[:, None])).any(axis=1)
                    if mixed.any():
                        raise _Conflict("a split would cut through an attention head")
                    changed |= fill(owner[coarse], firsts)

        for root in sorted({self.find(v) for v in self.whole}):
            owner[root][:] = ALL
        propagate()
        for root in sorted({self.find(v) for v in self.heads}):
            fill(owner[root], _deal(self.size[root], ranks, 1))
            propagate()
        derived = {w for w, _, _ in views} | {f for f, _, _ in expands}
        while True:
            open_ = [r for r in roots if (owner[r] == UNKNOWN).any()]
            if not open_:
                break
            atoms = [r for r in open_ if r not in derived] or open_
            fill(owner[atoms[0]], _deal(self.size[atoms[0]], ranks, self.unit.get(atoms[0], 1)))
            propagate()
        for root, values in owner.items():
            unit = self.unit.get(root, 1)
            blocks = values.reshape(-1, unit) if values.size % unit == 0 else None
            if blocks is None or not (blocks == blocks[:, :1]).all():
                raise _Conflict(f"a split would cut through groups of {unit} (quantization groups)")
        return owner


def _deal(size: int, ranks: int, unit: int) -> np.ndarray:
    """Contiguous, as even as possible, in whole units: the owner of each of ``size`` coordinates."""
    if size % unit:
        raise _Conflict(f"an axis of {size} does not divide into groups of {unit}")
    blocks = size // unit
    return np.repeat(np.arange(blocks) * ranks // blocks, unit).astype(np.int64)


@dataclass
class ShardPlan:
    """Where each rank's program differs from the whole one, and how to cut each const."""

    program: Program
    ranks: int
    owner: dict  #: solved var root -> owner per coordinate
    axes: _Axes
    #: const -> (axis of the stored array, var, coordinates per stored index, projections that cut it)
    const_cuts: dict
    #: node index -> edits: ("sizes", [var...]) | ("shape", attr, position, var) | ("bias_on_rank0",)
    edits: dict
    #: node index -> values to make whole (all_sum) right before it; len(nodes) for program outputs
    sums: dict
    #: node index -> partial sums it reads as they are (ops linear in them)
    partial_reads: dict
    #: projections that run column- or row-parallel, for the summary
    column: set
    row: set

    def local_size(self, var: int, rank: int) -> int:
        return self.local_count(var, 0, self.axes.size[var], rank)

    def local_count(self, var: int, start: int, stop: int, rank: int) -> int:
        """How many of coordinates start..stop-1 of ``var``'s axis rank ``rank`` holds."""
        owners = self.owner[self.axes.find(var)][start:stop]
        return int(((owners == rank) | (owners == ALL)).sum())

    def rank_program(self, rank: int) -> Program:
        """The program rank ``rank`` runs: local widths, dropped biases, all_sum nodes."""
        program = self.program
        renamed: dict[str, str] = {}
        for names in self.sums.values():
            for name in names:
                renamed[name] = f"{name}@partial"
        nodes: list[Node] = []
        for index, node in enumerate(program.nodes):
            for name in self.sums.get(index, ()):
                nodes.append(Node("all_sum", (renamed[name],), {}, (name,)))  # the whole value, under its own name
            nodes.append(self._local_node(index, node, rank, renamed))
        for name in self.sums.get(len(program.nodes), ()):
            nodes.append(Node("all_sum", (renamed[name],), {}, (name,)))
        spec = dict(program.spec)
        spec["consts"] = {name: self._local_meta(name, meta, rank) for name, meta in program.spec["consts"].items()}
        return replace(program, spec=spec, nodes=nodes)

    def _local_node(self, index: int, node: Node, rank: int, renamed: dict[str, str]) -> Node:
        summed_before = {name for at, names in self.sums.items() if at <= index for name in names}
        reads_partial = self.partial_reads.get(index, set())

        def rename(value):
            if isinstance(value, str):
                if value in renamed and (value not in summed_before or value in reads_partial):
                    return renamed[value]
                return value
            if isinstance(value, (list, tuple)):
                return type(value)(rename(v) for v in value)
            return value

        inputs = tuple(rename(v) for v in node.inputs)
        attrs = dict(node.attrs)
        for edit in self.edits.get(index, ()):
            if edit[0] == "sizes":
                attrs["sizes"] = [self.local_count(var, start, start + size, rank) for var, start, size in edit[1]]
            elif edit[0] == "slice":
                _, var, start, end = edit
                attrs["start"] = self.local_count(var, 0, start, rank)
                attrs["end"] = attrs["start"] + self.local_count(var, start, end, rank)
            elif edit[0] == "shape":
                _, attr, position, var = edit
                values = list(attrs[attr])
                values[position] = self.local_size(var, rank)
                attrs[attr] = values
            elif edit[0] == "bias_on_rank0" and rank != 0:
                inputs = (*inputs[:-1], None)
        outputs = tuple(renamed.get(out, out) for out in node.outputs)
        return Node(node.op, inputs, attrs, outputs)

    def _local_meta(self, name: str, meta: dict, rank: int) -> dict:
        if name not in self.const_cuts:
            return meta
        axis, var, per_index, _ = self.const_cuts[name]
        shape = list(meta["shape"])
        shape[axis] = int(self._keep(var, per_index, rank).sum())
        return {**meta, "shape": shape}

    def _keep(self, var: int, per_index: int, rank: int) -> np.ndarray:
        owners = self.owner[self.axes.find(var)][::per_index]
        return (owners == rank) | (owners == ALL)

    def cut_const(self, name: str, array: mx.array, rank: int) -> mx.array:
        """Rank ``rank``'s part of const ``name`` (the whole const when it is not split)."""
        if name not in self.const_cuts:
            return array
        axis, var, per_index, _ = self.const_cuts[name]
        keep = np.flatnonzero(self._keep(var, per_index, rank))
        if keep.size and keep[-1] - keep[0] + 1 == keep.size:  # contiguous: a slice, no gather
            index = [slice(None)] * array.ndim
            index[axis] = slice(int(keep[0]), int(keep[-1]) + 1)
            return array[tuple(index)]
        return mx.take(array, mx.array(keep.astype(np.int32)), axis=axis)


def probe_shapes(program: Program, batch: int = 2, length: int = 3) -> dict[str, tuple[int, ...]]:
    """The shape of every value for a [batch, length] prompt, from one lazy trace on placeholder weights."""
    from interp.graph import GraphModel, RunContext

    consts = {name: mx.zeros(meta["shape"], getattr(mx, meta["dtype"])) for name, meta in program.spec["consts"].items()}
    model = GraphModel(program, consts, compile_decode=False)
    env: dict = dict(model.consts)
    env["input_ids"] = mx.zeros((batch, length), mx.int32)
    env["position_ids"] = mx.broadcast_to(mx.arange(length, dtype=mx.int32), (batch, length))
    ctx = RunContext(cache=None, offset=0)
    for step in model._steps:
        step(env, ctx)
    return {name: tuple(value.shape) for name, value in env.items() if isinstance(value, mx.array)}


def plan_tensor_parallel(program: Program, ranks: int, *, first_head: int | None = None) -> ShardPlan:
    """How to split ``program`` over ``ranks`` (raises DistributedError naming what cannot be split).

    ``first_head``: the node where the output head begins (``interp/distributed/stages.py``);
    projections from there on stay whole.
    """
    from interp.distributed.stages import layer_cuts

    if first_head is None:
        first_head = layer_cuts(program)[1]
    shapes = probe_shapes(program)
    excluded: set[int] = set()
    whole_sections: set[tuple] = set()
    for _ in range(4 * len(program.nodes) + 4):
        trace = _Trace(program, shapes, ranks, first_head, excluded, whole_sections)
        trace.run()
        if trace.conflicts:
            sections = {c.section for c in trace.conflicts if c.section is not None} - whole_sections
            sources = set().union(*(c.sources for c in trace.conflicts if c.section is None)) - excluded
            if not sections and not sources:
                raise DistributedError(f"tensor parallelism cannot split this program: {trace.conflicts[0]}")
            whole_sections |= sections  # first try keeping just the offending sections whole
            if not sections:
                excluded |= sources
            continue
        if not trace.column:
            raise DistributedError(f"tensor parallelism finds nothing in this program to split over {ranks} ranks: "
                                   "use --parallel pipeline")
        try:
            owner = trace.axes.solve(ranks)
        except _Conflict as exc:
            raise DistributedError(f"tensor parallelism cannot split this program over {ranks} ranks: {exc}") from None
        plan = ShardPlan(program, ranks, owner, trace.axes, trace.const_cuts, trace.edits, trace.sums,
                         trace.partial_reads, trace.column, trace.row)
        starved = _starved(plan, trace)
        if not starved:
            return plan
        excluded |= starved  # too few heads (or too narrow a projection) for every rank: keep those whole
    raise DistributedError("tensor parallelism could not settle how to split this program")


def _starved(plan: ShardPlan, trace: _Trace) -> set[int]:
    """Projections to keep whole because some rank would get none of their heads or features."""
    starved: set[int] = set()
    for var, sources in (*trace.head_sources.items(), *trace.column_vars.items()):
        if min(plan.local_size(var, rank) for rank in range(plan.ranks)) == 0:
            starved |= sources
    return starved


class _Trace:
    """One pass of placements over the nodes, collecting conflicts, const cuts, edits and sums."""

    def __init__(self, program: Program, shapes: dict, ranks: int, first_head: int, excluded: set,
                 whole_sections: set):
        self.program, self.shapes, self.ranks = program, shapes, ranks
        self.first_head, self.excluded, self.whole_sections = first_head, excluded, whole_sections
        self.consts = program.spec["consts"]
        self.axes = _Axes()
        self.place: dict[str, object] = {}
        self.conflicts: list[_Conflict] = []
        self.const_cuts: dict = {}
        self.const_whole: set[str] = set()  # consts some node reads whole
        self.edits: dict = {}
        self.sums: dict[int, list[str]] = {}
        self.summed: set[str] = set()
        self.partial_reads: dict[int, set[str]] = {}
        self.column: set[int] = set()
        self.column_vars: dict[int, frozenset] = {}  # a projection's output axis -> the projection
        self.head_sources: dict[int, frozenset] = {}  # an attention's KV-head axis -> its projections
        self.row: set[int] = set()
        self.used_vars: set[int] = set()

    # ------------------------------------------------------------------ driver
    def run(self) -> None:
        for index, node in enumerate(self.program.nodes):
            self.index = index
            try:
                outs = self._node(node)
            except _Conflict as conflict:
                self.conflicts.append(conflict)
                outs = [None] * len(node.outputs)
            for name, placement in zip(node.outputs, outs, strict=True):
                self.place[name] = placement
                if isinstance(placement, Split):
                    self.used_vars.add(placement.var)
        end = len(self.program.nodes)
        for out in self.program.spec["outputs"]:
            placement = self.place.get(out["name"])
            if isinstance(placement, Partial):
                self._sum(out["name"], at=end)
            elif isinstance(placement, Split):
                self.conflicts.append(_Conflict("a program output would stay split", placement.sources,
                                                placement.section))
        for name in self.const_whole:
            if name in self.const_cuts:
                self.conflicts.append(_Conflict(f"const {name!r} is read both split and whole",
                                                self.const_cuts[name][3]))

    def _get(self, value):
        if not isinstance(value, str) or value in self.summed:
            return None  # a literal, or a partial sum made whole
        if value in self.consts:
            return Weight(value, tuple(range(len(self.consts[value]["shape"]))))
        return self.place.get(value)

    def _whole(self, name) -> None:
        """The node reads ``name`` whole: sum a partial first; a split value cannot be read whole."""
        placement = self._get(name)
        if isinstance(placement, Partial):
            self._sum(name)
        elif isinstance(placement, Split):
            raise _Conflict(f"node {self.index} ({self.program.nodes[self.index].op}) needs the whole of {name!r}",
                            placement.sources, placement.section)
        elif isinstance(placement, Weight):
            self.const_whole.add(placement.const)

    def _sum(self, name: str, at: int | None = None) -> None:
        if name in self.summed:
            return
        self.summed.add(name)
        self.sums.setdefault(self.index if at is None else at, []).append(name)

    def _read_partial(self, name: str) -> None:
        self.partial_reads.setdefault(self.index, set()).add(name)

    def _shape(self, name) -> tuple:
        return self.shapes[name]

    # ------------------------------------------------------------------ the op rules
    def _node(self, node: Node) -> list:
        op = node.op
        spec = schema.OPS[op]
        if spec.symbolic or op in ("arange", "full"):
            return [None] * len(node.outputs)
        source = self._get(node.inputs[0]) if node.inputs else None
        if op in ("transpose", "permute") and isinstance(source, Weight):  # a weight on its way to a matmul
            rank = len(source.perm)
            dims = list(range(rank))
            if op == "transpose":
                a, b = node.attrs["dim0"] % rank, node.attrs["dim1"] % rank
                dims[a], dims[b] = dims[b], dims[a]
            else:
                dims = [d % rank for d in node.attrs["dims"]]
            return [Weight(source.const, tuple(source.perm[d] for d in dims))]
        tensors = [v for v in _tensor_inputs(node) if isinstance(v, str)]
        places = {name: self._get(name) for name in tensors}
        if any(isinstance(p, Partial) for p in places.values()):
            kept = self._partial(node, places)
            if kept is not None:
                return kept
        places = {name: self._get(name) for name in tensors}
        if op in _PROJECTIONS:
            return [self._projection(node)]
        if not any(isinstance(p, Split) for p in places.values()):
            for name in tensors:
                self._whole(name)
            return [None] * len(node.outputs)
        handler = getattr(self, f"_op_{op}", None)
        if op in _UNARY:
            return [self._unary(node)]
        if op in _BINARY:
            return [self._broadcast(node)]
        if handler is None:
            split = next(p for p in places.values() if isinstance(p, Split))
            raise _Conflict(f"node {self.index} ({op}) cannot run on a share of its input", split.sources,
                            split.section)
        return handler(node)

    def _partial(self, node: Node, places: dict) -> list | None:
        """Placements when a partial sum may stay partial through ``node``; else sum first (None)."""
        op = node.op
        first = node.inputs[0] if node.inputs else None
        partial = {n for n, p in places.items() if isinstance(p, Partial)}
        sources = frozenset().union(*(places[n].sources for n in partial))
        keep = False
        if op in _LINEAR_IN_PARTIAL and partial == {first} and all(
                not isinstance(p, Split) for p in places.values()):
            keep = True
        elif op in ("add", "sub") and set(places) == partial and len(partial) == len(
                [v for v in node.inputs if isinstance(v, str)]):
            keep = True
        elif op == "mul" and len(partial) == 1 and all(
                p is None or isinstance(p, Weight) for n, p in places.items() if n not in partial):
            keep = True
        elif op == "div" and partial == {first} and all(p is None for n, p in places.items() if n != first):
            keep = True
        elif op in ("take", "gather") and partial == {first}:
            keep = True
        elif op == "cat" and set(places) == partial:
            keep = True
        if not keep:
            for name in partial:
                self._sum(name)
            return None
        for name in partial:
            self._read_partial(name)
        for placement in places.values():
            if isinstance(placement, Weight):
                self.const_whole.add(placement.const)
        return [Partial(sources)] * len(node.outputs)

    def _new_split(self, size: int, axis: int, sources: frozenset, section=None) -> Split:
        return Split(axis, self.axes.new(size), sources, section)

    def _projection(self, node: Node) -> Split | Partial | None:
        """linear / quantized_linear / matmul: column-parallel on a whole input, row-parallel on a share."""
        op, index = node.op, self.index
        x_name, w_name = node.inputs[0], node.inputs[1]
        x, w = self._get(x_name), self._get(w_name)
        out_shape = self._shape(node.outputs[0])
        if op == "matmul":
            if not isinstance(w, Weight):
                for name in (x_name, w_name):
                    self._whole(name)
                return None
            const, perm = w.const, w.perm
            out_axis_const, in_axis_const = perm[-1], perm[-2]
        else:
            if w_name not in self.consts:
                for name in node.inputs:
                    if name is not None:
                        self._whole(name)
                return None
            const, out_axis_const, in_axis_const = w_name, 0, 1
        consts_of_node = [v for v in node.inputs[1:] if isinstance(v, str) and v in self.consts]
        if isinstance(x, Split):
            if x.axis != len(self._shape(x_name)) - 1:
                raise _Conflict(f"node {index} ({op}) reads a share of an axis it does not contract", x.sources,
                                x.section)
            self._cut_input_axis(node, x.var, const, in_axis_const, x.sources)
            self.row.add(index)
            bias = node.inputs[-1] if op in ("linear", "quantized_linear") else None
            if bias is not None:
                self.edits.setdefault(index, []).append(("bias_on_rank0",))
                self.const_whole.add(bias)
            return Partial(x.sources | {index})
        self._whole(x_name)
        if index >= self.first_head or index in self.excluded:
            self.const_whole.update(consts_of_node)
            return None
        size = self.consts[const]["shape"][out_axis_const]
        split = self._new_split(size, len(out_shape) - 1, frozenset({index}))
        if op == "quantized_linear":
            for name in consts_of_node:  # weight, scales, biases (and bias): rows are output features
                self._cut(name, 0, split.var, 1, split.sources)
        else:
            self._cut(const, out_axis_const, split.var, 1, split.sources)
            if op == "linear" and node.inputs[2] is not None:
                self._cut(node.inputs[2], 0, split.var, 1, split.sources)
        self.column.add(index)
        self.column_vars[split.var] = split.sources
        return split

    def _cut_input_axis(self, node: Node, var: int, const: str, axis: int, sources: frozenset) -> None:
        if node.op == "quantized_linear":
            bits, group = node.attrs["bits"], node.attrs["group_size"]
            if 32 % bits:
                raise _Conflict(f"{bits}-bit weights cannot be split by input features", sources)
            self.axes.need_unit(var, group)
            weight, scales, biases = node.inputs[1:4]
            self._cut(weight, 1, var, 32 // bits, sources)
            self._cut(scales, 1, var, group, sources)
            self._cut(biases, 1, var, group, sources)
        else:
            self._cut(const, axis, var, 1, sources)

    def _cut(self, const: str, axis: int, var: int, per_index: int, sources: frozenset) -> None:
        old = self.const_cuts.get(const)
        if old is not None:
            if old[0] != axis or old[2] != per_index:
                raise _Conflict(f"const {const!r} would be split two ways", sources | old[3])
            self.axes.same(old[1], var, sources | old[3])
            self.const_cuts[const] = (axis, old[1], per_index, sources | old[3])
            return
        self.const_cuts[const] = (axis, var, per_index, sources)
        self.used_vars.add(var)

    def _unary(self, node: Node) -> Split:
        return self._get(node.inputs[0])

    def _broadcast(self, node: Node) -> Split:
        """An elementwise op with numpy broadcasting: shares must meet on one axis, whole operands broadcast."""
        out_rank = len(self._shape(node.outputs[0]))
        found: Split | None = None
        sources: frozenset = frozenset()
        for value in node.inputs:
            placement = self._get(value)
            if isinstance(placement, Split):
                axis = placement.axis + out_rank - len(self._shape(value))
                sources |= placement.sources
                if found is None:
                    found = replace(placement, axis=axis)
                elif found.axis != axis:
                    raise _Conflict(f"node {self.index} ({node.op}) combines shares of different axes", sources)
                else:
                    self.axes.same(found.var, placement.var, sources)
                    found = replace(found, section=None, sources=sources)
        assert found is not None
        found = replace(found, sources=sources)
        for value in node.inputs:
            if not isinstance(value, str) or isinstance(self._get(value), Split):
                continue
            shape = self._shape(value) if value in self.shapes else tuple(self.consts[value]["shape"])
            at = found.axis - (out_rank - len(shape))
            if at < 0 or shape[at] == 1:
                self._whole(value)
                continue
            if value in self.consts and shape[at] == self.axes.size[found.var]:
                self._cut(value, at, found.var, 1, sources)  # a bias added on its own: cut it like the share
                continue
            raise _Conflict(f"node {self.index} ({node.op}) mixes a share with the whole of {value!r}", sources,
                            found.section)
        return found

    def _moved(self, split: Split, axis: int) -> Split:
        return replace(split, axis=axis)

    def _op_transpose(self, node: Node) -> list:
        split = self._get(node.inputs[0])
        rank = len(self._shape(node.inputs[0]))
        a, b = node.attrs["dim0"] % rank, node.attrs["dim1"] % rank
        axis = b if split.axis == a else a if split.axis == b else split.axis
        return [self._moved(split, axis)]

    def _op_permute(self, node: Node) -> list:
        split = self._get(node.inputs[0])
        rank = len(self._shape(node.inputs[0]))
        dims = [d % rank for d in node.attrs["dims"]]
        return [self._moved(split, dims.index(split.axis))]

    def _op_unsqueeze(self, node: Node) -> list:
        split = self._get(node.inputs[0])
        rank = len(self._shape(node.inputs[0])) + 1
        dim = node.attrs["dim"] % rank
        return [self._moved(split, split.axis + (1 if dim <= split.axis else 0))]

    def _op_squeeze(self, node: Node) -> list:
        split = self._get(node.inputs[0])
        shape = self._shape(node.inputs[0])
        dims = node.attrs.get("dims") or [i for i, s in enumerate(shape) if s == 1]
        dims = [d % len(shape) for d in dims if shape[d] == 1]
        if split.axis in dims:
            raise _Conflict("squeezing a split axis", split.sources)
        return [self._moved(split, split.axis - sum(1 for d in dims if d < split.axis))]

    def _same_axis_unless(self, node: Node, dims: list[int], what: str) -> Split:
        split = self._get(node.inputs[0])
        rank = len(self._shape(node.inputs[0]))
        if split.axis in [d % rank for d in dims]:
            raise _Conflict(f"node {self.index} ({node.op}) {what} across a split axis", split.sources, split.section)
        return split

    def _op_softmax(self, node: Node) -> list:
        return [self._same_axis_unless(node, [node.attrs["dim"]], "normalises")]

    def _op_rms_norm(self, node: Node) -> list:
        split = self._same_axis_unless(node, [-1], "normalises")
        if len(node.inputs) > 1 and node.inputs[1] is not None:
            self._whole(node.inputs[1])
        return [split]

    def _op_layer_norm(self, node: Node) -> list:
        count = len(node.attrs["normalized_shape"])
        split = self._same_axis_unless(node, list(range(-count, 0)), "normalises")
        for name in node.inputs[1:]:
            if name is not None:
                self._whole(name)
        return [split]

    def _op_act_quant(self, node: Node) -> list:
        return [self._same_axis_unless(node, [-1], "quantises")]

    def _op_rope(self, node: Node) -> list:
        split = self._same_axis_unless(node, [-1], "rotates")
        for name in node.inputs[1:]:
            self._whole(name)
        return [split]

    def _op_flip(self, node: Node) -> list:
        return [self._same_axis_unless(node, node.attrs["dims"], "flips")]

    def _op_cumsum(self, node: Node) -> list:
        return [self._same_axis_unless(node, [node.attrs["dim"]], "sums")]

    def _op_repeat_interleave(self, node: Node) -> list:
        return [self._same_axis_unless(node, [node.attrs["dim"]], "repeats")]

    def _op_tril(self, node: Node) -> list:
        return [self._same_axis_unless(node, [-1, -2], "masks")]

    _op_triu = _op_tril

    def _op_select(self, node: Node) -> list:
        split = self._same_axis_unless(node, [node.attrs["dim"]], "selects")
        dim = node.attrs["dim"] % len(self._shape(node.inputs[0]))
        return [self._moved(split, split.axis - (1 if dim < split.axis else 0))]

    def _op_argmax(self, node: Node) -> list:
        split = self._same_axis_unless(node, [node.attrs["dim"]], "compares")
        dim = node.attrs["dim"] % len(self._shape(node.inputs[0]))
        keep = node.attrs.get("keepdim", False)
        return [self._moved(split, split.axis - (1 if dim < split.axis and not keep else 0))]

    def _op_topk(self, node: Node) -> list:
        split = self._same_axis_unless(node, [node.attrs.get("dim", -1)], "compares")
        return [split, split]

    def _reduction(self, node: Node, linear: bool) -> list:
        split = self._get(node.inputs[0])
        rank = len(self._shape(node.inputs[0]))
        dims = [d % rank for d in node.attrs["dims"]] or list(range(rank))
        if split.axis in dims:
            if linear:
                return [Partial(split.sources)]  # each rank sums its share: a partial sum of the whole
            raise _Conflict(f"node {self.index} ({node.op}) reduces across a split axis", split.sources,
                            split.section)
        keep = node.attrs.get("keepdim", False)
        return [self._moved(split, split.axis - (0 if keep else sum(1 for d in dims if d < split.axis)))]

    def _op_sum(self, node: Node) -> list:
        return self._reduction(node, linear=True)

    def _op_mean(self, node: Node) -> list:
        return self._reduction(node, linear=False)

    def _op_amax(self, node: Node) -> list:
        return self._reduction(node, linear=False)

    def _op_take(self, node: Node) -> list:
        split = self._same_axis_unless(node, [node.attrs["dim"]], "gathers")
        self._whole(node.inputs[1])
        rank = len(self._shape(node.inputs[0]))
        dim = node.attrs["dim"] % rank
        extra = len(self._shape(node.inputs[1])) - 1
        return [self._moved(split, split.axis + (extra if dim < split.axis else 0))]

    def _op_gather(self, node: Node) -> list:
        split = self._same_axis_unless(node, [node.attrs["dim"]], "gathers")
        index_shape = self._shape(node.inputs[1])
        if index_shape[split.axis] != 1:
            raise _Conflict(f"node {self.index} (gather) indexes a split axis", split.sources, split.section)
        self._whole(node.inputs[1])
        return [split]

    def _op_expand(self, node: Node) -> list:
        split = self._get(node.inputs[0])
        out_rank = len(node.attrs["shape"])
        axis = split.axis + out_rank - len(self._shape(node.inputs[0]))
        entry = node.attrs["shape"][axis]
        if isinstance(entry, int) and entry != -1:
            self.edits.setdefault(self.index, []).append(("shape", "shape", axis, split.var))
        return [self._moved(split, axis)]

    def _op_tile(self, node: Node) -> list:
        split = self._get(node.inputs[0])
        reps = node.attrs["reps"]
        rank = len(self._shape(node.inputs[0]))
        lead = max(0, len(reps) - rank)
        padded = [1] * max(0, rank - len(reps)) + list(reps)
        if padded[split.axis + lead] != 1:
            raise _Conflict(f"node {self.index} (tile) repeats a split axis", split.sources, split.section)
        return [self._moved(split, split.axis + lead)]

    def _op_split(self, node: Node) -> list:
        split = self._get(node.inputs[0])
        rank = len(self._shape(node.inputs[0]))
        if node.attrs["dim"] % rank != split.axis:
            return [split] * len(node.outputs)
        parts, vars_, start = [], [], 0
        for position, size in enumerate(node.attrs["sizes"]):
            section = (self.index, position)
            part = self._new_split(size, split.axis, split.sources, section)
            self.axes.views.append((split.var, part.var, start))
            if section in self.whole_sections:
                self.axes.whole.add(part.var)
                part = None
            parts.append(part)
            vars_.append((split.var, start, size))
            start += size
        self.edits.setdefault(self.index, []).append(("sizes", vars_))
        return parts

    def _op_slice(self, node: Node) -> list:
        split = self._get(node.inputs[0])
        rank = len(self._shape(node.inputs[0]))
        if node.attrs["dim"] % rank != split.axis:
            return [split]
        size = self.axes.size[split.var]
        start, end, step = node.attrs.get("start", 0), node.attrs.get("end"), node.attrs.get("step", 1)
        start = start + size if start < 0 else start
        end = size if end is None else min(end + size if end < 0 else end, size)
        if step != 1 or not isinstance(start, int) or not isinstance(end, int) or end <= start:
            raise _Conflict(f"node {self.index} (slice) slices a split axis with a step", split.sources,
                            split.section)
        part = self._new_split(end - start, split.axis, split.sources, split.section)
        self.axes.views.append((split.var, part.var, start))
        self.edits.setdefault(self.index, []).append(("slice", split.var, start, end))
        return [part]

    def _op_cat(self, node: Node) -> list:
        places = [self._get(v) for v in node.inputs[0]]
        rank = len(self._shape(node.outputs[0]))
        dim = node.attrs["dim"] % rank
        if not all(isinstance(p, Split) for p in places):
            first = next(p for p in places if isinstance(p, Split))
            raise _Conflict(f"node {self.index} (cat) joins shares with whole tensors", first.sources, first.section)
        sources = frozenset().union(*(p.sources for p in places))
        if any(p.axis != places[0].axis for p in places):
            raise _Conflict(f"node {self.index} (cat) joins shares of different axes", sources)
        if dim != places[0].axis:
            for p in places[1:]:
                self.axes.same(places[0].var, p.var, sources)
            return [replace(places[0], sources=sources, section=None)]
        whole = self._new_split(sum(self.axes.size[p.var] for p in places), dim, sources)
        start = 0
        for p in places:
            self.axes.views.append((whole.var, p.var, start))
            start += self.axes.size[p.var]
        self.edits.setdefault(self.index, [])
        return [whole]

    def _op_reshape(self, node: Node) -> list:
        split = self._get(node.inputs[0])
        before, after = self._shape(node.inputs[0]), self._shape(node.outputs[0])
        a = split.axis
        lead, tail = math.prod(before[:a]), math.prod(before[a + 1:])
        starts = [b for b in range(len(after)) if math.prod(after[:b]) == lead]
        result = None
        for b in starts:  # the axis kept whole
            if after[b] == before[a] and math.prod(after[b + 1:]) == tail:
                result = self._moved(split, b)
                break
        for b in starts if result is None else ():  # the axis cut into (heads, head size)
            if b + 1 < len(after) and after[b] * after[b + 1] == before[a] and math.prod(after[b + 2:]) == tail:
                result = self._new_split(after[b], b, split.sources, split.section)
                self.axes.expand.append((split.var, result.var, after[b + 1]))
                break
        for b in starts if result is None else ():  # (heads, head size) merged into one axis
            if a + 1 < len(before) and before[a] * before[a + 1] == after[b] and \
                    math.prod(after[b + 1:]) == math.prod(before[a + 2:]):
                result = self._new_split(after[b], b, split.sources, split.section)
                self.axes.expand.append((result.var, split.var, before[a + 1]))
                break
        if result is None:
            raise _Conflict(f"node {self.index} (reshape) regroups a split axis", split.sources, split.section)
        entry = node.attrs["shape"][result.axis]
        if isinstance(entry, int) and entry != -1:
            self.edits.setdefault(self.index, []).append(("shape", "shape", result.axis, result.var))
        return [result]

    def _op_attention(self, node: Node) -> list:
        q, k, v = (self._get(name) for name in node.inputs)
        if not all(isinstance(p, Split) and p.axis == 1 for p in (q, k, v)):
            split = next(p for p in (q, k, v) if isinstance(p, Split))
            raise _Conflict(f"node {self.index} (attention) needs its queries, keys and values split by head",
                            split.sources, split.section)
        sources = q.sources | k.sources | v.sources
        if node.attrs.get("alibi_max_bias", 0):
            raise _Conflict("ALiBi's slopes depend on each head's global index", sources)
        self.axes.same(k.var, v.var, sources)
        heads, kv_heads = self._shape(node.inputs[0])[1], self._shape(node.inputs[1])[1]
        self.axes.expand.append((q.var, k.var, heads // kv_heads))
        self.axes.heads.add(k.var)
        self.head_sources[k.var] = sources
        return [Split(1, q.var, sources)]


def _tensor_inputs(node: Node) -> list:
    spec = schema.OPS[node.op]
    values = []
    for arg, value in zip(spec.inputs, node.inputs, strict=True):
        if arg.kind == schema.TENSOR_LIST:
            values.extend(value)
        elif arg.kind != schema.SYMINT:
            values.append(value)
    return values


def describe_plan(plan: ShardPlan) -> str:
    """'12 column- and 12 row-parallel projections' for a summary line.

    A fused projection whose every section stays whole is not counted: no rank holds less of it.
    """
    split = [i for i in plan.column if any(
        (plan.owner[plan.axes.find(var)] != ALL).any() for name, (_, var, _, sources) in plan.const_cuts.items()
        if i in sources)]
    return f"{len(split)} column- and {len(plan.row)} row-parallel projections"


__all__ = ["ALL", "ShardPlan", "describe_plan", "plan_tensor_parallel", "probe_shapes", "references"]
