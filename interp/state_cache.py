"""A program's cache list: its KV caches, then the recurrent states of a hybrid model.

Attention layers keep a KV cache (``interp/cache.py``); a hybrid model's other layers keep
a fixed-size recurrent state: a short convolution its last inputs (``ConvState``), a gated
delta rule its memory matrix (``DeltaState``), a Mamba layer its SSM state (``SSMState``), an
RG-LRU layer its LRU state (``LRUState``).
One list holds them all, KV caches first, then each recurrent kind in the order of
``RECURRENT_STATES`` (``interp/program.py``), as mlx-lm's ``make_prompt_cache`` holds a
hybrid model's mixed cache kinds in one list; each op's ``layer`` attribute indexes it.
Every recurrent state has the same small interface (``state``, ``trim``, ``copy``,
``nbytes``), which is all the paths that carry one use (``paw_mlx/chat.py``, the server's
prefills, a program's prefix); the compiled step and the server's batch of rows reach the
one array inside through ``STATE_ARRAY``.
"""

from __future__ import annotations

import mlx.core as mx

from interp.cache import KVCache
from interp.conv_cache import ConvState
from interp.delta_state import DeltaState
from interp.lru_state import LRUState
from interp.program import RECURRENT_STATES
from interp.ssm_cache import SSMState

RecurrentState = ConvState | DeltaState | SSMState | LRUState

#: each recurrent state kind's runtime object
STATE_CLASSES: dict[str, type] = {"conv": ConvState, "delta": DeltaState, "ssm": SSMState,
                                   "lru": LRUState}
assert set(STATE_CLASSES) == {kind for kind, _ in RECURRENT_STATES}

#: each recurrent state class -> the attribute holding its one array (batch axis 0), which the
#: compiled step carries (``interp/compiled_step.py``) and a slot batch keeps a row of per slot
#: (``interp/slot_states.py``)
STATE_ARRAY: dict[type, str] = {ConvState: "rows", DeltaState: "array", SSMState: "array",
                               LRUState: "array"}


def compact_copy(state: RecurrentState) -> RecurrentState:
    """A copy of ``state`` whose array is a buffer of its own, not a view into a larger one (a conv
    state's rows are a slice of its last call's inputs), which a kept copy would hold on to."""
    clone = state.copy()
    name = STATE_ARRAY[type(state)]
    array = getattr(clone, name)
    if array is not None:
        setattr(clone, name, mx.array(array))
    return clone


def make_state_cache(kv_layers: int, recurrent: dict[str, int] | None = None) -> list[KVCache | RecurrentState]:
    """``kv_layers`` KV caches, then ``recurrent[kind]`` states of each kind, in ``RECURRENT_STATES``' order."""
    recurrent = recurrent or {}
    cache: list[KVCache | RecurrentState] = [KVCache() for _ in range(kv_layers)]
    for kind, _ in RECURRENT_STATES:
        cache += [STATE_CLASSES[kind]() for _ in range(recurrent.get(kind, 0))]
    return cache
