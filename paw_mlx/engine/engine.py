"""The continuous-batching engine: one MLX worker thread runs every request.

Each base model has a batch (``interp.slots.SlotBatch``) whose rows join and leave
between decode steps. A row may belong to any model served on that base: a compiled
program's row starts from the program's KV prefix, a base model's row from whatever the
prompt cache holds for its prompt, and each row samples with its own settings
(``interp.sampling.BatchSampler``). Programs with LoRA adapters run in the same batch:
the base's graph carries every served adapter and each row passes its own
``adapter_index`` (``paw_mlx.engine.models.AdapterStack``). One turn of the worker:

1. takes new requests from the inbox and drops rows that were cancelled or timed out;
2. runs one decode step for every batch with rows (one token for each row);
3. runs one chunk of the oldest waiting prompt's prefill (``prefill_chunk`` tokens
   while rows are decoding, so their streams keep flowing; ``idle_prefill_chunk``
   when nothing else runs), or, when the next waiting prompts are short enough to fit
   that budget together (after their prompt-cache hits), all of them in one forward
   pass. A prompt whose prefill is done joins its batch with its first token.

A finished row's keys and values go to the prompt cache, so a chat's next turn, or
another request sharing the prompt's start, prefills only what is new. Requests beyond
``max_rows`` wait in a queue of at most ``max_queue``; beyond that ``submit`` refuses
with ``OverloadedError``. Only the worker touches MLX; ``submit`` and ``cancel`` are
safe from any thread.

A program with recurrent state (``interp/recurrent.py``: conv, delta or SSM states beside
the KV caches) decodes in the same slot batch, its states one row per slot
(``interp/slot_states.py``), but each prompt is prefilled alone on its own cache list (a
padded prefill would feed the padding into the states), started from the prompt cache's
longest *snapshot* that its prompt starts with (the whole cache list, KV and states, kept
one token before a prompt's end, so the same prompt sent again has a token left to run, and
after a reply: a state cannot be cut back to a shorter prefix, so only whole snapshots are
reused) or from a copy of a compiled program's prefix state
(``prefix_state``). A model split over several processes takes no slot batch and runs *solo*:
each row keeps its own cache list and runs its own forward pass each step, the rows
stepped in turn and sampled together; no prompt cache, no prefills together.
"""

from __future__ import annotations

import atexit
import collections
import logging
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from interp import device
from interp.cache import KVCache
from interp.errors import ConstraintError, OverloadedError, RequestError
from interp.sampling import BatchSampler, SampleResult, SamplingParams
from interp.slots import SlotBatch, SlotLayer, slot_bucket
from interp.state_cache import compact_copy, make_state_cache
from paw_mlx.constrain import CONSTRAINT_FAILED
from paw_mlx.engine.prompt_cache import PromptCache
from paw_mlx.engine.requests import GenerationRequest, RequestHandle, TokenEvent
from paw_mlx.runtime import LoadedProgram

log = logging.getLogger("paw.engine")

#: engines whose worker runs: stopped at exit, so no worker outlives the interpreter
_RUNNING: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _stop_running_engines() -> None:
    for engine in list(_RUNNING):
        engine.stop()


@dataclass
class EngineConfig:
    max_rows: int = 32  # rows decoding at once, over all batches
    max_queue: int = 256  # requests waiting for a row; more are refused (HTTP 429)
    prefill_chunk: int = 64  # prompt tokens per worker turn while rows are decoding
    idle_prefill_chunk: int = 512  # ... while nothing decodes
    prefill_rows: int = 8  # short prompts prefilled together in one forward pass
    prompt_cache_bytes: int = 512 * 2**20
    timeout: float | None = 600.0  # seconds from submission to the last token
    #: decode a recurrent program's rows in one batch (False: each row's own pass, the reference)
    batch_recurrent: bool = True


@dataclass
class _Row:
    handle: RequestHandle
    slot: int | None = None
    cache: list[KVCache] | None = None  # its own cache while prefilling
    todo: list[int] = field(default_factory=list)  # prompt tokens still to prefill
    fed: list[int] = field(default_factory=list)  # tokens whose keys and values the row holds
    next_token: int = 0

    @property
    def request(self) -> GenerationRequest:
        return self.handle.request


class _Group:
    """The batch of one base model (with the adapters of the programs served on it)."""

    def __init__(self, base: LoadedProgram, adapters=None, batch_recurrent: bool = True):
        self.base = base
        self.adapters = adapters  # paw_mlx.engine.models.AdapterStack, or None
        self.batch_recurrent = batch_recurrent
        self.batch = self.new_batch()
        self.sampler: BatchSampler | None = None
        self.rows: dict[int, _Row] = {}  # slot -> row
        self.waiting: collections.deque[_Row] = collections.deque()
        self.prefilling: _Row | None = None
        self.eos = frozenset(base.eos_token_ids)
        self._kv_like: list | None = None

    def new_batch(self) -> SlotBatch:
        """An empty slot batch for this base: its KV layers, and its recurrent states' kinds (read from
        the program: a split model's ``make_cache`` would make a cache on every rank)."""
        states = make_state_cache(0, self.base.program.recurrent_states)
        return SlotBatch(self.base.model.num_layers, [type(state) for state in states])

    @property
    def recurrent(self) -> bool:
        """Whether the program keeps recurrent state: prompts are prefilled one at a time, on their
        own states, and the prompt cache keeps whole snapshots (``prompt_cache.py``)."""
        return self.base.program.recurrent

    @property
    def split(self) -> bool:
        """Whether the model runs over several processes (``interp.distributed``): its caches live on
        the ranks, so it takes no slot batch and no prompt cache."""
        return not hasattr(self.model, "step_rows")

    def kv_like(self) -> list:
        """Keys and values of one position per layer: the shapes and dtypes a cache needs."""
        if self._kv_like is None:
            cache = self.base.make_cache()
            self.base.model(mx.array([[0]], dtype=mx.int32), cache=cache)
            self._kv_like = [c.state for c in cache]
            mx.eval(self._kv_like)
        return self._kv_like

    @property
    def model(self):
        """The graph every forward pass of this batch runs: the base, with its programs' adapters."""
        return self.adapters.model if self.adapters is not None else self.base.model

    @property
    def solo(self) -> bool:
        """Whether each row runs on its own cache, one forward pass per row and step: a model
        split over several processes (``interp.distributed``) takes no slot batch, only the
        plain ``model(tokens, cache=...)`` call; a recurrent program, when ``batch_recurrent`` is
        off (``EngineConfig``: the reference its batched rows are measured against)."""
        return self.split or (self.recurrent and not self.batch_recurrent)

    def free_solo_slot(self) -> int:
        return next(slot for slot in range(len(self.rows) + 1) if slot not in self.rows)

    def adapter_inputs(self, rows: list) -> dict | None:
        """The ``adapter_index`` input for ``rows`` (None for a free slot), if the graph takes one."""
        if "adapter_index" not in self.model.input_names:
            return None
        indices = [row.request.model.adapter_index if row is not None else 0 for row in rows]
        return {"adapter_index": mx.array(indices, dtype=mx.int32)}

    @property
    def nbytes(self) -> int:
        """Bytes of the rows' state: the slot batch's, or each solo row's own cache list (KV caches and
        recurrent states; a split model's caches live on the ranks and count nothing here)."""
        rows = list(self.rows.values())  # the worker may change the rows meanwhile; a copy is consistent
        held = sum(getattr(c, "nbytes", 0) for row in rows for c in (row.cache or []))
        return held + self.batch.nbytes

    def free_slot(self) -> int | None:
        for slot in range(self.batch.slots):
            if slot not in self.rows:
                return slot
        return None


class Engine:
    """Continuous batching over one MLX worker thread; see the module docstring."""

    def __init__(self, config: EngineConfig | None = None):
        self.config = config or EngineConfig()
        self.prompt_cache = PromptCache(self.config.prompt_cache_bytes)
        self._groups: dict[int, _Group] = {}
        self._inbox: collections.deque[_Row] = collections.deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._queued = 0  # submitted, not yet holding a row
        self._running = 0
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._failure: str | None = None
        self._pinned: set[str] = set()
        self._turn = 0
        self._durations: collections.deque[float] = collections.deque(maxlen=64)
        self.steps = 0  # decode steps run (for tests and /health)
        self.prefill_chunks = 0
        self.prefilled_together = 0  # rows whose prompts shared a forward pass
        self.prefilled_tokens = 0  # prompt tokens run through a model (not taken from a cache)
        self.widest_step = 0  # the most rows one batched decode step has run

    # ------------------------------------------------------------------ control

    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="paw-engine", daemon=True)
            self._thread.start()
            _RUNNING.add(self)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel everything, finish the worker, free the batches."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def healthy(self) -> bool:
        return self._failure is None and self._thread is not None and self._thread.is_alive()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            queued, running = self._queued, self._running
        return {"rows": running, "queued": queued, "max_rows": self.config.max_rows,
                "max_queue": self.config.max_queue, "steps": self.steps, "prefill_chunks": self.prefill_chunks,
                "prefilled_together": self.prefilled_together, "prefilled_tokens": self.prefilled_tokens,
                "widest_step": self.widest_step,
                "prompt_cache_entries": len(self.prompt_cache), "prompt_cache_bytes": self.prompt_cache.nbytes,
                "prompt_cache_limit": self.config.prompt_cache_bytes,
                "prompt_cache_hits": self.prompt_cache.hits,
                "kv_bytes": sum(g.nbytes for g in list(self._groups.values())), "failure": self._failure}

    def retry_after(self) -> float:
        """Seconds a refused client might wait: the queue ahead of it over the rows' pace."""
        recent = sorted(self._durations)
        typical = recent[len(recent) // 2] if recent else 1.0
        return max(1.0, round(typical * max(1, self._queued) / self.config.max_rows, 1))

    # ------------------------------------------------------------------ requests

    def submit(self, request: GenerationRequest, on_event=None) -> RequestHandle:
        """Queue a request; its events go to ``on_event`` (from the worker thread) or its handle's queue.

        Raises ``RequestError`` for a request that cannot run (an empty prompt, one that
        fills the context) and ``OverloadedError`` when ``max_queue`` requests already wait.
        """
        model = request.model
        if not request.prompt:
            raise RequestError("the prompt is empty")
        context = model.context_length
        if len(request.prompt) >= context:
            raise RequestError(f"the prompt has {len(request.prompt)} tokens; this model's context is "
                               f"{context}, which leaves no room for a reply", code="context_length_exceeded")
        if request.max_tokens < 1:
            raise RequestError("max_tokens must be at least 1", param="max_tokens")
        # the prompt and the output share the context (as in paw run)
        request.max_tokens = min(request.max_tokens, context - len(request.prompt))
        if self._failure is not None:
            raise RequestError(f"the engine has stopped after a failure: {self._failure}", code="engine_failed")
        handle = RequestHandle(request, on_event)
        with self._lock:
            if self._stopping:
                raise OverloadedError("the server is shutting down", retry_after=5.0)
            if self._queued + self._running >= self.config.max_rows + self.config.max_queue:
                raise OverloadedError(f"all {self.config.max_rows} rows are busy and {self._queued} requests "
                                      f"wait (--max-queue {self.config.max_queue})", retry_after=self.retry_after())
            self._queued += 1
            self._inbox.append(_Row(handle))
        self._wake.set()
        self.start()
        return handle

    def pin_prefix(self, model) -> None:
        """Put a compiled program's KV prefix in the prompt cache for good (done once per model)."""
        if model.prefix_kv is None or model.namespace in self._pinned:
            return
        self.prompt_cache.insert(model.namespace, model.prefix_ids, model.prefix_kv, pinned=True)
        self._pinned.add(model.namespace)

    # ------------------------------------------------------------------ worker

    def _run(self) -> None:
        idle_cleaned = True
        try:
            while not self._stopping:
                self._admit()
                busy = False
                for group in list(self._groups.values()):
                    with group.base.lock:
                        self._sweep(group)
                        if group.rows:
                            self._guarded(group, self._decode)
                            busy = True
                if self._prefill():
                    busy = True
                if busy:
                    idle_cleaned = False
                    continue
                if not idle_cleaned:
                    self._release_memory()
                    idle_cleaned = True
                self._wake.wait(0.05)
                self._wake.clear()
        except Exception as exc:  # a bug or an MLX failure: fail every request rather than hang them
            log.exception("the engine's worker failed")
            self._failure = f"{type(exc).__name__}: {exc}"
        finally:
            self._fail_all("the server is shutting down" if self._failure is None else self._failure)
            self._groups.clear()
            # MLX keeps compiled traces and streams per thread; a thread must free them itself
            # (with the GIL held) or the interpreter can abort at exit.
            mx.clear_streams()

    def _guarded(self, group: _Group, work) -> None:
        """Run a step of ``group``; if it fails, fail that batch's rows and start it afresh.

        A failure of one batch (a constraint that raises, memory running out) ends the
        requests it holds with an error; other batches and later requests go on.
        """
        try:
            work(group)
        except Exception as exc:  # any failure inside MLX or a request's constraint
            log.exception("a step of the batch of %s failed", group.base.name)
            message = f"{type(exc).__name__}: {exc}"
            rows = list(group.rows.values()) + ([group.prefilling] if group.prefilling is not None else [])
            group.rows.clear()
            group.prefilling = None
            for row in rows:
                self._end(row, "error", error=message)
            group.batch = group.new_batch()
            group.sampler = None

    def _group(self, model) -> _Group:
        adapters = getattr(model, "adapters", None)
        key = (id(model.base), id(adapters))
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group(model.base, adapters, self.config.batch_recurrent)
        return group

    def _admit(self) -> None:
        with self._lock:
            rows, self._inbox = list(self._inbox), collections.deque()
        for row in rows:
            self._group(row.request.model).waiting.append(row)

    def _sweep(self, group: _Group) -> None:
        """Finish rows that were cancelled or ran out of time, wherever they are."""
        now = time.monotonic()
        timeout = self.config.timeout

        def reason(row: _Row) -> str | None:
            if row.handle.cancelled:
                return "cancelled"
            if timeout is not None and now - row.handle.created > timeout:
                return "timeout"
            return None

        for row in [r for r in group.waiting if reason(r)]:
            group.waiting.remove(row)
            self._dequeued()
            self._end(row, reason(row), started=False)
        if group.prefilling is not None and reason(group.prefilling):
            row, group.prefilling = group.prefilling, None
            row.cache = None
            self._end(row, reason(row))
        for row in [r for r in group.rows.values() if reason(r)]:
            self._finish(group, row, reason(row))

    # ------------------------------------------------------------------ decode

    def _decode(self, group: _Group) -> None:
        if group.solo:
            self._decode_solo(group)
            return
        batch, sampler = group.batch, group.sampler
        active = [slot in group.rows for slot in range(batch.slots)]
        tokens = mx.array([group.rows[s].next_token if on else 0 for s, on in enumerate(active)], dtype=mx.int32)
        allowed = {slot: row.request.constraint.allowed() for slot, row in group.rows.items()
                   if row.request.constraint is not None}
        logits = batch.step(group.model, tokens, active,
                            group.adapter_inputs([group.rows.get(s) for s in range(batch.slots)]))
        result = sampler.sample(logits, allowed=allowed or None)
        mx.eval(result.arrays(), batch.arrays())
        self.steps += 1
        self.widest_step = max(self.widest_step, len(group.rows))
        choices = _Choices(result)
        for slot, row in list(group.rows.items()):
            row.fed.append(row.next_token)
            self._accept(group, row, choices, slot)

    def _decode_solo(self, group: _Group) -> None:
        """One decode step of a solo group: each row's own forward pass, sampled together."""
        slots = sorted(group.rows)
        logits = mx.concatenate([self._step_solo(group, group.rows[s]) for s in slots])
        allowed = {s: group.rows[s].request.constraint.allowed() for s in slots
                   if group.rows[s].request.constraint is not None}
        result = group.sampler.sample(logits, rows=slots, allowed=allowed or None)
        mx.eval(result.arrays())
        self.steps += 1
        choices = _Choices(result)
        for index, slot in enumerate(slots):
            row = group.rows[slot]
            row.fed.append(row.next_token)
            self._accept(group, row, choices, index)

    @staticmethod
    def _step_solo(group: _Group, row: _Row) -> mx.array:
        """Logits [1, vocab] of one solo row's next token, run on the row's own cache."""
        extra = group.adapter_inputs([row])
        return group.model(mx.array([[row.next_token]], dtype=mx.int32), cache=row.cache,
                           **({"extra_inputs": extra} if extra else {}))[:, -1, :]

    def _accept(self, group: _Group, row: _Row, choices: _Choices, index: int) -> None:
        """Take one sampled token for a row: emit it, or finish the row."""
        token = choices.tokens[index]
        request = row.request
        if token in group.eos or token in request.stop_tokens:
            failure = request.constraint.failure if request.constraint is not None else None
            # a failed constraint allows only EOS: this row ends in error, the batch goes on
            self._finish(group, row, "stop" if failure is None else "error", error=failure)
            return
        if request.constraint is not None:
            try:
                request.constraint.advance(token)
            except ConstraintError as exc:  # this row's grammar gave up (llguidance's limits): it alone ends
                self._finish(group, row, "error", error=f"{CONSTRAINT_FAILED}: {exc}")
                return
        reason = None
        if request.constraint is not None and request.constraint.done:
            reason = "stop"
        elif row.handle.generated + 1 >= request.max_tokens:
            reason = "length"
        row.handle.deliver(choices.event(index, reason, request.sampling))
        if reason is not None:
            self._finish(group, row, reason, delivered=True)
        else:
            row.next_token = token

    def _finish(self, group: _Group, row: _Row, reason: str, delivered: bool = False,
                error: str | None = None) -> None:
        """Free a row's slot, keep its KV in the prompt cache, send its last event."""
        slot = row.slot
        keep = reason != "error" and len(row.fed) > 0 and not group.split
        if slot is not None and group.rows.get(slot) is row and group.solo:
            if keep and group.recurrent:
                self._snapshot(row, row.cache, row.fed)
            del group.rows[slot]
            group.sampler.release(slot)
            row.slot = row.cache = None  # a split model's cache is dropped on every rank with the next step
        elif slot is not None and group.rows.get(slot) is row:
            length = group.batch.lengths[slot]
            if keep and length == len(row.fed):
                states = group.batch.states.extract(slot, length) if group.recurrent else None
                self.prompt_cache.insert(row.request.model.namespace, row.fed, group.batch.extract(slot, length),
                                         states=states)
            del group.rows[slot]
            group.batch.release(slot)
            group.sampler.release(slot)
            row.slot = None
            self._pack(group)
        self._end(row, reason, delivered=delivered, error=error)

    def _snapshot(self, row: _Row, cache: list, ids: list[int]) -> None:
        """Keep a recurrent row's own cache list, which has run exactly ``ids``, as a prompt-cache
        snapshot: compact copies of its keys and states, made now (see ``SlotBatch.extract``)."""
        layers = row.request.model.base.model.num_layers
        kv = [(mx.array(k), mx.array(v)) for k, v in (c.state for c in cache[:layers])]
        states = [compact_copy(state) for state in cache[layers:]]
        mx.eval(kv, [state.state for state in states])
        self.prompt_cache.insert(row.request.model.namespace, list(ids), kv, states=states)

    def _end(self, row: _Row, reason: str, delivered: bool = False, started: bool = True,
             error: str | None = None) -> None:
        if started:
            with self._lock:
                self._running -= 1
        if not delivered:
            row.handle.deliver(TokenEvent([], finish_reason=reason, error=error))
        self._durations.append(time.monotonic() - row.handle.created)

    def _dequeued(self) -> None:
        with self._lock:
            self._queued -= 1

    def _pack(self, group: _Group) -> None:
        """Move rows into low slots when that lets the batch shrink to a smaller bucket."""
        count = len(group.rows)
        target = slot_bucket(count) if count else 0
        if target >= group.batch.slots:
            return
        free = [s for s in range(target) if s not in group.rows]
        for slot in sorted(s for s in group.rows if s >= target):
            new = free.pop(0)
            row = group.rows.pop(slot)
            group.batch.move(slot, new)
            group.sampler.move(slot, new)
            row.slot = new
            group.rows[new] = row
        if group.batch.fit(count):
            group.sampler.resize(group.batch.slots)

    # ------------------------------------------------------------------ prefill

    def _prefill(self) -> bool:
        """Run one chunk of one prompt's prefill; returns whether there was one to run."""
        groups = list(self._groups.values())
        if not groups:
            return False
        decoding = any(g.rows for g in groups)
        chunk = self.config.prefill_chunk if decoding else self.config.idle_prefill_chunk
        for i in range(len(groups)):
            group = groups[(self._turn + i) % len(groups)]
            together = self._short_prompts(group, chunk) if group.prefilling is None else []
            if together:
                self._turn += 1
                with group.base.lock:
                    self._guarded(group, lambda g, rows=together: self._prefill_together(g, rows))
                return True
            if group.prefilling is None and not self._start_prefill(group):
                continue
            self._turn += 1
            with group.base.lock:
                self._guarded(group, lambda g, size=chunk: self._prefill_chunk(g, size))
            return True
        return False

    def _short_prompts(self, group: _Group, budget: int) -> list[tuple[_Row, object]]:
        """Waiting rows whose prompts (after their cache hits) fit one forward pass together.

        Short prompts are the common case (a chat turn after the shared system prompt is
        cached); prefilling several in one pass reads the weights once for all of them.
        Returns at least two (row, cache hit) pairs, or none.
        """
        if group.solo or group.recurrent:  # right padding would enter a recurrent state
            return []
        picked: list[tuple[_Row, object]] = []
        total = 0
        for row in list(group.waiting)[: self.config.prefill_rows]:
            with self._lock:
                room = self._running + len(picked) < self.config.max_rows
            request = row.request
            hit = self.prompt_cache.peek(request.model.namespace, request.prompt, limit=len(request.prompt) - 1)
            need = len(request.prompt) - hit
            if not room or total + need > budget:
                break
            picked.append((row, hit))
            total += need
        return picked if len(picked) >= 2 else []

    def _start_prefill(self, group: _Group) -> bool:
        with self._lock:
            room = self._running < self.config.max_rows
        if not group.waiting or not room:
            return False
        row = group.waiting.popleft()
        with self._lock:
            self._queued -= 1
            self._running += 1
        request = row.request
        row.cache = group.base.make_cache()
        if group.solo or group.recurrent:  # the ranks hold the cache, or a state has no per-position prefix
            start = request.model.prefix_state  # a compiled program's on a recurrent base, copied
            skip = 0
            if start is not None and len(request.prompt) > start.length \
                    and request.prompt[: start.length] == list(start.artifact.prefix_ids):
                skip = start.length
            hit = None
            if group.recurrent and not group.split:  # a whole snapshot the prompt starts with
                hit = self.prompt_cache.lookup(request.model.namespace, request.prompt, limit=len(request.prompt) - 1)
            if hit is not None and hit.tokens > skip:
                layers = group.base.model.num_layers
                for layer, (k, v) in zip(row.cache[:layers], hit.kv, strict=True):
                    layer.state = (k, v)
                row.cache[layers:] = hit.states
                skip = hit.tokens
            elif skip:
                row.cache = start.cache()
            row.handle.cached_tokens = skip
            row.todo = list(request.prompt[skip:])
            group.prefilling = row
            return True
        self.pin_prefix(request.model)
        hit = self.prompt_cache.lookup(request.model.namespace, request.prompt, limit=len(request.prompt) - 1)
        if hit.kv is not None:
            for layer, (k, v) in zip(row.cache, hit.kv, strict=True):
                layer.state = (k, v)
        row.handle.cached_tokens = hit.tokens
        row.todo = list(request.prompt[hit.tokens:])
        group.prefilling = row
        return True

    def _prefill_chunk(self, group: _Group, size: int) -> None:
        row = group.prefilling
        # a recurrent prompt's snapshot is kept one token before its end (docs/serve.md, "Recurrent
        # programs"): its chunks stop there, unless the prefill starts there (an identical prompt's hit)
        snapshots = group.recurrent and not group.split and len(row.todo) > 1
        take = min(size, len(row.todo) - 1) if snapshots else size
        chunk, row.todo = row.todo[:take], row.todo[take:]
        logits = self._prefill_run(group, row, chunk)
        if snapshots and len(row.todo) == 1:  # the same prompt sent again starts here, with one token to run
            self._snapshot(row, row.cache, row.request.prompt[:-1])
            logits, row.todo = self._prefill_run(group, row, row.todo), []
        if row.todo:
            mx.eval([c.state for c in row.cache])
            return
        group.prefilling = None
        if group.solo:
            self._join_solo(group, row, logits)
            return
        slot = group.free_slot()
        layers = group.base.model.num_layers
        kv, states = [c.state for c in row.cache[:layers]], row.cache[layers:]
        if slot is None:
            slot = group.batch.slots
        group.batch.reserve(slot + 1, len(row.request.prompt) + 1, kv)
        if group.sampler is None:
            group.sampler = BatchSampler(logits.shape[-1], group.batch.slots)
        group.sampler.resize(group.batch.slots)
        request = row.request
        group.sampler.assign(slot, request.sampling, request.prompt)
        allowed = {slot: request.constraint.allowed()} if request.constraint is not None else None
        result = group.sampler.sample(logits[:, -1, :], rows=[slot], allowed=allowed)
        group.batch.insert(slot, kv, states, length=len(request.prompt))
        row.cache = None
        mx.eval(result.arrays(), group.batch.arrays())
        row.slot = slot
        row.fed = list(request.prompt)
        group.rows[slot] = row
        self._accept(group, row, _Choices(result), 0)

    def _prefill_run(self, group: _Group, row: _Row, chunk: list[int]) -> mx.array:
        """Run ``chunk`` of a prefilling row's prompt on its own cache; its last position's logits (lazy)."""
        self.prefilled_tokens += len(chunk)
        self.prefill_chunks += 1
        extra = group.adapter_inputs([row])
        return group.model(mx.array([chunk], dtype=mx.int32), cache=row.cache, last_only=True,
                           **({"extra_inputs": extra} if extra else {}))

    def _join_solo(self, group: _Group, row: _Row, logits: mx.array) -> None:
        """A prefilled row joins a solo group, keeping its own cache, with its first token."""
        slot = group.free_solo_slot()
        if group.sampler is None:
            group.sampler = BatchSampler(logits.shape[-1], slot + 1)
        group.sampler.resize(max(group.sampler.slots, slot + 1))
        request = row.request
        group.sampler.assign(slot, request.sampling, request.prompt)
        allowed = {slot: request.constraint.allowed()} if request.constraint is not None else None
        result = group.sampler.sample(logits[:, -1, :], rows=[slot], allowed=allowed)
        mx.eval(result.arrays())
        row.slot, row.fed = slot, list(request.prompt)
        group.rows[slot] = row
        self._accept(group, row, _Choices(result), 0)

    def _prefill_together(self, group: _Group, picked: list) -> None:
        """Prefill several short prompts in one forward pass, each row at its own cached length."""
        rows = []
        for row, _ in picked:
            group.waiting.remove(row)
            with self._lock:
                self._queued -= 1
                self._running += 1
            rows.append(row)
        hits = []
        for row in rows:
            request = row.request
            self.pin_prefix(request.model)
            hit = self.prompt_cache.lookup(request.model.namespace, request.prompt, limit=len(request.prompt) - 1)
            row.handle.cached_tokens = hit.tokens
            row.todo = list(request.prompt[hit.tokens:])
            hits.append(hit)
        # the rows in slots of their own batch; right-padded tokens write past a row's end,
        # where nothing reads before the row's own tokens overwrite them
        count, width = len(rows), max(len(r.todo) for r in rows)
        scratch = SlotBatch(group.base.model.num_layers)
        scratch.reserve(count, max(len(r.request.prompt) for r in rows) + width, group.kv_like())
        for i, hit in enumerate(hits):
            if hit.kv is not None:
                scratch.insert(i, hit.kv)
        starts = mx.array([scratch.lengths[i] for i in range(count)], dtype=mx.int32)
        tokens = mx.array([r.todo + [0] * (width - len(r.todo)) for r in rows], dtype=mx.int32)
        columns = starts[:, None] + mx.arange(width, dtype=mx.int32)
        layers = [SlotLayer(layer.keys[:count], layer.values[:count], starts) for layer in scratch.layers]
        inputs = {"input_ids": tokens, **(group.adapter_inputs(rows) or {})}
        if "position_ids" in group.model.input_names:
            inputs["position_ids"] = columns
        last = mx.array([len(r.todo) - 1 for r in rows], dtype=mx.int32)  # each row's last real token
        logits = group.model.run(inputs, layers, query_columns=columns, last_only=True,
                                 last_index=last)["logits"][:, 0, :]  # [rows, vocab]
        self.prefill_chunks += 1
        self.prefilled_together += count
        self.prefilled_tokens += sum(len(r.todo) for r in rows)
        slots = []
        for i, row in enumerate(rows):
            length = len(row.request.prompt)
            kv = [(layer.keys[i : i + 1, :, :length], layer.values[i : i + 1, :, :length]) for layer in layers]
            slot = group.free_slot()
            slot = group.batch.slots if slot is None else slot
            group.batch.reserve(slot + 1, length + 1, kv)
            group.batch.insert(slot, kv)
            slots.append(slot)
            row.slot, row.fed = slot, list(row.request.prompt)
            group.rows[slot] = row
        if group.sampler is None:
            group.sampler = BatchSampler(logits.shape[-1], group.batch.slots)
        group.sampler.resize(group.batch.slots)
        allowed = {}
        for slot, row in zip(slots, rows, strict=True):
            group.sampler.assign(slot, row.request.sampling, row.request.prompt)
            if row.request.constraint is not None:
                allowed[slot] = row.request.constraint.allowed()
        result = group.sampler.sample(logits, rows=slots, allowed=allowed or None)
        mx.eval(result.arrays(), group.batch.arrays())
        choices = _Choices(result)
        for i, row in enumerate(rows):
            row.todo = []
            self._accept(group, row, choices, i)

    # ------------------------------------------------------------------ memory and failure

    def _release_memory(self) -> None:
        """With nothing to run: drop the batches' buffers, MLX's cache of freed ones, and give
        the freed memory back to the system."""
        for group in self._groups.values():
            if not group.rows and group.prefilling is None:
                group.batch.fit(0)
                if group.sampler is not None:
                    group.sampler.resize(0)
        mx.clear_cache()
        device.return_freed_heap()

    def _fail_all(self, message: str) -> None:
        reason = "error" if self._failure is not None else "cancelled"
        with self._lock:
            inbox, self._inbox = list(self._inbox), collections.deque()
        for row in inbox:
            self._end(row, reason, started=False, error=message)
        for group in self._groups.values():
            for row in list(group.waiting):
                self._end(row, reason, started=False, error=message)
            group.waiting.clear()
            if group.prefilling is not None:
                self._end(group.prefilling, reason, error=message)
                group.prefilling = None
            for row in list(group.rows.values()):
                self._end(row, reason, error=message)
            group.rows.clear()
        with self._lock:
            self._queued = self._running = 0


class _Choices:
    """A sample result brought to Python lists, turned into per-row events."""

    def __init__(self, result: SampleResult):
        self.tokens = result.tokens.tolist()
        self.logprobs = result.logprobs.tolist() if result.logprobs is not None else None
        self.top_ids = result.top_ids.tolist() if result.top_ids is not None else None
        self.top_values = result.top_logprobs.tolist() if result.top_logprobs is not None else None

    def event(self, index: int, reason: str | None, params: SamplingParams) -> TokenEvent:
        token = self.tokens[index]
        if self.logprobs is None or not params.logprobs:
            return TokenEvent([token], finish_reason=reason)
        top = None
        if self.top_ids is not None and params.top_logprobs:
            count = params.top_logprobs
            top = [list(zip(self.top_ids[index][:count], self.top_values[index][:count], strict=True))]
        return TokenEvent([token], logprobs=[self.logprobs[index]], top=top, finish_reason=reason)
