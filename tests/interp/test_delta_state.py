"""The delta state beside the KV cache (interp/delta_state.py): the gated delta rule run piece by piece
through it equals the whole sequence and a float64 reference, and it never goes back."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from interp.delta_state import DeltaState
from interp.errors import ProgramError
from interp.graph import RunContext
from interp.ops import REGISTRY
from tests.interp.test_delta_chunks import DK, DV, HEADS, SCALE, B, delta_inputs, delta_reference

# No test here reaches a device predicate (interp/device.py), checked by instrumenting them
# (docs/devices.md): the fake-Mac pass would run the same branches again, so it leaves them out.
pytestmark = pytest.mark.not_fake_mac_pass

L = 12  # positions; the shapes are test_delta_chunks' (2 rows, 2 key heads, 4 value heads, 8 x 6)


def _rule(inputs: dict, cache: list | None, start: int = 0, stop: int = L) -> mx.array:
    ctx = RunContext(cache=cache)
    q, k, v, g, beta = (mx.array(inputs[name][:, start:stop]) for name in ("q", "k", "v", "g", "beta"))
    return REGISTRY["gated_delta_rule"].fn(ctx, q, k, v, g, beta, layer=0, scale=SCALE)


def _inputs(per_channel: bool) -> dict:
    return delta_inputs(L, per_channel)


def _reference(inputs: dict) -> np.ndarray:
    """The rule in float64, head by head and position by position, as written in the schema, from zeros."""
    return delta_reference(inputs, np.zeros((B, HEADS, DK, DV), np.float32))[0]


@pytest.mark.parametrize("per_channel", [False, True], ids=["decay per head", "decay per key channel"])
def test_the_rule_matches_a_float64_reference(per_channel):
    inputs = _inputs(per_channel)
    np.testing.assert_allclose(np.array(_rule(inputs, None)), _reference(inputs), atol=1e-5)


def test_pieces_through_the_state_equal_the_whole_sequence():
    """Prefill 5, then 3, then one position at a time, as a chat turn and decoding feed it."""
    inputs = _inputs(False)
    whole = np.array(_rule(inputs, None))
    state = DeltaState()
    bounds = [(0, 5), (5, 8)] + [(t, t + 1) for t in range(8, L)]
    pieces = [np.array(_rule(inputs, [state], a, b)) for a, b in bounds]
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), whole, atol=1e-6)
    assert state.offset == L
    assert state.array.shape == (B, HEADS, DK, DV) and state.array.dtype == mx.float32
    assert state.nbytes == B * HEADS * DK * DV * 4


def test_trim_forgets_nothing_and_a_copy_is_independent():
    inputs = _inputs(False)
    state = DeltaState()
    _rule(inputs, [state], 0, 5)
    matrix = np.array(state.array)
    assert state.trim(1) == 0 and state.offset == 5
    np.testing.assert_array_equal(np.array(state.array), matrix)
    clone = state.copy()
    _rule(inputs, [clone], 5, 6)
    assert (clone.offset, state.offset) == (6, 5)
    np.testing.assert_array_equal(np.array(state.array), matrix)


def test_a_state_of_another_batch_is_refused():
    inputs = _inputs(False)
    state = DeltaState()
    _rule(inputs, [state], 0, 5)
    one_row = {name: value[:1] for name, value in inputs.items()}
    with pytest.raises(ValueError, match="the delta state holds"):
        _rule(one_row, [state], 5, 6)


def test_padded_and_slot_batches_and_other_cache_entries_are_refused():
    """Padding (a key mask) or rows at their own columns would enter every later row's state."""
    inputs = _inputs(False)
    args = [mx.array(inputs[name]) for name in ("q", "k", "v", "g", "beta")]
    for ctx in (RunContext(cache=None, key_mask=mx.ones((B, L), dtype=mx.bool_)),
                RunContext(cache=None, query_columns=mx.zeros((B, 1), dtype=mx.int32))):
        with pytest.raises(ProgramError, match="gated_delta_rule runs on whole, unpadded rows"):
            REGISTRY["gated_delta_rule"].fn(ctx, *args, layer=0, scale=SCALE)
    from interp.cache import KVCache

    with pytest.raises(ProgramError, match="cache entry 0 is a KVCache, not a delta state"):
        REGISTRY["gated_delta_rule"].fn(RunContext(cache=[KVCache()]), *args, layer=0, scale=SCALE)
