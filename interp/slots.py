"""A KV cache for a batch of independent rows: one slot per row, each at its own length.

A continuous batch has rows that start and finish at different times. Here every row
owns a slot of fixed-size buffers ``[slots, kv_heads, capacity, head_dim]`` per layer
and keeps its tokens at columns ``0 .. length-1`` of it. A decode step writes each
row's new keys and values at that row's own column (one scatter per layer) and masks
each row causally at its column (``RunContext.query_columns``), so rows never need
aligning: a row joins by copying its prefilled keys into a free slot, and leaves by
freeing it. Nothing else moves. (mlx-lm's ``BatchKVCache`` instead left-pads rows to a
common end, which re-lays the whole batch whenever a longer prompt joins.)

Slots are allocated in buckets (``slot_bucket``) and columns in steps of 128, so the
whole decode step compiles to few shapes (``interp/compiled_step.py``, ``run_rows``);
free slots compute a throwaway token. Buffers shrink when the batch empties or its
longest row drops far below the capacity. A hybrid program's recurrent states ride along,
one row per slot (``interp/slot_states.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx

from interp.slot_states import SlotStates

#: columns are allocated in multiples of this: attention reads every allocated column, so a
#: finer step wastes less (docs/serve.md), a coarser one compiles fewer shapes
COLUMN_STEP = 128
#: slot counts the buffers take (then multiples of the last): few shapes to compile
SLOT_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)


def slot_bucket(rows: int) -> int:
    """The number of slots allocated for ``rows`` rows."""
    for bucket in SLOT_BUCKETS:
        if rows <= bucket:
            return bucket
    last = SLOT_BUCKETS[-1]
    return -(-rows // last) * last


def column_bucket(length: int) -> int:
    return max(COLUMN_STEP, -(-length // COLUMN_STEP) * COLUMN_STEP)


class SlotLayer:
    """One attention layer's keys and values for every slot (the cache protocol attention calls)."""

    def __init__(self, keys: mx.array, values: mx.array, columns: mx.array | None = None):
        self.keys, self.values = keys, values
        self.columns = columns  # int32 [slots]: where each row's first new position goes (set per call)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Write each row's new positions from its column on; return the whole buffers."""
        columns = self.columns[:, None] + mx.arange(keys.shape[2], dtype=self.columns.dtype)  # [slots, new]
        index = mx.broadcast_to(columns[:, None, :, None], keys.shape)
        self.keys = mx.put_along_axis(self.keys, index, keys, axis=2)
        self.values = mx.put_along_axis(self.values, index, values, axis=2)
        return self.keys, self.values


class SlotBatch:
    """Every layer's slot buffers plus each slot's length; the engine's batch KV cache.

    ``state_kinds``: the classes of a hybrid program's recurrent states after its KV layers
    (``GraphModel.make_cache()[num_layers:]``), kept one row per slot beside the buffers.
    """

    def __init__(self, num_layers: int, state_kinds: Sequence[type] = ()):
        self.num_layers = num_layers
        self.layers: list[SlotLayer] = []
        self.states = SlotStates(state_kinds)
        self.lengths: list[int] = []  # tokens held per slot (0 for a free slot)
        self.capacity = 0

    @property
    def slots(self) -> int:
        return len(self.lengths)

    @property
    def nbytes(self) -> int:
        return sum(layer.keys.nbytes + layer.values.nbytes for layer in self.layers) + self.states.nbytes

    def reserve(self, slots: int, length: int, like: Sequence[tuple[mx.array, mx.array]]) -> None:
        """Make room for ``slots`` slots of ``length`` columns (buffers grow, nothing moves).

        ``like`` gives the per-layer shapes and dtypes (keys, values of any one row).
        """
        slots = slot_bucket(max(slots, self.slots))
        capacity = max(self.capacity, column_bucket(length))
        if slots == self.slots and capacity == self.capacity:
            return
        self._reshape(slots, capacity, like)

    def fit(self, rows_in_use: int, like: Sequence[tuple[mx.array, mx.array]] | None = None) -> bool:
        """Shrink to the smallest buckets that hold the slots in use; returns whether it did.

        Rows must sit in the slots below ``slot_bucket(rows_in_use)`` (the caller packs them low).
        """
        if not self.lengths:
            return False
        if rows_in_use == 0:
            self.layers, self.lengths, self.capacity = [], [], 0
            self.states.resize(0)
            return True
        slots = slot_bucket(rows_in_use)
        capacity = column_bucket(max(self.lengths) + 1)
        if slots >= self.slots and capacity >= self.capacity:
            return False
        self._reshape(min(slots, self.slots), min(capacity, self.capacity), like)
        return True

    def _reshape(self, slots: int, capacity: int, like) -> None:
        keep_slots, keep_columns = min(slots, self.slots), min(capacity, self.capacity)
        layers = []
        for i in range(self.num_layers):
            if self.layers:
                old_k, old_v = self.layers[i].keys, self.layers[i].values
            else:
                old_k, old_v = like[i]
            k = mx.zeros((slots, old_k.shape[1], capacity, old_k.shape[3]), old_k.dtype)
            v = mx.zeros((slots, old_v.shape[1], capacity, old_v.shape[3]), old_v.dtype)
            if self.layers and keep_slots and keep_columns:
                k[:keep_slots, :, :keep_columns] = old_k[:keep_slots, :, :keep_columns]
                v[:keep_slots, :, :keep_columns] = old_v[:keep_slots, :, :keep_columns]
            layers.append(SlotLayer(k, v))
        self.layers = layers
        self.lengths = (self.lengths + [0] * slots)[:slots]
        self.capacity = capacity
        self.states.resize(slots)
        mx.eval(self.arrays())

    def arrays(self) -> list[mx.array]:
        return [a for layer in self.layers for a in (layer.keys, layer.values)] + self.states.arrays()

    @property
    def caches(self) -> list:
        """The cache list a step runs on: the KV layers, then the recurrent states."""
        return self.layers + self.states.states

    def insert(self, slot: int, kv: Sequence[tuple[mx.array, mx.array]], states: Sequence = (),
               length: int | None = None) -> None:
        """Copy one row's keys and values (per layer, each [1, kv_heads, length, dim]) into ``slot``,
        and its recurrent states (a hybrid program's, each of batch one) into the slot's row of them.

        ``length``: the row's tokens, needed only when there are no KV layers to tell (Mamba2).
        """
        length = kv[0][0].shape[2] if kv else length
        self.reserve(slot + 1, length + 1, kv)
        for layer, (k, v) in zip(self.layers, kv, strict=True):
            layer.keys[slot : slot + 1, :, :length] = k
            layer.values[slot : slot + 1, :, :length] = v
        if states:
            self.states.insert(slot, self.slots, states)
        self.lengths[slot] = length

    def extract(self, slot: int, length: int | None = None) -> list[tuple[mx.array, mx.array]]:
        """Copies of a slot's first ``length`` columns, made now.

        Not views: the buffers keep changing in place. And evaluated here: an unevaluated
        copy holds on to the whole buffer it will read, and a prompt-cache entry can wait
        long before anything evaluates it.
        """
        length = self.lengths[slot] if length is None else length
        copies = [(mx.array(layer.keys[slot : slot + 1, :, :length]),
                   mx.array(layer.values[slot : slot + 1, :, :length]))
                  for layer in self.layers]
        mx.eval(copies)
        return copies

    def move(self, source: int, target: int) -> None:
        """Move the row in ``source`` into the free slot ``target`` (to pack rows low)."""
        length = self.lengths[source]
        for layer in self.layers:
            layer.keys[target : target + 1, :, :length] = layer.keys[source : source + 1, :, :length]
            layer.values[target : target + 1, :, :length] = layer.values[source : source + 1, :, :length]
        self.states.move(source, target)
        self.lengths[target], self.lengths[source] = length, 0

    def release(self, slot: int) -> None:
        self.lengths[slot] = 0

    def step(self, model, tokens: mx.array, active: Sequence[bool], extra_inputs: dict | None = None) -> mx.array:
        """Logits [slots, vocab] of one new token per slot, appended at each row's length.

        ``tokens`` is int [slots]; rows not ``active`` (free slots) compute a throwaway
        token at column 0 and keep length 0. ``extra_inputs``: per-slot graph inputs
        (``GraphModel.step_rows``).
        """
        need = max((n for n, on in zip(self.lengths, active, strict=True) if on), default=0) + 1
        if need > self.capacity:
            self.reserve(self.slots, need, None)
        columns = mx.array([n if on else 0 for n, on in zip(self.lengths, active, strict=True)], dtype=mx.int32)
        logits = model.step_rows(tokens.reshape(-1, 1).astype(mx.int32), self.caches, columns, extra_inputs)
        for i, on in enumerate(active):
            if on:
                self.lengths[i] += 1
        return logits[:, -1, :]
