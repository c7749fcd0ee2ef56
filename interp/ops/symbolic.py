"""Ops on symbolic ints: plain Python arithmetic, evaluated while the graph is built."""

from __future__ import annotations

from interp.ops.registry import implementation


@implementation("sym_size")
def sym_size(x, *, dim):
    return x.shape[dim]


implementation("sym_add")(lambda a, b: a + b)
implementation("sym_sub")(lambda a, b: a - b)
implementation("sym_mul")(lambda a, b: a * b)
implementation("sym_floordiv")(lambda a, b: a // b)
