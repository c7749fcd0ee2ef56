"""Read only the consts a rank needs, and measure what the rank holds.

``mx.load`` of a safetensors file is lazy: it reads the header and returns arrays that
read their bytes when first evaluated. So a rank loads the file, keeps the names its
stages use, drops the rest unevaluated and evaluates what it kept: the other ranks'
weights are never read (resident memory grows by the kept bytes only; docs/distributed.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import mlx.core as mx

from interp.errors import WeightsError
from interp.program import Program
from interp.program import load_consts as program_consts


def load_consts(program: Program, names: Iterable[str],
                cut: Callable[[str, mx.array], mx.array] | None = None) -> dict[str, mx.array]:
    """The named consts of ``program``, evaluated; nothing else is read from disk.

    Only the consts files (one, or shards) that hold a wanted const are opened
    (``interp.program.load_consts``). ``cut(name, array)`` keeps a part of a const (tensor
    parallelism): each is then copied out and evaluated on its own, so one whole const at
    a time is in memory.
    """
    wanted = set(names)
    found = program_consts(program, wanted)
    missing = sorted(wanted - found.keys())
    if missing:
        raise WeightsError(f"{program.directory} lacks the const {missing[0]!r}")
    if cut is None:
        mx.eval(list(found.values()))
        return found
    for name in sorted(found):
        part = cut(name, found[name])
        if part is not found[name]:
            part = mx.contiguous(part)  # a copy: a view would keep the whole const alive
        mx.eval(part)
        found[name] = part
    return found


def held_bytes(arrays: Iterable) -> int:
    """Bytes of the arrays (and of arrays inside prepared weights such as ternary layouts)."""
    total = 0
    for value in arrays:
        if isinstance(value, mx.array):
            total += value.nbytes
        elif hasattr(value, "__dict__"):
            total += sum(v.nbytes for v in vars(value).values() if isinstance(v, mx.array))
    return total
