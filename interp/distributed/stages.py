"""Cut a program into pipeline stages at layer boundaries, computed from the graph alone.

Each attention node anchors a layer (its ``layer`` attribute numbers the KV cache slot).
Between two consecutive attention nodes the node list is cut where the fewest computed
tensors are alive, the latest such point: in a transformer that is the residual stream
after the layer's last add, so a layer's MLP stays with its attention. The *tail* (the
output projection and what follows it) is cut off the last layer the same way, at the
latest such point up to the last node that reads a weight matrix. Nodes that depend
only on the program's inputs and small consts (symbolic sizes, RoPE tables, masks) are
never cut: every stage that needs them recomputes them rather than receiving them.

Stages go to ranks in order: rank 0 holds the first layers *and* the tail, ranks
1..n-1 the rest, and the split balances the weight bytes each rank holds. The tail sits
on rank 0 because that is where the sampler runs: the last rank sends back the hidden
state (``hidden`` floats a row) instead of the logits (``vocab`` floats a row, 85x more
for SmolLM2), and a tied embedding is loaded once. Nothing here branches on the
model's family.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from interp import schema
from interp.errors import DistributedError
from interp.program import Node, Program
from interp.recurrent import refuse_recurrent
from interp.schema import references

#: Bytes per element of each program dtype.
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2, "int8": 1,
               "uint32": 4, "uint16": 2, "uint8": 1, "bool": 1}


@dataclass(frozen=True)
class Stage:
    """One contiguous piece of the program and the rank that runs it."""

    rank: int
    #: indices into ``program.nodes``, in order (recomputed input-only nodes included)
    nodes: tuple[int, ...]
    #: the KV cache slots of its attention nodes, in order (local slot i is ``layers[i]``)
    layers: tuple[int, ...]
    #: tensors that arrive from the previous stage, in message order
    receives: tuple[str, ...]
    #: tensors an earlier stage on the same rank kept for it (rank 0's tail reads them)
    local: tuple[str, ...]
    #: tensors it passes to the next stage, in message order
    sends: tuple[str, ...]
    #: tensors a later stage on the same rank reads (rank 0's first stage keeps them for the tail)
    keeps: tuple[str, ...]
    consts: tuple[str, ...]
    weight_bytes: int


@dataclass(frozen=True)
class PipelinePlan:
    """Stages in execution order: rank 0's layers, ranks 1..n-1, then rank 0's tail."""

    stages: tuple[Stage, ...]
    ranks: int
    #: bytes of the consts each rank loads (a const two of its stages share counts once)
    weight_bytes: tuple[int, ...]

    def for_rank(self, rank: int) -> list[Stage]:
        return [s for s in self.stages if s.rank == rank]

    def describe(self, rank: int) -> str:
        """'layers 0-14 + output head' for ``rank``."""
        stages = self.for_rank(rank)
        layers = [layer for stage in stages for layer in stage.layers]
        text = _ranges(layers)
        if rank == 0 and len(stages) > 1 and stages[-1].consts:
            text += " + output head"
        return text


def const_bytes(meta: dict) -> int:
    """Bytes of a const from its prog.json entry (dtype and shape)."""
    return DTYPE_BYTES[meta["dtype"]] * math.prod(meta["shape"])


class _Facts:
    """What the cut needs to know about each value and node of a program."""

    def __init__(self, program: Program):
        self.program = program
        self.nodes = program.nodes
        self.inputs = {i["name"] for i in program.spec["inputs"]}
        self.consts = program.spec["consts"]
        self.refs = [references(node) for node in self.nodes]
        self.defined_at: dict[str, int] = {}
        for index, node in enumerate(self.nodes):
            for out in node.outputs:
                self.defined_at[out] = index
        end = len(self.nodes)
        self.last_use: dict[str, int] = {}
        for index, refs in enumerate(self.refs):
            for name in refs:
                self.last_use[name] = index
        for out in program.spec["outputs"]:
            self.last_use[out["name"]] = end
        #: layer anchors: the nodes that own a KV cache slot (ops with a ``layer`` attribute)
        self.attention = [i for i, node in enumerate(self.nodes) if "layer" in schema.OPS[node.op].attr_by_name]
        self.recomputed = self._recomputable()

    def _small_const(self, name: str) -> bool:
        return name in self.consts and len(self.consts[name]["shape"]) < 2

    def _recomputable(self) -> set[int]:
        """Nodes every stage can recompute: symbolic sizes, and anything but a cache op computed
        only from the inputs and small consts (vectors, scalars)."""
        found: set[int] = set()
        cheap: set[str] = set(self.inputs)
        anchors = set(self.attention)
        for index, node in enumerate(self.nodes):
            spec = schema.OPS[node.op]
            if index in anchors:
                continue
            if spec.symbolic or all(name in cheap or self._small_const(name) for name in self.refs[index]):
                found.add(index)
                cheap.update(node.outputs)
        return found

    def sendable(self, name: str) -> bool:
        """A tensor computed by a node that is not recomputed everywhere (so it may cross a cut)."""
        index = self.defined_at.get(name)
        return index is not None and index not in self.recomputed

    def live_counts(self) -> list[int]:
        """counts[p]: sendable tensors alive across a cut just before node p (p = 0..len(nodes))."""
        end = len(self.nodes)
        delta = [0] * (end + 2)
        for name, index in self.defined_at.items():
            last = self.last_use.get(name, -1)
            if last > index and self.sendable(name):
                delta[index + 1] += 1
                delta[last + 1] -= 1
        counts, running = [], 0
        for p in range(end + 1):
            running += delta[p]
            counts.append(running)
        return counts

    def reads_matrix(self, index: int) -> bool:
        return any(name in self.consts and len(self.consts[name]["shape"]) >= 2 for name in self.refs[index])


def layer_cuts(program: Program) -> tuple[list[int], int]:
    """(cuts, tail): cuts[i] is the node index where layer i + 1 begins; tail where the output head begins.

    Layer 0 begins at node 0 (it takes the embedding with it); the tail runs to the end.
    """
    facts = _Facts(program)
    return _layer_cuts(facts)


def _layer_cuts(facts: _Facts) -> tuple[list[int], int]:
    attention = facts.attention
    _check_layers(facts)
    counts = facts.live_counts()

    def best(lo: int, hi: int) -> int:
        """The latest p in [lo, hi] with the fewest live tensors."""
        return min(range(lo, hi + 1), key=lambda p: (counts[p], -p))

    cuts = [best(a + 1, b) for a, b in zip(attention, attention[1:], strict=False)]
    head = max((i for i in range(len(facts.nodes)) if facts.reads_matrix(i)), default=-1)
    last = attention[-1]
    tail = best(last + 1, head) if head > last else len(facts.nodes)
    return cuts, tail


def _check_layers(facts: _Facts) -> None:
    layers = [facts.nodes[i].attrs["layer"] for i in facts.attention]
    if not layers:
        raise DistributedError("the program has no attention layers to split between ranks")
    if len(set(layers)) != len(layers):
        raise DistributedError("the program's attention nodes share KV cache slots; it cannot be split into stages")


def plan_pipeline(program: Program, ranks: int, shares: list[float] | None = None) -> PipelinePlan:
    """Stages of ``program`` for ``ranks`` processes, balancing the weight bytes each rank holds.

    ``shares``: how much each rank should hold relative to the others (``[3, 1]`` for a Mac with
    three times the other's memory); equal by default.
    """
    refuse_recurrent(program, "distributed (pipeline) execution", DistributedError)
    shares = list(shares) if shares else [1.0] * ranks
    if len(shares) != ranks or not all(share > 0 for share in shares):
        raise DistributedError(f"pipeline shares must be {ranks} positive numbers, one per rank; got "
                               f"{', '.join(f'{share:g}' for share in shares)}")
    facts = _Facts(program)
    cuts, tail = _layer_cuts(facts)
    layer_count = len(facts.attention)
    if ranks < 2:
        raise DistributedError("a pipeline needs at least 2 ranks")
    if ranks > layer_count:
        raise DistributedError(f"the program has {layer_count} layers, too few for {ranks} pipeline ranks")
    bounds = [0, *cuts, tail]
    blocks = [_owned_consts(facts, range(bounds[i], bounds[i + 1])) for i in range(layer_count)]
    tail_consts = _owned_consts(facts, range(tail, len(facts.nodes)))
    starts = _balance(facts, blocks, tail_consts, shares)
    ranges = [range(bounds[starts[r]], bounds[starts[r + 1]] if r + 1 < ranks else tail) for r in range(ranks)]
    ranges.append(range(tail, len(facts.nodes)))
    return _link(facts, ranges, ranks)


def _owned_consts(facts: _Facts, nodes: range) -> set[str]:
    return {name for i in nodes if i not in facts.recomputed for name in facts.refs[i] if name in facts.consts}


def _balance(facts: _Facts, blocks: list[set[str]], tail: set[str], shares: list[float]) -> list[int]:
    """First block of each rank: contiguous, at least one each, minimising the largest rank's bytes
    per share.

    Rank 0 also holds the tail. Exact over unions (a const two blocks share counts once per rank).
    """
    count, ranks = len(blocks), len(shares)
    size = {name: const_bytes(meta) for name, meta in facts.consts.items()}
    costs: dict[tuple[int, int], int] = {}  # (first, stop) -> bytes of blocks first..stop-1 (rank 0: + tail)
    for first in range(count):
        names = set(tail) if first == 0 else set()
        total = sum(size[name] for name in names)
        for stop in range(first + 1, count + 1):
            new = blocks[stop - 1] - names
            names |= new
            total += sum(size[name] for name in new)
            costs[first, stop] = total

    inf = float("inf")
    # best[r][j]: the smallest possible largest load when ranks 0..r-1 hold blocks 0..j-1
    best = [[inf] * (count + 1) for _ in range(ranks + 1)]
    choice = [[0] * (count + 1) for _ in range(ranks + 1)]
    best[0][0] = 0
    for r in range(1, ranks + 1):
        for j in range(r, count - (ranks - r) + 1):
            for i in range(r - 1, j):
                if best[r - 1][i] == inf:
                    continue
                load = max(best[r - 1][i], costs[i, j] / shares[r - 1])
                if load < best[r][j]:
                    best[r][j], choice[r][j] = load, i
    starts, j = [], count
    for r in range(ranks, 0, -1):
        j = choice[r][j]
        starts.append(j)
    return starts[::-1]


def _link(facts: _Facts, ranges: list[range], ranks: int) -> PipelinePlan:
    """Stages from node ranges: pull in recomputed nodes, route every tensor a stage lacks."""
    order = [*range(ranks), 0]  # the rank of each stage
    stage_of = {i: s for s, nodes in enumerate(ranges) for i in nodes}
    members: list[list[int]] = []
    needs: list[set[str]] = []
    for s, nodes in enumerate(ranges):
        chosen = set(nodes)
        wanted: set[str] = set()
        if s == len(ranges) - 1:  # the last stage returns the program's outputs
            wanted |= {out["name"] for out in facts.program.spec["outputs"]} - {
                name for i in nodes for name in facts.nodes[i].outputs}
        frontier = list(nodes)
        while frontier:
            i = frontier.pop()
            for name in facts.refs[i]:
                if name in facts.inputs or name in facts.consts:
                    continue
                j = facts.defined_at[name]
                if j in chosen:
                    continue
                if j in facts.recomputed or schema.OPS[facts.nodes[j].op].symbolic:
                    chosen.add(j)  # recomputed here, never sent (symbolic sizes cannot be)
                    frontier.append(j)
                else:
                    wanted.add(name)
        members.append(sorted(chosen))
        needs.append(wanted)
    count = len(ranges)
    sends: list[list[str]] = [[] for _ in range(count)]
    receives: list[list[str]] = [[] for _ in range(count)]
    keeps: list[list[str]] = [[] for _ in range(count)]
    local: list[list[str]] = [[] for _ in range(count)]
    for name in sorted({n for wanted in needs for n in wanted}, key=lambda n: facts.defined_at[n]):
        source = stage_of[facts.defined_at[name]]
        users = [t for t, wanted in enumerate(needs) if name in wanted]
        for t in users:
            if order[t] == order[source]:
                keeps[source].append(name)
                local[t].append(name)
        remote = [t for t in users if order[t] != order[source]]
        for hop in range(source, max(remote, default=source)):
            sends[hop].append(name)
            receives[hop + 1].append(name)
    size = {name: const_bytes(meta) for name, meta in facts.consts.items()}
    stages = []
    for s, nodes in enumerate(members):
        consts = sorted({name for i in nodes for name in facts.refs[i] if name in facts.consts})
        layers = tuple(facts.nodes[i].attrs["layer"] for i in nodes if i in facts.attention)
        stages.append(Stage(rank=order[s], nodes=tuple(nodes), layers=layers, receives=tuple(receives[s]),
                            local=tuple(dict.fromkeys(local[s])), sends=tuple(sends[s]),
                            keeps=tuple(dict.fromkeys(keeps[s])), consts=tuple(consts),
                            weight_bytes=sum(size[c] for c in consts)))
    held = [sum(size[c] for c in {c for st in stages if st.rank == r for c in st.consts}) for r in range(ranks)]
    return PipelinePlan(tuple(stages), ranks, tuple(held))


def stage_program(program: Program, stage: Stage, final: bool) -> Program:
    """The program a stage runs: its nodes (cache slots renumbered from 0), inputs and outputs.

    ``final``: the last stage, which gives the program's outputs.
    """
    local = {layer: i for i, layer in enumerate(stage.layers)}
    nodes = []
    for i in stage.nodes:
        node = program.nodes[i]
        if "layer" in schema.OPS[node.op].attr_by_name:
            node = Node(node.op, node.inputs, dict(node.attrs, layer=local[node.attrs["layer"]]), node.outputs)
        nodes.append(node)
    outputs = program.spec["outputs"] if final else [{"name": n} for n in (*stage.sends, *stage.keeps)]
    spec = dict(program.spec)
    spec["inputs"] = list(program.spec["inputs"]) + [{"name": n} for n in (*stage.receives, *stage.local)]
    spec["outputs"] = list(outputs)
    spec["consts"] = {name: program.spec["consts"][name] for name in stage.consts}
    spec["state"] = {"kv_cache": {"layers": len(stage.layers)}}
    return replace(program, spec=spec, nodes=nodes)


def _ranges(layers: list[int]) -> str:
    if not layers:
        return "no layers"
    runs, start = [], layers[0]
    for prev, cur in zip(layers, layers[1:], strict=False):
        if cur != prev + 1:
            runs.append((start, prev))
            start = cur
    runs.append((start, layers[-1]))
    text = ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in runs)
    return ("layers " if len(layers) > 1 else "layer ") + text
