"""Consts known by shape and dtype, computed only when the writer asks for them.

The exporter's passes (projection fusion, quantization, ternary packing, GGUF blocks
kept as they are) describe each new const as a ``LazyTensor``: its shape and dtype, and
how to compute it from other consts, rather than transforming weights in place (which
would need every weight of the model in memory at once). The writer materializes
one const at a time, in file order, and drops it once written, so an export holds a
handful of tensors at a time whatever the model's size. A const can still be a plain
``torch.Tensor`` (a buffer, a lifted constant, a weight of a model already in memory):
every helper here takes either.

A derivation with several outputs (affine quantization gives codes, scales and biases)
computes them together; outputs not yet written are kept in a small cache bounded by
``CACHE_BYTES`` and recomputed if they were evicted.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from math import prod

import torch

from interp.errors import ExportError

#: Outputs of multi-output derivations kept until written (beyond it, they are recomputed).
CACHE_BYTES = 256 << 20


class LazyTensor:
    """A tensor's shape and dtype, and a function that computes its values."""

    __slots__ = ("shape", "dtype", "_make", "__weakref__")

    def __init__(self, shape: Sequence[int], dtype: torch.dtype, make: Callable[[], torch.Tensor]):
        self.shape = torch.Size(int(d) for d in shape)
        self.dtype = dtype
        self._make = make

    def dim(self) -> int:
        return len(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        return prod(self.shape)

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    @property
    def nbytes(self) -> int:
        return self.numel() * self.dtype.itemsize

    def materialize(self) -> torch.Tensor:
        """The values, checked against the promised shape and dtype."""
        tensor = self._make()
        if tensor.shape != self.shape or tensor.dtype != self.dtype:
            raise ExportError(f"internal: a const computed as {tensor.dtype}{list(tensor.shape)}, "
                              f"promised {self.dtype}{list(self.shape)}")
        return tensor

    def __repr__(self) -> str:
        return f"LazyTensor({self.dtype}, {list(self.shape)})"


def materialize(value: torch.Tensor | LazyTensor) -> torch.Tensor:
    """The values of a const, whichever kind it is."""
    return value.materialize() if isinstance(value, LazyTensor) else value


def nbytes(value: torch.Tensor | LazyTensor) -> int:
    return value.nbytes if isinstance(value, LazyTensor) else value.numel() * value.element_size()


def lazy_cat(parts: Sequence[torch.Tensor | LazyTensor], dim: int = 0) -> LazyTensor:
    """``torch.cat(parts, dim)``, computed when written."""
    shapes = [list(p.shape) for p in parts]
    shape = list(shapes[0])
    axis = dim % len(shape)
    shape[axis] = sum(s[axis] for s in shapes)
    parts = list(parts)
    return LazyTensor(shape, parts[0].dtype, lambda: torch.cat([materialize(p) for p in parts], dim=axis))


def derive(inputs: Sequence[torch.Tensor | LazyTensor], compute: Callable[..., Sequence[torch.Tensor]],
           outputs: Sequence[tuple[Sequence[int], torch.dtype]]) -> list[LazyTensor]:
    """Consts computed together by ``compute(*input_values)``, one per (shape, dtype) in ``outputs``."""
    derivation = _Derivation(list(inputs), compute, len(outputs))
    return [LazyTensor(shape, dtype, derivation.getter(index)) for index, (shape, dtype) in enumerate(outputs)]


class _Derivation:
    """Runs ``compute`` once for all its outputs; keeps the ones not yet asked for in the cache."""

    def __init__(self, inputs: list, compute: Callable, count: int):
        self.inputs = inputs
        self.compute = compute
        self.count = count

    def getter(self, index: int) -> Callable[[], torch.Tensor]:
        return lambda: self.value(index)

    def value(self, index: int) -> torch.Tensor:
        cached = _CACHE.pop((id(self), index), None)
        if cached is not None:
            return cached[1]
        results = list(self.compute(*[materialize(x) for x in self.inputs]))
        if len(results) != self.count:
            raise ExportError(f"internal: a derivation gave {len(results)} consts, promised {self.count}")
        for other, tensor in enumerate(results):
            if other != index:
                _CACHE.put((id(self), other), self, tensor)
        return results[index]


class _OutputCache:
    """Least-recently stored outputs go first once their bytes pass ``CACHE_BYTES``."""

    def __init__(self) -> None:
        self._items: OrderedDict[tuple[int, int], tuple[_Derivation, torch.Tensor]] = OrderedDict()
        self._bytes = 0

    def put(self, key: tuple[int, int], owner: _Derivation, tensor: torch.Tensor) -> None:
        # The owner rides along so its id cannot be reused by another derivation while cached.
        self.pop(key)
        self._items[key] = (owner, tensor)
        self._bytes += tensor.numel() * tensor.element_size()
        while self._bytes > CACHE_BYTES and self._items:
            self.pop(next(iter(self._items)))

    def pop(self, key: tuple[int, int], default=None):
        item = self._items.pop(key, None)
        if item is None:
            return default
        self._bytes -= item[1].numel() * item[1].element_size()
        return item

    def clear(self) -> None:
        self._items.clear()
        self._bytes = 0


_CACHE = _OutputCache()


def clear_cache() -> None:
    """Forget every cached output (the writer calls it when a program is written)."""
    _CACHE.clear()
