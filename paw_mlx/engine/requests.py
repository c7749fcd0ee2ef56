"""A generation request, the events it produces, and the handle a caller holds.

The engine's worker thread delivers ``TokenEvent``s to each request's handle: to a
callback (the server passes one that hands them to its event loop) or, by default, to a
queue the caller iterates. Every request ends with exactly one event that carries a
``finish_reason``.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from interp.sampling import SamplingParams

#: why a request ended: EOS, a stop string or a finished constraint; the token budget or
#: the context; the caller cancelled (or disconnected); the request timed out; a failure
FINISH_REASONS = ("stop", "length", "cancelled", "timeout", "error")

_ids = itertools.count(1)


@dataclass
class GenerationRequest:
    """What to generate: token ids for one served model, a budget and sampling settings.

    ``constraint`` is an object with ``allowed()`` (a boolean mask over the vocabulary),
    ``advance(token)`` and ``done`` (``paw_mlx.constrain``); ``stop_tokens`` end the
    output like EOS (neither is part of it).
    """

    model: Any  # paw_mlx.engine.models.ServedModel
    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    constraint: Any | None = None
    stop_tokens: frozenset[int] = frozenset()


@dataclass
class TokenEvent:
    """New tokens of one request (usually one), and how it ended if this is its last event."""

    tokens: list[int]
    logprobs: list[float] | None = None
    top: list[list[tuple[int, float]]] | None = None  # per token: (id, logprob), best first
    finish_reason: str | None = None
    error: str | None = None


class RequestHandle:
    """A submitted request: its events, its counters, and ``cancel()``."""

    def __init__(self, request: GenerationRequest, on_event: Callable[[TokenEvent], None] | None = None):
        self.id = f"req-{next(_ids)}"
        self.request = request
        self.prompt_tokens = len(request.prompt)
        self.cached_tokens = 0  # prompt tokens whose KV came from a cache (a program prefix, an earlier turn)
        self.generated = 0
        self.finish_reason: str | None = None
        self.created = time.monotonic()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self._cancelled = threading.Event()
        self._queue: queue.Queue[TokenEvent] | None = None if on_event is not None else queue.Queue()
        self._on_event = on_event or self._queue.put

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """Stop generating; the row is freed at the engine's next step."""
        self._cancelled.set()

    def deliver(self, event: TokenEvent) -> None:
        """Called by the engine's worker thread."""
        if event.tokens and self.first_token_at is None:
            self.first_token_at = time.monotonic()
        self.generated += len(event.tokens)
        if event.finish_reason is not None:
            self.finish_reason = event.finish_reason
            self.finished_at = time.monotonic()
        self._on_event(event)

    def events(self, timeout: float | None = None) -> Iterator[TokenEvent]:
        """Iterate this request's events as they come (only without an ``on_event`` callback).

        ``timeout`` bounds each wait; a wait that runs out raises ``TimeoutError``.
        """
        if self._queue is None:
            raise RuntimeError("this request delivers its events to a callback")
        while True:
            try:
                event = self._queue.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"{self.id}: no event within {timeout} s") from None
            yield event
            if event.finish_reason is not None:
                return
