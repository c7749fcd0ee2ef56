"""The delta-rule state the interpreter owns beside the KV cache: a linear-attention layer's memory.

Gated DeltaNet layers (Qwen3.5, Qwen3-Next, OLMo Hybrid) replace attention's growing KV
cache with one matrix per head, [batch, heads, key size, value size] in float32 (as
transformers and FLA accumulate it), which ``gated_delta_rule`` (``interp/ops/delta_rule.py``)
decays, corrects and reads at every new position. The matrix summarises every position
before it: unlike a KV cache or a conv state it cannot go back, so ``trim`` forgets
nothing and returns 0, and a caller that must go back prefills again
(``paw_mlx/chat.py``). Its shape is the same from call to call, so the compiled decode
step carries it (``interp/compiled_step.py``).

A program's cache list holds its KV caches, then its conv states, then its delta states
(``make_state_cache`` in ``interp/state_cache.py``); each op's ``layer`` attribute indexes
that list.
"""

from __future__ import annotations

import mlx.core as mx


class DeltaState:
    """One gated-delta-rule layer's memory matrix, and how many positions it has seen."""

    def __init__(self) -> None:
        self.matrix: mx.array | None = None
        self.offset = 0

    def fetch(self, shape: tuple[int, int, int, int]) -> mx.array:
        """The memory [B, H, Dk, Dv] = ``shape`` in float32: zeros before the first position."""
        if self.matrix is None:
            return mx.zeros(shape, mx.float32)
        if tuple(self.matrix.shape) != tuple(shape):
            raise ValueError(f"the delta state holds {tuple(self.matrix.shape)}; these positions need {tuple(shape)}")
        return self.matrix

    def update(self, matrix: mx.array, length: int) -> None:
        """Hold ``matrix``, the memory after ``length`` more positions."""
        self.matrix = matrix
        self.offset += length

    @property
    def state(self) -> tuple[mx.array] | tuple[()]:
        return () if self.matrix is None else (self.matrix,)

    def trim(self, count: int) -> int:
        """Going back is impossible (each position is folded into the matrix): forgets nothing, returns 0."""
        return 0

    def copy(self) -> DeltaState:
        """An independent state holding the same matrix (arrays are immutable: shared)."""
        clone = DeltaState()
        clone.matrix, clone.offset = self.matrix, self.offset
        return clone

    @property
    def nbytes(self) -> int:
        return 0 if self.matrix is None else self.matrix.nbytes
