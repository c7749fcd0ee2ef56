"""The delta-rule state the interpreter owns beside the KV cache: a linear-attention layer's memory.

Gated DeltaNet layers (Qwen3.5, Qwen3-Next, OLMo Hybrid) replace attention's growing KV
cache with one matrix per head, [batch, heads, key size, value size] in float32 (as
transformers and FLA accumulate it), which ``gated_delta_rule`` (``interp/ops/delta_rule.py``)
decays, corrects and reads at every new position. The matrix summarises every position
before it: unlike a KV cache or a conv state it cannot go back, so ``trim`` forgets
nothing and returns 0, and a caller that must go back prefills again
(``paw_mlx/chat.py``). Its shape is the same from call to call, so the compiled decode
step carries it (``interp/compiled_step.py``).

A program's cache list holds its KV caches, then its conv states, then its delta states
(``make_state_cache`` in ``interp/state_cache.py``); each op's ``layer`` attribute indexes
that list.
"""

from __future__ import annotations

from interp.folded_state import FoldedState


class DeltaState(FoldedState):
    """One gated-delta-rule layer's memory matrix [B, H, Dk, Dv], and how many positions it has seen."""

    what = "delta state"
