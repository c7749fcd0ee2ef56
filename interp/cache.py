"""The KV cache the interpreter owns.

Same protocol as mlx-lm's cache classes (``update_and_fetch``, ``offset``, ``state``),
so an mlx-lm cache can be passed in instead. Written here rather than imported because
importing anything from mlx_lm imports transformers and, through it, torch: ``paw run``
must start without either.
"""

from __future__ import annotations

import mlx.core as mx


class KVCache:
    """Keys and values of one attention layer, grown in steps of ``step`` positions.

    Growing in steps keeps decoding from reallocating every token; writes go into the
    preallocated buffer with slice assignment.
    """

    step = 256

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def reserve(self, new: int, like: tuple[mx.array, mx.array] | None = None) -> None:
        """Make room for ``new`` more positions after ``offset``: the capacity grows to the
        next whole number of steps, so caches of different lengths (a program prefix set
        as ``state``) meet at the same capacities, which compiled steps trace once for.

        ``like`` (keys, values of the new positions) gives the shapes and dtype when
        nothing is allocated yet.
        """
        start = self.offset
        if self.keys is not None and start + new <= self.keys.shape[2]:
            return
        keys, values = (self.keys, self.values) if like is None else like
        batch, heads, _, k_dim = keys.shape
        v_dim = values.shape[3]
        grow = -(-(start + new) // self.step) * self.step - start
        k_more = mx.zeros((batch, heads, grow, k_dim), keys.dtype)
        v_more = mx.zeros((batch, heads, grow, v_dim), values.dtype)
        if self.keys is None:
            self.keys, self.values = k_more, v_more
        else:
            self.keys = mx.concatenate([self.keys[..., :start, :], k_more], axis=2)
            self.values = mx.concatenate([self.values[..., :start, :], v_more], axis=2)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        start = self.offset
        self.reserve(keys.shape[2], like=(keys, values))
        self.offset = start + keys.shape[2]
        self.keys[..., start : self.offset, :] = keys
        self.values[..., start : self.offset, :] = values
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    @property
    def state(self) -> tuple[mx.array, mx.array] | tuple[()]:
        if self.keys is None:
            return ()
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    @state.setter
    def state(self, value: tuple[mx.array, mx.array]) -> None:
        self.keys, self.values = value
        self.offset = self.keys.shape[2]

    def trim(self, count: int) -> int:
        """Forget the last ``count`` positions; returns how many were forgotten."""
        count = min(self.offset, count)
        self.offset -= count
        return count

    def copy(self) -> KVCache:
        """An independent cache holding the same positions (the buffers are shared lazily)."""
        clone = KVCache()
        if self.keys is not None:
            clone.keys, clone.values = self.state
            clone.offset = self.offset
        return clone

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


def make_cache(num_layers: int) -> list[KVCache]:
    return [KVCache() for _ in range(num_layers)]
