"""Fusion passes over the lowered node list: HF's multi-op patterns -> one fast op.

Each pass rewrites only exact matches of the pattern transformers' modules produce and
leaves everything else alone, so architectures with other shapes of norm or rotary
embedding export unchanged (just unfused). Intermediate values of a match must have
no other users; the nodes left without users afterwards are removed by the exporter's
dead-code pass.

- ``fuse_rms_norm``: pow(x, 2) -> mean(-1, keepdim) -> add(eps) -> rsqrt -> mul(x, .)
  [-> cast] -> mul(weight, .)  (optionally x = cast(h, float32))  =>  rms_norm(h, weight, eps)
- ``fuse_rope``: q * unsqueeze(cos, 1) + cat(-q[..., h:], q[..., :h]) * unsqueeze(sin, 1), with
  cos/sin = [cast](mul(cos|sin(cat(f, f)), s)) and f = position_ids * inv_freq  =>
  rope(q, position_ids, inv_freq, mscale=s)
- ``fuse_projections``: linear(x, W1[, b1]), linear(x, W2[, b2]), ... reading the same x
  (q/k/v; gate/up)  =>  split(linear(x, cat(W1, W2, ...)[, cat(b1, ...)]), sizes). One
  matmul instead of several: fewer dispatches per token and wider BLAS calls. Quantized
  projections (GGUF blocks kept as they are) merge the same way.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from exporter.lazy import lazy_cat
from exporter.lower import Lowering, value_names


class _Graph:
    """Producer and use-count indexes over a node list (value name -> node)."""

    def __init__(self, low: Lowering):
        self.low = low
        self.producer: dict[str, dict] = {}
        self.uses: Counter = Counter()
        for node in low.nodes:
            for out in node["outputs"]:
                self.producer[out] = node
            for value in node["inputs"]:
                for name in value_names(value):
                    self.uses[name] += 1
            for value in node["attrs"].values():
                for name in value_names(value):
                    self.uses[name] += 1

    def node(self, value: Any, op: str | tuple[str, ...]) -> dict | None:
        """The node producing ``value`` if it is of kind ``op``."""
        if not isinstance(value, str):
            return None
        node = self.producer.get(value)
        ops = (op,) if isinstance(op, str) else op
        return node if node is not None and node["op"] in ops else None

    def single_use(self, *values: str) -> bool:
        return all(self.uses[v] == 1 for v in values)


def _other(node: dict, value: Any) -> Any:
    """The input of a binary node that is not ``value`` (None if neither matches)."""
    a, b = node["inputs"]
    if a == value:
        return b
    if b == value:
        return a
    return None


def _replace(node: dict, op: str, inputs: list, attrs: dict) -> None:
    """Turn ``node`` into ``op`` in place, keeping its output name (later users see no change)."""
    node["op"], node["inputs"], node["attrs"] = op, inputs, attrs


def _last_dim(dims: Any) -> bool:
    return dims == [-1]


# ----------------------------------------------------------------------------- RMSNorm


def fuse_rms_norm(low: Lowering) -> int:
    """Rewrite HF RMSNorm patterns into ``rms_norm``; returns how many were fused."""
    return _rewrite_matches(low, _match_rms_norm)


def _rewrite_matches(low: Lowering, match: Callable[[_Graph, dict], tuple[str, list, dict] | None]) -> int:
    """Replace each node ``match`` recognises by the (op, inputs, attrs) it returns; returns how many."""
    g = _Graph(low)
    count = 0
    for node in low.nodes:
        found = match(g, node)
        if found is not None:
            _replace(node, *found)
            count += 1
    return count


def _match_rms_norm(g: _Graph, out: dict) -> tuple[str, list, dict] | None:
    if out["op"] != "mul":
        return None
    for weight in out["inputs"]:
        meta = g.low.consts.get(weight) if isinstance(weight, str) else None
        if meta is None or meta.dim() != 1 or meta.shape[0] < 2:
            continue
        normed = _other(out, weight)
        cast = g.node(normed, "cast")
        if cast is not None:
            if not g.single_use(normed):
                continue
            normed = cast["inputs"][0]
        scaled = g.node(normed, "mul")
        if scaled is None or not g.single_use(normed):
            continue
        for x in scaled["inputs"]:
            r = _other(scaled, x)
            rsqrt = g.node(r, "rsqrt")
            add = g.node(rsqrt["inputs"][0], "add") if rsqrt else None
            if add is None or not g.single_use(r, rsqrt["inputs"][0]):
                continue
            eps = next((v for v in add["inputs"] if isinstance(v, (int, float)) and not isinstance(v, bool)), None)
            mean = g.node(_other(add, eps), "mean") if eps is not None else None
            if mean is None or not _last_dim(mean["attrs"].get("dims")) or not mean["attrs"].get("keepdim"):
                continue
            square = g.node(mean["inputs"][0], "pow")
            if (square is None or square["inputs"] != [x, 2]
                    or not g.single_use(mean["outputs"][0], square["outputs"][0])):
                continue
            source = x
            upcast = g.node(x, "cast")
            if upcast is not None and upcast["attrs"].get("dtype") == "float32" and cast is not None:
                source = upcast["inputs"][0]  # rms_norm computes in float32 internally
            elif cast is not None:
                continue
            return "rms_norm", [source, weight], {"eps": float(eps)}
    return None


# ----------------------------------------------------------------------------- RoPE


def fuse_rope(low: Lowering) -> int:
    """Rewrite HF rotate-half RoPE applications into ``rope``; returns how many were fused."""
    return _rewrite_matches(low, _match_rope)


def _match_rope(g: _Graph, out: dict) -> tuple[str, list, dict] | None:
    if out["op"] != "add" or not all(isinstance(v, str) for v in out["inputs"]):
        return None
    for first, second in (out["inputs"], out["inputs"][::-1]):
        direct, rotated = g.node(first, "mul"), g.node(second, "mul")
        if direct is None or rotated is None or not g.single_use(first, second):
            continue
        for cat_value in rotated["inputs"]:
            cat = g.node(cat_value, "cat")
            if cat is None or cat["attrs"].get("dim") not in (-1, 3) or len(cat["inputs"][0]) != 2:
                continue
            neg = g.node(cat["inputs"][0][0], "neg")
            low_half = g.node(cat["inputs"][0][1], "slice")
            high_half = g.node(neg["inputs"][0], "slice") if neg else None
            if low_half is None or high_half is None:
                continue
            x = low_half["inputs"][0]
            half = low_half["attrs"].get("end")
            if (high_half["inputs"][0] != x or not isinstance(half, int)
                    or low_half["attrs"] != {"dim": low_half["attrs"]["dim"], "start": 0, "end": half, "step": 1}
                    or low_half["attrs"]["dim"] not in (-1, 3)
                    or high_half["attrs"] != {"dim": low_half["attrs"]["dim"], "start": half, "end": None, "step": 1}):
                continue
            cos_u = _other(direct, x)
            sin_u = _other(rotated, cat_value)
            cos_table = _table(g, cos_u, "cos")
            sin_table = _table(g, sin_u, "sin")
            if cos_table is None or sin_table is None or cos_table[0] != sin_table[0] or cos_table[1] != sin_table[1]:
                continue
            freqs = _frequencies(g, cos_table[0])
            if freqs is None or g.low.consts[freqs[1]].shape[0] != half:
                continue
            if not g.single_use(cat_value, *cat["inputs"][0], neg["inputs"][0]):
                continue
            return "rope", [x, freqs[0], freqs[1]], {"mscale": cos_table[1]}
    return None


def _table(g: _Graph, value: Any, fn: str):
    """unsqueeze(dim 1) of [cast](mul(fn(emb), s)) -> (emb, s)."""
    unsq = g.node(value, "unsqueeze")
    if unsq is None or unsq["attrs"].get("dim") != 1:
        return None
    table = unsq["inputs"][0]
    cast = g.node(table, "cast")
    if cast is not None:
        table = cast["inputs"][0]
    scale = 1.0
    scaled = g.node(table, "mul")
    if scaled is not None:
        number = next((v for v in scaled["inputs"] if isinstance(v, (int, float)) and not isinstance(v, bool)), None)
        if number is None:
            return None
        scale, table = float(number), _other(scaled, number)
    wave = g.node(table, fn)
    return (wave["inputs"][0], scale) if wave is not None else None


def _frequencies(g: _Graph, emb: Any):
    """cat([f, f], -1) with f = cast(unsqueeze(position_ids, 2), f32) * inv_freq -> (positions, inv_freq)."""
    cat = g.node(emb, "cat")
    if cat is None or cat["attrs"].get("dim") not in (-1, 2) or len(cat["inputs"][0]) != 2:
        return None
    f, f2 = cat["inputs"][0]
    mul = g.node(f, "mul")
    if f != f2 or mul is None:
        return None
    for factor in mul["inputs"]:
        inv = factor
        upcast = g.node(factor, "cast")  # a bf16/f16 model keeps inv_freq in its dtype and upcasts it
        if upcast is not None and upcast["attrs"].get("dtype") == "float32":
            inv = upcast["inputs"][0]
        const = g.low.consts.get(inv) if isinstance(inv, str) else None
        if const is None or const.dim() != 1:
            continue
        pos = _other(mul, factor)
        cast = g.node(pos, "cast")
        if cast is not None and cast["attrs"].get("dtype") == "float32":
            pos = cast["inputs"][0]
        unsq = g.node(pos, "unsqueeze")
        if unsq is None or unsq["attrs"].get("dim") not in (2, -1):
            continue
        positions = unsq["inputs"][0]
        if positions == "position_ids":
            return positions, inv
    return None


# ----------------------------------------------------------------------------- projections


def fuse_projections(low: Lowering) -> int:
    """Merge ``linear`` (float) or ``quantized_linear`` nodes that read the same input; returns merges made.

    Only constant weights of one dtype and input width merge (quantized ones with the same
    bits and group size: their codes, scales and biases are catenated row by row), with
    all biases present or all absent; the fused node takes the place of the group's first
    member, where its input already exists, and a ``split`` restores the members' output
    names.
    """
    groups: dict[str, list[dict]] = {}
    for node in low.nodes:
        if _projection(low, node):
            groups.setdefault(node["inputs"][0], []).append(node)
    merged = 0
    replaced: dict[int, list[dict]] = {}
    removed: set[int] = set()
    for members in groups.values():
        members = _compatible(low, members)
        if len(members) < 2:
            continue
        replaced[id(members[0])] = _merge(low, members)
        removed.update(id(m) for m in members[1:])
        merged += 1
    nodes = []
    for node in low.nodes:
        if id(node) in removed:
            continue
        nodes.extend(replaced.get(id(node), [node]))
    low.nodes = nodes
    return merged


#: projection ops -> the input slots of their weight consts (catenated row-wise when merged);
#: the bias follows the last of them
_WEIGHT_SLOTS = {"linear": (1,), "quantized_linear": (1, 2, 3)}


def _projection(low: Lowering, node: dict) -> bool:
    slots = _WEIGHT_SLOTS.get(node["op"])
    if slots is None or not isinstance(node["inputs"][0], str):
        return False
    weights = [low.consts.get(node["inputs"][i]) if isinstance(node["inputs"][i], str) else None for i in slots]
    if any(w is None or w.dim() != 2 for w in weights):
        return False
    if node["op"] == "linear" and not weights[0].dtype.is_floating_point:
        return False
    bias = node["inputs"][slots[-1] + 1]
    return bias is None or (isinstance(bias, str) and bias in low.consts)


def _signature(low: Lowering, node: dict) -> tuple:
    """What projections must share to become one matmul: op, attrs, each weight's dtype and width, a bias or not."""
    slots = _WEIGHT_SLOTS[node["op"]]
    weights = tuple((low.consts[node["inputs"][i]].dtype, low.consts[node["inputs"][i]].shape[1]) for i in slots)
    return node["op"], tuple(sorted(node["attrs"].items())), weights, node["inputs"][slots[-1] + 1] is not None


def _compatible(low: Lowering, members: list[dict]) -> list[dict]:
    """The members that can share one matmul with the first one."""
    first = _signature(low, members[0])
    return [m for m in members if _signature(low, m) == first]


def _merge(low: Lowering, members: list[dict]) -> list[dict]:
    op = members[0]["op"]
    slots = _WEIGHT_SLOTS[op]
    merged_inputs = []
    for slot in [*slots, slots[-1] + 1]:
        parts = [m["inputs"][slot] for m in members]
        if parts[0] is None:  # no biases
            merged_inputs.append(None)
            continue
        name = _joined_name(parts)
        while name in low.consts:
            name += "_"
        low.consts[name] = lazy_cat([low.consts[p] for p in parts], dim=0)
        merged_inputs.append(name)
    fused = low.fresh()
    sizes = [low.consts[m["inputs"][slots[0]]].shape[0] for m in members]
    return [
        {"op": op, "inputs": [members[0]["inputs"][0], *merged_inputs], "attrs": dict(members[0]["attrs"]),
         "outputs": [fused]},
        {"op": "split", "inputs": [fused], "attrs": {"sizes": sizes, "dim": -1},
         "outputs": [m["outputs"][0] for m in members]},
    ]


def _joined_name(names: list[str]) -> str:
    """``a.q_proj.weight``, ``a.k_proj.weight`` -> ``a.q_proj+k_proj.weight`` (readable in inspect)."""
    parts = [n.split(".") for n in names]
    head = 0
    while all(len(p) > head + 1 and p[head] == parts[0][head] for p in parts):
        head += 1
    tail = 0
    while all(len(p) > head + tail + 1 and p[-1 - tail] == parts[0][-1 - tail] for p in parts):
        tail += 1
    middles = [".".join(p[head:len(p) - tail]) for p in parts]
    return ".".join(parts[0][:head] + ["+".join(middles)] + (parts[0][len(parts[0]) - tail:] if tail else []))


PASSES = {"rms_norm": fuse_rms_norm, "rope": fuse_rope, "projections": fuse_projections}


def fuse(low: Lowering) -> dict[str, int]:
    """Run every fusion pass; returns the number of rewrites per pass."""
    return {name: run(low) for name, run in PASSES.items()}
