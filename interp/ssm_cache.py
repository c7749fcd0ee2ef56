"""The SSM state the interpreter owns beside the KV cache: a Mamba layer's recurrent state.

A Mamba2 layer (Mamba2, Nemotron-H, Granite 4, Bamba, Zamba2, Falcon-H1) folds every
position it has seen into one float32 array per sequence, [batch, heads, head_dim,
state_size], as transformers keeps it, and a Mamba 1 layer (Mamba, Falcon-Mamba, Jamba, Zamba) into
[batch, channels, 1, state_size], a head per channel (``ssm_scan`` in ``interp/ops/ssm.py``
reads and replaces it). Unlike the KV cache and the conv state (``interp/conv_cache.py``), it keeps
nothing per position, so it cannot go back: ``trim`` forgets nothing and returns 0, and the caller prefills again
(``paw_mlx/chat.py``). It keeps one shape from call to call, so the compiled decode step
carries it (``interp/compiled_step.py``).

A program's cache list holds its KV caches, then its conv states, then its SSM states
(``make_state_cache`` in ``interp/state_cache.py``); each op's ``layer`` indexes that list.
"""

from __future__ import annotations

from interp.folded_state import FoldedState


class SSMState(FoldedState):
    """One state-space layer's recurrent state [B, H, P, N], and how many positions it has folded in."""

    what = "SSM state"
