"""An LRU of KV prefixes, so a request that starts like an earlier one prefills only the rest.

Entries are token sequences with the keys and values the model computed for them, kept
per *namespace*: a base model's KV differs from a compiled program's tuned prefix for the
same ids, so each served model has its own. The KV of position i depends only on tokens
0..i, so an entry serves any prompt that shares a prefix with it, however long the entry
(a chat's next turn shares the previous turn's prompt and reply). Pinned entries (a
compiled program's prefix) are never evicted; the rest are dropped least recently used
first when their bytes pass the budget.

A program with recurrent state (``interp/state_cache.py``) keeps *snapshots*: entries that
also hold every recurrent layer's state after exactly their ids. Such a state exists only
at its snapshot point and cannot be cut back, so a snapshot serves only a prompt its whole
ids start (never a shorter shared prefix), a lookup returns the longest such snapshot with
copies of its states (a run writes into them), and a snapshot does not replace the shorter
ones it extends: a branch that leaves the longer one still finds its own start there.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

KV = list[tuple[mx.array, mx.array]]  # per layer: keys, values, each [1, kv_heads, length, dim]


@dataclass
class CacheHit:
    tokens: int  # how many leading prompt tokens the KV covers
    kv: KV | None  # per-layer views of the entry's first ``tokens`` positions
    #: a snapshot's recurrent states after its ``tokens`` ids (copies, each a batch of one); None for KV only
    states: list | None = None


@dataclass
class _Entry:
    ids: np.ndarray
    kv: KV
    nbytes: int
    pinned: bool = False
    states: list | None = None  # a snapshot's recurrent states (interp/state_cache.py)

    def covers(self, query: np.ndarray, limit: int) -> int:
        """How many leading tokens of ``query`` (at most ``limit``) this entry can serve: any shared
        prefix of a KV entry; all of a snapshot's ids, or nothing."""
        shared = common_prefix(self.ids, query)
        if self.states is None:
            return min(shared, limit)
        return len(self.ids) if shared == len(self.ids) <= limit else 0


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two int arrays."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


class PromptCache:
    """Token-prefix -> KV entries with a byte budget; safe to call from several threads."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[str, int], _Entry] = OrderedDict()
        self._next = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.hit_tokens = 0

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values() if not e.pinned)

    def __len__(self) -> int:
        return len(self._entries)

    def peek(self, namespace: str, ids: Sequence[int], limit: int | None = None) -> int:
        """How many leading tokens of ``ids`` a lookup would find (no LRU update, no counting)."""
        query = np.asarray(ids, dtype=np.int64)
        limit = len(query) if limit is None else min(limit, len(query))
        with self._lock:
            return max((e.covers(query, limit) for key, e in self._entries.items() if key[0] == namespace),
                       default=0)

    def lookup(self, namespace: str, ids: Sequence[int], limit: int | None = None) -> CacheHit:
        """The longest cached prefix of ``ids`` (at most ``limit`` tokens) in ``namespace``."""
        query = np.asarray(ids, dtype=np.int64)
        limit = len(query) if limit is None else min(limit, len(query))
        best_key, best = None, 0
        with self._lock:
            for key, entry in self._entries.items():
                if key[0] != namespace:
                    continue
                shared = entry.covers(query, limit)
                if shared > best:
                    best_key, best = key, shared
            if best_key is None:
                return CacheHit(0, None)
            entry = self._entries[best_key]
            self._entries.move_to_end(best_key)
            self.hits += 1
            self.hit_tokens += best
        states = [state.copy() for state in entry.states] if entry.states is not None else None
        return CacheHit(best, [(k[:, :, :best], v[:, :, :best]) for k, v in entry.kv], states)

    def insert(self, namespace: str, ids: Sequence[int], kv: KV, pinned: bool = False,
               states: list | None = None) -> None:
        """Keep ``kv`` (covering ``ids``; with ``states``, a snapshot: the recurrent states after
        exactly ``ids``); KV entries it extends are dropped, then the LRU is trimmed."""
        if not ids or (kv and kv[0][0].shape[2] != len(ids)) or (not kv and states is None):
            raise ValueError("the KV must cover exactly the ids")
        new_ids = np.asarray(ids, dtype=np.int64)
        nbytes = sum(k.nbytes + v.nbytes for k, v in kv) + sum(state.nbytes for state in states or ())
        if not pinned and nbytes > self.max_bytes:
            return
        with self._lock:
            for key, entry in list(self._entries.items()):
                if key[0] != namespace or entry.pinned:
                    continue
                shared = common_prefix(entry.ids, new_ids)
                if states is not None:  # a snapshot replaces only one at the same ids
                    if shared == len(entry.ids) == len(new_ids):
                        self._entries.move_to_end(key)
                        return
                elif shared == len(entry.ids):  # the new entry holds all of this one
                    del self._entries[key]
                elif shared == len(new_ids):  # an entry already holds all of the new one
                    self._entries.move_to_end(key)
                    return
            self._entries[(namespace, self._next)] = _Entry(new_ids, kv, nbytes, pinned, states)
            self._next += 1
            self._trim()

    def _trim(self) -> None:
        total = sum(e.nbytes for e in self._entries.values() if not e.pinned)
        for key in list(self._entries):
            if total <= self.max_bytes:
                break
            entry = self._entries[key]
            if not entry.pinned:
                total -= entry.nbytes
                del self._entries[key]

    def clear(self, namespace: str | None = None) -> None:
        """Drop every unpinned entry (of ``namespace``, or all)."""
        with self._lock:
            for key in list(self._entries):
                if not self._entries[key].pinned and (namespace is None or key[0] == namespace):
                    del self._entries[key]
