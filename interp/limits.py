"""The memory a program run may ask for, checked before MLX allocates it.

MLX does not survive an allocation it cannot make: a buffer larger than the memory the
process may map ends in a segfault, and a shape whose element count overflows aborts.
So every size a program asks for is checked here first, in bytes, against one budget:
the physical memory of the machine, or less when the process runs under an address-space
limit (``ulimit -v``) or a container's memory limit (cgroups), or ``PAW_MEMORY_LIMIT``
(bytes, or with a K/M/G/T suffix).

The interpreter calls ``check_shape`` before an op allocates from its attributes
(``full``, ``arange``, ``expand``, ...) and ``RunBudget.spend`` for every node's outputs,
so a run whose tensors together outgrow the budget stops with a ``ProgramError`` naming
the node, before MLX sees it.
"""

from __future__ import annotations

import math
import os
import resource
from collections.abc import Sequence

from interp.errors import PawError, ProgramError
from interp.schema import INT32_MAX

_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2, "int8": 1,
          "uint32": 4, "uint16": 2, "uint8": 1, "bool": 1}
_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_budget: int | None = None


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a schema dtype name."""
    return _BYTES[dtype]


def _parse_size(given: str) -> int:
    text = given.strip().upper().removesuffix("B")
    unit = text[-1:] if text[-1:] in _SUFFIXES else ""
    try:
        value = float(text[: len(text) - len(unit)])
    except ValueError:
        raise PawError(f"PAW_MEMORY_LIMIT={given!r} is not a size (bytes, or a number with K, M, G or T)") from None
    size = value * _SUFFIXES[unit]
    if not 0 < size < 2**63:  # inf ("inf", "1e999") and nan are floats too
        raise PawError(f"PAW_MEMORY_LIMIT must be a positive number of bytes below 2**63, not {given!r:.40}")
    return int(size)


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _mapped_bytes() -> int:
    """Address space this process maps already (Linux; 0 where unknown)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


#: cgroup memory limits (v2, then v1) and the usage they count, for processes in containers
_CGROUP_FILES = (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                 ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"))


def _cgroup_room() -> int | None:
    """Bytes the container's memory limit leaves (Linux cgroups; None without a limit)."""
    for limit_path, usage_path in _CGROUP_FILES:
        try:
            with open(limit_path, encoding="ascii") as fh:
                limit = fh.read().strip()
            with open(usage_path, encoding="ascii") as fh:
                usage = int(fh.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:
            return max(int(limit) - usage, 0)
    return None


def memory_budget() -> int:
    """Bytes one run's tensors may take in this process (worked out once)."""
    global _budget
    if _budget is None:
        limits = [_physical_memory(), _cgroup_room()]
        given = os.environ.get("PAW_MEMORY_LIMIT")
        if given:
            limits.append(_parse_size(given))
        for kind in (resource.RLIMIT_AS, resource.RLIMIT_DATA):
            soft, _ = resource.getrlimit(kind)
            if soft != resource.RLIM_INFINITY:
                # what is mapped already (libraries, weights, thread stacks) is not available
                limits.append(max(soft - _mapped_bytes(), 0) * 3 // 4)
        known = [limit for limit in limits if limit]
        _budget = min(known) if known else 1 << 62
    return _budget


def reset_budget() -> None:
    """Forget the budget so the next call works it out again (tests change the limits)."""
    global _budget
    _budget = None


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def check_shape(shape: Sequence, itemsize: int, what: str) -> int:
    """The bytes of a tensor of ``shape``; ProgramError naming ``what`` ("node 3 (full): its output")
    if it cannot be made.

    Each entry must be an integer in [0, 2**31) (MLX's shapes are 32-bit) and the whole
    must fit the memory budget.
    """
    for size in shape:
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= INT32_MAX:
            raise ProgramError(f"{what} would have shape {list(shape)}, with an entry outside [0, 2**31)")
    nbytes = math.prod(shape) * itemsize
    if nbytes > memory_budget():
        raise ProgramError(f"{what} of shape {list(shape)} needs {human_bytes(nbytes)}, "
                           f"more than the {human_bytes(memory_budget())} this process may use")
    return nbytes


def arange_length(start: int, end: int, step: int) -> int:
    """Elements of arange(start, end, step) (0 when empty); step must not be 0."""
    if step == 0:
        raise ProgramError("arange's step must not be 0")
    return max(0, -((start - end) // step))


class RunBudget:
    """Bytes spent by the outputs of one run's nodes, against ``memory_budget()``."""

    __slots__ = ("spent", "limit")

    def __init__(self) -> None:
        self.spent = 0
        self.limit = memory_budget()

    def spend(self, shape: Sequence[int], itemsize: int, where: str) -> None:
        self.spent += math.prod(shape) * itemsize
        if self.spent > self.limit:
            raise ProgramError(f"{where}: the run's tensors would need {human_bytes(self.spent)} by this node "
                               f"(its output has shape {list(shape)}), more than the {human_bytes(self.limit)} "
                               "this process may use")
