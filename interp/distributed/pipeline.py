"""Pipeline parallelism: each rank runs a contiguous share of the layers, activations move by send/recv.

Rank 0 is the only rank a caller talks to. ``PipelineModel`` has the interface of
``GraphModel`` (``model(tokens, cache=...)`` returns logits, ``make_cache()``,
``layers``), so paw's generation loop, a chat session or a server drive it like a local
model. One call runs rank 0's first layers, sends the step (a header, then the tensors
that cross the cut) to rank 1, which runs its layers and passes on, around the ring to
the last rank, which sends its hidden state back to rank 0; rank 0 runs the output head
(``interp/distributed/stages.py`` says why there) and returns the logits, so sampling,
penalties and constraints stay on rank 0. The other ranks loop in ``PipelineWorker.serve``.

Every layer's KV cache lives on the rank that runs the layer. A cache made by
``make_cache()`` has an id; the other ranks keep their layers' part of it under that id,
trim it to the length rank 0 announces with each step (so ``trim`` on rank 0 is
enough), copy it on ``copy()``, and drop it once rank 0's cache is garbage.

Failures: a rank that dies closes its sockets and MLX raises within a second; that
becomes one ``DistributedError`` line. A rank that hangs is caught by the watchdog
(``world.timeout`` seconds per wait). While idle, rank 0 pings the ring every third of
the timeout, so the other ranks can tell a quiet rank 0 from a dead one.
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import mlx.core as mx

from interp.cache import KVCache
from interp.distributed import wire
from interp.distributed.stages import PipelinePlan, Stage
from interp.distributed.wire import Header, Op
from interp.distributed.world import World
from interp.errors import DistributedError
from interp.graph import GraphModel
from interp.program import Program


class RemoteLayer:
    """Rank 0's stand-in for a layer whose KV cache lives on another rank."""

    def __init__(self, owner: PipelineCache):
        self._owner = weakref.ref(owner)

    @property
    def offset(self) -> int:
        owner = self._owner()
        return owner.offset if owner is not None else 0

    @property
    def state(self) -> tuple[()]:
        return ()

    @state.setter
    def state(self, value) -> None:
        raise DistributedError("this layer's KV cache lives on another rank: its state cannot be set from rank 0")

    def trim(self, count: int) -> int:
        """The rank holding the layer trims it to rank 0's length with the next step."""
        return min(count, self.offset)

    def copy(self) -> RemoteLayer:
        raise DistributedError("copy a pipeline-parallel KV cache whole, with cache.copy()")

    @property
    def nbytes(self) -> int:
        return 0


class PipelineCache(list):
    """A KV cache of a pipeline-parallel model: rank 0's layers here, the others' on their ranks."""

    def __init__(self, model: PipelineModel, cache_id: int, local: list[KVCache] | None = None):
        self.id = cache_id
        self.model = model
        self.local = local if local is not None else [KVCache() for _ in model.local_layers]
        local_at = dict(zip(model.local_layers, self.local, strict=True))
        super().__init__(local_at[layer] if layer in local_at else RemoteLayer(self) for layer in range(model.num_layers))
        weakref.finalize(self, model.release, cache_id)

    @property
    def offset(self) -> int:
        return self.local[0].offset

    def copy(self) -> PipelineCache:
        """An independent cache holding the same positions, on every rank."""
        return self.model.fork(self)


class PipelineModel:
    """Rank 0's view of a pipeline-parallel program: call it like ``GraphModel``."""

    def __init__(self, program: Program, plan: PipelinePlan, world: World, head: GraphModel, tail: GraphModel):
        self.program = program
        self.plan = plan
        self.world = world
        self.num_layers = program.num_layers
        self.layers = [None] * self.num_layers  # mlx-lm sizes its default cache with len(model.layers)
        self.head_stage, self.tail_stage = plan.stages[0], plan.stages[-1]
        self.local_layers = list(self.head_stage.layers)
        self.input_names = list(head.input_names[: len(program.spec["inputs"])])
        self._head, self._tail = head, tail
        self._ids = itertools.count(1)
        self._released: list[int] = []
        self._lock = threading.RLock()
        self._closed = False
        self._last_contact = time.monotonic()
        self._stop = threading.Event()
        self._keepalive = threading.Thread(target=self._keep_alive, name="paw-pipeline-keepalive", daemon=True)
        self._keepalive.start()

    @property
    def consts(self) -> dict:
        """The weights rank 0 holds (its first layers and the output head)."""
        return {**self._head.consts, **self._tail.consts}

    def make_cache(self) -> PipelineCache:
        return PipelineCache(self, next(self._ids))

    def __call__(self, tokens: mx.array, cache: list | None = None, positions: mx.array | None = None,
                 key_mask: mx.array | None = None) -> mx.array:
        """Logits for ``tokens`` ([batch, length] ids), continuing from the cache's offset."""
        if tokens.ndim == 1:
            tokens = tokens[None]
        batch, length = tokens.shape
        if cache is not None and not (isinstance(cache, PipelineCache) and cache.model is self):
            raise DistributedError("a pipeline-parallel model runs with a cache from its own make_cache()")
        cache_offset = cache.offset if cache is not None else 0
        offset = None
        if positions is None:
            offset = cache_offset
            positions = mx.broadcast_to(mx.arange(offset, offset + length, dtype=mx.int32), (batch, length))
        inputs = {"input_ids": tokens.astype(mx.int32)}
        if "position_ids" in self.input_names:
            inputs["position_ids"] = positions.astype(mx.int32)
        with self._exchange("running a step"):
            header = Header(Op.FORWARD, cache.id if cache is not None else 0, batch, length,
                            -1 if offset is None else offset, cache_offset,
                            0 if key_mask is None else key_mask.shape[-1], released=self._take_released(),
                            ints=wire.pack_ints(tokens, positions, key_mask))
            head = self._head.forward(inputs, cache.local if cache is not None else None, offset, key_mask)
            outgoing = [head[name] for name in self.head_stage.sends]
            mx.eval(outgoing)  # a failure to compute is raised here, before the ring hears of the step
            header.tensors = wire.describe(outgoing)
            wire.send_header(header, self.world.next, self.world.group)
            wire.send_tensors(outgoing, self.world.next, self.world.group)
            reply = self._reply()
            arrived = wire.recv_tensors(reply, self.world.previous, self.world.group)
        tail_inputs = dict(inputs)
        tail_inputs.update(zip(self.tail_stage.receives, arrived, strict=True))
        tail_inputs.update({name: head[name] for name in self.tail_stage.local})
        return self._tail.forward(tail_inputs, None, offset, key_mask)["logits"]

    def fork(self, cache: PipelineCache) -> PipelineCache:
        """A copy of ``cache`` under a new id (the other ranks copy their layers too)."""
        copy = PipelineCache(self, next(self._ids), [layer.copy() for layer in cache.local])
        with self._exchange("copying a cache"):
            wire.send_header(Header(Op.FORK, copy.id, source=cache.id), self.world.next, self.world.group)
            self._reply()
        return copy

    def release(self, cache_id: int) -> None:
        """Called when a cache is garbage: the other ranks drop their part with the next message."""
        self._released.append(cache_id)

    def ping(self) -> None:
        """One round trip through every rank."""
        with self._exchange("checking the other ranks"):
            wire.send_header(Header(Op.PING), self.world.next, self.world.group)
            self._reply()

    def close(self) -> None:
        """Tell the other ranks to exit, and wait until the last one has heard it. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._stop.set()
            try:
                with self._exchange("closing"):
                    wire.send_header(Header(Op.SHUTDOWN), self.world.next, self.world.group)
                    self._reply()
            except DistributedError:
                pass  # a rank is gone already: nothing left to tell
            finally:
                self._closed = True
                self.world.watchdog.close()

    def _reply(self) -> Header:
        reply = wire.recv_header(self.world.previous, self.world.group)
        if reply.op == Op.ERROR:
            raise DistributedError(reply.text)
        return reply

    def _take_released(self) -> tuple[int, ...]:
        taken = tuple(self._released[: wire.RELEASE_SLOTS])
        del self._released[: len(taken)]
        return taken

    @contextmanager
    def _exchange(self, what: str) -> Iterator[None]:
        """One conversation with the other ranks: serialised, under the watchdog, errors as one line."""
        me, timeout = self.world.me, self.world.timeout
        with self._lock:
            if self._closed:
                raise DistributedError(f"{me}: the pipeline is closed")
            try:
                with self.world.watchdog.deadline(timeout, f"{me}: no answer from the other ranks for {timeout:g} s "
                                                           f"while {what} (a rank hung, or the network failed)"):
                    yield
            except RuntimeError as exc:
                if not lost_connection(exc):
                    raise
                self._closed = True
                raise DistributedError(f"{me}: lost the connection to another rank while {what} (a rank "
                                       "died, or the network failed)") from None
            finally:
                self._last_contact = time.monotonic()

    def _keep_alive(self) -> None:
        interval = self.world.timeout / 3
        while not self._stop.wait(interval / 2):
            if time.monotonic() - self._last_contact < interval or not self._lock.acquire(blocking=False):
                continue
            try:
                if not self._closed:
                    self.ping()
            except DistributedError as exc:
                fail_rank(str(exc))
            finally:
                self._lock.release()


class PipelineWorker:
    """A rank other than 0: runs its stage for every step rank 0 starts, until rank 0 is done."""

    def __init__(self, world: World, stage: Stage, model: GraphModel):
        self.world = world
        self.stage = stage
        self.model = model
        self.caches: dict[int, list[KVCache]] = {}

    def serve(self) -> None:
        """Handle messages until SHUTDOWN; a lost or silent peer ends the process with one line."""
        world = self.world
        me, timeout = world.me, world.timeout
        quiet = f"{me}: no word from rank {world.previous} for {timeout:g} s (rank 0 died, hung, or lost its network)"
        busy = f"{me}: rank {world.next} did not take the step for {timeout:g} s (it hung, or the network failed)"
        while True:
            try:
                with world.watchdog.deadline(timeout, quiet):
                    header = wire.recv_header(world.previous, world.group)
                with world.watchdog.deadline(timeout, busy):
                    if self._handle(header):
                        return
            except RuntimeError as exc:
                if not lost_connection(exc):
                    raise
                fail_rank(f"{me}: lost the connection to a neighbouring rank (a rank died, or the network failed)")

    def _handle(self, header: Header) -> bool:
        """Run or pass on one message; True when it was SHUTDOWN."""
        world = self.world
        if header.op == Op.FORWARD:
            for cache_id in header.released:
                self.caches.pop(cache_id, None)
            arrived = wire.recv_tensors(header, world.previous, world.group)
            outgoing: list[mx.array] = []
            try:
                header, outgoing = self._forward(header, arrived)
            except DistributedError as exc:
                header = Header(Op.ERROR, text=str(exc))
            except Exception as exc:  # MLX raises plain RuntimeError/ValueError (memory, shapes): tell rank 0
                if lost_connection(exc):
                    raise
                header = Header(Op.ERROR, text=f"{world.me}: {type(exc).__name__}: {exc}")
            wire.send_header(header, world.next, world.group)
            wire.send_tensors(outgoing, world.next, world.group)
            return False
        if header.op == Op.FORK:
            source = self.caches.get(header.source)
            if source is not None:
                self.caches[header.cache] = [layer.copy() for layer in source]
        wire.send_header(header, world.next, world.group)
        return header.op == Op.SHUTDOWN

    def _forward(self, header: Header, arrived: list[mx.array]) -> tuple[Header, list[mx.array]]:
        """The message for the next rank, and the tensors that follow it."""
        tokens, positions, key_mask = wire.unpack_ints(header)
        inputs = {"input_ids": tokens, "position_ids": positions}
        inputs.update(zip(self.stage.receives, arrived, strict=True))
        offset = None if header.offset < 0 else header.offset
        outs = self.model.forward(inputs, self._cache(header), offset, key_mask)
        outgoing = [outs[name] for name in self.stage.sends]
        mx.eval(outgoing)  # a failure to compute is raised here, before the next rank hears of the step
        last = self.world.next == 0
        reply = Header(Op.FORWARD, header.cache, header.batch, header.length, header.offset, header.cache_offset,
                       header.mask_keys, released=header.released, tensors=wire.describe(outgoing),
                       ints=None if last else header.ints)
        return reply, outgoing

    def _cache(self, header: Header) -> list[KVCache] | None:
        """This rank's layers of cache ``header.cache``, trimmed to the length rank 0 announced."""
        if header.cache == 0:
            return None
        cache = self.caches.get(header.cache)
        if cache is None:
            cache = self.caches[header.cache] = self.model.make_cache()
        for layer in cache:
            extra = layer.offset - header.cache_offset
            if extra < 0:
                raise DistributedError(f"{self.world.me}: KV cache {header.cache} holds {layer.offset} positions "
                                       f"but rank 0's holds {header.cache_offset} (was its state set on rank 0 only?)")
            layer.trim(extra)
        return cache


def lost_connection(exc: BaseException) -> bool:
    """Whether an MLX error means a peer went away (rather than a problem with the computation)."""
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(word in text for word in ("[ring]", "peer", "connection", "mpi"))


def fail_rank(message: str) -> None:
    """End this rank now with ``paw: error: message``, from any thread."""
    sys.stderr.flush()
    os.write(2, f"paw: error: {message}\n".encode())
    os._exit(1)
