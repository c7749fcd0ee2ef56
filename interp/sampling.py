"""Token sampling for a batch whose rows each carry their own settings.

``SamplingParams`` is one request's settings (the OpenAI fields plus mlx-lm's
extensions); ``BatchSampler`` turns logits [rows, vocab] into one token per row, with
every setting applied per row in vectorised form: logit bias, repetition / presence /
frequency penalties, a caller's allowed-token mask (constrained decoding), then greedy
choice or temperature sampling with min-p, top-k and top-p filtering. Each row draws
from its own PRNG key (from its seed, or fresh entropy), so a seeded request samples the
same tokens whatever else shares its batch. ``paw run``, ``paw_mlx.generate`` and the
server's batching engine all sample here; a batch of one is a single stream.

Order of operations, as in vLLM and transformers: bias, penalties and the mask change
the logits; the greedy choice is their argmax; sampling then divides by the
temperature and filters by min-p, top-k and top-p before drawing (Gumbel-max). The
log-probabilities reported to a caller are the model's own (``log_softmax`` of the raw
logits), what OpenAI's and vLLM's default ``logprobs`` report.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

Sampler = Callable[[mx.array], mx.array]

#: most alternatives a row may ask for per token (OpenAI's limit for top_logprobs)
MAX_TOP_LOGPROBS = 20
#: bisection steps of the top-p threshold: it lands within 2^-24 of the top probability
TOP_P_STEPS = 24


def _token_id(key: int | str) -> int:
    """A logit_bias key as a token id: an int, or its decimal digits (``int`` would also read
    " 5", "+5", "1_0" and other scripts' digits such as "\u0663")."""
    if isinstance(key, str) and not re.fullmatch(r"-?[0-9]+", key):
        raise ValueError(key)
    return int(key)


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens. The defaults are greedy decoding.

    ``logit_bias`` maps token ids to values added to their logits (OpenAI's range is
    -100..100); ``repetition_penalty`` divides positive (multiplies negative) logits of
    every token already in the prompt or output, as transformers does; presence and
    frequency penalties subtract from tokens already generated, as OpenAI defines them.
    ``top_logprobs`` alternatives are reported per token when ``logprobs`` is set.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0

    @classmethod
    def create(cls, *, logit_bias: Mapping[int | str, float] | None = None, **settings) -> SamplingParams:
        """Build from keyword settings; ``logit_bias`` may be a dict with str or int keys."""
        items = ()
        if logit_bias:
            try:
                items = tuple(sorted((_token_id(k), float(v)) for k, v in logit_bias.items()))
            except (TypeError, ValueError):
                raise ValueError("logit_bias maps token ids to numbers") from None
            for (token, _), (following, _) in zip(items, items[1:], strict=False):
                if token == following:  # "5" and "05": the biases would add up past the range
                    raise ValueError(f"logit_bias names token {token} twice")
        return cls(logit_bias=items, **settings)

    def check(self, vocab_size: int | None = None) -> None:
        """Raise ``ValueError`` naming the first setting out of range."""
        checks = [
            (_finite(self.temperature) and self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (_finite(self.top_p) and 0 < self.top_p <= 1, f"top-p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, f"top-k must be >= 0, got {self.top_k}"),
            (_finite(self.min_p) and 0 <= self.min_p <= 1, f"min-p must be in [0, 1], got {self.min_p}"),
            (_finite(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
             f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (_finite(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
             f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (_finite(self.repetition_penalty) and self.repetition_penalty > 0,
             f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (0 <= self.top_logprobs <= MAX_TOP_LOGPROBS,
             f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}"),
            (self.seed is None or -(2**63) <= self.seed < 2**64, f"seed must fit in 64 bits, got {self.seed}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        for token, bias in self.logit_bias:
            if vocab_size is not None and not 0 <= token < vocab_size:
                raise ValueError(f"logit_bias names token {token}, outside the vocabulary of {vocab_size}")
            if not (_finite(bias) and -100 <= bias <= 100):
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias} for token {token}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)


def _finite(value: float) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


@dataclass
class SampleResult:
    """One step's choice for the rows sampled (lazy arrays, rows in the order asked)."""

    tokens: mx.array  # int32 [rows]
    logprobs: mx.array | None = None  # float32 [rows]: the chosen tokens' log-probabilities
    top_ids: mx.array | None = None  # int32 [rows, k]: the likeliest tokens, best first
    top_logprobs: mx.array | None = None  # float32 [rows, k]
    #: arrays the sampler's state moved to; evaluate them with the tokens
    state: list[mx.array] = field(default_factory=list)

    def arrays(self) -> list[mx.array]:
        extra = [a for a in (self.logprobs, self.top_ids, self.top_logprobs) if a is not None]
        return [self.tokens, *extra, *self.state]


def _fresh_seed() -> int:
    return int.from_bytes(os.urandom(8), "little")


def _row_key(seed: int) -> mx.array:
    return mx.random.key(seed % (1 << 64))


class BatchSampler:
    """Samples tokens for up to ``slots`` rows, each with its own ``SamplingParams``.

    A row is a slot index; ``assign`` gives a slot a request's settings (and its prompt,
    which the repetition penalty counts), ``release`` frees it. ``sample`` takes the
    logits of some slots and returns their tokens, updating each slot's penalty counts
    and PRNG key. Only what some row uses is computed: a batch of greedy rows costs an
    argmax.
    """

    def __init__(self, vocab_size: int, slots: int = 1):
        self.vocab_size = vocab_size
        self.slots = 0
        self._params: list[SamplingParams | None] = []
        self._keys = mx.zeros((0, 2), dtype=mx.uint32)
        self._counts: mx.array | None = None  # float32 [slots, vocab]: tokens generated
        self._seen: mx.array | None = None  # bool [slots, vocab]: tokens in prompt or output
        self._cache: dict[tuple[int, ...], _RowSettings] = {}
        self.resize(slots)

    # ------------------------------------------------------------------ slots

    def resize(self, slots: int) -> None:
        """Grow or shrink to ``slots`` rows; rows past the new size must be free."""
        if slots < self.slots and any(p is not None for p in self._params[slots:]):
            raise ValueError("cannot shrink past a slot in use")
        extra = slots - self.slots
        if extra > 0:
            self._params.extend([None] * extra)
            self._keys = mx.concatenate([self._keys, mx.zeros((extra, 2), dtype=mx.uint32)])
            if self._counts is not None:
                self._counts = mx.concatenate([self._counts, mx.zeros((extra, self.vocab_size))])
                self._seen = mx.concatenate([self._seen, mx.zeros((extra, self.vocab_size), dtype=mx.bool_)])
        elif extra < 0:
            del self._params[slots:]
            self._keys = self._keys[:slots]
            if self._counts is not None:
                self._counts, self._seen = self._counts[:slots], self._seen[:slots]
        self.slots = slots
        self._cache.clear()

    def move(self, source: int, target: int) -> None:
        """Move a row's settings and state from slot ``source`` to free slot ``target``."""
        self._params[target], self._params[source] = self._params[source], None
        self._keys[target] = self._keys[source]
        if self._counts is not None:
            self._counts[target] = self._counts[source]
            self._seen[target] = self._seen[source]
        self._cache.clear()

    def assign(self, slot: int, params: SamplingParams, prompt: Sequence[int] = ()) -> None:
        """Give ``slot`` a new row: its settings, a fresh PRNG key and empty penalty counts."""
        self._params[slot] = params
        if not params.greedy:
            self._keys[slot] = _row_key(params.seed if params.seed is not None else _fresh_seed())
        if params.penalized:
            if self._counts is None:
                self._counts = mx.zeros((self.slots, self.vocab_size))
                self._seen = mx.zeros((self.slots, self.vocab_size), dtype=mx.bool_)
            seen = np.zeros(self.vocab_size, dtype=bool)
            ids = np.asarray([t for t in prompt if 0 <= t < self.vocab_size], dtype=np.int64)
            seen[ids] = True
            self._counts[slot] = mx.zeros((self.vocab_size,))
            self._seen[slot] = mx.array(seen)
        self._cache.clear()

    def release(self, slot: int) -> None:
        self._params[slot] = None
        self._cache.clear()
        if self._counts is not None and not any(p is not None and p.penalized for p in self._params):
            self._counts = self._seen = None

    def params(self, slot: int) -> SamplingParams | None:
        return self._params[slot]

    # ------------------------------------------------------------------ sampling

    def sample(self, logits: mx.array, rows: Sequence[int] | None = None,
               allowed: Mapping[int, np.ndarray | mx.array] | None = None) -> SampleResult:
        """Tokens for ``rows`` (slot indices; default every slot) from their logits [rows, vocab].

        ``allowed`` maps a slot to a boolean mask [vocab] of the tokens it may take (a
        constrained row); a row whose mask allows nothing keeps its unmasked logits.
        Free slots in ``rows`` are treated as greedy rows.
        """
        rows = tuple(range(self.slots)) if rows is None else tuple(rows)
        if logits.shape[0] != len(rows):
            raise ValueError(f"{logits.shape[0]} rows of logits for {len(rows)} slots")
        settings = self._cache.get(rows)
        if settings is None:
            settings = self._cache[rows] = _RowSettings.build(self._params, rows, self.vocab_size)
        logits = logits.astype(mx.float32)
        vocab = logits.shape[-1]
        result = SampleResult(tokens=mx.zeros((len(rows),), dtype=mx.int32))
        raw_logprobs = None
        if settings.logprobs:
            raw_logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        if settings.bias is not None:
            rows_index, tokens_index, values = settings.bias
            logits = logits.at[rows_index, tokens_index].add(values)
        slot_index = settings.slot_index
        if settings.penalized is not None and self._counts is not None:
            logits = _penalize(logits, self._counts[slot_index], self._seen[slot_index], settings.penalized)
        if allowed:
            logits = _mask_rows(logits, rows, allowed)
        tokens = mx.argmax(logits, axis=-1).astype(mx.int32)
        if settings.sampled is not None:
            picked = settings.sampled
            slots = slot_index[picked]
            keys = self._keys[slots]
            split = mx.vmap(lambda key: mx.random.split(key))(keys)  # [n, 2, 2]
            self._keys[slots] = split[:, 0]
            drawn = _draw(logits[picked], split[:, 1], settings)
            tokens[picked] = drawn
            result.state.append(self._keys)
        result.tokens = tokens
        if settings.penalized is not None and self._counts is not None:
            rows_used = slot_index[settings.penalized.rows]
            chosen = tokens[settings.penalized.rows]
            self._counts = self._counts.at[rows_used, chosen].add(1.0)
            self._seen[rows_used, chosen] = True
            result.state += [self._counts, self._seen]
        if raw_logprobs is not None:
            result.logprobs = mx.take_along_axis(raw_logprobs, tokens[:, None], axis=-1)[:, 0]
            if settings.top_logprobs:
                k = min(settings.top_logprobs, vocab)
                top = mx.argpartition(-raw_logprobs, k - 1, axis=-1)[:, :k]
                values = mx.take_along_axis(raw_logprobs, top, axis=-1)
                order = mx.argsort(-values, axis=-1)
                result.top_ids = mx.take_along_axis(top, order, axis=-1).astype(mx.int32)
                result.top_logprobs = mx.take_along_axis(values, order, axis=-1)
        return result


@dataclass
class _Penalties:
    rows: mx.array  # int32 [n]: positions (in the sampled rows) of penalized rows
    presence: mx.array  # float32 [n, 1]
    frequency: mx.array
    repetition: mx.array


@dataclass
class _RowSettings:
    """The per-row settings of one set of rows as arrays, built once per batch composition."""

    slot_index: mx.array
    logprobs: bool
    top_logprobs: int
    bias: tuple[mx.array, mx.array, mx.array] | None
    penalized: _Penalties | None
    sampled: mx.array | None  # int32 [n]: positions of rows that sample (temperature > 0)
    temperature: mx.array | None = None  # float32 [n, 1] for the sampled rows
    min_p: mx.array | None = None
    top_k: mx.array | None = None  # int32 [n, 1]; 0 keeps every token
    top_k_max: int = 0
    top_p: mx.array | None = None

    @classmethod
    def build(cls, params: list[SamplingParams | None], rows: tuple[int, ...], vocab: int) -> _RowSettings:
        chosen = [params[r] if params[r] is not None else _GREEDY for r in rows]
        bias_rows, bias_tokens, bias_values = [], [], []
        for i, p in enumerate(chosen):
            for token, value in p.logit_bias:
                if 0 <= token < vocab:
                    bias_rows.append(i)
                    bias_tokens.append(token)
                    bias_values.append(value)
        bias = None
        if bias_rows:
            bias = (mx.array(bias_rows, dtype=mx.int32), mx.array(bias_tokens, dtype=mx.int32),
                    mx.array(bias_values, dtype=mx.float32))
        penal = [i for i, p in enumerate(chosen) if p.penalized]
        penalties = None
        if penal:
            def column(name: str) -> mx.array:
                return mx.array([[getattr(chosen[i], name)] for i in penal], dtype=mx.float32)

            penalties = _Penalties(mx.array(penal, dtype=mx.int32), column("presence_penalty"),
                                   column("frequency_penalty"), column("repetition_penalty"))
        settings = cls(slot_index=mx.array(rows, dtype=mx.int32), logprobs=any(p.logprobs for p in chosen),
                       top_logprobs=max((p.top_logprobs for p in chosen if p.logprobs), default=0),
                       bias=bias, penalized=penalties, sampled=None)
        sampled = [i for i, p in enumerate(chosen) if not p.greedy]
        if sampled:
            picked = [chosen[i] for i in sampled]
            settings.sampled = mx.array(sampled, dtype=mx.int32)
            # a temperature this small is greedy in effect; dividing by it would overflow
            settings.temperature = mx.array([[max(p.temperature, 1e-4)] for p in picked], dtype=mx.float32)
            if any(p.min_p > 0 for p in picked):
                settings.min_p = mx.array([[p.min_p] for p in picked], dtype=mx.float32)
            if any(0 < p.top_k < vocab for p in picked):
                settings.top_k_max = min(vocab, max(p.top_k for p in picked))
                settings.top_k = mx.array([[p.top_k if 0 < p.top_k < vocab else 0] for p in picked], dtype=mx.int32)
            if any(p.top_p < 1 for p in picked):
                settings.top_p = mx.array([[p.top_p] for p in picked], dtype=mx.float32)
        return settings


_GREEDY = SamplingParams()


def _penalize(logits: mx.array, counts: mx.array, seen: mx.array, penalties: _Penalties) -> mx.array:
    """Apply each penalized row's repetition, presence and frequency penalties."""
    rows = penalties.rows
    x, count, was_seen = logits[rows], counts[rows], seen[rows]
    repetition = penalties.repetition
    x = mx.where(was_seen, mx.where(x > 0, x / repetition, x * repetition), x)
    x = x - penalties.presence * (count > 0) - penalties.frequency * count
    logits[rows] = x
    return logits


def _mask_rows(logits: mx.array, rows: tuple[int, ...], allowed: Mapping[int, np.ndarray | mx.array]) -> mx.array:
    """Set to -inf the logits of tokens a constrained row may not take."""
    positions = [i for i, slot in enumerate(rows) if slot in allowed]
    if not positions:
        return logits
    vocab = logits.shape[-1]
    masks = []
    for i in positions:
        mask = allowed[rows[i]]
        mask = mask if isinstance(mask, mx.array) else mx.array(np.asarray(mask, dtype=bool))
        if mask.shape[0] < vocab:  # a tokenizer smaller than the embedding: the rest are never allowed
            mask = mx.concatenate([mask, mx.zeros((vocab - mask.shape[0],), dtype=mx.bool_)])
        masks.append(mask[:vocab])
    index = mx.array(positions, dtype=mx.int32)
    stacked = mx.stack(masks)
    stacked = stacked | ~mx.any(stacked, axis=-1, keepdims=True)  # nothing allowed: leave the row be
    logits[index] = mx.where(stacked, logits[index], -mx.inf)
    return logits


def _draw(logits: mx.array, keys: mx.array, s: _RowSettings) -> mx.array:
    """Temperature sampling with min-p, top-k and top-p filters; one PRNG key per row."""
    x = logits / s.temperature
    if s.min_p is not None:
        # min-p keeps tokens with probability >= min_p * the top probability
        top = mx.max(x, axis=-1, keepdims=True)
        x = mx.where(x >= top + mx.log(s.min_p), x, -mx.inf)
    if s.top_k is not None:
        best = mx.sort(mx.topk(x, s.top_k_max, axis=-1), axis=-1)[:, ::-1]  # [n, k] descending
        kth = mx.take_along_axis(best, mx.maximum(s.top_k - 1, 0), axis=-1)
        x = mx.where((s.top_k == 0) | (x >= kth), x, -mx.inf)
    if s.top_p is not None:
        x = mx.where(mx.softmax(x, axis=-1) >= _nucleus_threshold(x, s.top_p), x, -mx.inf)
    noise = mx.vmap(lambda key: mx.random.gumbel((x.shape[-1],), key=key))(keys)
    return mx.argmax(x + noise, axis=-1).astype(mx.int32)


def _nucleus_threshold(x: mx.array, top_p: mx.array) -> mx.array:
    """The probability of the last token of each row's nucleus, by bisection ([n, 1]).

    The nucleus is the smallest set of likeliest tokens whose mass reaches ``top_p``:
    every token with probability >= the largest t at which the mass of tokens >= t still
    reaches ``top_p``. Bisection needs no sort of the vocabulary (the cost of a sort per row
    is in docs/serve.md); ties within 2^-24 of the top probability are kept.
    """
    probs = mx.softmax(x, axis=-1)
    high = mx.max(probs, axis=-1, keepdims=True)
    low = mx.zeros_like(high)
    for _ in range(TOP_P_STEPS):
        middle = (low + high) * 0.5
        enough = mx.sum(mx.where(probs >= middle, probs, 0.0), axis=-1, keepdims=True) >= top_p
        low = mx.where(enough, middle, low)
        high = mx.where(enough, high, middle)
    # the top token always stays, whatever rounding did to the sum
    return mx.minimum(low, mx.max(probs, axis=-1, keepdims=True))


# ---------------------------------------------------------------------- single stream


def greedy(logits: mx.array) -> mx.array:
    return mx.argmax(logits, axis=-1)


def make_sampler(temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
                 seed: int | None = None) -> Sampler:
    """A stateless function from logits [batch, vocab] to tokens, as mlx-lm's ``make_sampler``.

    Greedy when ``temperature`` is 0. Penalties need the tokens so far: use a
    ``BatchSampler`` for them.
    """
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed)
    params.check()
    if params.greedy:
        return greedy
    samplers: dict[int, BatchSampler] = {}

    def sample(logits: mx.array) -> mx.array:
        squeeze = logits.ndim == 1
        logits = logits[None] if squeeze else logits
        batch = logits.shape[0]
        sampler = samplers.get(batch)
        if sampler is None:
            sampler = samplers[batch] = BatchSampler(logits.shape[-1], batch)
            for row in range(batch):
                sampler.assign(row, params if seed is None else
                               SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                                              seed=seed + row))
        tokens = sampler.sample(logits).tokens
        return tokens[0] if squeeze else tokens

    return sample
