"""An LRU of KV prefixes, so a request that starts like an earlier one prefills only the rest.

Entries are token sequences with the keys and values the model computed for them, kept
per *namespace*: a base model's KV differs from a compiled program's tuned prefix for the
same ids, so each served model has its own. The KV of position i depends only on tokens
0..i, so an entry serves any prompt that shares a prefix with it, however long the entry
(a chat's next turn shares the previous turn's prompt and reply). Pinned entries (a
compiled program's prefix) are never evicted; the rest are dropped least recently used
first when their bytes pass the budget.
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


@dataclass
class _Entry:
    ids: np.ndarray
    kv: KV
    nbytes: int
    pinned: bool = False


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
            return max((min(common_prefix(e.ids, query), limit) for key, e in self._entries.items()
                        if key[0] == namespace), default=0)

    def lookup(self, namespace: str, ids: Sequence[int], limit: int | None = None) -> CacheHit:
        """The longest cached prefix of ``ids`` (at most ``limit`` tokens) in ``namespace``."""
        query = np.asarray(ids, dtype=np.int64)
        limit = len(query) if limit is None else min(limit, len(query))
        best_key, best = None, 0
        with self._lock:
            for key, entry in self._entries.items():
                if key[0] != namespace:
                    continue
                shared = min(common_prefix(entry.ids, query), limit)
                if shared > best:
                    best_key, best = key, shared
            if best_key is None:
                return CacheHit(0, None)
            entry = self._entries[best_key]
            self._entries.move_to_end(best_key)
            self.hits += 1
            self.hit_tokens += best
        return CacheHit(best, [(k[:, :, :best], v[:, :, :best]) for k, v in entry.kv])

    def insert(self, namespace: str, ids: Sequence[int], kv: KV, pinned: bool = False) -> None:
        """Keep ``kv`` (covering ``ids``); entries it extends are dropped, then the LRU is trimmed."""
        if not ids or kv[0][0].shape[2] != len(ids):
            raise ValueError("the KV must cover exactly the ids")
        new_ids = np.asarray(ids, dtype=np.int64)
        nbytes = sum(k.nbytes + v.nbytes for k, v in kv)
        if not pinned and nbytes > self.max_bytes:
            return
        with self._lock:
            for key, entry in list(self._entries.items()):
                if key[0] != namespace or entry.pinned:
                    continue
                shared = common_prefix(entry.ids, new_ids)
                if shared == len(entry.ids):  # the new entry holds all of this one
                    del self._entries[key]
                elif shared == len(new_ids):  # an entry already holds all of the new one
                    self._entries.move_to_end(key)
                    return
            self._entries[(namespace, self._next)] = _Entry(new_ids, kv, nbytes, pinned)
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
