"""What pipeline and tensor parallelism share: rank 0's driver, the other ranks' loop, the KV cache.

Rank 0 is the only rank a caller talks to: its model has ``GraphModel``'s interface
(``model(tokens, cache=...)`` returns logits, ``make_cache()``, ``layers``), so paw's
generation loop, a chat session or a server drive it as they drive a local model. The
other ranks run ``Worker.serve`` until rank 0 says SHUTDOWN.

A cache made by ``make_cache()`` has an id. The other ranks keep their part of it under
that id, trim it to the length rank 0 announces with each step (so ``trim`` on rank 0 is
enough), copy it on ``copy()``, and drop it once rank 0's cache is garbage.

Failures: a rank that dies closes its sockets and MLX raises within a second; that
becomes one ``DistributedError`` line. A rank that hangs is caught by the watchdog
(``world.timeout`` seconds per wait). While idle, rank 0 pings every third of the
timeout, so the other ranks can tell a quiet rank 0 from a dead one.
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
from interp.distributed.wire import Header, Op
from interp.distributed.world import World
from interp.errors import DistributedError
from interp.graph import GraphModel
from interp.program import Program


class RemoteLayer:
    """Rank 0's stand-in for a layer whose KV cache lives on another rank."""

    def __init__(self, owner: DistributedCache):
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
        raise DistributedError("copy a distributed KV cache whole, with cache.copy()")

    @property
    def nbytes(self) -> int:
        return 0


class DistributedCache(list):
    """A KV cache of a distributed model: one entry per layer, rank 0's layers local, the rest remote."""

    def __init__(self, model: Driver, cache_id: int, local: list[KVCache] | None = None):
        self.id = cache_id
        self.model = model
        self.local = local if local is not None else [KVCache() for _ in model.local_layers]
        local_at = dict(zip(model.local_layers, self.local, strict=True))
        super().__init__(local_at[layer] if layer in local_at else RemoteLayer(self)
                         for layer in range(model.num_layers))
        weakref.finalize(self, model.release, cache_id)

    @property
    def offset(self) -> int:
        return self.local[0].offset

    def copy(self) -> DistributedCache:
        """An independent cache holding the same positions, on every rank."""
        return self.model.fork(self)


class Driver:
    """Rank 0's side: commands to the other ranks, serialised and bounded in time."""

    def __init__(self, program: Program, world: World, local_layers: list[int]):
        self.program = program
        self.world = world
        self.num_layers = program.num_layers
        self.layers = [None] * self.num_layers  # mlx-lm sizes its default cache with len(model.layers)
        self.input_names = [i["name"] for i in program.spec["inputs"]]
        self.local_layers = local_layers
        #: every rank's check-in report (``interp/distributed/loader.py`` fills it in)
        self.ranks: list = []
        self._ids = itertools.count(1)
        self._released: list[int] = []
        self._lock = threading.RLock()
        self._closed = False
        self._last_contact = time.monotonic()
        self._stop = threading.Event()
        self._keepalive = threading.Thread(target=self._keep_alive, name="paw-distributed-keepalive", daemon=True)
        self._keepalive.start()

    @property
    def closed(self) -> bool:
        return self._closed

    def make_cache(self) -> DistributedCache:
        return DistributedCache(self, next(self._ids))

    def __call__(self, tokens: mx.array, cache: list | None = None, positions: mx.array | None = None,
                 key_mask: mx.array | None = None, last_only: bool = False) -> mx.array:
        """Logits for ``tokens`` ([batch, length] ids), continuing from the cache's offset
        (``last_only``: of the last position only, [batch, 1, vocab], as ``GraphModel``'s)."""
        if last_only:
            return self(tokens, cache, positions, key_mask)[:, -1:, :]
        if tokens.ndim == 1:
            tokens = tokens[None]
        cache = self.cache_of(cache)
        batch, length = tokens.shape
        offset = None
        if positions is None:
            offset = cache.offset if cache is not None else 0
            positions = mx.broadcast_to(mx.arange(offset, offset + length, dtype=mx.int32), (batch, length))
        inputs = {"input_ids": tokens.astype(mx.int32)}
        if "position_ids" in self.input_names:
            inputs["position_ids"] = positions.astype(mx.int32)
        with self._exchange("running a step"):
            header = Header(Op.FORWARD, cache.id if cache is not None else 0, batch, length,
                            -1 if offset is None else offset, cache.offset if cache is not None else 0,
                            0 if key_mask is None else key_mask.shape[-1], released=self._take_released(),
                            ints=wire.pack_ints(tokens, positions, key_mask))
            return self._step(header, inputs, cache, offset, key_mask)

    def _step(self, header: Header, inputs: dict[str, mx.array], cache: DistributedCache | None,
              offset: int | None, key_mask: mx.array | None) -> mx.array:
        """Run one FORWARD command with every rank (under the exchange); the logits."""
        raise NotImplementedError

    def cache_of(self, cache: list | None) -> DistributedCache | None:
        if cache is not None and not (isinstance(cache, DistributedCache) and cache.model is self):
            raise DistributedError("a distributed model runs with a cache from its own make_cache()")
        return cache

    def fork(self, cache: DistributedCache) -> DistributedCache:
        """A copy of ``cache`` under a new id (the other ranks copy their layers too)."""
        copy = DistributedCache(self, next(self._ids), [layer.copy() for layer in cache.local])
        with self._exchange("copying a cache"):
            self._command(Header(Op.FORK, copy.id, source=cache.id))
        return copy

    def release(self, cache_id: int) -> None:
        """Called when a cache is garbage: the other ranks drop their part with the next message."""
        self._released.append(cache_id)

    def ping(self) -> None:
        """A command every rank answers: are they all still there."""
        with self._exchange("checking the other ranks"):
            self._command(Header(Op.PING))

    def close(self) -> None:
        """Tell the other ranks to exit, and wait until they have heard it. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._stop.set()
            try:
                with self._exchange("closing"):
                    self._command(Header(Op.SHUTDOWN))
            except DistributedError:
                pass  # a rank is gone already: nothing left to tell
            finally:
                self._closed = True

    def _command(self, header: Header) -> None:
        """Deliver a header-only command to every rank and wait until it has gone round."""
        raise NotImplementedError

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
                raise DistributedError(f"{me}: the distributed model is closed")
            try:
                with self.world.watchdog.deadline(timeout, f"{me}: no answer from the other ranks for {timeout:g} s "
                                                           f"while {what} (a rank hung, or the network failed)"):
                    yield
            except RuntimeError as exc:
                if not lost_connection(exc):
                    raise
                self._closed = True
                raise DistributedError(f"{me}: lost the connection to another rank while {what} (a rank "
                                       "died, or the network failed)") from exc
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
                fail_rank(str(exc), self.world)
            finally:
                self._lock.release()


class Worker:
    """A rank other than 0: runs its part of every step rank 0 starts, until rank 0 is done."""

    def __init__(self, world: World, model: GraphModel):
        self.world = world
        self.model = model
        self.caches: dict[int, list[KVCache]] = {}

    def serve(self) -> None:
        """Handle commands until SHUTDOWN; a lost or silent peer ends the process with one line."""
        world = self.world
        me, timeout = world.me, world.timeout
        quiet = f"{me}: no command from rank 0 for {timeout:g} s (a rank died, hung, or lost its network)"
        busy = f"{me}: a step took the other ranks more than {timeout:g} s (a rank hung, or the network failed)"
        while True:
            try:
                with world.watchdog.deadline(timeout, quiet):
                    header = self._receive()
                with world.watchdog.deadline(timeout, busy):
                    if self._handle(header):
                        return
            except RuntimeError as exc:
                if not lost_connection(exc):
                    raise
                fail_rank(f"{me}: lost the connection to another rank (a rank died, or the network failed)", world)

    def _receive(self) -> Header:
        raise NotImplementedError

    def _handle(self, header: Header) -> bool:
        """Act on one command; True when it was SHUTDOWN."""
        raise NotImplementedError

    def _fork(self, header: Header) -> None:
        source = self.caches.get(header.source)
        if source is not None:
            self.caches[header.cache] = [layer.copy() for layer in source]

    def _release(self, header: Header) -> None:
        for cache_id in header.released:
            self.caches.pop(cache_id, None)

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


def step_inputs(header: Header) -> tuple[dict[str, mx.array], int | None, mx.array | None]:
    """(inputs, offset, key mask) of a FORWARD header whose ints arrived."""
    tokens, positions, key_mask = wire.unpack_ints(header)
    offset = None if header.offset < 0 else header.offset
    return {"input_ids": tokens, "position_ids": positions}, offset, key_mask


def lost_connection(exc: BaseException) -> bool:
    """Whether an MLX error means a peer went away (rather than a problem with the computation)."""
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(word in text for word in ("[ring]", "peer", "connection", "mpi"))


def fail_rank(message: str, world: World | None = None) -> None:
    """End this rank now with ``paw: error: message``, from any thread (the watchdog stands down)."""
    if world is not None:
        world.watchdog.disarm()
    sys.stderr.flush()
    os.write(2, f"paw: error: {message}\n".encode())
    os._exit(1)
