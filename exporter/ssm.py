"""Mamba2 state-space layers captured as ops whose state the interpreter owns (Mamba 1's: exporter/mamba.py).

A Mamba2 mixer (Mamba2, Nemotron-H, Granite 4, Bamba, Zamba2: one forward, line for line;
Falcon-H1's adds muP multipliers) projects the input into a gate, x, B, C and a step dt;
runs a depthwise causal convolution over x, B, C; scans the selective state-space
recurrence; and gates, normalises and projects the result. transformers keeps the
convolution's last inputs and the scan's state in its cache; a program keeps no cache in the
graph, so the recipe (``exporter/recipes.py``) routes the convolution to
``paw::causal_conv1d`` (``exporter/conv.py``) and the scan to ``paw::ssm_scan``; everything
around them (the activation, softplus and bias of dt, the D skip, the gated norm) stays
ordinary ops, as transformers writes them. The scan's reference here is the recurrence from
a zero state: a whole sequence from the start, which is what capture runs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


@torch.library.custom_op("paw::ssm_scan", mutates_args=())
def paw_ssm_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """Reference semantics of the program's ``ssm_scan`` op, from a zero state, in float32.

    x [batch, L, H, P]; dt [batch, L, H] (softplus'd); A [H] (Mamba2) or [H, N] (Mamba 1: a decay per
    state column); B, C [batch, L, G, N]; returns float32 [batch, L, H, P].
    """
    batch, length, heads, size = x.shape
    x, dt = x.float(), dt.float()
    A = A.float() if A.dim() == 2 else A.float()[:, None]  # [H, N or 1]
    B = B.float().repeat_interleave(heads // B.shape[2], dim=2)  # [batch, L, H, N]
    C = C.float().repeat_interleave(heads // C.shape[2], dim=2)
    state = x.new_zeros(batch, heads, size, B.shape[-1])
    outputs = []
    for t in range(length):
        step = (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None]  # [batch, H, P, N]
        state = state * torch.exp(dt[:, t, :, None] * A)[:, :, None, :] + step
        outputs.append(state @ C[:, t, :, :, None])
    return torch.stack(outputs, dim=1)[..., 0]


@paw_ssm_scan.register_fake
def _paw_ssm_scan_fake(x, dt, A, B, C):
    return torch.empty(x.shape, dtype=torch.float32, device=x.device)


def _scan_projected(self, projected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A Mamba2 mixer's convolution and scan over its input projection [B, L, *]: (y float32
    [B, L, H * P] with the D skip, gate).

    dt is clamped to ``time_step_limit`` as transformers' full-sequence path does (its decode
    path does not: the two agree while dt stays within it).
    """
    batch, length, _ = projected.shape
    A = -torch.exp(self.A_log.float())
    gate, xBC, dt = projected.split([self.intermediate_size, self.conv_dim, self.num_heads], dim=-1)
    xBC = self.act(torch.ops.paw.causal_conv1d(xBC, self.conv1d.weight, self.conv1d.bias))
    groups_state = self.n_groups * self.ssm_state_size
    x, B, C = torch.split(xBC, [self.intermediate_size, groups_state, groups_state], dim=-1)
    dt = F.softplus(dt + self.dt_bias.to(dt.dtype))
    low, high = self.time_step_limit
    if low > 0.0 or not math.isinf(high):  # the default (0, inf) is a no-op after softplus
        dt = torch.clamp(dt, min=low, max=None if math.isinf(high) else high)
    x = x.reshape(batch, length, self.num_heads, self.head_dim)
    y = torch.ops.paw.ssm_scan(x, dt, A, B.reshape(batch, length, self.n_groups, self.ssm_state_size),
                               C.reshape(batch, length, self.n_groups, self.ssm_state_size))
    y = y + self.D[..., None] * x.float()  # the D skip, in float32 as transformers adds it
    return y.reshape(batch, length, -1), gate


def mamba2_mixer_forward(self, hidden_states, cache_params=None, attention_mask=None, **kwargs):
    """transformers' Mamba2 mixer without a cache, its convolution and scan as paw ops.

    The mask it applies to padding is unused: a program's rows are never padded through a
    recurrent state (``interp/ops/ssm.py``).
    """
    y, gate = _scan_projected(self, self.in_proj(hidden_states))
    return self.out_proj(self.norm(y, gate).to(hidden_states.dtype))


def falcon_h1_mixer_forward(self, hidden_states, cache_params=None, attention_mask=None, **kwargs):
    """FalconH1Mixer: the Mamba2 mixer with muP multipliers on its input and projection, gated by
    its norm or, without one (``mamba_rms_norm`` false), by silu(gate) alone."""
    y, gate = _scan_projected(self, self.in_proj(hidden_states * self.ssm_in_multiplier) * self.mup_vector)
    y = self.norm(y, gate) if self.mamba_rms_norm else y * F.silu(gate)
    return self.out_proj(y.to(hidden_states.dtype))
