"""Greedy generation for a batch of inputs that share one KV prefix.

Inputs of different lengths are left-padded *after* the shared prefix:

    row 0:  [prefix ...] [pad pad] [input 0 ........]
    row 1:  [prefix ...] [input 1 ..................]

A per-row key mask hides the pads from attention, and each row's position ids skip
them, so every row sees exactly the keys and positions it would see alone. Each row
then decodes in lockstep until it emits EOS or reaches its token budget. A row with an
output constraint (``paw_mlx.constrain``) samples only among the tokens its grammar
allows and stops as soon as the grammar is complete.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import mlx.core as mx

from interp.cache import KVCache
from interp.errors import ConstraintError
from interp.sampling import make_sampler
from paw_mlx.constrain import Constraint, mask_logits
from paw_mlx.runtime import LoadedProgram

if TYPE_CHECKING:
    from paw_mlx.programs.recurrent_prefix import RecurrentPrefix


def prefix_cache(prefix: Sequence[tuple[mx.array, mx.array]], batch: int) -> list[KVCache]:
    """A fresh cache per layer holding the prefix, copied to ``batch`` rows."""
    caches = []
    for k, v in prefix:
        cache = KVCache()
        if batch != k.shape[0]:
            k = mx.broadcast_to(k, (batch, *k.shape[1:]))
            v = mx.broadcast_to(v, (batch, *v.shape[1:]))
        cache.state = (k, v)
        caches.append(cache)
    return caches


@dataclass
class BatchState:
    """A batch after its prefill: the last logits and what decoding continues from."""

    logits: mx.array  # [batch, vocab] at each row's last input token
    cache: list[KVCache]
    next_positions: mx.array  # [batch]: each row's next position id
    key_mask: mx.array | None  # [batch, keys], or None when no row is padded


class ResidentPrefix:
    """A program's prefix held in a cache of its own, which one-input calls run in.

    A call writes its input and output after the prefix, in place, and the next call
    trims the cache back to the prefix: the positions past it are stale but never read
    (attention masks the keys after each query), so a call copies nothing, where a cache
    built from the prefix copies every layer's keys and values into a larger buffer
    first. Used under the base program's lock, as generation is (``generate_batch``).
    """

    def __init__(self, prefix: Sequence[tuple[mx.array, mx.array]]):
        self.prefix = prefix
        self.length = prefix[0][0].shape[2] if prefix else 0
        self._cache: list[KVCache] | None = None

    def cache(self) -> list[KVCache]:
        """The cache at the end of the prefix, ready for one row."""
        if self._cache is None or any(c.keys is None for c in self._cache):
            self._cache = prefix_cache(self.prefix, 1)
        for c in self._cache:
            c.offset = self.length
        return self._cache


def prefill_batch(prog: LoadedProgram, prefix: Sequence[tuple[mx.array, mx.array]], rows: Sequence[list[int]],
                  pad_id: int = 0, cache: list[KVCache] | None = None) -> BatchState:
    """Run every row's input after the shared prefix in one call (left padding, masked).

    ``cache``: a cache already holding ``prefix`` (a ``ResidentPrefix``'s) to run in."""
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("a batch needs at least one non-empty row")
    batch = len(rows)
    start = prefix[0][0].shape[2] if prefix else 0
    width = max(len(r) for r in rows)
    pads = [width - len(r) for r in rows]
    tokens = mx.array([[pad_id] * p + list(r) for p, r in zip(pads, rows, strict=True)], dtype=mx.int32)
    positions = key_mask = None  # rows of one length: positions follow the cache's offset
    if any(pads):
        positions = mx.array([[start] * p + list(range(start, start + len(r)))
                              for p, r in zip(pads, rows, strict=True)], dtype=mx.int32)
        key_mask = mx.array([[True] * start + [False] * p + [True] * len(r) for p, r in zip(pads, rows, strict=True)])
    if cache is None:
        cache = prefix_cache(prefix, batch) if prefix else prog.make_cache()
    logits = prog.model(tokens, cache=cache, positions=positions, key_mask=key_mask, last_only=True)[:, -1, :]
    next_positions = mx.array([start + len(r) for r in rows], dtype=mx.int32)
    return BatchState(logits, cache, next_positions, key_mask)


def generate_batch(prog: LoadedProgram, prefix: Sequence[tuple[mx.array, mx.array]], rows: Sequence[list[int]],
                   *, max_new_tokens: int, temperature: float = 0.0, pad_id: int = 0,
                   constraints: Sequence[Constraint | None] | None = None,
                   resident: ResidentPrefix | RecurrentPrefix | None = None, ended: list[bool] | None = None,
                   row_numbers: Sequence[int] | None = None) -> list[list[int]]:
    """New token ids (EOS excluded) for each row of ``rows``, all continuing ``prefix``.

    ``constraints`` (one per row, or None) restrict each row's tokens to its grammar; a
    constrained row (``required``) that has not completed its output within the budget raises
    ``ConstraintError`` (an output that stops early would not parse), naming the row by
    its number from 1 (from its index in ``row_numbers``, the caller's, when ``rows`` is
    part of a larger call).
    ``resident``: the prefix's ``ResidentPrefix`` (or a recurrent base's ``RecurrentPrefix``),
    whose ``cache()`` a batch of one row runs in.
    ``ended``, when given, is filled with whether each row ended by itself (its end-of-turn
    token or a complete constraint) rather than at the budget or the context's end.
    """
    if not rows:
        return []
    batch = len(rows)
    if prog.model.program.recurrent and (batch > 1 or (prefix and resident is None)):
        raise ValueError("a base with recurrent state runs one row at a time, from its prefix's RecurrentPrefix")
    # the prefix's length: a recurrent base's may hold no keys and values (every layer recurrent)
    start = resident.length if resident is not None else prefix[0][0].shape[2] if prefix else 0
    budget = min(max_new_tokens, max(0, prog.context_length - start - max(len(r) for r in rows)))
    sampler = make_sampler(temperature)
    eos = prog.eos_token_ids
    outputs: list[list[int]] = [[] for _ in rows]
    done = [False] * batch
    with prog.lock:
        cache = resident.cache() if resident is not None and batch == 1 and resident.length else None
        state = prefill_batch(prog, prefix, rows, pad_id, cache)
        logits, key_mask = state.logits, state.key_mask
        for step in range(budget):
            if constraints is not None:
                logits = mask_logits(logits, [c.allowed() if c is not None and not done[i] else None
                                              for i, c in enumerate(constraints)])
            y = sampler(logits)
            mx.eval(y)
            for i, token in enumerate(y.tolist()):
                if done[i]:
                    continue
                constraint = constraints[i] if constraints is not None else None
                if token in eos:
                    done[i] = True
                    continue
                outputs[i].append(token)
                if constraint is not None:
                    constraint.advance(token)
                    done[i] = constraint.done
            if all(done) or step + 1 == budget:
                break
            positions = None  # unpadded rows: from the cache's offset, so the step runs compiled
            if key_mask is not None:
                key_mask = mx.concatenate([key_mask, mx.ones((batch, 1), dtype=mx.bool_)], axis=1)
                positions = (state.next_positions + step)[:, None]
            logits = prog.model(y[:, None].astype(mx.int32), cache=state.cache, positions=positions,
                                key_mask=key_mask)[:, -1, :]
    if ended is not None:
        ended[:] = done
    if constraints is not None:
        for i, constraint in enumerate(constraints):
            if constraint is not None and constraint.required and not constraint.accepting:
                number = (row_numbers[i] if row_numbers is not None else i) + 1
                remedy = ("raise max_new_tokens" if budget == max_new_tokens else
                          f"the base model's context of {prog.context_length} tokens left room for no more: "
                          "shorten the input")
                raise ConstraintError(f"the output for input {number} did not complete its constraint within "
                                      f"{budget} new tokens ({remedy})")
    return outputs
