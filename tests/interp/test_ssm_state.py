"""The SSM state beside the KV cache (interp/ssm_cache.py): the ssm_scan op against a float64
recurrence (in its matrix form by chunks and position by position; with a decay per head, as
Mamba2's, and per head and state column, as Mamba 1's), run piece by piece through the state
equal to one shot, a state that cannot go back, and the compiled decode step carrying it."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from interp.graph import GraphModel, RunContext
from interp.ops import REGISTRY
from interp.ops.ssm import CHUNK
from interp.ssm_cache import SSMState

# No test here reaches a device predicate (interp/device.py), checked by instrumenting them
# (docs/devices.md): the fake-Mac pass would run the same branches again, so it leaves them out.
pytestmark = pytest.mark.not_fake_mac_pass

BATCH, LENGTH, HEADS, SIZE, GROUPS, STATE = 2, 14, 4, 3, 2, 5


@pytest.fixture(params=["chunked", "sequential"], autouse=True)
def scan_mode(request, monkeypatch) -> str:
    """Every test runs with the scan's matrix form by chunks (the default) and position by position."""
    monkeypatch.setenv("PAW_SSM_SCAN", request.param)
    return request.param


def _scan(inputs: list[mx.array], cache: list | None) -> np.ndarray:
    return np.array(REGISTRY["ssm_scan"].fn(RunContext(cache=cache), *inputs, layer=0))


@pytest.fixture(params=["per head", "per state column"])
def decay(request) -> str:
    """A [H] (Mamba2) or A [H, N] (Mamba 1)."""
    return request.param


def _random(length: int, decay: str, seed: int = 0) -> list[mx.array]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((BATCH, length, HEADS, SIZE))
    dt = rng.random((BATCH, length, HEADS)) + 0.05  # a softplus'd step is positive
    A = -(rng.random(HEADS if decay == "per head" else (HEADS, STATE)) + 0.1)  # -exp(A_log) is negative
    B, C = rng.standard_normal((2, BATCH, length, GROUPS, STATE))
    return [mx.array(a.astype(np.float32)) for a in (x, dt, A, B, C)]


def _reference(x, dt, A, B, C) -> np.ndarray:
    """The recurrence in float64, head by head and position by position, from a zero state (A[h] is a
    number, or one decay per state column)."""
    x, dt, A, B, C = (np.asarray(a, dtype=np.float64) for a in (x, dt, A, B, C))
    out = np.zeros(x.shape)
    per_group = HEADS // GROUPS
    for b in range(BATCH):
        for h in range(HEADS):
            state = np.zeros((SIZE, STATE))
            g = h // per_group
            for t in range(x.shape[1]):
                state = state * np.exp(dt[b, t, h] * A[h]) + dt[b, t, h] * np.outer(x[b, t, h], B[b, t, g])
                out[b, t, h] = state @ C[b, t, g]
    return out


@pytest.fixture
def data(decay) -> list[mx.array]:
    return _random(LENGTH, decay)


def _positions(data: list[mx.array], start: int, end: int) -> list[mx.array]:
    x, dt, A, B, C = data
    return [x[:, start:end], dt[:, start:end], A, B[:, start:end], C[:, start:end]]


def test_the_scan_is_the_float64_recurrence(data):
    got = _scan(data, None)
    assert got.dtype == np.float32 and got.shape == (BATCH, LENGTH, HEADS, SIZE)
    np.testing.assert_allclose(got, _reference(*(np.array(a) for a in data)), atol=1e-5, rtol=1e-5)


def test_a_prompt_of_several_chunks_is_the_float64_recurrence(decay):
    """Across chunk boundaries the state carried from chunk to chunk is the recurrence's; small steps
    (slow decay) let early positions reach the last ones."""
    x, dt, A, B, C = _random(2 * CHUNK + 11, decay, seed=1)
    inputs = [x, dt * 0.1, A, B, C]
    got = _scan(inputs, None)
    np.testing.assert_allclose(got, _reference(*(np.array(a) for a in inputs)), atol=1e-5, rtol=1e-5)


def test_pieces_through_the_state_equal_one_shot(data):
    """5 positions, then 3, then one at a time: each piece continues from the state the last left."""
    whole = _scan(data, None)
    state = SSMState()
    cuts = [0, 5, 8, *range(9, LENGTH + 1)]
    pieces = [_scan(_positions(data, a, b), [state]) for a, b in zip(cuts, cuts[1:], strict=False)]
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), whole, atol=1e-6, rtol=1e-6)
    assert state.offset == LENGTH
    assert state.array.shape == (BATCH, HEADS, SIZE, STATE) and state.array.dtype == mx.float32
    assert state.nbytes == BATCH * HEADS * SIZE * STATE * 4


def test_it_cannot_go_back_and_forgets_nothing(data):
    state = SSMState()
    _scan(_positions(data, 0, 6), [state])
    kept = np.array(state.array)
    assert state.trim(1) == 0
    assert state.offset == 6
    np.testing.assert_array_equal(np.array(state.array), kept)


def test_a_copy_continues_on_its_own(data):
    state = SSMState()
    _scan(_positions(data, 0, 6), [state])
    kept = np.array(state.array)
    clone = state.copy()
    resumed = _scan(_positions(data, 6, LENGTH), [clone])
    np.testing.assert_allclose(resumed, _scan(data, None)[:, 6:], atol=1e-6, rtol=1e-6)
    assert clone.offset == LENGTH and state.offset == 6
    np.testing.assert_array_equal(np.array(state.array), kept)


def test_a_state_of_another_shape_is_refused(data):
    state = SSMState()
    _scan(_positions(data, 0, 3), [state])
    x, dt, A, B, C = _positions(data, 3, 4)
    with pytest.raises(ValueError, match=r"the SSM state holds \(2, 4, 3, 5\); the new positions need \(1, 4, 3, 5\)"):
        _scan([x[:1], dt[:1], A, B[:1], C[:1]], [state])


def test_a_decay_per_state_column_of_another_state_size_is_refused():
    from interp.errors import ProgramError

    x, dt, _, B, C = _random(3, "per head")
    with pytest.raises(ProgramError, match=r"ssm_scan: .* A \(4, 4\) and B \(2, 3, 2, 5\) disagree"):
        _scan([x, dt, -mx.ones((HEADS, STATE - 1)), B, C], None)


def test_padded_and_slot_batches_are_refused_by_the_op(data):
    """Padding (a key mask) or rows at their own columns would enter every later row's state."""
    from interp.errors import ProgramError

    for ctx in (RunContext(cache=None, key_mask=mx.ones((BATCH, LENGTH), dtype=mx.bool_)),
                RunContext(cache=None, query_columns=mx.zeros((BATCH, 1), dtype=mx.int32))):
        with pytest.raises(ProgramError, match="ssm_scan runs on whole, unpadded rows"):
            REGISTRY["ssm_scan"].fn(ctx, *data, layer=0)


def check_compiled_step_carries(arch_cases, arch: str, state_class: type, kind: str) -> None:
    """A decode step of the tiny ``arch`` runs compiled and leaves each ``state_class`` state (two of
    kind ``kind``) holding what the plain interpreter's step leaves there."""
    model = arch_cases(arch).model
    plain = GraphModel(model.program, model.consts, compile_decode=False)
    prompt, token = mx.array([[5, 17, 42, 99, 7]]), mx.array([[11]])
    caches = []
    for runner in (model, plain):
        cache = runner.make_cache()
        mx.eval(runner(prompt, cache=cache))
        caches.append((cache, runner(token, cache=cache)))
    (compiled_cache, compiled_logits), (plain_cache, plain_logits) = caches
    assert model._compiled_step is not None and model._compiled_step.accepts(compiled_cache)
    states = [c for c in compiled_cache if isinstance(c, state_class)]
    assert len(states) == model.program.state_layers(kind) == 2
    for got, want in zip(states, [c for c in plain_cache if isinstance(c, state_class)], strict=True):
        assert got.offset == want.offset == 6
        np.testing.assert_allclose(np.array(got.array), np.array(want.array), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.array(compiled_logits), np.array(plain_logits), atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ["mamba2", "mamba"])
def test_the_compiled_step_carries_the_ssm_state(arch_cases, arch):
    """A decode step of the tiny Mamba2 or Mamba (no attention at all) runs compiled and leaves each SSM
    state holding what the plain interpreter's step leaves there."""
    check_compiled_step_carries(arch_cases, arch, SSMState, "ssm")
