"""The recurrent states of a slot batch: one row of each recurrent layer's state per slot.

A hybrid program's conv, delta, SSM and LRU states (``interp/state_cache.py``) are one array
per layer with the batch on axis 0, so a slot batch (``interp/slots.py``) keeps them as
it keeps keys and values: one array of ``[slots, ...]`` per layer, row ``s`` belonging to
the request in slot ``s``. A request is prefilled alone on its own states (a padded
prefill would feed the padding into them), then its states are copied into a free row;
a decode step advances every row by one real token, so no row needs padding there. A
free row computes a throwaway token and is overwritten whole when a request joins it.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx

from interp.state_cache import STATE_ARRAY, RecurrentState


class SlotStates:
    """Every recurrent layer's state with one row per slot, in the program's cache-list order."""

    def __init__(self, kinds: Sequence[type]):
        #: one state object per recurrent layer; its array is None until a row joins
        self.states: list[RecurrentState] = [kind() for kind in kinds]

    def _array(self, state: RecurrentState) -> mx.array | None:
        return getattr(state, STATE_ARRAY[type(state)])

    def _set(self, state: RecurrentState, array: mx.array | None) -> None:
        setattr(state, STATE_ARRAY[type(state)], array)

    @property
    def nbytes(self) -> int:
        return sum(state.nbytes for state in self.states)

    def arrays(self) -> list[mx.array]:
        return [a for a in (self._array(s) for s in self.states) if a is not None]

    def resize(self, slots: int) -> None:
        """Keep the first ``slots`` rows, adding zero rows or dropping the last ones (0: drop all)."""
        for state in self.states:
            old = self._array(state)
            if old is None or old.shape[0] == slots:
                continue
            if slots == 0:
                self._set(state, None)
                continue
            new = mx.zeros((slots, *old.shape[1:]), old.dtype)
            keep = min(slots, old.shape[0])
            new[:keep] = old[:keep]
            self._set(state, new)

    def insert(self, slot: int, slots: int, row: Sequence[RecurrentState]) -> None:
        """Copy one request's states (each a batch of one, after its prefill) into row ``slot`` of ``slots``."""
        if len(row) != len(self.states):
            raise ValueError(f"a row has {len(row)} recurrent states; the batch keeps {len(self.states)}")
        for state, own in zip(self.states, row, strict=True):
            if type(own) is not type(state):
                raise ValueError(f"a row's {type(own).__name__} cannot go where the batch keeps a "
                                 f"{type(state).__name__}")
            value = self._array(own)
            if value is None or value.shape[0] != 1:
                raise ValueError(f"a row's {type(own).__name__} must hold one prefilled sequence")
            array = self._array(state)
            if array is None:
                array = mx.zeros((slots, *value.shape[1:]), value.dtype)
            array[slot : slot + 1] = value
            self._set(state, array)

    def extract(self, slot: int, length: int) -> list[RecurrentState]:
        """Copies of row ``slot``'s states, each a batch of one that has seen ``length`` positions.

        Made and evaluated now, as ``SlotBatch.extract`` makes its keys: the batch's arrays keep
        changing in place (a prompt-cache snapshot keeps these, ``paw_mlx/engine/prompt_cache.py``).
        """
        row = []
        for state in self.states:
            own = type(state)()
            array = self._array(state)
            if array is not None:
                self._set(own, mx.array(array[slot : slot + 1]))
            own.offset = length
            row.append(own)
        mx.eval([a for a in (self._array(s) for s in row) if a is not None])
        return row

    def move(self, source: int, target: int) -> None:
        """Copy row ``source`` into row ``target`` (to pack rows low)."""
        for state in self.states:
            array = self._array(state)
            if array is not None:
                array[target : target + 1] = array[source : source + 1]
