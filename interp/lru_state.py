"""The LRU state the interpreter owns beside the KV cache: an RG-LRU layer's recurrent state.

A RecurrentGemma recurrent block folds every position it has seen into one float32 vector
per sequence, [batch, channels], as transformers keeps it (``lru_scan`` in
``interp/ops/lru.py`` reads and replaces it). Like an SSM state (``interp/ssm_cache.py``) it
keeps nothing per position, so it cannot go back: ``trim`` forgets nothing and returns 0, and
the caller prefills again or restores a copy (``paw_mlx/chat.py``). It keeps one shape from
call to call, so the compiled decode step carries it (``interp/compiled_step.py``).
"""

from __future__ import annotations

from interp.folded_state import FoldedState


class LRUState(FoldedState):
    """One linear recurrence's state [B, D], and how many positions it has folded in."""

    what = "LRU state"
