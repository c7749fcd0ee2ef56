"""Tensor-parallel placements: one pass over a program's nodes, an op rule each.

Every value gets a placement: whole on every rank (``None``), split along one axis
(``Split``), a partial sum (``Partial``) or a const seen through transposes (``Weight``,
an expert's weight on its way to a matmul). A projection whose input is whole becomes
column-parallel (unless excluded); one that reads a share of its contracted axis becomes
row-parallel and gives a partial sum; an op that needs a value whole gets an ``all_sum``
before it, or, for a share, a ``SplitConflict`` naming the projections behind the share
(``interp/distributed/sharding.py`` keeps those whole and runs the pass again).
Elementwise ops broadcast as numpy does, so shapes (from ``probe_shapes``) decide
whether a whole operand spans the split axis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from interp import schema
from interp.distributed.split_axes import SplitAxes, SplitConflict
from interp.program import Node, Program

_UNARY = {"neg", "abs", "exp", "log", "sqrt", "rsqrt", "reciprocal", "sin", "cos", "tanh", "sigmoid", "silu",
          "relu", "erf", "logical_not", "gelu", "clamp", "cast", "full_like"}
_BINARY = {"add", "sub", "mul", "div", "pow", "maximum", "minimum", "eq", "ne", "lt", "le", "gt", "ge",
           "logical_and", "logical_or", "where"}
#: ops through which a partial sum stays a partial sum (they are linear in it)
_LINEAR_IN_PARTIAL = {"neg", "cast", "reshape", "transpose", "permute", "squeeze", "unsqueeze", "expand", "flip",
                      "tile", "repeat_interleave", "slice", "select", "split", "sum", "mean"}
_PROJECTIONS = {"linear", "quantized_linear", "matmul", "expert_linear", "quantized_expert_linear"}
#: mixture-of-experts projections: weight [experts, out, in], the routing indices an input kept whole
_EXPERTS = {"expert_linear": 2, "quantized_expert_linear": 4}  # op -> position of the indices input
_QUANTIZED = {"quantized_linear", "quantized_expert_linear"}


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


class Trace:
    """One pass of placements over the nodes, collecting conflicts, const cuts, edits and sums."""

    def __init__(self, program: Program, shapes: dict, ranks: int, first_head: int, excluded: set,
                 whole_sections: set):
        self.program, self.shapes, self.ranks = program, shapes, ranks
        self.first_head, self.excluded, self.whole_sections = first_head, excluded, whole_sections
        self.consts = program.spec["consts"]
        self.axes = SplitAxes()
        self.place: dict[str, object] = {}
        self.conflicts: list[SplitConflict] = []
        self.const_cuts: dict = {}
        self.const_whole: set[str] = set()  # consts some node reads whole
        self.edits: dict = {}
        self.sums: dict[int, list[str]] = {}
        self.summed: set[str] = set()
        self.partial_reads: dict[int, set[str]] = {}
        self.column: set[int] = set()
        self.column_vars: dict[int, frozenset] = {}  # a projection's output axis -> the projection
        self.head_sources: dict[int, frozenset] = {}  # an attention's KV-head axis -> its projections
        #: an attention's KV-head axis -> the sections of fused projections its q, k and v are
        self.head_sections: dict[int, set] = {}
        self.row: set[int] = set()

    # ------------------------------------------------------------------ driver
    def run(self) -> None:
        for index, node in enumerate(self.program.nodes):
            self.index = index
            try:
                outs = self._node(node)
            except SplitConflict as conflict:
                self.conflicts.append(conflict)
                outs = [None] * len(node.outputs)
            for name, placement in zip(node.outputs, outs, strict=True):
                self.place[name] = placement
        end = len(self.program.nodes)
        for out in self.program.spec["outputs"]:
            placement = self.place.get(out["name"])
            if isinstance(placement, Partial):
                self._sum(out["name"], at=end)
            elif isinstance(placement, Split):
                self.conflicts.append(SplitConflict("a program output would stay split", placement.sources,
                                                    placement.section))
        for name in self.const_whole:
            if name in self.const_cuts:
                self.conflicts.append(SplitConflict(f"const {name!r} is read both split and whole",
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
            raise SplitConflict(f"node {self.index} ({self.program.nodes[self.index].op}) needs the whole of {name!r}",
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
            raise SplitConflict(f"node {self.index} ({op}) cannot run on a share of its input", split.sources,
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
        """linear / quantized_linear / matmul and the experts' projections: column-parallel on a
        whole input, row-parallel on a share (an expert's weight is cut in every expert alike)."""
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
        elif op in _EXPERTS:
            indices, bias = node.inputs[_EXPERTS[op]], node.inputs[-1]
            if w_name not in self.consts or (bias is not None and bias not in self.consts):
                for name in node.inputs:
                    if name is not None:
                        self._whole(name)
                return None
            self._whole(indices)
            const, out_axis_const, in_axis_const = w_name, 1, 2
        else:
            if w_name not in self.consts:
                for name in node.inputs:
                    if name is not None:
                        self._whole(name)
                return None
            const, out_axis_const, in_axis_const = w_name, 0, 1
            bias = node.inputs[-1] if op == "linear" else None
            if bias is not None and bias not in self.consts:  # a computed bias: keep the projection whole
                for name in node.inputs:
                    self._whole(name)
                return None
        consts_of_node = [v for v in node.inputs[1:] if isinstance(v, str) and v in self.consts]
        bias = node.inputs[-1] if op in ("linear", *_QUANTIZED, *_EXPERTS) else None
        if isinstance(x, Split):
            if x.axis != len(self._shape(x_name)) - 1:
                raise SplitConflict(f"node {index} ({op}) reads a share of an axis it does not contract", x.sources,
                                    x.section)
            self._cut_input_axis(node, x.var, const, in_axis_const, x.sources)
            self.row.add(index)
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
        if op in _QUANTIZED:
            for name in consts_of_node:  # weight, scales, biases (and bias): rows are output features
                self._cut(name, out_axis_const, split.var, 1, split.sources)
        else:
            self._cut(const, out_axis_const, split.var, 1, split.sources)
            if bias is not None:
                self._cut(bias, out_axis_const, split.var, 1, split.sources)
        self.column.add(index)
        self.column_vars[split.var] = split.sources
        return split

    def _cut_input_axis(self, node: Node, var: int, const: str, axis: int, sources: frozenset) -> None:
        if node.op in _QUANTIZED:
            bits, group = node.attrs["bits"], node.attrs["group_size"]
            if 32 % bits:
                raise SplitConflict(f"{bits}-bit weights cannot be split by input features", sources)
            self.axes.need_unit(var, group)
            weight, scales, biases = node.inputs[1:4]
            self._cut(weight, axis, var, 32 // bits, sources)
            self._cut(scales, axis, var, group, sources)
            self._cut(biases, axis, var, group, sources)
        else:
            self._cut(const, axis, var, 1, sources)

    def _cut(self, const: str, axis: int, var: int, per_index: int, sources: frozenset) -> None:
        old = self.const_cuts.get(const)
        if old is not None:
            if old[0] != axis or old[2] != per_index:
                raise SplitConflict(f"const {const!r} would be split two ways", sources | old[3])
            self.axes.same(old[1], var, sources | old[3])
            self.const_cuts[const] = (axis, old[1], per_index, sources | old[3])
            return
        self.const_cuts[const] = (axis, var, per_index, sources)

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
                    raise SplitConflict(f"node {self.index} ({node.op}) combines shares of different axes", sources)
                else:
                    self.axes.same(found.var, placement.var, sources)
                    section = found.section if found.section == placement.section else None
                    found = replace(found, section=section, sources=sources)
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
            raise SplitConflict(f"node {self.index} ({node.op}) mixes a share with the whole of {value!r}", sources,
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
            raise SplitConflict("squeezing a split axis", split.sources)
        return [self._moved(split, split.axis - sum(1 for d in dims if d < split.axis))]

    def _same_axis_unless(self, node: Node, dims: list[int], what: str) -> Split:
        split = self._get(node.inputs[0])
        rank = len(self._shape(node.inputs[0]))
        if split.axis in [d % rank for d in dims]:
            raise SplitConflict(
                f"node {self.index} ({node.op}) {what} across a split axis", split.sources, split.section)
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
            raise SplitConflict(f"node {self.index} ({node.op}) reduces across a split axis", split.sources,
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
            raise SplitConflict(f"node {self.index} (gather) indexes a split axis", split.sources, split.section)
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
            raise SplitConflict(f"node {self.index} (tile) repeats a split axis", split.sources, split.section)
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
            raise SplitConflict(f"node {self.index} (slice) slices a split axis with a step", split.sources,
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
            raise SplitConflict(
                f"node {self.index} (cat) joins shares with whole tensors", first.sources, first.section)
        sources = frozenset().union(*(p.sources for p in places))
        if any(p.axis != places[0].axis for p in places):
            raise SplitConflict(f"node {self.index} (cat) joins shares of different axes", sources)
        if dim != places[0].axis:
            for p in places[1:]:
                self.axes.same(places[0].var, p.var, sources)
            section = places[0].section if all(p.section == places[0].section for p in places) else None
            return [replace(places[0], sources=sources, section=section)]
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
            raise SplitConflict(f"node {self.index} (reshape) regroups a split axis", split.sources, split.section)
        entry = node.attrs["shape"][result.axis]
        if isinstance(entry, int) and entry != -1:
            self.edits.setdefault(self.index, []).append(("shape", "shape", result.axis, result.var))
        return [result]

    def _op_attention(self, node: Node) -> list:
        q, k, v = (self._get(name) for name in node.inputs[:3])
        if not all(isinstance(p, Split) and p.axis == 1 for p in (q, k, v)):
            split = next(p for p in (q, k, v) if isinstance(p, Split))
            raise SplitConflict(f"node {self.index} (attention) needs its queries, keys and values split by head",
                                split.sources, split.section)
        sources = q.sources | k.sources | v.sources
        if node.attrs.get("alibi_max_bias", 0):
            raise SplitConflict("ALiBi's slopes depend on each head's global index", sources)
        if len(node.inputs) > 3 and node.inputs[3] is not None:
            raise SplitConflict("attention sinks are one logit per global head", sources)
        self.axes.same(k.var, v.var, sources)
        heads, kv_heads = self._shape(node.inputs[0])[1], self._shape(node.inputs[1])[1]
        self.axes.expand.append((q.var, k.var, heads // kv_heads))
        self.axes.heads.add(k.var)
        self.head_sources[k.var] = sources
        self.head_sections[k.var] = {p.section for p in (q, k, v)} - {None}
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
