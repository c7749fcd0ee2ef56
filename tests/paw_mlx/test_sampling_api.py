"""The sampling controls through paw_mlx's generation API (the same sampler as the server's)."""

from __future__ import annotations

import math

import pytest

import paw_mlx
from interp.errors import PawError


@pytest.fixture(scope="module")
def prog(tiny_program):
    return paw_mlx.load(tiny_program)


def test_stream_generate_reports_log_probabilities(prog):
    chunks = list(paw_mlx.stream_generate(prog, "Hello", max_tokens=6, logprobs=3))
    choices = [c for chunk in chunks for c in chunk.choices]
    assert len(choices) == chunks[-1].stats.generation_tokens
    for choice in choices:
        assert len(choice.top) == 3 and choice.top[0][0] == choice.token  # greedy: the best is chosen
        assert math.isclose(choice.logprob, choice.top[0][1], abs_tol=1e-5) and choice.logprob <= 0


def test_controls_change_what_is_generated(prog):
    greedy = paw_mlx.generate(prog, "Hello", max_tokens=8)
    assert paw_mlx.generate(prog, "Hello", max_tokens=8, logit_bias={40: 100}) == "F" * 8
    penalized = paw_mlx.generate(prog, "Hello", max_tokens=8, frequency_penalty=2.0, presence_penalty=2.0,
                                 repetition_penalty=1.5)
    assert penalized != greedy
    sampled = [paw_mlx.generate(prog, "Hello", max_tokens=8, temperature=1.0, min_p=0.05, seed=5) for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_out_of_range_controls_are_pawerrors(prog):
    with pytest.raises(PawError, match="min-p"):
        paw_mlx.generate(prog, "Hello", min_p=2.0)
    with pytest.raises(PawError, match="outside the vocabulary"):
        paw_mlx.generate(prog, "Hello", logit_bias={10**6: 1.0})
