"""Round trips and sizes of the ternary packings (interp/kernels/ternary.py)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from interp.kernels import ternary as tp

# No test here reaches a device predicate (interp/device.py), checked by instrumenting them
# (docs/devices.md): the fake-Mac pass would run the same branches again, so it leaves them out.
pytestmark = pytest.mark.not_fake_mac_pass

trit_arrays = hnp.arrays(
    np.int8,
    hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=37),
    elements=st.integers(-1, 1),
)


@settings(max_examples=200, deadline=None)
@given(trit_arrays)
def test_2bit_round_trip_any_shape(t):
    packed = tp.pack_ternary(t)
    assert packed.dtype == np.uint8
    assert packed.shape == t.shape[:-1] + (-(-t.shape[-1] // 4),)
    np.testing.assert_array_equal(tp.unpack_ternary(packed, t.shape[-1]), t)


@settings(max_examples=200, deadline=None)
@given(trit_arrays)
def test_base3_round_trip_any_shape(t):
    packed = tp.pack_ternary_base3(t)
    assert packed.dtype == np.uint8
    assert packed.shape == t.shape[:-1] + (-(-t.shape[-1] // 5),)
    assert packed.size == 0 or packed.max() <= 242
    np.testing.assert_array_equal(tp.unpack_ternary_base3(packed, t.shape[-1]), t)


@settings(max_examples=100, deadline=None)
@given(trit_arrays)
def test_base3_repacks_to_the_same_2bit_bytes(t):
    n = t.shape[-1]
    np.testing.assert_array_equal(tp.base3_to_2bit(tp.pack_ternary_base3(t), n), tp.pack_ternary(t))


def test_bit_layout_is_the_documented_one():
    # trit 4j + i at bits 2i..2i+1 of byte j, code t + 1; tail padded with code 1 (t = 0)
    t = np.array([-1, 0, 1, 1, 0], dtype=np.int8)
    assert tp.pack_ternary(t).tolist() == [0b10_10_01_00, 0b01_01_01_01]
    # base 3: byte = sum(code_i * 3**i)
    assert tp.pack_ternary_base3(t).tolist() == [0 + 1 * 3 + 2 * 9 + 2 * 27 + 1 * 81]


def test_sizes_against_int8_and_float32():
    t = np.random.default_rng(0).integers(-1, 2, size=(64, 4096)).astype(np.int8)
    packed = tp.pack_ternary(t)
    assert t.nbytes == 4 * packed.nbytes
    assert t.astype(np.float32).nbytes == 16 * packed.nbytes
    assert tp.pack_ternary_base3(t).nbytes * 8 / t.size <= 1.61


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="lie in"):
        tp.pack_ternary(np.array([2, 0], dtype=np.int8))
    with pytest.raises(ValueError, match="integers"):
        tp.pack_ternary(np.array([0.5]))
    with pytest.raises(ValueError, match="cannot hold"):
        tp.unpack_ternary(np.zeros(3, np.uint8), 20)
    with pytest.raises(ValueError, match="invalid code 3"):
        tp.unpack_ternary(np.array([0xFF], np.uint8), 4)
    with pytest.raises(ValueError, match="above 242"):
        tp.unpack_ternary_base3(np.array([250], np.uint8), 5)


def test_absmean_ternarization_per_row_and_per_tensor():
    w = np.array([[0.9, -0.1, -2.0, 0.3], [0.0, 0.0, 0.0, 0.0]], dtype=np.float32)
    t, s = tp.ternarize_absmean(w)
    np.testing.assert_allclose(s, [0.825, 1.0])
    assert t.tolist() == [[1, 0, -1, 0], [0, 0, 0, 0]]
    t1, s1 = tp.ternarize_absmean(w, per_row=False)
    assert s1.shape == (1,)
    np.testing.assert_allclose(s1, [np.abs(w).mean()])
