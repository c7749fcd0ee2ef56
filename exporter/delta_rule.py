"""Gated DeltaNet layers captured as a short convolution and one gated-delta-rule op.

Qwen3.5, Qwen3-Next, OLMo Hybrid and Kimi Linear mix attention layers with Gated DeltaNet
layers: a causal convolution over the projected q, k, v, then linear attention by the
gated delta rule, whose state transformers keeps in its cache. Their forwards differ only
in the projections around two module-level functions they all call on a whole sequence:
``causal_conv1d_fn`` (channels first, silu after) and ``torch_chunk_gated_delta_rule``
(Kimi Linear's ``chunk_kimi_delta_attention``, whose decay has one value per key channel),
from no state. The recipe (``exporter/recipes.py``) swaps those two functions in the
model's modeling module for the ones below, which call ``paw::causal_conv1d`` and
``paw::gated_delta_rule``: the model's own forward runs, and the graph holds the new
positions only while the interpreter keeps both states (``interp/conv_cache.py``,
``interp/delta_state.py``).

The L2 norm of q and k (``use_qk_l2norm_in_kernel``) and the grouping of value heads
stay outside the op, as ordinary float32 ops in the graph, which keeps the op the rule
alone. The op's reference here is transformers' recurrent rule from a zero state.
"""

from __future__ import annotations

import torch

from exporter.conv import causal_conv1d_fn
from interp.errors import ExportError


@torch.library.custom_op("paw::gated_delta_rule", mutates_args=())
def paw_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                         scale: float) -> torch.Tensor:
    """Reference semantics of the program's ``gated_delta_rule`` op, from a zero state.

    q, k [B, L, Hk, Dk]; v [B, L, H, Dv] with H a multiple of Hk; g [B, L, H] (log-decay) or
    [B, L, H, Dk] (per key channel); beta [B, L, H]; returns [B, L, H, Dv] in v's dtype,
    computed in float32 as transformers' ``torch_recurrent_gated_delta_rule`` does.
    """
    group = v.shape[2] // k.shape[2]
    q, k = (x.float().repeat_interleave(group, dim=2) for x in (q, k))
    q = q * scale
    v32, beta = v.float(), beta.float()
    decay = g.float().exp()
    decay = decay[..., None, None] if g.dim() == 3 else decay[..., None]
    state = torch.zeros(v.shape[0], v.shape[2], k.shape[3], v.shape[3], dtype=torch.float32)
    outs = []
    for t in range(v.shape[1]):
        state = state * decay[:, t]
        remembered = (state * k[:, t, :, :, None]).sum(dim=-2)
        delta = (v32[:, t] - remembered) * beta[:, t, :, None]
        state = state + k[:, t, :, :, None] * delta[:, :, None, :]
        outs.append((state * q[:, t, :, :, None]).sum(dim=-2))
    return torch.stack(outs, dim=1).to(v.dtype)


@paw_gated_delta_rule.register_fake
def _paw_gated_delta_rule_fake(q, k, v, g, beta, scale):
    return torch.empty_like(v)


def _l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """transformers' (and FLA's) ``l2norm`` over the last axis."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def chunk_gated_delta_rule(query, key, value, g, beta, chunk_size=64, initial_state=None, output_final_state=False,
                           use_qk_l2norm_in_kernel=False, **kwargs):
    """``torch_chunk_gated_delta_rule`` from no state, as ``paw::gated_delta_rule``: (out [B, L, H, Dv], None)."""
    if initial_state is not None:
        raise ExportError("cannot export: the gated delta rule was called with a state; capture runs whole sequences")
    dtype = query.dtype
    query, key = query.float(), key.float()
    if use_qk_l2norm_in_kernel:
        query, key = _l2norm(query), _l2norm(key)
    out = torch.ops.paw.gated_delta_rule(query, key, value, g, beta, query.shape[-1] ** -0.5)
    return out.to(dtype), None


#: the module-level functions a Gated DeltaNet forward calls, and what the recipe puts in their place
FUNCTIONS = {"causal_conv1d_fn": causal_conv1d_fn, "torch_chunk_gated_delta_rule": chunk_gated_delta_rule,
             "chunk_kimi_delta_attention": chunk_gated_delta_rule}
