"""Mamba 1 state-space layers captured as a short convolution and one ``ssm_scan`` op.

Mamba, Falcon-Mamba, Jamba's and Zamba's Mamba layers project the input into x and a gate, run a
depthwise causal convolution over x, project dt, B and C from it (Falcon-Mamba and Jamba
normalise the three), and scan the selective recurrence, whose state transformers keeps
in its cache. Their mixers call two module-level functions on a whole sequence from no
state: ``causal_conv1d_fn`` and ``mamba_selective_scan`` (Zamba's once per Mamba head, its
dt, B and C projected per head: a scan, and an SSM state, per head). The recipe
(``exporter/recipes.py``) swaps them in the modeling module for ``conv.causal_conv1d_fn``
(-> ``paw::causal_conv1d``) and ``selective_scan`` below, so the model's own forward runs
and everything around the two ops stays ordinary ops (the norms, dt's projection).

Mamba 1's scan is the ``ssm_scan`` op's recurrence with one head per channel (P = 1), one
group and a decay per head and state column (A [D, N]), so it shares the op and the SSM
state with Mamba2 (``interp/ops/ssm.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from exporter import ssm  # noqa: F401  (registers paw::ssm_scan)
from exporter.conv import causal_conv1d_fn
from interp.errors import ExportError


def selective_scan(hidden_states, dt, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, **kwargs):
    """transformers' ``mamba_selective_scan`` from no state through ``paw::ssm_scan``: float32 [B, D, L].

    hidden_states, dt, z [B, D, L] (channels first); A [D, N]; B, C [B, N, L]; D [D]. As transformers
    computes it: dt gets its bias and softplus, the scan's output the D skip, then the silu(z) gate.
    """
    if return_last_state:
        raise ExportError("cannot export: the selective scan was asked for its state; capture runs without a cache")
    if delta_bias is not None:
        dt = dt + delta_bias.to(dt.dtype)[..., None]
    if delta_softplus:
        dt = F.softplus(dt)
    x = hidden_states.transpose(1, 2)  # [B, L, D]
    y = torch.ops.paw.ssm_scan(x[..., None], dt.transpose(1, 2), A, B.transpose(1, 2)[:, :, None],
                               C.transpose(1, 2)[:, :, None])  # [B, L, D, 1]: a head per channel, one group
    y = y[..., 0].transpose(1, 2)  # [B, D, L]
    if D is not None:
        y = y + hidden_states * D[None, :, None]
    if z is not None:
        y = y * F.silu(z)
    return y


#: the module-level functions a Mamba 1 mixer calls, and what the recipe puts in their place
FUNCTIONS = {"causal_conv1d_fn": causal_conv1d_fn, "mamba_selective_scan": selective_scan}
