"""The LRU state beside the KV cache (interp/lru_state.py): the lru_scan op against a float64
recurrence, run piece by piece through the state equal to one shot, a state that cannot go back,
and the compiled decode step carrying it (the tiny RecurrentGemma of tests/archs.py)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from interp.errors import ProgramError
from interp.graph import RunContext
from interp.lru_state import LRUState
from interp.ops import REGISTRY
from tests.interp.test_ssm_state import check_compiled_step_carries

# No test here reaches a device predicate (interp/device.py): the fake-Mac pass leaves them out.
pytestmark = pytest.mark.not_fake_mac_pass

BATCH, LENGTH, WIDTH = 2, 14, 6


def _scan(inputs: list[mx.array], cache: list | None) -> np.ndarray:
    return np.array(REGISTRY["lru_scan"].fn(RunContext(cache=cache), *inputs, layer=0))


@pytest.fixture
def data() -> list[mx.array]:
    """Decays in (0, 1) close to 1 (slow: early positions reach the last ones), as RG-LRU's are; inputs."""
    rng = np.random.default_rng(0)
    a = np.exp(-0.2 * rng.random((BATCH, LENGTH, WIDTH)))
    x = rng.standard_normal((BATCH, LENGTH, WIDTH))
    return [mx.array(v.astype(np.float32)) for v in (a, x)]


def _positions(data: list[mx.array], start: int, end: int) -> list[mx.array]:
    return [v[:, start:end] for v in data]


def _reference(a, x) -> np.ndarray:
    """h = a * h + x in float64, position by position, from a zero state."""
    a, x = np.asarray(a, np.float64), np.asarray(x, np.float64)
    out, state = np.zeros(x.shape), np.zeros((x.shape[0], x.shape[2]))
    for t in range(x.shape[1]):
        state = a[:, t] * state + x[:, t]
        out[:, t] = state
    return out


def test_the_scan_is_the_float64_recurrence(data):
    got = _scan(data, None)
    assert got.dtype == np.float32 and got.shape == (BATCH, LENGTH, WIDTH)
    np.testing.assert_allclose(got, _reference(*(np.array(v) for v in data)), atol=1e-5, rtol=1e-5)


def test_half_precision_inputs_scan_in_float32(data):
    """transformers keeps the RG-LRU's state in float32 whatever the model's dtype; so does the op."""
    a, x = (v.astype(mx.bfloat16) for v in data)
    got = _scan([a, x], None)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, _reference(np.array(a.astype(mx.float32)), np.array(x.astype(mx.float32))),
                               atol=1e-5, rtol=1e-5)


def test_pieces_through_the_state_equal_one_shot(data):
    """5 positions, then 3, then one at a time: each piece continues from the state the last left."""
    whole = _scan(data, None)
    state = LRUState()
    cuts = [0, 5, 8, *range(9, LENGTH + 1)]
    pieces = [_scan(_positions(data, a, b), [state]) for a, b in zip(cuts, cuts[1:], strict=False)]
    np.testing.assert_array_equal(np.concatenate(pieces, axis=1), whole)
    assert state.offset == LENGTH
    assert state.array.shape == (BATCH, WIDTH) and state.array.dtype == mx.float32
    assert state.nbytes == BATCH * WIDTH * 4


def test_it_cannot_go_back_and_a_copy_continues_on_its_own(data):
    state = LRUState()
    _scan(_positions(data, 0, 6), [state])
    kept = np.array(state.array)
    assert state.trim(1) == 0 and state.offset == 6
    clone = state.copy()
    resumed = _scan(_positions(data, 6, LENGTH), [clone])
    np.testing.assert_array_equal(resumed, _scan(data, None)[:, 6:])
    assert clone.offset == LENGTH and state.offset == 6
    np.testing.assert_array_equal(np.array(state.array), kept)


def test_a_state_of_another_shape_and_mismatched_inputs_are_refused(data):
    state = LRUState()
    _scan(_positions(data, 0, 3), [state])
    with pytest.raises(ValueError, match=r"the LRU state holds \(2, 6\); the new positions need \(1, 6\)"):
        _scan([v[:1] for v in _positions(data, 3, 4)], [state])
    with pytest.raises(ProgramError, match=r"lru_scan needs a and x of one shape \[B, L, D\]"):
        _scan([data[0][:, :, :3], data[1]], None)


def test_padded_and_slot_batches_are_refused_by_the_op(data):
    """Padding (a key mask) or rows at their own columns would enter every later row's state."""
    for ctx in (RunContext(cache=None, key_mask=mx.ones((BATCH, LENGTH), dtype=mx.bool_)),
                RunContext(cache=None, query_columns=mx.zeros((BATCH, 1), dtype=mx.int32))):
        with pytest.raises(ProgramError, match="lru_scan runs on whole, unpadded rows"):
            REGISTRY["lru_scan"].fn(ctx, *data, layer=0)


def test_the_compiled_step_carries_the_lru_state(arch_cases):
    """A decode step of the tiny RecurrentGemma runs compiled and leaves each LRU state holding what the
    plain interpreter's step leaves there."""
    check_compiled_step_carries(arch_cases, "recurrent_gemma", LRUState, "lru")
