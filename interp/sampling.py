"""Token samplers: functions from logits [batch, vocab] to token ids [batch]."""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx

Sampler = Callable[[mx.array], mx.array]


def greedy(logits: mx.array) -> mx.array:
    return mx.argmax(logits, axis=-1)


def make_sampler(temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0) -> Sampler:
    """Greedy when temperature is 0; otherwise temperature sampling with top-k / top-p filtering."""
    if temperature < 0:
        raise ValueError("temperature must be >= 0")
    if not 0 < top_p <= 1:
        raise ValueError("top-p must be in (0, 1]")
    if top_k < 0:
        raise ValueError("top-k must be >= 0")
    if temperature == 0:
        return greedy

    def sample(logits: mx.array) -> mx.array:
        logits = logits.astype(mx.float32) / temperature
        if top_k > 0 and top_k < logits.shape[-1]:
            kth = mx.sort(logits, axis=-1)[..., -top_k][..., None]
            logits = mx.where(logits < kth, -mx.inf, logits)
        if top_p < 1.0:
            order = mx.argsort(-logits, axis=-1)
            sorted_logits = mx.take_along_axis(logits, order, axis=-1)
            probs = mx.softmax(sorted_logits, axis=-1)
            before = mx.cumsum(probs, axis=-1) - probs  # mass strictly before each token
            sorted_logits = mx.where(before >= top_p, -mx.inf, sorted_logits)
            choice = mx.random.categorical(sorted_logits, axis=-1)
            return mx.take_along_axis(order, choice[..., None], axis=-1)[..., 0]
        return mx.random.categorical(logits, axis=-1)

    return sample
