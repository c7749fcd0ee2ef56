"""The one table of per-family capture recipes.

paw captures a model's own forward with torch.export, so nearly every decoder-only
architecture needs nothing here: its attention goes through transformers' attention
interface (-> ``paw::attention``) and its expert blocks through the experts interface
(-> ``exporter.experts``). A family appears in ``RECIPES`` only when its code bypasses
those interfaces; the recipe then swaps the bypassing module's forward for one that
calls the paw op, for the duration of the capture only.

| model_type | why | what the recipe does |
| --- | --- | --- |
| bloom | hand-written ALiBi attention (``baddbmm``) | forward calls ``paw::attention``, ``alibi_max_bias=8`` |
| gptj, codegen | hand-written ``_attn`` (scores / sqrt(head_dim) + mask) | ``_attn`` calls ``paw::attention`` |
| gpt_neo | hand-written ``_attn``, unscaled, local layers masked | ``_attn`` calls ``paw::attention`` (window) |
| xglm | hand-written attention (scaled queries, mask added to scores) | forward calls ``paw::attention`` |
| mpt | hand-written ALiBi attention | forward calls ``paw::attention``, ``alibi_max_bias=8`` (slopes checked) |
| falcon | hand-written attention (rotary; falcon-rw: ALiBi) | forward calls ``paw::attention``; ALiBi refused |
| dbrx | expert block loops over the experts it hits (``nonzero``) | forward calls ``experts.route`` |
| jetmoe | MLP and attention experts grouped by sizes read with ``tolist()`` | ``experts.route``, ``expert_linear`` |
| jetmoe | keys and values tiled once per attention expert slot | queries regrouped by key head: keys cached once |
| phimoe | rotary picks its longrope mscale with a Python ``if`` on the positions | the same choice as a ``where`` |
| llama4_text | NoPE query temperature counts the cache; every expert runs on every token | ``position_ids``; routed |
| lfm2, lfm2_moe, lfm3 | short convolutions keep their last inputs in a cache | ``paw::causal_conv1d`` (conv state) |
| qwen3_5*, qwen3_next, olmo_hybrid, kimi_linear | Gated DeltaNet layers keep conv and delta states | two functions |
| qwen3_5* | M-RoPE's strided frequency writes | plain RoPE, which M-RoPE is on text |
| mamba2, nemotron_h, granitemoehybrid, bamba, zamba2 | Mamba2 mixers keep conv, SSM states | ``ssm_scan`` |
| falcon_h1 | the same mixer with muP multipliers | ``ssm_scan`` and the multipliers |
| mamba, falcon_mamba, jamba, zamba | Mamba 1 mixers keep conv, SSM states | two functions (``ssm_scan``, A per state) |
| recurrent_gemma | RG-LRU blocks keep conv, recurrent states on the modules | ``causal_conv1d``, ``lru_scan`` |
| deepseek_v32, glm_moe_dsa, axk2, hy_v4, dots3_note_text | DSA: indexer top-k masked by hand | ``index_topk`` |

A key names the module class, or ``Class.method`` for a method other than ``forward``; a recipe's
``functions`` replace module-level functions of the model's modeling modules by name (the Gated
DeltaNet families': ``causal_conv1d_fn`` -> ``paw::causal_conv1d``, ``torch_chunk_gated_delta_rule``
-> ``paw::gated_delta_rule``, ``exporter/delta_rule.py``; the Mamba 1 families' ``causal_conv1d_fn``
and ``mamba_selective_scan`` -> ``paw::ssm_scan``, ``exporter/mamba.py``). A recipe's
``layer_types`` are the layer kinds (``config.layer_types``) beyond plain attention it captures with an op
whose state the interpreter owns (recurrent states; DSA's ``indexed_attention``, exporter/indexed.py);
capture refuses every other kind.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from exporter import conv, delta_rule, indexed, llama4, mamba, mrope, rg_lru, ssm
from interp.errors import ExportError


@dataclass(frozen=True)
class Recipe:
    """How to capture one family: module class name (or ``Class.method``) -> replacement, config tweaks."""

    why: str
    forwards: dict[str, Callable] = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    #: run on the model before capture; raises ExportError where the replacements would not be exact
    check: Callable[[torch.nn.Module], None] | None = None
    #: recurrent layer kinds the replacements capture with a stateful op (exporter/conv.py, exporter/ssm.py)
    layer_types: frozenset[str] = frozenset()
    #: module-level function name -> replacement, in every modeling module of the model's classes
    functions: dict[str, Callable] = field(default_factory=dict)


def _bloom_attention_forward(self, hidden_states, residual, alibi, attention_mask, layer_past=None,
                             use_cache=False, output_attentions=False, **kwargs):
    """BloomAttention with the paw attention op; ALiBi's slopes are BLOOM's (max bias 8)."""
    batch, length, _ = hidden_states.shape
    fused = self.query_key_value(hidden_states).view(batch, length, self.num_heads, 3, self.head_dim)
    q, k, v = (fused[..., i, :].transpose(1, 2) for i in range(3))
    out = torch.ops.paw.attention(q, k, v, int(self.layer_idx), float(self.inv_norm_factor), 0, 0.0, 8.0)
    out = out.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim)
    out = residual + F.dropout(self.dense(out), p=self.hidden_dropout, training=self.training)
    return out, None


def _window(attention_mask) -> int:
    """The sliding window the model's mask carries to a hand-written attention (exporter/masks.py)."""
    from exporter.masks import AttentionPattern

    return attention_mask.window if isinstance(attention_mask, AttentionPattern) else 0


def _scaled_attn(self, query, key, value, attention_mask=None):
    """GPT-J's and CodeGen's ``_attn`` (q, k, v [B, H, L, D]; scores / scale_attn) with the paw attention op."""
    out = torch.ops.paw.attention(query, key, value, 0, 1.0 / float(self.scale_attn), _window(attention_mask), 0.0)
    return out, None


def _gpt_neo_attn(self, query, key, value, attention_mask=None):
    """GPTNeoSelfAttention._attn with the paw attention op: unscaled scores; local layers see window_size keys."""
    window = self.config.window_size if self.attention_type == "local" else _window(attention_mask)
    return torch.ops.paw.attention(query, key, value, 0, 1.0, int(window), 0.0), None


def _falcon_attention_forward(self, hidden_states, alibi, attention_mask, position_ids=None, layer_past=None,
                              use_cache=False, output_attentions=False, position_embeddings=None, **kwargs):
    """FalconAttention (rotary) with the paw attention op."""
    if alibi is not None:
        raise ExportError("cannot export: Falcon with ALiBi (falcon-rw) scales ALiBi with the scores, which the "
                          "attention op's ALiBi does not do")
    kv_heads = self.num_heads if self.new_decoder_architecture else self.num_kv_heads
    q, k, v = self._split_heads(self.query_key_value(hidden_states))
    batch, length = q.shape[:2]
    q = q.transpose(1, 2).reshape(batch, self.num_heads, length, self.head_dim)
    k = k.transpose(1, 2).reshape(batch, kv_heads, length, self.head_dim)
    v = v.transpose(1, 2).reshape(batch, kv_heads, length, self.head_dim)
    q, k = sys.modules[type(self).__module__].apply_rotary_pos_emb(q, k, *position_embeddings)
    out = torch.ops.paw.attention(q, k, v, 0, self.head_dim**-0.5, _window(attention_mask), 0.0)
    out = out.permute(0, 2, 1, 3).reshape(batch, length, self.num_heads * self.head_dim)
    return self.dense(out), None


@torch.no_grad()
def _phimoe_rotary_forward(self, x, position_ids=None):
    """PhimoeRotaryEmbedding.forward with its long/short mscale chosen by ``torch.where``, not ``if``."""
    params = self.config.rope_parameters
    inv_freq, mscale = self.rope_init_fn(self.config)
    if params["rope_type"] != "default":
        beyond = torch.max(position_ids) + 1 > params["original_max_position_embeddings"]
        mscale = torch.where(beyond, params["long_mscale"], params["short_mscale"])
    freqs = position_ids[..., None].float() * inv_freq.to(device=x.device, dtype=torch.float)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * mscale).to(x.dtype), (emb.sin() * mscale).to(x.dtype)


def _xglm_attention_forward(self, hidden_states, key_value_states=None, past_key_values=None, attention_mask=None,
                            **kwargs):
    """XGLMAttention (scaled queries, the mask added to the scores by hand) with the paw attention op."""
    if key_value_states is not None:
        raise ExportError("cannot export: XGLM with cross-attention; a program's attention is causal self-attention")
    batch, length, _ = hidden_states.shape
    q, k, v = (proj(hidden_states).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
               for proj in (self.q_proj, self.k_proj, self.v_proj))
    out = torch.ops.paw.attention(q, k, v, 0, float(self.scaling), _window(attention_mask), 0.0)
    return self.out_proj(out.transpose(1, 2).reshape(batch, length, self.embed_dim)), None


#: the max bias transformers' MPT builds its ALiBi slopes with (``build_mpt_alibi_tensor``'s default)
MPT_ALIBI_MAX_BIAS = 8.0


def _check_mpt_alibi(model: torch.nn.Module) -> None:
    """Refuse MPT unless transformers' ALiBi slopes are the attention op's (``alibi_max_bias`` 8) for its heads.

    MPT's bias for key j is slope * (j - last key), BLOOM's (the op's) slope * j: the two
    differ by a constant along each row of scores, which softmax ignores; the slopes must agree.
    """
    from exporter.attention_reference import alibi_slopes

    heads = model.config.n_heads
    bias = sys.modules[type(model).__module__].build_mpt_alibi_tensor(heads, 2)  # [heads, 1, 2]: -slope, 0
    theirs, ours = -bias[:, 0, 0].float(), alibi_slopes(heads, MPT_ALIBI_MAX_BIAS)
    if not torch.allclose(theirs, ours, rtol=1e-6, atol=0.0):
        raise ExportError(f"cannot export: MPT's ALiBi slopes for {heads} heads are not the attention op's "
                          f"(max bias {MPT_ALIBI_MAX_BIAS:g}): {theirs.tolist()} against {ours.tolist()}")


def _mpt_attention_forward(self, hidden_states, position_bias, past_key_values=None, attention_mask=None, **kwargs):
    """MptAttention (ALiBi added to scores by hand) with the paw attention op (slopes: ``_check_mpt_alibi``)."""
    batch, length = hidden_states.shape[:2]
    qkv = self.Wqkv(hidden_states)
    if self.clip_qkv:
        qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
    q, k, v = (part.reshape(batch, length, self.n_heads, self.head_dim).transpose(1, 2) for part in qkv.chunk(3, dim=2))
    out = torch.ops.paw.attention(q, k, v, 0, float(self.softmax_scale), _window(attention_mask), 0.0,
                                  MPT_ALIBI_MAX_BIAS)
    return self.out_proj(out.permute(0, 2, 1, 3).reshape(batch, length, -1)), None


def _dbrx_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """DbrxExperts (a loop over the experts hit, which torch.export cannot capture) through ``experts.route``.

    Its w1, v1 and w2 stack each expert's [ffn, hidden] matrices; w2 is applied untransposed.
    """
    from exporter.experts import route

    batch = hidden_states.shape[0]
    split = (-1, self.ffn_hidden_size, self.hidden_size)
    w1, v1, w2 = (weight.view(split) for weight in (self.mlp.w1, self.mlp.v1, self.mlp.w2))

    def mlp(project, x):
        inner = self.mlp.activation_fn(project(x, w1)) * project(x, v1)
        return project(inner, w2.transpose(1, 2))

    out = route(hidden_states.reshape(-1, self.hidden_size), top_k_index, top_k_weights, mlp)
    return out.view(batch, -1, self.hidden_size)


def _jetmoe_gates(router, x):
    """JetMoeTopKGating's choice for x [T, D] without its sort by expert: weights and expert ids [T, k], logits."""
    logits = router.layer(x).float()
    top_logits, top_index = logits.topk(router.top_k, dim=1)
    return torch.softmax(top_logits, dim=1).type_as(x), top_index, logits


def _jetmoe_moe_forward(self, layer_input):
    """JetMoeMoE (experts grouped by ``tolist()`` sizes, data-dependent) through ``experts.route``."""
    from exporter.experts import route

    batch, length, width = layer_input.shape
    x = layer_input.reshape(-1, width)
    weights, index, _ = _jetmoe_gates(self.router, x)

    def mlp(project, h):
        gate, up = project(h, self.input_linear.weight).chunk(2, dim=-1)
        return project(self.activation(gate) * up, self.output_linear.weight)

    return route(x, index, weights, mlp).view(batch, length, width) + self.bias


def _jetmoe_moa_map(self, layer_input):
    """JetMoeMoA.map: each token's query through its top-k query experts, [B, L, k, hidden]."""
    batch, length, width = layer_input.shape
    x = layer_input.reshape(-1, width)
    weights, index, logits = _jetmoe_gates(self.router, x)
    queries = torch.ops.paw.expert_linear(x.unsqueeze(1), self.input_linear.weight, index)  # [T, k, hidden]
    return queries.view(batch, length, self.top_k, -1), logits, (weights, index)


def _jetmoe_moa_reduce(self, layer_input, topo_info):
    """JetMoeMoA.reduce: each of the k attention outputs through its expert's output projection, weighted."""
    batch, length, k, hidden = layer_input.shape
    weights, index = topo_info
    out = torch.ops.paw.expert_linear(layer_input.reshape(-1, k, hidden), self.output_linear.weight, index)
    out = (out * weights.unsqueeze(-1)).sum(dim=1)  # [T, D]
    return out.view(batch, length, -1) + self.bias


def _jetmoe_attention_forward(self, hidden_states, attention_mask=None, position_embeddings=None, past_key_values=None,
                              **kwargs):
    """JetMoeAttention with each key and value head cached once, not tiled once per expert slot.

    Its k expert slots each bring kv_heads query heads, slot-major (head s * kv_heads + j
    reads key head j, which it tiles k times); regrouped key-head-major (head j * k + s), the
    queries read the untiled keys as grouped-query attention does, and the output goes back.
    """
    batch, length = hidden_states.shape[:2]
    slots, heads, size = self.top_k, self.num_key_value_heads, self.head_dim
    queries, router_logits, topo_info = self.experts.map(hidden_states)  # [B, L, k, heads * size]
    q = queries.view(batch, length, slots * heads, size).transpose(1, 2)
    k, v = (part.view(batch, length, heads, size).transpose(1, 2) for part in self.kv_proj(hidden_states).chunk(2, -1))
    q, k = sys.modules[type(self).__module__].apply_rotary_pos_emb(q, k, *position_embeddings)
    q = q.view(batch, slots, heads, length, size).transpose(1, 2).reshape(batch, heads * slots, length, size)
    out = torch.ops.paw.attention(q, k, v, 0, float(self.scaling), _window(attention_mask), 0.0)
    out = out.view(batch, heads, slots, length, size).permute(0, 3, 2, 1, 4)  # [B, L, k, heads, size]
    out = self.experts.reduce(out.reshape(batch, length, slots, heads * size), topo_info)
    return out.view(batch, length, -1), None, router_logits


RECIPES: dict[str, Recipe] = {
    "xglm": Recipe(why="hand-written attention", forwards={"XGLMAttention": _xglm_attention_forward}),
    "mpt": Recipe(why="hand-written ALiBi attention", forwards={"MptAttention": _mpt_attention_forward},
                  check=_check_mpt_alibi),
    "jetmoe": Recipe(why="experts grouped by data-dependent sizes (tolist)", forwards={
        "JetMoeMoE": _jetmoe_moe_forward, "JetMoeMoA.map": _jetmoe_moa_map, "JetMoeMoA.reduce": _jetmoe_moa_reduce,
        "JetMoeAttention": _jetmoe_attention_forward}),
    "dbrx": Recipe(why="experts looped by hand", forwards={"DbrxExperts": _dbrx_experts_forward}),
    "bloom": Recipe(why="hand-written ALiBi attention", forwards={"BloomAttention": _bloom_attention_forward}),
    "gptj": Recipe(why="hand-written attention", forwards={"GPTJAttention._attn": _scaled_attn}),
    "codegen": Recipe(why="hand-written attention", forwards={"CodeGenAttention._attn": _scaled_attn}),
    "falcon": Recipe(why="hand-written attention", forwards={"FalconAttention": _falcon_attention_forward}),
    "phimoe": Recipe(why="data-dependent rotary scale", forwards={"PhimoeRotaryEmbedding": _phimoe_rotary_forward}),
    "gpt_neo": Recipe(why="hand-written attention, local layers windowed",
                      forwards={"GPTNeoSelfAttention._attn": _gpt_neo_attn}),
    "llama4_text": Recipe(why="query temperature from the cache length; experts run densely", forwards={
        "Llama4TextAttention": llama4.attention_forward, "Llama4TextDecoderLayer": llama4.decoder_forward,
        "Llama4TextMoe": llama4.moe_forward}),
    "lfm2": Recipe(why="short convolutions with state", forwards={"Lfm2ShortConv": conv.lfm2_short_conv_forward},
                   layer_types=frozenset({"conv"})),
    "lfm2_moe": Recipe(why="short convolutions with state",
                       forwards={"Lfm2MoeShortConv": conv.lfm2_short_conv_forward}, layer_types=frozenset({"conv"})),
    "lfm3": Recipe(why="short convolutions with state (LFM2's)",
                   forwards={"Lfm3ShortConv": conv.lfm2_short_conv_forward}, layer_types=frozenset({"conv"})),
    **{model_type: Recipe(why="Mamba2 mixers with conv and SSM state", forwards={mixer: ssm.mamba2_mixer_forward},
                          layer_types=frozenset({"linear_attention"}))
       for model_type, mixer in (("mamba2", "Mamba2Mixer"), ("nemotron_h", "NemotronHMamba2Mixer"),
                                 ("granitemoehybrid", "GraniteMoeHybridMambaLayer"), ("bamba", "BambaMixer"))},
    "falcon_h1": Recipe(why="Mamba2 mixers (muP multipliers) with conv and SSM state",
                        forwards={"FalconH1Mixer": ssm.falcon_h1_mixer_forward}, layer_types=frozenset({"hybrid"})),
    # Zamba2's "hybrid" layers run its shared attention block, then a Mamba2 mixer
    "zamba2": Recipe(why="Mamba2 mixers with conv and SSM state",
                     forwards={"Zamba2MambaMixer": ssm.mamba2_mixer_forward},
                     layer_types=frozenset({"linear_attention", "hybrid"})),
    **{model_type: Recipe(why="indexer-selected sparse attention (DSA), indexer keys cached",
                          forwards={attention: indexed.dsa_attention_forward},
                          layer_types=frozenset({"indexed_attention"}))
       for model_type, attention in (("deepseek_v32", "DeepseekV32Attention"), ("glm_moe_dsa", "GlmMoeDsaAttention"),
                                     ("axk2", "AXK2Attention"), ("hy_v4", "HYV4Attention"))},
    "dots3_note_text": Recipe(why="indexer-selected sparse attention (DSA) beside sliding layers",
                              forwards={"Dots3NoteTextAttention": indexed.dots3_attention_forward},
                              layer_types=frozenset({"indexed_attention"})),
}
#: Gated DeltaNet hybrids: their forwards call the same two functions (exporter/delta_rule.py); Qwen3.5's
#: text rotary embedding is M-RoPE, which on text is plain RoPE (exporter/mrope.py)
_QWEN3_5_ROTARY = {"Qwen3_5TextRotaryEmbedding": mrope.text_rotary_forward,
                   "Qwen3_5MoeTextRotaryEmbedding": mrope.text_rotary_forward}
RECIPES.update({name: Recipe(why="Gated DeltaNet layers with conv and recurrent state", functions=delta_rule.FUNCTIONS,
                             forwards=_QWEN3_5_ROTARY if name.startswith("qwen3_5") else {},
                             layer_types=frozenset({"linear_attention"}))
                for name in ("qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text", "qwen3_next",
                             "olmo_hybrid", "kimi_linear")})
#: Mamba 1 families: their mixers call the same two functions (exporter/mamba.py; Zamba's once per Mamba head);
#: Jamba's layers_block_type says "mamba" where layer_types says "linear_attention"; Zamba's "hybrid" layers run
#: its shared attention block, then a Mamba 1 mixer
RECIPES.update({name: Recipe(why="Mamba 1 mixers with conv and SSM state", functions=mamba.FUNCTIONS,
                             layer_types=frozenset({"linear_attention", "mamba", "hybrid"}))
                for name in ("mamba", "falcon_mamba", "jamba", "zamba")})
#: RecurrentGemma (Griffin): recurrent blocks beside local attention; its config's layers_block_type names them
#: "linear_attention" (exporter/rg_lru.py)
RECIPES["recurrent_gemma"] = Recipe(why="RG-LRU blocks with conv and LRU state", forwards=rg_lru.FORWARDS,
                                    layer_types=frozenset({"linear_attention"}))


@contextlib.contextmanager
def applied(model: torch.nn.Module) -> Iterator[None]:
    """Apply the model family's recipe (if any) while the block runs, then undo it."""
    recipe = RECIPES.get(getattr(model.config, "model_type", ""))
    if recipe is None:
        yield
        return
    if recipe.check is not None:
        recipe.check(model)
    saved_config = {key: getattr(model.config, key, None) for key in recipe.config}
    replacements = {(cls, key.partition(".")[2] or "forward"): replacement
                    for cls in {type(m) for m in model.modules()} for key, replacement in recipe.forwards.items()
                    if key.partition(".")[0] == cls.__name__}
    modules = {sys.modules[type(m).__module__] for m in model.modules()}
    replacements.update({(module, name): replacement for module in modules
                         for name, replacement in recipe.functions.items() if hasattr(module, name)})
    saved = {(owner, name): owner.__dict__.get(name) for owner, name in replacements}
    try:
        for key, value in recipe.config.items():
            setattr(model.config, key, value)
        for (owner, name), replacement in replacements.items():
            setattr(owner, name, replacement)
        yield
    finally:
        for (owner, name), original in saved.items():
            if original is None:
                delattr(owner, name)
            else:
                setattr(owner, name, original)
        for key, value in saved_config.items():
            setattr(model.config, key, value)
