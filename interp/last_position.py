"""Logits for the last position only: where to cut a program's graph so the LM head runs once.

A prompt's prefill needs the next-token logits of its last position alone, yet a graph
computes the LM head (hidden size x vocabulary per token: a fifth of SmolLM2-135M's
work) at every position, and MLX does not push a slice of the result back through the
matrix product. The head and what precedes it back to the last residual sum act on each
position alone (the final norm, the head, a logit soft-cap or scale), so slicing the
residual sum to its last position before them gives the same last-position logits.

``last_position_cut`` finds that point by walking back from the ``logits`` output through
a chain of such nodes, each with one computed input and otherwise constants (weights,
scalars). Anything else (a fused LoRA's sum, a vocabulary split across ranks) ends the
walk; without a head in the chain there is no cut, and the caller slices the full logits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from interp.program import names_in

#: ops that act on each position alone, given one computed input (index 0) and constants
_LINEAR = frozenset({"linear", "quantized_linear", "ternary_linear", "matmul"})
_PER_POSITION = _LINEAR | frozenset({"rms_norm", "layer_norm", "cast", "mul", "div", "add", "sub", "tanh",
                                     "clamp", "neg"})
#: elementwise ops whose computed input may be either operand (a constant on the other side)
_COMMUTING = frozenset({"mul", "add"})


@dataclass(frozen=True)
class Cut:
    """Slice ``value`` to its last position before node ``node`` (its only reader) runs."""

    node: int
    value: str


def last_position_cut(nodes: Sequence, consts: Mapping[str, object], outputs: Sequence[str],
                      output: str = "logits") -> Cut | None:
    """The cut for ``output``'s last position, or None where the graph gives none (see the module)."""
    producer = {name: i for i, node in enumerate(nodes) for name in node.outputs}
    readers: dict[str, int] = {}
    for node in nodes:
        for name in names_in(node.inputs):
            readers[name] = readers.get(name, 0) + 1
    value, cut, linear_seen = output, None, False
    while value in producer:
        index = producer[value]
        node = nodes[index]
        data = _computed_input(node, consts)
        if data is None or len(node.outputs) != 1:
            break
        if readers.get(data, 0) != 1 or data in outputs:
            break  # another node reads this value in full: slicing it would change what it sees
        cut, linear_seen = Cut(index, data), linear_seen or node.op in _LINEAR
        value = data
    return cut if linear_seen else None


def _computed_input(node, consts: Mapping[str, object]) -> str | None:
    """The one input of ``node`` that is computed (not a constant), if the node acts on each
    position alone; None otherwise."""
    if node.op not in _PER_POSITION:
        return None
    computed = [(i, name) for i, name in enumerate(node.inputs)
                if isinstance(name, str) and name not in consts]
    if len(computed) != 1 or any(isinstance(v, list | tuple) for v in node.inputs):
        return None
    position, name = computed[0]
    if position != 0 and not (node.op in _COMMUTING and position == 1):
        return None
    if node.op not in _LINEAR and node.op not in ("rms_norm", "layer_norm"):
        # an elementwise constant must not carry a position axis: scalars and vectors only
        if any(_rank(consts.get(v)) > 1 for v in node.inputs if isinstance(v, str) and v != name):
            return None
    return name


def _rank(value) -> int:
    return len(getattr(value, "shape", ()))

