"""Split axes as variables: the relations tensor-parallel ops put between them, solved into owning ranks.

A split axis (the output features of a column-parallel projection, the heads of a
reshape, a section of a fused projection) is a variable with a size. Ops relate them: a
*view* (``part`` is coordinates ``start..`` of ``whole``: a section, a slice, a piece of a
concatenation) or an *expansion* (``fine[i]`` belongs with ``coarse[i // factor]``: a head's
coordinates, a KV head's query heads); an elementwise op between two shares makes their
axes one (union-find). ``SplitAxes.solve`` gives every coordinate an owning rank: each
attention's KV heads are dealt out first, contiguously, everything tied to them follows,
and the remaining axes split evenly in whole units (quantization groups).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

ALL = -1  #: owner of a coordinate every rank holds (a section of a fused projection kept whole)
UNKNOWN = -2  #: not decided yet (inside ``solve``)


class SplitConflict(Exception):
    """Ops disagree about a split; ``sources`` are the column-parallel projections behind it."""

    def __init__(self, reason: str, sources: frozenset = frozenset(), section: tuple | None = None):
        super().__init__(reason)
        self.sources, self.section = sources, section


@dataclass
class SplitAxes:
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
            raise SplitConflict(f"split axes of {self.size[a]} and {self.size[b]} meet", sources)
        self.parent[b] = a
        self.unit[a] = math.lcm(self.unit.get(a, 1), self.unit.pop(b, 1))

    def need_unit(self, var: int, unit: int) -> None:
        root = self.find(var)
        self.unit[root] = math.lcm(self.unit.get(root, 1), unit)

    def solve(self, ranks: int) -> dict[int, np.ndarray]:
        """An owner per coordinate of every axis variable (raises SplitConflict when impossible)."""
        roots = sorted({self.find(v) for v in range(len(self.size))})
        owner = {root: np.full(self.size[root], UNKNOWN, dtype=np.int64) for root in roots}
        views = [(self.find(w), self.find(p), start) for w, p, start in self.views]
        expands = [(self.find(f), self.find(c), k) for f, c, k in self.expand]

        def fill(target: np.ndarray, values: np.ndarray) -> bool:
            known = values != UNKNOWN
            clash = known & (target != UNKNOWN) & (target != values)
            if clash.any():
                raise SplitConflict("the ops split one axis two ways")
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
                        raise SplitConflict("a split would cut through an attention head")
                    changed |= fill(owner[coarse], firsts)

        for root in sorted({self.find(v) for v in self.whole}):
            owner[root][:] = ALL
        propagate()
        for root in sorted({self.find(v) for v in self.heads}):
            fill(owner[root], deal(self.size[root], ranks, 1))
            propagate()
        derived = {w for w, _, _ in views} | {f for f, _, _ in expands}
        while True:
            open_ = [r for r in roots if (owner[r] == UNKNOWN).any()]
            if not open_:
                break
            atoms = [r for r in open_ if r not in derived] or open_
            fill(owner[atoms[0]], deal(self.size[atoms[0]], ranks, self.unit.get(atoms[0], 1)))
            propagate()
        for root, values in owner.items():
            unit = self.unit.get(root, 1)
            blocks = values.reshape(-1, unit) if values.size % unit == 0 else None
            if blocks is None or not (blocks == blocks[:, :1]).all():
                raise SplitConflict(f"a split would cut through groups of {unit} (quantization groups)")
        return owner


def deal(size: int, ranks: int, unit: int) -> np.ndarray:
    """Contiguous, as even as possible, in whole units: the owner of each of ``size`` coordinates."""
    if size % unit:
        raise SplitConflict(f"an axis of {size} does not divide into groups of {unit}")
    blocks = size // unit
    return np.repeat(np.arange(blocks) * ranks // blocks, unit).astype(np.int64)
