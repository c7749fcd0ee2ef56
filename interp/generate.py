"""The generation loop: prefill in chunks, then decode one token at a time.

Like mlx-lm's ``generate_step``: the next token's graph is built and handed to
``mx.async_eval`` before the current token is returned, so Python's work overlaps
the computation.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import mlx.core as mx

from interp.sampling import BatchSampler, Sampler, SampleResult, SamplingParams


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0  # prefill, until the first token is known (time to first token)
    generation_tokens: int = 0
    generation_seconds: float = 0.0
    peak_memory_gb: float = 0.0
    _start: float = field(default=0.0, repr=False)

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def generation_tps(self) -> float:
        # The first token belongs to the prefill; the rate counts the ones decoded after it.
        if self.generation_tokens < 2 or not self.generation_seconds:
            return 0.0
        return (self.generation_tokens - 1) / self.generation_seconds

    @property
    def ttft(self) -> float:
        return self.prompt_seconds


def prefill(model, tokens: mx.array, cache: list, step: int = 512) -> mx.array:
    """Feed the prompt into the cache in chunks of ``step`` tokens but the last; return the
    last chunk (1 to ``step`` tokens), whose pass also gives the first token's logits."""
    while tokens.shape[-1] > step:
        model(tokens[..., :step], cache=cache)
        mx.eval([c.state for c in cache])
        tokens = tokens[..., step:]
    return tokens


@dataclass(frozen=True)
class TokenChoice:
    """A generated token with, when asked for, its log-probability and the likeliest alternatives."""

    token: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()  # (token id, log-probability), best first


def generate_choices(model, prompt: list[int] | mx.array, cache: list, *, params: SamplingParams | None = None,
                     sampler: Sampler | None = None, max_tokens: int = 256, prefill_step: int = 512,
                     stats: GenerationStats | None = None) -> Iterator[TokenChoice]:
    """Yield generated tokens (batch of one) until ``max_tokens``; the caller stops at EOS.

    ``params`` (default greedy) picks tokens through ``interp.sampling.BatchSampler``,
    the same sampler as the server's batches, penalties and log-probabilities included;
    a plain ``sampler`` function (logits -> ids, as mlx-lm's) may stand in for it.
    """
    stats = stats if stats is not None else GenerationStats()
    tokens = mx.array(prompt, dtype=mx.int32) if not isinstance(prompt, mx.array) else prompt.astype(mx.int32)
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.shape[-1] == 0:
        raise ValueError("the prompt is empty")
    stats.prompt_tokens = tokens.shape[-1]
    start = time.perf_counter()
    batch_sampler: BatchSampler | None = None

    def step(x: mx.array) -> SampleResult:
        nonlocal batch_sampler
        logits = model(x, cache=cache, last_only=True)[:, -1, :]  # the LM head at the last position only
        if sampler is not None:
            return SampleResult(tokens=sampler(logits))
        if batch_sampler is None:
            batch_sampler = BatchSampler(logits.shape[-1], 1)
            batch_sampler.assign(0, params or SamplingParams(), tokens[0].tolist())
        return batch_sampler.sample(logits)

    last = prefill(model, tokens, cache, prefill_step)
    y = step(last)
    mx.async_eval(y.arrays())
    produced = 0
    decode_start = None
    while produced < max_tokens:
        next_y = step(y.tokens.reshape(1, 1)) if produced + 1 < max_tokens else None
        if next_y is not None:
            mx.async_eval(next_y.arrays())
        choice = _choice(y)
        now = time.perf_counter()
        if decode_start is None:
            stats.prompt_seconds = now - start
            decode_start = now
        produced += 1
        stats.generation_tokens = produced
        stats.generation_seconds = now - decode_start
        stats.peak_memory_gb = mx.get_peak_memory() / 1e9
        yield choice
        if next_y is None:
            break
        y = next_y


def _choice(result: SampleResult) -> TokenChoice:
    token = result.tokens.item()
    if result.logprobs is None:
        return TokenChoice(token)
    top = ()
    if result.top_ids is not None:
        top = tuple(zip(result.top_ids[0].tolist(), result.top_logprobs[0].tolist(), strict=True))
    return TokenChoice(token, result.logprobs.item(), top)


def generate_step(model, prompt: list[int] | mx.array, cache: list, *, sampler: Sampler | None = None,
                  params: SamplingParams | None = None, max_tokens: int = 256, prefill_step: int = 512,
                  stats: GenerationStats | None = None) -> Iterator[int]:
    """Yield generated token ids (batch of one) until ``max_tokens``; the caller stops at EOS."""
    for choice in generate_choices(model, prompt, cache, params=params, sampler=sampler, max_tokens=max_tokens,
                                   prefill_step=prefill_step, stats=stats):
        yield choice.token
