"""DeepSeek Sparse Attention (DSA) captured as ``paw::index_topk`` feeding ``paw::attention``.

DeepSeek-V3.2, GLM-5 and A.X-K2 (``deepseek_v32``, ``glm_moe_dsa``, ``axk2``) add a "lightning indexer" to
multi-head latent attention: a small multi-head scorer that rates every earlier key for each
query and keeps the ``index_topk`` best; attention then sees only those. transformers folds
the choice into the attention mask as a tensor and keeps the indexer's keys in its cache
(``update_indexer``). A program keeps no cache in the graph, so the recipe
(``exporter/recipes.py``) replaces the attention forward: the indexer's queries, keys and
head weights go to ``paw::index_topk``, whose keys the interpreter caches in a KV slot of
their own (``interp/ops/indexer.py``), and its keep mask goes to ``paw::attention``. GLM-5's
"shared" layers reuse the previous indexer layer's choice: the mask is handed on as
transformers hands on its top-k indices.
"""

from __future__ import annotations

import sys

import torch


@torch.library.custom_op("paw::index_topk", mutates_args=())
def paw_index_topk(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, layer: int, topk: int,
                   scale: float) -> torch.Tensor:
    """Reference semantics of the program's ``index_topk`` op over a whole sequence (no cache).

    q [B, L, H, D], k [B, L, D], weights [B, L, H]; returns bool [B, L, L], True at the keys each
    query keeps: its ``topk`` best-scoring earlier keys (all of them while there are at most
    ``topk``), ties at the k-th score kept.
    """
    scores = torch.relu((q.float() @ k.float().transpose(-1, -2).unsqueeze(1)) * scale)  # [B, L, H, L]
    index = (weights.float().unsqueeze(-2) @ scores).squeeze(-2)  # [B, L, L]
    length = q.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    index = index.masked_fill(~causal, float("-inf"))
    if length <= topk:
        return torch.ones_like(index, dtype=torch.bool)
    kth = index.topk(topk, dim=-1).values[..., -1:]
    return index >= kth


@paw_index_topk.register_fake
def _paw_index_topk_fake(q, k, weights, layer, topk, scale):
    return torch.empty(q.shape[:2] + (k.shape[1],), dtype=torch.bool, device=q.device)


def index_keep(indexer: torch.nn.Module, hidden_states: torch.Tensor, q_resid: torch.Tensor,
               position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The indexer's keep mask [B, L, T] through ``paw::index_topk``: transformers' ``Indexer.forward`` up to its
    scores, which the op computes against the cached keys.

    DeepSeek-V3.2's indexer rotates halves (``apply_rotary_pos_emb``), GLM-5's neighbours
    (``apply_rotary_pos_emb_interleave``); ``ROTARY`` names each indexer class's function.
    """
    batch, length, _ = hidden_states.shape
    rope = indexer.qk_rope_head_dim
    rotate = getattr(sys.modules[type(indexer).__module__], ROTARY[type(indexer).__name__])
    q = indexer.wq_b(q_resid).view(batch, length, indexer.n_heads, indexer.head_dim)
    q_rot, q_pass = torch.split(q, [rope, indexer.head_dim - rope], dim=-1)
    k = indexer.k_norm(indexer.wk(hidden_states)).unsqueeze(2)  # [B, L, 1, D]
    k_rot, k_pass = torch.split(k, [rope, indexer.head_dim - rope], dim=-1)
    q_rot, k_rot = rotate(q_rot, k_rot, *position_embeddings, unsqueeze_dim=2)
    q = torch.cat([q_rot, q_pass], dim=-1)
    k = torch.cat([k_rot, k_pass], dim=-1).squeeze(2)
    weights = indexer.weights_proj(hidden_states.to(indexer.weights_proj.weight.dtype)).float() * indexer.n_heads**-0.5
    return torch.ops.paw.index_topk(q, k, weights, int(indexer.layer_idx), int(indexer.index_topk),
                                    float(indexer.softmax_scale))


#: each indexer class's rotary function, by name in its modeling module
ROTARY = {"DeepseekV32Indexer": "apply_rotary_pos_emb", "AXK2Indexer": "apply_rotary_pos_emb",
          "GlmMoeDsaIndexer": "apply_rotary_pos_emb_interleave"}


def _queries(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The query LoRA's normed latent [B, L, q_lora_rank], the queries [B, H, L, qk_head_dim] and the output gate
    [B, L, H * v_head_dim] (None but for A.X-K2, whose one projection of the latent and its unnormed self gives
    both queries and gate)."""
    batch, length = hidden_states.shape[:-1]
    compressed = self.q_a_proj(hidden_states)
    q_resid = self.q_a_layernorm(compressed)
    if not hasattr(self, "q_gate_proj"):
        return q_resid, self.q_b_proj(q_resid).view(batch, length, -1, self.qk_head_dim).transpose(1, 2), None
    fused = self.q_gate_proj(torch.cat([q_resid, compressed], dim=-1)).view(batch, length, -1,
                                                                            self.qk_head_dim + self.v_head_dim)
    q, gate = torch.split(fused, [self.qk_head_dim, self.v_head_dim], dim=-1)
    return q_resid, q.transpose(1, 2), gate.reshape(batch, length, -1)


def dsa_attention_forward(self, hidden_states, position_embeddings, attention_mask, past_key_values=None,
                          position_ids=None, prev_topk_indices=None, **kwargs):
    """DeepseekV32Attention / GlmMoeDsaAttention / AXK2Attention: MLA as transformers computes it, the indexer's
    choice as a keep mask (``index_keep``, or the previous layer's for GLM-5's shared layers), attention as
    ``paw::attention``.

    Returns what the family's forward returns: (output, None), and GLM-5's keep mask third, which its
    decoder hands to the next layer as ``prev_topk_indices``.
    """
    batch, length = hidden_states.shape[:-1]
    q_resid, q, gate = _queries(self, hidden_states)
    q_pass, q_rot = torch.split(q, [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
    kv_pass, k_rot = torch.split(self.kv_a_proj_with_mqa(hidden_states), [self.kv_lora_rank, self.qk_rope_head_dim],
                                 dim=-1)
    k_pass = self.kv_a_layernorm(kv_pass).view(batch, 1, length, self.kv_lora_rank)
    k_rot = k_rot.view(batch, 1, length, self.qk_rope_head_dim)
    rotate = sys.modules[type(self).__module__].apply_rotary_pos_emb_interleave
    q_rot, k_rot = rotate(q_rot, k_rot, *position_embeddings)
    query = torch.cat((q_pass, q_rot), dim=-1)
    key, value = self.expand_kv(k_pass, k_rot)
    indexer = getattr(self, "indexer", None)
    keep = index_keep(indexer, hidden_states, q_resid, position_embeddings) if indexer is not None \
        else prev_topk_indices
    out = torch.ops.paw.attention(query, key, value, int(self.layer_idx), float(self.scaling), 0, 0.0, 0.0, None, 0,
                                  keep)
    out = out.transpose(1, 2).reshape(batch, length, -1)
    if gate is not None:  # A.X-K2's sigmoid gate on the attention output
        out = (out * torch.sigmoid(gate.float())).to(out.dtype)
    out = self.o_proj(out)
    return (out, None, keep) if hasattr(self, "skip_topk") else (out, None)
