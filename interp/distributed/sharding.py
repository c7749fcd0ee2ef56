"""Tensor parallelism planned from the graph: which weights to split, how, and where to sum.

Megatron's scheme, found in the program instead of written per model. A projection whose
input is whole on every rank becomes *column-parallel* (each rank computes some of its
output features); the ops after it run on their share (attention on its heads, an MLP's
activation on its width); the projection that consumes the share becomes *row-parallel*
(each rank multiplies its share of the input features and holds a partial sum), and an
``all_sum`` node makes the value whole where an op needs it whole (the residual add).

``interp/distributed/placement.py`` gives each value a placement in one pass over the
nodes; ``interp/distributed/split_axes.py`` solves the split axes into an owning rank per
coordinate. A projection whose share reaches an op that needs the whole axis (a softmax
over a router's experts, a norm over the full width) is left whole, or only the
offending section of a fused projection is, and the pass runs again until nothing
conflicts; so is one that would leave a rank no heads. This module turns the result into
each rank's program (local widths, ``all_sum`` nodes, a bias on rank 0 only) and cuts
each const. Shapes come from one lazy trace of the graph on placeholder weights (nothing
is evaluated). Nothing here branches on the model's family.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import mlx.core as mx
import numpy as np

from interp.distributed.placement import Trace
from interp.distributed.split_axes import ALL, SplitAxes, SplitConflict
from interp.errors import DistributedError
from interp.program import Node, Program
from interp.recurrent import refuse_recurrent


@dataclass
class ShardPlan:
    """Where each rank's program differs from the whole one, and how to cut each const."""

    program: Program
    ranks: int
    owner: dict  #: solved var root -> owner per coordinate
    axes: SplitAxes
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

    consts = {name: mx.zeros(meta["shape"], getattr(mx, meta["dtype"]))
              for name, meta in program.spec["consts"].items()}
    model = GraphModel(program, consts, compile_decode=False)
    env: dict = dict(model.consts)
    env["input_ids"] = mx.zeros((batch, length), mx.int32)
    env["position_ids"] = mx.broadcast_to(mx.arange(length, dtype=mx.int32), (batch, length))
    ctx = RunContext(cache=None, offset=0)
    for run_node in model._node_runners:
        run_node(env, ctx)
    return {name: tuple(value.shape) for name, value in env.items() if isinstance(value, mx.array)}


def plan_tensor_parallel(program: Program, ranks: int, *, first_head: int | None = None) -> ShardPlan:
    """How to split ``program`` over ``ranks`` (raises DistributedError naming what cannot be split).

    ``first_head``: the node where the output head begins (``interp/distributed/stages.py``);
    projections from there on stay whole.
    """
    from interp.distributed.stages import layer_cuts

    refuse_recurrent(program, "tensor parallelism", DistributedError)
    if first_head is None:
        first_head = layer_cuts(program)[1]
    shapes = probe_shapes(program)
    excluded: set[int] = set()
    whole_sections: set[tuple] = set()
    for _ in range(4 * len(program.nodes) + 4):
        trace = Trace(program, shapes, ranks, first_head, excluded, whole_sections)
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
        except SplitConflict as exc:
            # heads that cannot be dealt out in whole quantization groups: keep attention whole
            if not _keep_whole(trace, set(trace.head_sources), excluded, whole_sections):
                raise DistributedError(
                    f"tensor parallelism cannot split this program over {ranks} ranks: {exc}") from None
            continue
        plan = ShardPlan(program, ranks, owner, trace.axes, trace.const_cuts, trace.edits, trace.sums,
                         trace.partial_reads, trace.column, trace.row)
        heads, columns = _starved(plan, trace)
        if not heads and not columns:
            return plan
        # too few heads (or too narrow a projection) for every rank: keep those whole
        _keep_whole(trace, heads, excluded, whole_sections)
        excluded |= columns
    raise DistributedError("tensor parallelism could not settle how to split this program")


def _starved(plan: ShardPlan, trace: Trace) -> tuple[set[int], set[int]]:
    """(KV-head axes, projections) of which some rank would get nothing."""
    def empty(var: int) -> bool:
        return min(plan.local_size(var, rank) for rank in range(plan.ranks)) == 0

    heads = {var for var in trace.head_sources if empty(var)}
    columns = set().union(*(sources for var, sources in trace.column_vars.items() if empty(var)))
    return heads, columns


def _keep_whole(trace: Trace, heads: set[int], excluded: set[int], whole_sections: set) -> bool:
    """Keep the attention of ``heads`` whole: its q/k/v sections of a fused projection where it
    has them (the projection's other sections still split), else its projections. False when
    that changes nothing."""
    before = len(excluded) + len(whole_sections)
    for var in heads:
        sections = trace.head_sections.get(var, set())
        if sections and not sections <= whole_sections:
            whole_sections |= sections
        else:
            excluded |= trace.head_sources[var]
    return len(excluded) + len(whole_sections) > before


def describe_plan(plan: ShardPlan) -> str:
    """'12 column- and 12 row-parallel projections' for a summary line.

    A fused projection whose every section stays whole is not counted: no rank holds less of it.
    """
    split = [i for i in plan.column if any(
        (plan.owner[plan.axes.find(var)] != ALL).any() for name, (_, var, _, sources) in plan.const_cuts.items()
        if i in sources)]
    return f"{len(split)} column- and {len(plan.row)} row-parallel projections"
