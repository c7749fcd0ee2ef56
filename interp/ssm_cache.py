"""The SSM state the interpreter owns beside the KV cache: a Mamba2 layer's recurrent state.

A Mamba2 layer (Mamba2, Nemotron-H, Granite 4, Bamba, Zamba2, Falcon-H1) folds every
position it has seen into one float32 array per sequence, [batch, heads, head_dim,
state_size], as transformers keeps it (``ssm_scan`` in ``interp/ops/ssm.py`` reads and
replaces it). Unlike the KV cache and the conv state (``interp/conv_cache.py``), it keeps
nothing per position, so it cannot go back: ``trim`` forgets nothing and returns 0, and the caller prefills again
(``paw_mlx/chat.py``). It keeps one shape from call to call, so the compiled decode step
carries it (``interp/compiled_step.py``).

A program's cache list holds its KV caches, then its conv states, then its SSM states
(``make_state_cache`` in ``interp/state_cache.py``); each op's ``layer`` indexes that list.
"""

from __future__ import annotations

import mlx.core as mx


class SSMState:
    """One state-space layer's recurrent state, and how many positions it has folded in."""

    def __init__(self) -> None:
        #: [B, H, P, N] float32, or None before the first position
        self.ssm: mx.array | None = None
        self.offset = 0

    def fetch(self, shape: tuple[int, ...]) -> mx.array:
        """The state before the new positions: zeros at the start of a sequence, else the kept one
        (which must have ``shape``)."""
        if self.ssm is None:
            return mx.zeros(shape, mx.float32)
        if tuple(self.ssm.shape) != tuple(shape):
            raise ValueError(f"the SSM state holds {tuple(self.ssm.shape)}; the new positions need {tuple(shape)}")
        return self.ssm

    def update(self, ssm: mx.array, count: int) -> None:
        """Keep ``ssm``, the state after ``count`` more positions."""
        self.ssm = ssm
        self.offset += count

    @property
    def state(self) -> tuple[mx.array] | tuple[()]:
        return () if self.ssm is None else (self.ssm,)

    def trim(self, count: int) -> int:
        """Going back is impossible (the state keeps no positions): forgets nothing, returns 0."""
        return 0

    def copy(self) -> SSMState:
        """An independent state holding the same array (arrays are immutable: shared)."""
        clone = SSMState()
        clone.ssm, clone.offset = self.ssm, self.offset
        return clone

    @property
    def nbytes(self) -> int:
        return 0 if self.ssm is None else self.ssm.nbytes
