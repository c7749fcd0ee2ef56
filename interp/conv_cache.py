"""The conv state the interpreter owns beside the KV cache: a short convolution's last inputs.

Hybrid recurrent models (LFM2) mix attention layers with depthwise causal convolutions
over the sequence. A convolution of kernel K needs the K - 1 inputs before each new
position (``causal_conv1d`` in ``interp/ops/conv.py``); the state keeps those and ``depth``
more, [batch, K - 1 + depth, channels], oldest first, zeros standing for the positions
before the sequence. The extra rows are what lets ``trim`` go back up to ``depth``
positions exactly, as a chat turn that drops the reply's last token needs; a longer trim
forgets nothing and the caller prefills again (``paw_mlx/chat.py``). The buffer keeps one
shape from call to call, so the compiled decode step carries it (``interp/compiled_step.py``).

A program's cache list holds its KV caches, then its conv states, then its other recurrent
states (``interp/state_cache.py``); each op's ``layer`` attribute indexes that list.
"""

from __future__ import annotations

import mlx.core as mx


class ConvState:
    """One convolution layer's last inputs, and how many positions it has seen."""

    #: positions ``trim`` can take back (inputs kept beyond the K - 1 the convolution reads)
    depth = 32

    def __init__(self) -> None:
        self.rows: mx.array | None = None
        self.offset = 0
        #: rows of positions below this were zero-filled by a trim and are no longer the inputs
        self.lost = 0

    def update_and_fetch(self, x: mx.array, width: int) -> mx.array:
        """``x`` [B, L, C] preceded by the ``width`` inputs before it; keeps the last inputs as the state."""
        keep = width + self.depth
        before = self.rows if self.rows is not None else mx.zeros((x.shape[0], keep, x.shape[2]), x.dtype)
        if tuple(before.shape) != (x.shape[0], keep, x.shape[2]):
            raise ValueError(f"the conv state holds {tuple(before.shape)}; new inputs {tuple(x.shape)} need "
                             f"({x.shape[0]}, {keep}, {x.shape[2]})")
        rows = mx.concatenate([before, x.astype(before.dtype)], axis=1)
        self.rows = rows[:, rows.shape[1] - keep :]
        self.offset += x.shape[1]
        return rows[:, keep - width :]

    @property
    def state(self) -> tuple[mx.array] | tuple[()]:
        return () if self.rows is None else (self.rows,)

    def trim(self, count: int) -> int:
        """Go back ``count`` positions; returns how many were forgotten: ``count`` (at most the
        offset), or 0 when the rows the convolution would read there are no longer kept."""
        count = min(self.offset, count)
        if count == 0 or self.rows is None:
            return 0
        keep = self.rows.shape[1]
        width = keep - self.depth
        lost = max(self.lost, self.offset - keep)  # the rows shifted in below are zeros, right only before 0
        if max(self.offset - count - width, 0) < lost:  # it would read a zero-filled row
            return 0
        B, _, C = self.rows.shape
        self.rows = mx.concatenate([mx.zeros((B, min(count, keep), C), self.rows.dtype),
                                    self.rows[:, : keep - min(count, keep)]], axis=1)
        self.lost, self.offset = lost, self.offset - count
        return count

    def copy(self) -> ConvState:
        """An independent state holding the same rows (arrays are immutable: shared)."""
        clone = ConvState()
        clone.rows, clone.offset, clone.lost = self.rows, self.offset, self.lost
        return clone

    @property
    def nbytes(self) -> int:
        return 0 if self.rows is None else self.rows.nbytes
