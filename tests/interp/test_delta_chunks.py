"""The chunked gated delta rule (interp/ops/delta_chunks.py), the prefill fast path, against a float64
reference and the scan: prompts shorter than a chunk, whole chunks and a ragged last chunk, from a
non-zero state, both decay shapes, value heads sharing key heads.

Tolerance: inputs are unit keys and queries, values and a starting state of order 1 and decays in (0, 1],
so outputs are of order 1; the chunked form reorders sums of at most C * Dk products and inverts a unit
triangular system whose entries are at most 1, which costs a few float32 roundings per term (measured: at
most 1e-6). 1e-5 is the scan's own tolerance against the same reference (tests/interp/test_delta_state.py)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import interp.ops.delta_rule as delta_rule
from interp.delta_state import DeltaState
from interp.errors import ProgramError
from interp.graph import RunContext
from interp.ops import REGISTRY
from interp.ops.delta_chunks import _unit_lower_inverse

# No test here reaches a device predicate (interp/device.py), checked by instrumenting them
# (docs/devices.md): the fake-Mac pass would run the same branches again, so it leaves them out.
pytestmark = pytest.mark.not_fake_mac_pass

B, KEY_HEADS, HEADS, DK, DV = 2, 2, 4, 8, 6
SCALE = DK**-0.5
CHUNK = 8
TOLERANCE = 1e-5


def delta_inputs(length: int, per_channel: bool, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)

    def unit(*shape):
        x = rng.standard_normal(shape)
        return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)

    gate = (B, length, HEADS, DK) if per_channel else (B, length, HEADS)
    return {"q": unit(B, length, KEY_HEADS, DK), "k": unit(B, length, KEY_HEADS, DK),
            "v": rng.standard_normal((B, length, HEADS, DV)).astype(np.float32),
            "g": -rng.random(gate).astype(np.float32), "beta": rng.random((B, length, HEADS)).astype(np.float32)}


def delta_reference(inputs: dict, start: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(out, final state): the rule in float64 from the state ``start`` [B, H, Dk, Dv], as the schema writes it."""
    q, k, v, g, beta = (inputs[name].astype(np.float64) for name in ("q", "k", "v", "g", "beta"))
    states = start.astype(np.float64).copy()
    out = np.zeros(v.shape)
    for b in range(B):
        for h in range(HEADS):
            kh = h // (HEADS // KEY_HEADS)
            state = states[b, h]
            for t in range(v.shape[1]):
                decay = np.exp(g[b, t, h])
                state = state * (decay[:, None] if decay.ndim else decay)
                state = state + np.outer(k[b, t, kh], beta[b, t, h] * (v[b, t, h] - k[b, t, kh] @ state))
                out[b, t, h] = (SCALE * q[b, t, kh]) @ state
            states[b, h] = state
    return out, states


def _run(inputs: dict, state: DeltaState) -> np.ndarray:
    args = [mx.array(inputs[name]) for name in ("q", "k", "v", "g", "beta")]
    return np.array(REGISTRY["gated_delta_rule"].fn(RunContext(cache=[state]), *args, layer=0, scale=SCALE))


def _started_state() -> DeltaState:
    """A delta state that holds a non-zero matrix, as after an earlier turn."""
    state = DeltaState()
    state.update(mx.array(np.random.default_rng(1).standard_normal((B, HEADS, DK, DV)).astype(np.float32)), 7)
    return state


@pytest.mark.parametrize("per_channel", [False, True], ids=["decay per head", "decay per key channel"])
@pytest.mark.parametrize("length", [5, 3 * CHUNK, 3 * CHUNK + 5], ids=["under a chunk", "whole chunks", "ragged"])
def test_chunks_from_a_started_state_match_a_float64_reference(monkeypatch, per_channel, length):
    monkeypatch.setenv("PAW_DELTA_CHUNK", str(CHUNK))
    inputs = delta_inputs(length, per_channel)
    state = _started_state()
    out, final = delta_reference(inputs, np.array(state.array))
    np.testing.assert_allclose(_run(inputs, state), out, atol=TOLERANCE)
    np.testing.assert_allclose(np.array(state.array), final, atol=TOLERANCE)
    assert state.offset == 7 + length


@pytest.mark.parametrize("per_channel", [False, True], ids=["decay per head", "decay per key channel"])
def test_the_default_chunks_equal_the_scan(monkeypatch, per_channel):
    """A prompt of several default chunks with a ragged end, chunked and scanned from the same state."""
    inputs = delta_inputs(70, per_channel, seed=2)
    chunked_state, scanned_state = _started_state(), _started_state()
    chunked = _run(inputs, chunked_state)
    monkeypatch.setenv("PAW_DELTA_CHUNK", "0")
    scanned = _run(inputs, scanned_state)
    np.testing.assert_allclose(chunked, scanned, atol=TOLERANCE)
    np.testing.assert_allclose(np.array(chunked_state.array), np.array(scanned_state.array), atol=TOLERANCE)


def test_prompts_take_the_chunks_and_a_decode_step_the_scan(monkeypatch):
    """The switch: several positions go to the chunked form unless PAW_DELTA_CHUNK=0; one position never does."""
    calls = []
    chunked = delta_rule.chunked_delta_rule
    monkeypatch.setattr(delta_rule, "chunked_delta_rule", lambda *a: calls.append(a[-1]) or chunked(*a))
    inputs = delta_inputs(6, False)
    _run(inputs, DeltaState())
    assert calls == [16]
    _run({name: value[:, :1] for name, value in inputs.items()}, DeltaState())
    monkeypatch.setenv("PAW_DELTA_CHUNK", "0")
    _run(inputs, DeltaState())
    assert calls == [16]


@pytest.mark.parametrize("value", ["12", "1", "2048", "fast", "-4", "\u00b2"])  # "²".isdigit(), int("²") fails
def test_a_bad_chunk_size_is_one_clear_error(monkeypatch, value):
    monkeypatch.setenv("PAW_DELTA_CHUNK", value)
    with pytest.raises(ProgramError, match="PAW_DELTA_CHUNK must be 0 .* or a power of two from 2 to 1024"):
        _run(delta_inputs(4, False), DeltaState())


@pytest.mark.parametrize("size", [1, 2, 8, 64])
def test_the_unit_lower_inverse_inverts_the_rules_system(size):
    """(I + A)^-1 for A as the rule builds it (beta_s k_s . k_r below the diagonal, unit keys) against numpy's."""
    rng = np.random.default_rng(size)
    keys = rng.standard_normal((3, size, DK))
    keys /= np.linalg.norm(keys, axis=-1, keepdims=True)
    lower = np.tril(rng.random((3, size, 1)) * (keys @ keys.swapaxes(-1, -2)), -1)
    inverse = np.array(_unit_lower_inverse(mx.array(lower.astype(np.float32))))
    expected = np.linalg.inv(np.eye(size) + lower)
    np.testing.assert_allclose(inverse, expected, atol=TOLERANCE * np.abs(expected).max())
    assert np.array_equal(inverse, np.tril(inverse))
