"""The batch sampler: every setting per row, vectorised, against plain numpy references."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from interp.sampling import BatchSampler, SamplingParams, make_sampler

# No test here reaches a device predicate (interp/device.py), checked by instrumenting them
# (docs/devices.md): the fake-Mac pass would run the same branches again, so it leaves them out.
pytestmark = pytest.mark.not_fake_mac_pass

VOCAB = 32


def logits_rows(rows: int, seed: int = 0) -> mx.array:
    return mx.array(np.random.default_rng(seed).normal(size=(rows, VOCAB)).astype(np.float32) * 3)


def sampler_with(*params: SamplingParams, prompts=None) -> BatchSampler:
    sampler = BatchSampler(VOCAB, len(params))
    for slot, p in enumerate(params):
        sampler.assign(slot, p, (prompts or {}).get(slot, ()))
    return sampler


def test_greedy_rows_take_the_argmax_and_leave_the_logits_alone():
    logits = logits_rows(4)
    before = np.array(logits)
    result = sampler_with(*[SamplingParams()] * 4).sample(logits)
    assert result.tokens.tolist() == np.argmax(before, axis=-1).tolist()
    assert np.array_equal(np.array(logits), before)


def test_a_seeded_row_draws_the_same_tokens_whatever_shares_its_batch():
    seeded = SamplingParams(temperature=1.0, seed=42)
    alone = sampler_with(seeded)
    crowd = sampler_with(SamplingParams(), SamplingParams(temperature=0.7), seeded, SamplingParams(top_k=3,
                                                                                                 temperature=2))
    first, second = [], []
    for step in range(12):
        logits = logits_rows(4, seed=step)
        first.append(alone.sample(logits[2:3]).tokens.item())
        second.append(crowd.sample(logits).tokens[2].item())
    assert first == second
    assert len(set(first)) > 1  # it really samples


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = logits_rows(3, seed=1)
    greedy = np.argmax(np.array(logits), axis=-1).tolist()
    sampler = sampler_with(SamplingParams(temperature=1.5, top_k=1, seed=1),
                           SamplingParams(temperature=1.5, top_p=1e-6, seed=2),
                           SamplingParams(temperature=1.5, min_p=1.0, seed=3))
    for _ in range(5):
        assert sampler.sample(logits).tokens.tolist() == greedy


def _empirical(params: SamplingParams, logits: np.ndarray, draws: int = 400) -> set[int]:
    sampler = BatchSampler(VOCAB, draws)
    for slot in range(draws):
        sampler.assign(slot, SamplingParams(**{**params.__dict__, "seed": slot}))
    tokens = sampler.sample(mx.array(np.repeat(logits[None], draws, axis=0))).tokens
    return set(tokens.tolist())


def test_filters_keep_exactly_the_tokens_they_should():
    logits = np.random.default_rng(3).normal(size=VOCAB).astype(np.float32) * 2
    order = np.argsort(-logits)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    top_k = _empirical(SamplingParams(temperature=1.0, top_k=4), logits)
    assert top_k <= set(order[:4].tolist())
    mass = np.cumsum(probs[order])
    nucleus = set(order[: int(np.searchsorted(mass, 0.6)) + 1].tolist())
    assert _empirical(SamplingParams(temperature=1.0, top_p=0.6), logits) <= nucleus
    kept = set(np.flatnonzero(probs >= 0.2 * probs.max()).tolist())
    assert _empirical(SamplingParams(temperature=1.0, min_p=0.2), logits) <= kept


def test_logit_bias_and_masks_decide_tokens():
    logits = logits_rows(3, seed=2)
    mask = np.zeros(VOCAB, dtype=bool)
    mask[[5, 9]] = True
    sampler = sampler_with(SamplingParams.create(logit_bias={"7": 100}), SamplingParams(),
                           SamplingParams.create(logit_bias={3: -100}))
    result = sampler.sample(logits, allowed={1: mask})
    expected_masked = 5 if logits[1, 5].item() > logits[1, 9].item() else 9
    assert result.tokens.tolist()[:2] == [7, expected_masked]
    assert result.tokens.tolist()[2] != 3


def test_penalties_follow_their_definitions():
    base = np.linspace(-2, 2, VOCAB).astype(np.float32)
    base[10], base[11] = 3.0, 2.9  # token 10 leads, 11 is close behind
    logits = mx.array(np.stack([base] * 3))
    sampler = sampler_with(SamplingParams(repetition_penalty=2.0), SamplingParams(presence_penalty=0.5),
                           SamplingParams(frequency_penalty=0.5), prompts={0: [10]})
    first = sampler.sample(logits).tokens.tolist()
    assert first == [11, 10, 10]  # the prompt's token 10 is penalized for row 0 only
    second = sampler.sample(logits).tokens.tolist()
    assert second[1:] == [11, 11]  # a generated token is penalized for presence and frequency rows


def test_logprobs_are_the_models_own():
    logits = logits_rows(2, seed=4)
    sampler = sampler_with(SamplingParams(logprobs=True, top_logprobs=3),
                           SamplingParams(temperature=1.0, repetition_penalty=1.5, logprobs=True, seed=0))
    result = sampler.sample(logits)
    raw = np.array(logits, dtype=np.float64)
    log_softmax = raw - np.log(np.exp(raw).sum(axis=-1, keepdims=True))
    tokens = result.tokens.tolist()
    for row in range(2):
        assert math.isclose(result.logprobs[row].item(), log_softmax[row, tokens[row]], abs_tol=1e-4)
    best = np.argsort(-log_softmax[0])[:3].tolist()
    assert result.top_ids[0].tolist() == best
    assert np.allclose(np.array(result.top_logprobs[0]), log_softmax[0, best], atol=1e-4)


@pytest.mark.parametrize("settings, word", [
    (dict(temperature=-1), "temperature"), (dict(top_p=0), "top-p"), (dict(top_k=-2), "top-k"),
    (dict(min_p=1.5), "min-p"), (dict(presence_penalty=3), "presence_penalty"),
    (dict(repetition_penalty=0), "repetition_penalty"), (dict(top_logprobs=21), "top_logprobs"),
    (dict(temperature=float("nan")), "temperature"),
])
def test_settings_out_of_range_name_themselves(settings, word):
    with pytest.raises(ValueError, match=word):
        SamplingParams(**settings).check(VOCAB)


def test_logit_bias_outside_the_vocabulary_is_refused():
    with pytest.raises(ValueError, match="outside the vocabulary"):
        SamplingParams.create(logit_bias={"999": 1.0}).check(VOCAB)
    with pytest.raises(ValueError, match="token ids"):
        SamplingParams.create(logit_bias={"x": 1.0})


def test_slots_move_and_shrink_with_their_state():
    sampler = sampler_with(SamplingParams(), SamplingParams(frequency_penalty=2.0))
    logits = mx.array(np.stack([np.arange(VOCAB, dtype=np.float32)] * 2))
    assert sampler.sample(logits).tokens.tolist() == [VOCAB - 1, VOCAB - 1]
    sampler.release(0)
    sampler.move(1, 0)
    sampler.resize(1)
    # the moved row remembers it generated the top token: frequency 2 pushes it below the next
    assert sampler.sample(logits[:1]).tokens.tolist() == [VOCAB - 2]


def test_make_sampler_stays_a_plain_function():
    logits = logits_rows(2, seed=5)
    assert make_sampler()(logits).tolist() == np.argmax(np.array(logits), axis=-1).tolist()
    a = make_sampler(temperature=1.0, seed=3)
    b = make_sampler(temperature=1.0, seed=3)
    assert [a(logits).tolist() for _ in range(4)] == [b(logits).tolist() for _ in range(4)]
