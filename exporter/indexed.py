"""DeepSeek Sparse Attention (DSA) captured as ``paw::index_topk`` feeding ``paw::attention``.

DeepSeek-V3.2, GLM-5, A.X-K2, HY-V4 and dots.3 Note (``deepseek_v32``, ``glm_moe_dsa``,
``axk2``, ``hy_v4``, ``dots3_note_text``) add a "lightning indexer" to multi-head latent
attention: a small multi-head scorer that rates every earlier key for each query and keeps
the ``index_topk`` best; attention then sees only those. transformers folds the choice into
the attention mask as a tensor and keeps the indexer's keys in its cache
(``update_indexer``). A program keeps no cache in the graph, so the recipe
(``exporter/recipes.py``) replaces the attention forward: the indexer's queries, keys and
head weights go to ``paw::index_topk``, whose keys the interpreter caches in a KV slot of
their own (``interp/ops/indexer.py``), and its keep mask goes to ``paw::attention``.
GLM-5's and HY-V4's "shared" layers reuse the previous indexer layer's choice: the mask is
handed on as transformers hands on its top-k indices.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from interp.errors import ExportError


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


@dataclass(frozen=True)
class IndexerForm:
    """How a family's indexer rotates and scales, where transformers' ``Indexer.forward`` differs by family."""

    #: its rotary function, by name in its modeling module (DeepSeek-V3.2 rotates halves, GLM-5 neighbours)
    rotate: str
    #: the rotated channels are the last ``qk_rope_head_dim`` of a head (HY-V4), not the first
    rope_last: bool = False
    #: ``softmax_scale`` multiplies the head weights (HY-V4), not q . k
    scale_weights: bool = False


#: each indexer class's form
INDEXERS = {"DeepseekV32Indexer": IndexerForm("apply_rotary_pos_emb"),
            "AXK2Indexer": IndexerForm("apply_rotary_pos_emb"),
            "GlmMoeDsaIndexer": IndexerForm("apply_rotary_pos_emb_interleave"),
            "Dots3NoteTextIndexer": IndexerForm("apply_rotary_pos_emb_interleave"),
            "HYV4Indexer": IndexerForm("apply_rotary_pos_emb", rope_last=True, scale_weights=True)}


def index_keep(indexer: torch.nn.Module, hidden_states: torch.Tensor, q_resid: torch.Tensor,
               position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The indexer's keep mask [B, L, T] through ``paw::index_topk``: transformers' ``Indexer.forward`` up to its
    scores (``INDEXERS`` holds what differs by family), which the op computes against the cached keys."""
    form = INDEXERS.get(type(indexer).__name__)
    if form is None:  # a new family's indexer: its rotary and scaling are not known to be one of these
        raise ExportError(f"cannot export: paw does not know how {type(indexer).__name__} rotates and scales "
                          "(exporter/indexed.py INDEXERS)")
    batch, length, _ = hidden_states.shape
    rope = indexer.qk_rope_head_dim
    sizes = [indexer.head_dim - rope, rope] if form.rope_last else [rope, indexer.head_dim - rope]
    rotated = 1 if form.rope_last else 0

    def rotary_parts(x: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.split(x, sizes, dim=-1))

    q = rotary_parts(indexer.wq_b(q_resid).view(batch, length, indexer.n_heads, indexer.head_dim))
    norm = indexer.k_norm
    k = rotary_parts(norm(indexer.wk(hidden_states).to(norm.weight.dtype)).to(hidden_states.dtype).unsqueeze(2))
    rotate = getattr(sys.modules[type(indexer).__module__], form.rotate)
    q[rotated], k[rotated] = rotate(q[rotated], k[rotated], *position_embeddings, unsqueeze_dim=2)
    weights = indexer.weights_proj(hidden_states.to(indexer.weights_proj.weight.dtype)).float() * indexer.n_heads**-0.5
    scale = float(indexer.softmax_scale)
    if form.scale_weights:
        weights, scale = weights * scale, 1.0
    return torch.ops.paw.index_topk(torch.cat(q, dim=-1), torch.cat(k, dim=-1).squeeze(2), weights,
                                    int(indexer.layer_idx), int(indexer.index_topk), scale)


#: the MLA rotary of the attention classes that rotate halves (the others rotate neighbours)
MLA_ROTARY = {"HYV4Attention": "apply_rotary_pos_emb"}


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
    """DeepseekV32Attention, GlmMoeDsaAttention, AXK2Attention, HYV4Attention: MLA as transformers computes it,
    the indexer's choice as a keep mask (``index_keep``, or the previous layer's for shared layers), attention as
    ``paw::attention``.

    Returns what the family's forward returns: (output, None), and GLM-5's and HY-V4's keep mask third,
    which their decoders hand to the next layer as ``prev_topk_indices``.
    """
    batch, length = hidden_states.shape[:-1]
    q_resid, q, gate = _queries(self, hidden_states)
    q_pass, q_rot = torch.split(q, [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
    kv_pass, k_rot = torch.split(self.kv_a_proj_with_mqa(hidden_states), [self.kv_lora_rank, self.qk_rope_head_dim],
                                 dim=-1)
    k_pass = self.kv_a_layernorm(kv_pass).view(batch, 1, length, self.kv_lora_rank)
    k_rot = k_rot.view(batch, 1, length, self.qk_rope_head_dim)
    rotate = getattr(sys.modules[type(self).__module__], MLA_ROTARY.get(type(self).__name__,
                                                                         "apply_rotary_pos_emb_interleave"))
    q_rot, k_rot = rotate(q_rot, k_rot, *position_embeddings)
    query = torch.cat((q_pass, q_rot), dim=-1)
    key, value = self.expand_kv(k_pass, k_rot)
    indexer = getattr(self, "indexer", None)
    keep = index_keep(indexer, hidden_states, q_resid, position_embeddings) if indexer is not None \
        else prev_topk_indices
    sinks = getattr(self, "sinks", None)  # HY-V4's, as gpt-oss's
    out = torch.ops.paw.attention(query, key, value, int(self.layer_idx), float(self.scaling), 0, 0.0, 0.0, sinks, 0,
                                  keep)
    out = out.transpose(1, 2).reshape(batch, length, -1)
    if gate is not None:  # A.X-K2's sigmoid gate on the attention output, in float32
        out = (out * torch.sigmoid(gate.float())).to(out.dtype)
    elif hasattr(self, "gate_proj"):  # HY-V4's, from the hidden states
        out = out * torch.sigmoid(self.gate_proj(hidden_states))
    out = self.o_proj(out)
    return (out, None, keep) if hasattr(self, "skip_topk") else (out, None)


def dots3_attention_forward(self, hidden_states, position_embeddings, attention_mask, past_key_values=None,
                            **kwargs):
    """Dots3NoteTextAttention: MLA with scaled latents and a normed rotary key, an indexer on its indexed layers
    (``index_keep``; a sliding layer has none and slides through the attention op's window), a sigmoid gate per
    head; attention as ``paw::attention``."""
    from exporter.masks import AttentionPattern

    batch, length = hidden_states.shape[:-1]
    q_resid = self.q_a_layernorm(self.q_a_proj(hidden_states)) * self.q_lora_scale
    q = self.q_b_proj(q_resid).view(batch, length, -1, self.qk_head_dim).transpose(1, 2)
    q_pass, q_rot = torch.split(q, [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
    kv_pass, k_rot = torch.split(self.kv_a_proj_with_mqa(hidden_states), [self.kv_lora_rank, self.qk_rope_head_dim],
                                 dim=-1)
    k_pass = self.kv_a_layernorm(kv_pass).view(batch, 1, length, self.kv_lora_rank) * self.kv_lora_scale
    k_rot = self.k_rope_only_layernorm(k_rot.view(batch, 1, length, self.qk_rope_head_dim))
    rotate = sys.modules[type(self).__module__].apply_rotary_pos_emb_interleave
    q_dtype, k_dtype = q_rot.dtype, k_rot.dtype
    q_rot, k_rot = rotate(q_rot, k_rot, *position_embeddings)
    query = torch.cat((q_pass, q_rot.to(q_dtype)), dim=-1)
    key, value = self.expand_kv(k_pass, k_rot.to(k_dtype))
    keep = None if self.indexer is None else index_keep(self.indexer, hidden_states, q_resid, position_embeddings)
    window = attention_mask.window if isinstance(attention_mask, AttentionPattern) else 0
    out = torch.ops.paw.attention(query, key, value, int(self.layer_idx), float(self.scaling), int(window), 0.0, 0.0,
                                  None, 0, keep)
    gate = self.g_proj(hidden_states).view(batch, length, -1, 1)
    out = out.transpose(1, 2) * gate.sigmoid()
    return self.o_proj(out.reshape(batch, length, -1)), None
