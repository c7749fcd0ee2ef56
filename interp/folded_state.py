"""A recurrent state that folds every position it has seen into one array: it cannot go back.

A Gated DeltaNet layer's memory matrix (``DeltaState``, [B, H, Dk, Dv]) and a Mamba layer's
SSM state (``SSMState``, [B, H, P, N]) are such states: one float32 array per layer and
sequence, read and replaced by their op at every call, the same shape from call to call (so
the compiled decode step carries it, ``interp/compiled_step.py``). Unlike a KV cache or a conv
state they keep nothing per position, so ``trim`` forgets nothing and returns 0, and a
caller that must go back restores a ``copy()`` it kept or prefills again (``paw_mlx/chat.py``).
"""

from __future__ import annotations

from typing import Self

import mlx.core as mx


class FoldedState:
    """One layer's folded state, and how many positions it has folded in."""

    #: what the state is, for errors ("the delta state holds ...")
    what = "state"

    def __init__(self) -> None:
        #: float32, or None before the first position
        self.array: mx.array | None = None
        self.offset = 0

    def fetch(self, shape: tuple[int, ...]) -> mx.array:
        """The state before the new positions: zeros at the start of a sequence, else the kept one
        (which must have ``shape``)."""
        if self.array is None:
            return mx.zeros(shape, mx.float32)
        if tuple(self.array.shape) != tuple(shape):
            raise ValueError(f"the {self.what} holds {tuple(self.array.shape)}; the new positions need {tuple(shape)}")
        return self.array

    def update(self, array: mx.array, count: int) -> None:
        """Keep ``array``, the state after ``count`` more positions."""
        self.array = array
        self.offset += count

    @property
    def state(self) -> tuple[mx.array] | tuple[()]:
        return () if self.array is None else (self.array,)

    def trim(self, count: int) -> int:
        """Going back is impossible (the state keeps no positions): forgets nothing, returns 0."""
        return 0

    def copy(self) -> Self:
        """An independent state holding the same array (arrays are immutable: shared)."""
        clone = type(self)()
        clone.array, clone.offset = self.array, self.offset
        return clone

    @property
    def nbytes(self) -> int:
        return 0 if self.array is None else self.array.nbytes
