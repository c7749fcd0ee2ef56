"""How much memory a program needs to run: its weights plus the KV cache at a context length.

The weights are the consts' bytes, read from the safetensors headers. The cache's shape
is not written in prog.json (a program's layers may differ: grouped-query heads, sliding
windows, a head size of their own), so it is measured: the graph is built for one token
on lazily loaded consts, with a stand-in cache that records the keys and values each
attention layer would store, and nothing is evaluated (only a ternary program's packed
weights are read, by the layout the loader prepares for them). The interpreter's cache keeps
every position and grows in steps of ``KVCache.step``, so the estimate rounds the
context up to a whole step. A hybrid program's recurrent states (conv, delta, SSM and LRU states,
``interp/state_cache.py``) are recorded the same way; their size does not grow with the context.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import mlx.core as mx

from interp.cache import KVCache
from interp.program import ST_DTYPES, Program, load_consts
from interp.state_cache import make_state_cache


@dataclass(frozen=True)
class LayerCache:
    """What one attention layer stores per position: bytes of keys plus values, for one sequence."""

    bytes_per_position: int
    dtype: str


@dataclass(frozen=True)
class MemoryEstimate:
    weights_by_dtype: dict[str, int]
    cache_by_dtype: dict[str, int]
    context: int  # positions the cache holds (a whole number of cache steps)
    batch: int
    #: the recurrent states (conv, delta, SSM, LRU) of a hybrid program (whatever the context)
    recurrent_by_dtype: dict[str, int] = field(default_factory=dict)

    @property
    def weights(self) -> int:
        return sum(self.weights_by_dtype.values())

    @property
    def cache(self) -> int:
        return sum(self.cache_by_dtype.values()) + sum(self.recurrent_by_dtype.values())

    @property
    def total(self) -> int:
        return self.weights + self.cache


class _RecordingCache:
    """Stands in for a layer's KVCache: notes what would be stored and stores nothing."""

    offset = 0

    def __init__(self) -> None:
        self.seen: LayerCache | None = None

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        per_position = (keys.nbytes // keys.shape[2]) + (values.nbytes // values.shape[2])
        self.seen = LayerCache(per_position, str(keys.dtype).removeprefix("mlx.core."))
        return keys, values


def layer_caches(program: Program) -> tuple[list[LayerCache], Counter]:
    """Per attention layer, the KV bytes one position of one sequence takes; and the bytes of the
    recurrent states of one sequence, by dtype (builds a lazy graph, evaluates nothing)."""
    from interp.graph import GraphModel

    model = GraphModel(program, load_consts(program), compile_decode=False)
    caches = [_RecordingCache() for _ in range(program.num_layers)]
    states = make_state_cache(0, program.recurrent_states)
    token = mx.zeros((1, 1), dtype=mx.int32)
    inputs = {name: token for name in model.input_names}
    model.run(inputs, cache=caches + states, offset=0)
    recurrent: Counter = Counter()
    for state in states:
        for array in state.state:
            recurrent[str(array.dtype).removeprefix("mlx.core.")] += array.nbytes
    return [c.seen for c in caches if c.seen is not None], recurrent


def estimate_memory(program: Program, context: int, batch: int = 1) -> MemoryEstimate:
    """Weights plus a KV cache of ``context`` positions for ``batch`` sequences, in bytes by dtype."""
    weights: Counter = Counter()
    for consts_file in program.consts_files:
        for meta in consts_file.header.values():
            start, end = meta["data_offsets"]
            weights[ST_DTYPES.get(meta["dtype"], meta["dtype"])] += end - start
    positions = -(-max(context, 1) // KVCache.step) * KVCache.step
    cache: Counter = Counter()
    layers, recurrent = layer_caches(program)
    for layer in layers:
        cache[layer.dtype] += layer.bytes_per_position * positions * batch
    recurrent = {dtype: nbytes * batch for dtype, nbytes in recurrent.items()}
    return MemoryEstimate(dict(weights), dict(cache), positions, batch, recurrent)
