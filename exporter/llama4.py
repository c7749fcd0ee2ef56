"""Llama 4's capture recipe: attention temperature from the positions a program is given, sparse experts.

Llama 4's NoPE layers (no rotary) scale their queries by a temperature that grows with
the query's position (``attn_temperature_tuning``, arXiv 2501.19399). transformers counts
that position from its cache: ``arange(length) + past_key_values.get_seq_length()``.
Captured without a cache, that is ``arange(length)``, which a program would then apply
to every decode step as if it were the first token. The decoder layer here hands its
``position_ids`` (the program's input) to the attention, which scales by them instead:
the same numbers for an unpadded sequence, and each row's own positions in a padded batch.
The rest is transformers' code as it stands (5.23): rotary, L2 q/k norm, the attention
interface (-> ``paw::attention``, chunked on the local layers, exporter/masks.py).

Its MoE block runs every expert on every token (bypassing the experts interface); the
recipe routes each token through its top-k experts only (``moe_forward``).
"""

from __future__ import annotations

import sys

import torch


def temperature(self, position_ids: torch.Tensor) -> torch.Tensor:
    """[B, L, 1, 1] query scales of a NoPE layer: 1 + attn_scale * log1p(floor((position + 1) / floor_scale))."""
    scales = torch.log1p(torch.floor((position_ids.float() + 1.0) / self.floor_scale)) * self.attn_scale + 1.0
    return scales[..., None, None]


def attention_forward(self, hidden_states, position_embeddings, attention_mask, past_key_values=None,
                      position_ids=None, **kwargs):
    """Llama4TextAttention.forward, its temperature counted from ``position_ids`` (see the module docstring)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    modeling = sys.modules[type(self).__module__]
    input_shape = hidden_states.shape[:-1]
    shape = (*input_shape, -1, self.head_dim)
    query = self.q_proj(hidden_states).view(shape)
    key = self.k_proj(hidden_states).view(shape)
    value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
    if self.use_rope:
        query, key = modeling.apply_rotary_emb(query, key, position_embeddings.to(query.device))
    if hasattr(self, "qk_norm"):
        query, key = self.qk_norm(query), self.qk_norm(key)
    if self.attn_temperature_tuning and not self.use_rope:
        query = (query * temperature(self, position_ids)).to(query.dtype)
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                      modeling.eager_attention_forward)
    out, weights = interface(self, query.transpose(1, 2), key.transpose(1, 2), value, attention_mask, dropout=0.0,
                             scaling=self.scaling, **kwargs)
    return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


def decoder_forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                    use_cache=False, position_embeddings=None, **kwargs):
    """Llama4TextDecoderLayer.forward, handing ``position_ids`` on to its attention."""
    residual = hidden_states
    attended, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states),
                                 position_embeddings=position_embeddings, attention_mask=attention_mask,
                                 position_ids=position_ids, **kwargs)
    hidden_states = residual + attended
    residual = hidden_states
    hidden_states = self.feed_forward(self.post_attention_layernorm(hidden_states))
    if self.is_moe_layer:
        hidden_states, _ = hidden_states
    return residual + hidden_states.view(residual.shape)


def moe_forward(self, hidden_states):
    """Llama4TextMoe.forward with only the routed experts in sparse mode (``paw::expert_linear``).

    transformers runs every expert on every token, each on the token scaled by its score
    (sigmoid of the router's top-k logits, 0 elsewhere). Sparse, each token goes through
    its top-k experts only, scaled the same way: an expert sees x * score, not its output
    weighted. Dense mode (``--experts dense``) keeps transformers' form.
    """
    from exporter.experts import current_mode

    x = hidden_states.reshape(-1, self.hidden_dim)
    logits = torch.nn.functional.linear(x, self.router.weight)  # [T, E], as Llama4Router computes them
    top, index = torch.topk(logits, self.top_k, dim=1)
    if current_mode() == "dense":  # transformers' own form
        scores = torch.full_like(logits, float("-inf")).scatter(1, index, top)
        scores = torch.sigmoid(scores.float()).to(x.dtype).transpose(0, 1)  # [E, T]
        routed = self.experts(x.repeat(scores.shape[0], 1) * scores.reshape(-1, 1))
        return self.shared_expert(x) + routed.reshape(scores.shape[0], -1, self.hidden_dim).sum(dim=0), logits
    scaled = x.unsqueeze(1) * torch.sigmoid(top.float()).to(x.dtype).unsqueeze(-1)  # [T, k, D]
    experts = self.experts
    gate, up = torch.ops.paw.expert_linear(scaled, experts.gate_up_proj.transpose(1, 2), index).chunk(2, dim=-1)
    routed = torch.ops.paw.expert_linear(up * experts.act_fn(gate), experts.down_proj.transpose(1, 2), index)
    return self.shared_expert(x) + routed.sum(dim=1), logits
