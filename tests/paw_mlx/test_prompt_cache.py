"""The prompt cache's rules for KV entries and for snapshots of recurrent states (no model needed)."""

from __future__ import annotations

import mlx.core as mx

from interp.delta_state import DeltaState
from paw_mlx.engine.prompt_cache import PromptCache


def kv(length: int) -> list:
    return [(mx.ones((1, 2, length, 4)), mx.ones((1, 2, length, 4)))]


def state(value: float) -> DeltaState:
    s = DeltaState()
    s.update(mx.full((1, 2, 4, 4), value), 1)
    return s


def test_a_kv_entry_serves_any_shared_prefix():
    cache = PromptCache(2**20)
    cache.insert("m", [1, 2, 3, 4], kv(4))
    hit = cache.lookup("m", [1, 2, 9])
    assert hit.tokens == 2 and hit.states is None and hit.kv[0][0].shape[2] == 2


def test_a_snapshot_serves_only_prompts_that_start_with_all_of_its_ids():
    cache = PromptCache(2**20)
    cache.insert("m", [1, 2, 3], kv(3), states=[state(3.0)])
    cache.insert("m", [1, 2, 3, 4, 5], kv(5), states=[state(5.0)])
    assert len(cache) == 2  # the longer one does not replace the one it extends
    assert cache.lookup("m", [1, 2, 9]).tokens == 0  # parts inside the first: no state there
    hit = cache.lookup("m", [1, 2, 3, 4, 9])
    assert hit.tokens == 3 and hit.states[0].array[0, 0, 0, 0].item() == 3.0
    longest = cache.lookup("m", [1, 2, 3, 4, 5, 6])
    assert longest.tokens == 5 and longest.states[0].array[0, 0, 0, 0].item() == 5.0
    # limit: at least one prompt token must be left to run
    assert cache.lookup("m", [1, 2, 3, 4, 5], limit=4).tokens == 3
    assert cache.peek("m", [1, 2, 3, 4, 9]) == 3 and cache.peek("m", [1, 2]) == 0
    assert cache.lookup("other", [1, 2, 3, 4]).tokens == 0


def test_a_hit_hands_out_copies_of_the_states():
    cache = PromptCache(2**20)
    cache.insert("m", [1, 2], kv(2), states=[state(1.0)])
    first = cache.lookup("m", [1, 2, 3]).states[0]
    first.update(mx.zeros((1, 2, 4, 4)), 1)  # a run writes into its copy
    again = cache.lookup("m", [1, 2, 3]).states[0]
    assert again is not first and again.array[0, 0, 0, 0].item() == 1.0 and again.offset == 1


def test_snapshots_count_their_states_and_leave_least_recently_used_first():
    one = sum(k.nbytes + v.nbytes for k, v in kv(2)) + state(0.0).nbytes
    cache = PromptCache(2 * one)
    cache.insert("m", [1, 2], kv(2), states=[state(1.0)])
    cache.insert("m", [3, 4], kv(2), states=[state(2.0)])
    assert cache.nbytes == 2 * one
    cache.lookup("m", [1, 2, 5])  # [1, 2] is now the most recently used
    cache.insert("m", [6, 7], kv(2), states=[state(3.0)])
    assert cache.nbytes == 2 * one and cache.peek("m", [3, 4, 5]) == 0 and cache.peek("m", [1, 2, 5]) == 2
    cache.insert("m", [6, 7], kv(2), states=[state(3.0)])  # the same ids again: kept once
    assert len(cache) == 2
