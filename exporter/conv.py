"""Short causal convolutions captured as one op whose state the interpreter owns.

Hybrid recurrent models (LFM2) run a depthwise causal ``Conv1d`` over the sequence in
some layers. transformers keeps its last K - 1 inputs in its cache; a program keeps no
cache in the graph, so the recipe (``exporter/recipes.py``) routes the convolution to the
custom op ``paw::causal_conv1d``, as attention goes to ``paw::attention``: the graph holds
the new positions only, and the interpreter prepends the conv state
(``interp/conv_cache.py``). The op's reference here is the convolution with zero padding:
a whole sequence from the start, which is what capture runs. The Gated DeltaNet and Mamba 1
families call transformers' module-level ``causal_conv1d_fn`` instead of a module; their
recipes put ``causal_conv1d_fn`` below in its place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from interp.errors import ExportError


@torch.library.custom_op("paw::causal_conv1d", mutates_args=())
def paw_causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reference semantics of the program's ``causal_conv1d`` op, from an empty state.

    x [B, L, C]; weight [C, 1, K] (torch's depthwise layout); bias [C] or None; returns [B, L, C].
    """
    width = weight.shape[-1] - 1
    out = F.conv1d(F.pad(x.transpose(1, 2), (width, 0)), weight, bias, groups=weight.shape[0])
    return out.transpose(1, 2).contiguous()


@paw_causal_conv1d.register_fake
def _paw_causal_conv1d_fake(x, weight, bias=None):
    return torch.empty_like(x)


def lfm2_short_conv_forward(self, hidden_states, past_key_values=None, attention_mask=None, **kwargs):
    """Lfm2ShortConv with its convolution as ``paw::causal_conv1d``, channels last throughout.

    transformers' forward transposes to channels first and chunks there; chunking the
    channels-last projection gives the same B, C, x. The mask it applies to padding is
    unused: a program's rows are never padded through a conv state (``interp/ops/conv.py``).
    """
    gate_in, gate_out, x = self.in_proj(hidden_states).chunk(3, dim=-1)
    conv = torch.ops.paw.causal_conv1d(gate_in * x, self.conv.weight, self.conv.bias)
    return self.out_proj(gate_out * conv)


def causal_conv1d_fn(hidden_states, weight, bias=None, activation=None, **kwargs):
    """transformers' ``causal_conv1d_fn`` (x [B, C, L], weight [C, K]) through ``paw::causal_conv1d``."""
    if activation not in (None, "silu", "swish"):
        raise ExportError(f"cannot export: a causal convolution followed by {activation!r}; paw knows silu")
    x = hidden_states.transpose(1, 2).to(weight.dtype)
    out = torch.ops.paw.causal_conv1d(x, weight.unsqueeze(1), bias)
    out = out if activation is None else F.silu(out)
    return out.transpose(1, 2).to(hidden_states.dtype)
