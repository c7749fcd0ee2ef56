"""The conv state the interpreter owns beside the KV cache: a short convolution's last inputs.

Hybrid recurrent models (LFM2) mix attention layers with depthwise causal convolutions
over the sequence. A convolution of kernel K needs the K - 1 inputs before each new
position, so a layer's state is those rows, [batch, K - 1, channels], replaced by every
call (``causal_conv1d`` in ``interp/ops/conv.py``). Unlike keys and values, a state is
not one entry per position: it cannot be cut back to an earlier position, so ``trim``
forgets nothing and a caller that needs a shorter prefix prefills again
(``paw_mlx/chat.py``).

A program's cache list holds its KV caches first, then its conv states
(``make_state_cache``), as mlx-lm's ``make_prompt_cache`` holds a hybrid model's mixed
cache kinds in one list; each op's ``layer`` attribute indexes that list.
"""

from __future__ import annotations

import mlx.core as mx

from interp.cache import KVCache


class ConvState:
    """One convolution layer's last K - 1 inputs, and how many positions it has seen."""

    def __init__(self) -> None:
        self.rows: mx.array | None = None
        self.offset = 0

    def update_and_fetch(self, x: mx.array, width: int) -> mx.array:
        """``x`` [B, L, C] preceded by the ``width`` rows before it; keeps the last ``width`` as the state."""
        before = self.rows if self.rows is not None else mx.zeros((x.shape[0], width, x.shape[2]), x.dtype)
        if before.shape[0] != x.shape[0] or before.shape[1:] != (width, x.shape[2]):
            raise ValueError(f"the conv state holds {before.shape}; new rows {x.shape} need [{x.shape[0]}, "
                             f"{width}, {x.shape[2]}]")
        rows = mx.concatenate([before, x.astype(before.dtype)], axis=1)
        self.rows = rows[:, rows.shape[1] - width :]
        self.offset += x.shape[1]
        return rows

    @property
    def state(self) -> tuple[mx.array] | tuple[()]:
        return () if self.rows is None else (self.rows,)

    def trim(self, count: int) -> int:
        """Forget nothing: a conv state cannot go back (returns 0 forgotten)."""
        return 0

    def copy(self) -> ConvState:
        """An independent state holding the same rows (arrays are immutable: shared)."""
        clone = ConvState()
        clone.rows, clone.offset = self.rows, self.offset
        return clone

    @property
    def nbytes(self) -> int:
        return 0 if self.rows is None else self.rows.nbytes


def make_state_cache(kv_layers: int, conv_layers: int) -> list[KVCache | ConvState]:
    """A program's cache list: ``kv_layers`` KV caches, then ``conv_layers`` conv states."""
    return [KVCache() for _ in range(kv_layers)] + [ConvState() for _ in range(conv_layers)]


def can_trim(cache: list) -> bool:
    """Whether every entry of ``cache`` can be cut back to an earlier position (no conv state)."""
    return not any(isinstance(entry, ConvState) for entry in cache)
