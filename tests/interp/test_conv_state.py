"""The conv state beside the KV cache (interp/conv_cache.py): a short convolution run piece by
piece through it equals the whole sequence, and it goes back exactly as far as it keeps inputs."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from interp.conv_cache import ConvState
from interp.graph import RunContext
from interp.ops import REGISTRY

# No test here reaches a device predicate (interp/device.py), checked by instrumenting them
# (docs/devices.md): the fake-Mac pass would run the same branches again, so it leaves them out.
pytestmark = pytest.mark.not_fake_mac_pass

CHANNELS, KERNEL = 6, 3


def _conv(x: mx.array, weight: mx.array, bias: mx.array, cache: list | None) -> np.ndarray:
    ctx = RunContext(cache=cache)
    return np.array(REGISTRY["causal_conv1d"].fn(ctx, x, weight, bias, layer=0))


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    x = mx.array(rng.standard_normal((2, 50, CHANNELS)).astype(np.float32))
    weight = mx.array(rng.standard_normal((CHANNELS, 1, KERNEL)).astype(np.float32))
    bias = mx.array(rng.standard_normal(CHANNELS).astype(np.float32))
    return x, weight, bias


def test_pieces_through_the_state_equal_the_whole_sequence(data):
    x, weight, bias = data
    whole = _conv(x, weight, bias, None)
    state = ConvState()
    pieces = [_conv(x[:, a:b], weight, bias, [state]) for a, b in [(0, 1), (1, 7), (7, 8), (8, 50)]]
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), whole, atol=1e-6)
    assert state.offset == 50
    assert state.rows.shape == (2, KERNEL - 1 + ConvState.depth, CHANNELS)


@pytest.mark.parametrize("fed, back", [(40, 1), (40, ConvState.depth), (5, 5), (3, 2)])
def test_trim_goes_back_exactly_within_its_depth(data, fed, back):
    x, weight, bias = data
    whole = _conv(x, weight, bias, None)
    state = ConvState()
    _conv(x[:, :fed], weight, bias, [state])
    assert state.trim(back) == back
    assert state.offset == fed - back
    resumed = _conv(x[:, fed - back :], weight, bias, [state])
    np.testing.assert_allclose(resumed, whole[:, fed - back :], atol=1e-6)


def test_trim_beyond_its_depth_forgets_nothing(data):
    x, weight, bias = data
    state = ConvState()
    _conv(x[:, :40], weight, bias, [state])
    rows = np.array(state.rows)
    assert state.trim(ConvState.depth + 1) == 0
    assert state.offset == 40
    np.testing.assert_array_equal(np.array(state.rows), rows)


def test_a_later_trim_cannot_read_the_rows_an_earlier_one_zero_filled(data):
    x, weight, bias = data
    whole = _conv(x, weight, bias, None)
    state = ConvState()
    _conv(x[:, :40], weight, bias, [state])  # keeps positions 6..39
    assert state.trim(31) == 31  # back to 9: the rows shifted in stand for 0..5, which were not kept
    assert state.trim(1) == 1  # position 8 reads 6 and 7: kept
    np.testing.assert_allclose(_conv(x[:, 8:12], weight, bias, [state.copy()]), whole[:, 8:12], atol=1e-6)
    assert state.trim(1) == 0  # position 7 would read 5
    assert state.offset == 8


def test_padded_and_slot_batches_are_refused_by_the_op(data):
    """Padding (a key mask) or rows at their own columns would enter every later row's state."""
    from interp.errors import ProgramError

    x, weight, bias = data
    for ctx in (RunContext(cache=None, key_mask=mx.ones((2, 50), dtype=mx.bool_)),
                RunContext(cache=None, query_columns=mx.zeros((2, 1), dtype=mx.int32))):
        with pytest.raises(ProgramError, match="causal_conv1d runs on whole, unpadded rows"):
            REGISTRY["causal_conv1d"].fn(ctx, x, weight, bias, layer=0)
