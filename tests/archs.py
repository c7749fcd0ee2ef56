"""Tiny random configs of every architecture paw is tested on (no download), and their exports.

Each entry is a model_type and the config overrides that make it tiny (hidden 64, two
layers, vocab 384) while still exercising what is special about the family: sliding
windows short enough to matter, soft-capping, partial rotary, MoE routing, ALiBi.
``ArchCase`` exports one and keeps transformers' results beside it; the session fixture
``arch_cases`` (tests/conftest.py) builds each at most once for every test that needs it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

VOCAB = 384
WINDOW = 5  # shorter than the test prompts, so sliding-window layers really slide

_BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
             bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.2)

#: the Gated DeltaNet part of a tiny hybrid: a linear-attention layer first, then attention
_GDN = dict(num_hidden_layers=4, head_dim=16,
            layer_types=["linear_attention", "full_attention", "linear_attention", "linear_attention"],
            linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=8,
            linear_conv_kernel_dim=4,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5))

#: multi-head latent attention with a DSA indexer that keeps fewer keys than the test's sequences hold
_DSA = dict(num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8,
            v_head_dim=16, head_dim=8, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
            n_shared_experts=1, first_k_dense_replace=1, index_topk=4, index_n_heads=8, index_head_dim=16)

#: Gemma 4's text model: sliding and full layers, the full one with heads twice as wide (per_layer_config),
#: per-layer token inputs
_GEMMA4_TEXT = dict(head_dim=16, sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"],
                    per_layer_config={"01": {"head_dim": 32}}, hidden_size_per_layer_input=16,
                    vocab_size_per_layer_input=VOCAB)

# Gemma and BLOOM untie their embeddings here: tied, these random models greedily repeat one
# token, which makes the greedy comparison weak. Tied embeddings stay covered by gpt2, opt, ...
ARCHS: dict[str, dict] = {
    "llama": {},
    "mistral": dict(sliding_window=WINDOW),
    "ministral": dict(head_dim=16, sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"]),
    "qwen2": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1,
                  layer_types=["full_attention", "sliding_attention"]),
    "qwen3": dict(head_dim=16),
    "gemma": dict(head_dim=16, tie_word_embeddings=False),
    "gemma2": dict(head_dim=16, tie_word_embeddings=False, sliding_window=WINDOW, attn_logit_softcapping=5.0,
                   final_logit_softcapping=3.0, query_pre_attn_scalar=16),
    "gemma3_text": dict(head_dim=16, tie_word_embeddings=False, sliding_window=WINDOW, query_pre_attn_scalar=16,
                        layer_types=["sliding_attention", "full_attention"]),
    "phi": dict(partial_rotary_factor=0.5),
    # longrope as Phi-3.5 and Phi-4-mini have it; positions past 4 take the long factors
    "phi3": dict(partial_rotary_factor=0.5, rope_parameters=dict(
        rope_type="longrope", rope_theta=10000.0, short_factor=[1.0, 1.1, 1.2, 1.3], long_factor=[2.0, 2.5, 3.0, 4.0],
        original_max_position_embeddings=4)),
    "gpt2": dict(n_inner=128),
    "gpt_neox": dict(rotary_pct=0.5, use_parallel_residual=True),
    "olmo": dict(clip_qkv=4.0),
    "olmo2": {},
    "stablelm": dict(partial_rotary_factor=0.25, use_qkv_bias=True, qk_layernorm=True),
    "starcoder2": dict(sliding_window=WINDOW, use_bias=True),
    "granite": dict(embedding_multiplier=2.0, logits_scaling=4.0, residual_multiplier=0.5, attention_multiplier=0.2),
    "cohere": dict(logit_scale=0.5, use_qk_norm=False),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=64, decoder_sparse_step=1, norm_topk_prob=False),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
    "opt": dict(ffn_dim=128, word_embed_proj_dim=64, bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "bloom": dict(n_head=4, tie_word_embeddings=False),
    "helium": dict(head_dim=16),
    "gemma4_text": dict(_GEMMA4_TEXT, tie_word_embeddings=False),
    # MiMo-V2-Flash: value heads narrower than query/key heads (scaled), sliding layers with twice the key
    # heads and attention sinks, a third of each head rotated (8 of 24), routed experts after a dense layer
    "mimo_v2_flash": dict(head_dim=24, v_head_dim=16, sliding_window=WINDOW, n_routed_experts=4,
                          num_experts_per_tok=2, moe_intermediate_size=32),
    # Command's North family: rotary per layer type, none on the global layers (NoPE); the text rotary is
    # interleaved M-RoPE written through strided slices (plain RoPE on text); logits scaled
    "cohere_compass_text": dict(sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"],
                                rope_parameters=dict(sliding_attention=dict(rope_type="default", rope_theta=10000.0),
                                                     full_attention=None), logit_scale=0.5),
    "exaone4": dict(sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"]),
    "smollm3": dict(no_rope_layers=[1, 0]),
    "qwen3_moe": dict(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      decoder_sparse_step=1, norm_topk_prob=True),
    # attention sinks, sliding and full layers, experts with biases and a clamped GLU
    "gpt_oss": dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW,
                    layer_types=["sliding_attention", "full_attention"]),
    # multi-head latent attention; group-limited routing (a scatter), a dense first layer, a shared expert
    "deepseek_v3": dict(num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
                        qk_nope_head_dim=8, v_head_dim=16, head_dim=8, n_routed_experts=4, num_experts_per_tok=2,
                        moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1, n_group=2,
                        topk_group=1),
    # DeepSeek Sparse Attention: MLA whose keys an indexer picks, top 4 of the test's 12 and more positions
    "deepseek_v32": dict(_DSA, n_group=2, topk_group=1),
    # GLM-5: the same, its indexer rotating neighbours; the second layer reuses the first's choice ("shared")
    "glm_moe_dsa": dict(_DSA, num_hidden_layers=3, indexer_types=["full", "shared", "full"]),
    # A.X-K2: DeepSeek-V3.2's indexer; queries and a sigmoid output gate from one projection, gated norms
    "axk2": dict(_DSA),
    # HY-V4: the indexer rotates the last channels of its heads, attention has sinks and a gate, hyper-connections
    # mix four residual streams; the second layer reuses the first's choice
    "hy_v4": dict(_DSA, num_hidden_layers=3, indexer_types=["full", "shared", "full"], learnable_sink_init=0.5),
    # dots.3 Note's text model: an indexed layer and a sliding one (its own, smaller MLA shapes, no indexer)
    "dots3_note_text": dict(_DSA, n_group=2, topk_group=1, layer_types=["indexed_attention", "sliding_attention"],
                            sliding_window=WINDOW, swa_num_attention_heads=4, swa_num_key_value_heads=4,
                            swa_q_lora_rank=24, swa_kv_lora_rank=16, swa_head_dim=16, swa_qk_nope_head_dim=8,
                            swa_v_head_dim=16),
    # DeepSeek-V2-Lite's form: complex rotary (polar, a complex product) with yarn scaling, MLA without a
    # query LoRA, greedy routing
    "deepseek_v2": dict(num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
                        qk_nope_head_dim=8, v_head_dim=16, head_dim=8, n_routed_experts=4, num_experts_per_tok=2,
                        moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1, topk_method="greedy",
                        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                             original_max_position_embeddings=64, mscale=1.0, mscale_all_dim=0.707)),
    "glm4_moe": dict(head_dim=16, partial_rotary_factor=0.5, use_qk_norm=True, n_routed_experts=4,
                     num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1,
                     n_group=2, topk_group=1),
    # a window its attention applies through the mask only; sparsemixer routing (max, scatter);
    # longrope whose mscale the rotary picks with an if on the positions (exporter/recipes.py)
    "phimoe": dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW, rope_parameters=dict(
        rope_type="longrope", rope_theta=10000.0, short_factor=[1.0 + i / 10 for i in range(8)],
        long_factor=[2.0 + i / 10 for i in range(8)], original_max_position_embeddings=4, short_mscale=1.1,
        long_mscale=1.3)),
    # experts looped by hand (exporter/recipes.py), clipped qkv, routing weights normalised by their 1-norm
    "dbrx": dict(d_model=64, n_heads=4, n_layers=2, max_seq_len=256,  # d_model also sizes its ffn_config
                 attn_config=dict(kv_n_heads=2, clip_qkv=4.0, rope_theta=10000.0),
                 ffn_config=dict(ffn_hidden_size=64, moe_num_experts=4, moe_top_k=2)),
    # mixtures of MLP and of attention experts grouped by data-dependent sizes (exporter/recipes.py)
    "jetmoe": dict(num_local_experts=4, num_experts_per_tok=2, kv_channels=16),
    # hand-written attention (exporter/recipes.py): Falcon's grouped fused qkv, GPT-J's interleaved rotary
    "falcon": dict(new_decoder_architecture=True, num_kv_heads=2, alibi=False, parallel_attn=True, bias=False),
    "gptj": dict(rotary_dim=8, n_inner=128),
    "xglm": dict(ffn_dim=128),
    # ALiBi added to the scores by hand; six heads, so the slopes past the largest power of two count too
    "mpt": dict(hidden_size=48, num_attention_heads=6, max_seq_len=256, attn_config=dict(clip_qkv=4.0)),
    # differential attention: two attention calls per layer, each its own cache slot
    "diffllama": {},
    # chunked attention (chunks of 4 cut the test's prompts) with rotary and L2 q/k norm, a NoPE
    # global layer whose query temperature grows every 4 positions; a dense layer, then a MoE one
    # (sigmoid router written with scatter, a shared expert)
    "llama4_text": dict(head_dim=16, attention_chunk_size=4, no_rope_layers=[1, 0], floor_scale=4,
                        num_local_experts=4, num_experts_per_tok=2, interleave_moe_layer_step=2,
                        intermediate_size_mlp=128),
    # a hybrid: short convolutions (conv state) around attention, a conv layer first
    "lfm2": dict(num_hidden_layers=4, layer_types=["conv", "full_attention", "conv", "conv"], conv_L_cache=3,
                 conv_bias=True, block_auto_adjust_ff_dim=False, tie_word_embeddings=False),
    "lfm2_moe": dict(num_hidden_layers=4, layer_types=["conv", "full_attention", "conv", "full_attention"],
                     num_dense_layers=1, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                     tie_word_embeddings=False),
    # LFM2's short convolutions around gated, sandwich-normed attention: a full layer with proportional partial
    # rotary, a sliding one with its own rotary
    "lfm3": dict(num_hidden_layers=4, layer_types=["conv", "full_attention", "conv", "sliding_attention"],
                 conv_L_cache=3, sliding_window=5, head_dim=16, tie_word_embeddings=False),
    # Gated DeltaNet hybrids (conv and delta states beside the KV cache): twice as many value heads as
    # query/key heads, a value size unlike the key size; gated attention with q/k norms, partial rotary
    "qwen3_5_text": dict(_GDN, tie_word_embeddings=False),
    "qwen3_5_moe_text": dict(_GDN, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                             shared_expert_intermediate_size=32, tie_word_embeddings=False),
    "qwen3_next": dict(_GDN, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       shared_expert_intermediate_size=32, decoder_sparse_step=1, tie_word_embeddings=False),
    # separate projections, beta scaled by 2 (negative eigenvalues), no rotary scaling
    "olmo_hybrid": dict(_GDN, tie_word_embeddings=False),
    # Kimi Delta Attention: the gated delta rule with one decay per key channel; MLA attention, routed experts
    "kimi_linear": dict(num_hidden_layers=4, layer_types=_GDN["layer_types"],
                        mlp_layer_types=["dense", "sparse", "dense", "sparse"], linear_num_heads=4,
                        linear_head_dim=16, linear_conv_kernel_dim=4, num_key_value_heads=4, kv_lora_rank=16,
                        q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, qk_head_dim=16, v_head_dim=16,
                        head_dim=8, num_experts=4, num_experts_per_token=2, moe_intermediate_size=32,
                        num_shared_experts=1, tie_word_embeddings=False),
    # state-space layers (conv + SSM state): 8 heads of 16 in 2 groups, chunks of 4 cut transformers'
    # full-sequence scan into pieces
    "mamba2": dict(num_heads=8, head_dim=16, expand=2, n_groups=2, state_size=16, conv_kernel=4, chunk_size=4,
                   tie_word_embeddings=False),
    # Mamba2, MoE and attention layers, a Mamba2 layer first
    "nemotron_h": dict(layers_block_type=["linear_attention", "moe", "full_attention", "mlp"], head_dim=16,
                       mamba_num_heads=8, mamba_head_dim=16, n_groups=2, ssm_state_size=16, conv_kernel=4,
                       chunk_size=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       moe_shared_expert_intermediate_size=32, n_group=1, topk_group=1, tie_word_embeddings=False),
    # Granite 4: Mamba2 and attention (NoPE) layers, each with routed experts and a shared one;
    # Granite's multipliers off 1
    "granitemoehybrid": dict(num_hidden_layers=3,
                             layer_types=["linear_attention", "full_attention", "linear_attention"],
                             mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=2, mamba_d_state=16, mamba_chunk_size=4,
                             num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=32,
                             embedding_multiplier=2.0, residual_multiplier=0.5, logits_scaling=2.0,
                             attention_multiplier=0.25),
    # Bamba: Mamba2 layers around one rotary attention layer
    "bamba": dict(num_hidden_layers=3, attn_layer_indices=[1], mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=2,
                  mamba_d_state=16, mamba_chunk_size=4),
    # Zamba2: Mamba2 layers and hybrid ones (a shared attention block, with per-layer LoRA adapters,
    # before a Mamba2 layer); initializer 0.1: at 0.2 transformers' own float32 logits are 2e-4 from
    # float64 (paw's too), too close to the tolerance to compare
    "zamba2": dict(num_hidden_layers=4, layers_block_type=["linear_attention", "hybrid", "linear_attention", "hybrid"],
                   n_mamba_heads=8, mamba_ngroups=2, mamba_d_state=16, chunk_size=4, num_attention_heads=4,
                   num_key_value_heads=4, use_shared_attention_adapter=True, adapter_rank=8, use_mem_rope=True,
                   tie_word_embeddings=False, initializer_range=0.1),
    # Falcon-H1: attention and a Mamba2 mixer side by side in every layer, muP multipliers off 1
    "falcon_h1": dict(head_dim=16, mamba_d_ssm=128, mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=2,
                      mamba_d_state=16, mamba_chunk_size=4, ssm_multipliers=[0.5, 2.0, 1.5, 0.75, 1.25],
                      ssm_in_multiplier=0.5, ssm_out_multiplier=2.0, attention_in_multiplier=0.5,
                      attention_out_multiplier=1.5, key_multiplier=0.5, mlp_multipliers=[0.5, 2.0],
                      embedding_multiplier=2.0, lm_head_multiplier=0.5, tie_word_embeddings=False),
    # Mamba 1 (conv + SSM state, a decay per channel and state column): 128 channels, state 8
    "mamba": dict(state_size=8, time_step_rank=8, tie_word_embeddings=False),
    # the same mixer with RMS norms on dt, B and C
    "falcon_mamba": dict(state_size=8, time_step_rank=8, tie_word_embeddings=False),
    # Jamba: Mamba 1 layers around an attention layer, routed experts in the Mamba layers; float32 rounding
    # moves its logits more than most (5.3e-05 from a float64 run for paw, 3.8e-05 for transformers)
    "jamba": dict(num_hidden_layers=3, attn_layer_period=3, attn_layer_offset=1, expert_layer_period=2,
                  expert_layer_offset=0, num_experts=4, num_experts_per_tok=2, mamba_d_state=8, mamba_dt_rank=8,
                  tie_word_embeddings=False),
    # Zamba: Mamba 1 mixers of two Mamba heads each (a scan per head), a hybrid layer last (the shared
    # attention block, then a mixer)
    "zamba": dict(num_hidden_layers=3, attn_layer_period=3, attn_layer_offset=1, n_mamba_heads=2, mamba_d_state=8,
                  mamba_dt_rank=8, attention_head_dim=16, tie_word_embeddings=False),
    # RecurrentGemma (Griffin): two RG-LRU blocks (conv + LRU state), then local attention over a short window;
    # weights 10x wider than its default init (0.01 variance), which left replies blind to the input past the window
    "recurrent_gemma": dict(num_hidden_layers=3, attention_window_size=WINDOW, w_init_variance_scale=1.0,
                            tie_word_embeddings=False),
}


#: the mixture-of-experts families above: their routed experts run as ``expert_linear``
MOE = ("axk2", "hy_v4", "dots3_note_text", "dbrx", "deepseek_v2", "deepseek_v3", "deepseek_v32", "glm_moe_dsa",
       "glm4_moe", "gpt_oss", "granitemoehybrid", "jetmoe", "lfm2_moe", "llama4_text", "mixtral", "nemotron_h", "olmoe",
       "phimoe", "qwen2_moe", "qwen3_moe", "qwen3_5_moe_text", "qwen3_next", "kimi_linear", "mimo_v2_flash", "jamba")
#: DeepSeek Sparse Attention families (exporter/indexed.py): a lightning indexer picks the keys each
#: query attends to; their experts are DeepSeek-V3's
INDEXED = ("deepseek_v32", "glm_moe_dsa", "axk2", "hy_v4", "dots3_note_text")
#: the hybrid families above: short convolutions keep a conv state beside the KV cache (exporter/conv.py),
#: Gated DeltaNet layers a conv and a delta state (exporter/delta_rule.py), Mamba2 and Mamba 1 mixers a conv
#: and an SSM state (exporter/ssm.py, exporter/mamba.py), RG-LRU blocks a conv and an LRU state
#: (exporter/rg_lru.py)
RECURRENT = ("lfm2", "lfm2_moe", "lfm3", "qwen3_5_text", "qwen3_5_moe_text", "qwen3_next", "olmo_hybrid",
             "kimi_linear", "mamba2", "nemotron_h", "granitemoehybrid", "bamba", "zamba2", "falcon_h1", "mamba",
             "falcon_mamba", "jamba", "zamba", "recurrent_gemma")


#: Sub-models of a multimodal (composite) config other than its text model (vision towers,
#: projectors), shrunk to these values wherever they have the field.
TINY_TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=16, image_size=32, patch_size=8, vision_output_dim=32,
                  projector_input_dim=32, projector_output_dim=32, position_embedding_size=64,
                  depth=1, embed_dim=32, num_heads=2, out_hidden_size=32, num_position_embeddings=16,
                  deepstack_visual_indexes=[0], fullatt_block_indexes=[0])

# M-RoPE over head_dim 16's 8 frequencies: consecutive sections (Qwen2-VL) or interleaved (Qwen3-VL)
_MROPE = dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3]))


def glm_rope(fraction: float | None, head_dim: int | None = None) -> dict:
    """GLM-4.1V-family text overrides: M-RoPE on ``fraction`` of each head (None: not stated, the whole head
    for glm4v_text), every rotated frequency in one of three consecutive sections; heads ``head_dim`` wide
    (None: not stated, hidden_size / heads wide)."""
    width = head_dim or _BASE["hidden_size"] // _BASE["num_attention_heads"]
    frequencies = int(width * (fraction or 1.0)) // 2
    time = frequencies // 4  # GLM-4.1V's [8, 12, 12] over 32 frequencies
    rope = dict(rope_type="default", rope_theta=10000.0,
                mrope_section=[time, (frequencies - time) // 2, frequencies - time - (frequencies - time) // 2])
    if fraction is not None:
        rope["partial_rotary_factor"] = fraction
    return dict(rope_parameters=rope) if head_dim is None else dict(rope_parameters=rope, head_dim=head_dim)


#: GLM-4.5V's text model: experts with a shared one, group-limited routing, a dense first layer
GLM_MOE = dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
               first_k_dense_replace=1, n_group=2, topk_group=1)

#: Multimodal checkpoints tested through their text model (tests/exporter/test_composite.py):
#: model_type -> overrides of the composite config beside its sub-configs. ``text`` overrides
#: the text config (default: ``ARCHS`` of the text model_type); a ``*_config`` dict names a
#: tower the default config leaves out. gemma3 and gemma4 are untied (see above); mistral3's
#: composite ties what its text config alone would not.
COMPOSITES: dict[str, dict] = {
    "gemma3": dict(mm_tokens_per_image=4, tie_word_embeddings=False),
    "mistral3": {},
    "llama4": {},
    "mllama": {},  # its embedding keeps 8 rows for image tokens past the vocabulary
    # text models with M-RoPE, exported as their family's plain causal LM (exporter/mrope.py)
    "qwen2_vl": dict(text=_MROPE),
    "qwen2_5_vl": dict(text=dict(_MROPE, tie_word_embeddings=True)),
    "qwen3_vl": dict(text=dict(_MROPE, head_dim=16)),
    # its checkpoints store the experts transposed ([experts, hidden, 2 x 16]): not square, so a
    # transpose left out could not go unnoticed
    "qwen3_vl_moe": dict(text=dict(_MROPE, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                   moe_intermediate_size=16, decoder_sparse_step=1)),
    "aya_vision": dict(text=dict(logit_scale=0.5)),  # its head does not scale the logits as Cohere 2's does
    "smolvlm": {},  # Llama under model.text_model
    "llava_onevision": {},
    # Gated DeltaNet hybrids whose text model has a causal LM of its own (exporter/delta_rule.py)
    "qwen3_5": {},
    "qwen3_5_moe": {},
    "gemma4": dict(tie_word_embeddings=False, vision_config=dict(model_type="gemma4_vision"),
                   text=_GEMMA4_TEXT),
    # timm vision towers (stood in: ``timm_stood_in``), which paw leaves out without timm
    # gemma3n: the last two layers read the first two's keys and values (KV sharing), the first two's MLPs
    # are sparse (a normal quantile of the gate, as E2B's and E4B's first ten layers); an audio tower too
    "gemma3n": dict(tie_word_embeddings=False, audio_config=dict(model_type="gemma3n_audio", conf_num_hidden_layers=1),
                    text=dict(num_hidden_layers=4, num_kv_shared_layers=2, head_dim=16, sliding_window=WINDOW,
                              layer_types=["sliding_attention", "full_attention"] * 2,
                              activation_sparsity_pattern=[0.95, 0.95, 0.0, 0.0], vocab_size_per_layer_input=VOCAB,
                              hidden_size_per_layer_input=16)),
    "fast_vlm": {},
    # its projector reads the tower's width from model_args, which the default config leaves empty
    "perception_lm": dict(vision_config=dict(model_type="timm_wrapper", model_args=dict(embed_dim=32))),
    # GLM-4.1V's family: M-RoPE text models exported as GLM-4 (glm4v_moe: GLM-4.5) on rotated halves of
    # heads (as the hub's checkpoints) and whole ones (glm46v: unstated, which GLM-4's config would read as
    # half); glm_ocr's and glm4v_moe's heads wider than hidden / heads (as GLM-4.5V's); glm4v's attention
    # heads are always hidden / heads wide, with or without head_dim
    "glm4v": dict(text=glm_rope(0.5, head_dim=16)),
    "glm46v": dict(text=glm_rope(None)),
    "glmga": dict(text=glm_rope(0.5)),
    "glm_ocr": dict(text=glm_rope(1.0, head_dim=32)),
    "glm4v_moe": dict(text=dict(glm_rope(0.5, head_dim=32), **GLM_MOE)),
}


def composite_config(model_type: str, text: dict | None = None):
    """The tiny float32 config of the multimodal ``model_type``: its text config as ``arch_config``
    builds one (``_BASE`` + ``text``, default from ``COMPOSITES`` or ``ARCHS``), its towers shrunk."""
    from transformers import AutoConfig

    default = AutoConfig.for_model(model_type)
    extra = dict(COMPOSITES.get(model_type, {}))
    text_type = default.text_config.model_type
    params = dict(_BASE, model_type=text_type)
    params.update(text if text is not None else extra.pop("text", ARCHS.get(text_type, {})))
    extra.pop("text", None)
    towers = {}
    for name in default.sub_configs:
        given = extra.pop(name, None)
        if name == "text_config" or (given is None and getattr(default, name) is None):
            continue
        tower = AutoConfig.for_model(**given).to_dict() if given else getattr(default, name).to_dict()
        towers[name] = {**tower, **{key: value for key, value in TINY_TOWER.items() if key in tower}}
    config = AutoConfig.for_model(model_type, text_config=params, **towers, **extra)
    config.dtype = config.text_config.dtype = "float32"
    return config


@contextlib.contextmanager
def timm_stood_in() -> Iterator[None]:
    """Within the block, transformers' timm wrapper holds one 1x1 convolution where its timm model would be.

    paw depends on neither timm nor PIL, yet Gemma 3n, FastVLM and Perception LM have a timm vision tower:
    with the stand-in their tiny composites build, and save tower weights under the tower's names for the
    export to leave out. Only the tower's vision forward, which no test runs, would differ."""
    import torch
    from transformers.models.timm_wrapper import modeling_timm_wrapper as wrapper

    saved = wrapper.requires_backends, wrapper._create_timm_model_with_error_handling
    wrapper.requires_backends = lambda *args, **kwargs: None
    wrapper._create_timm_model_with_error_handling = lambda config, **kwargs: torch.nn.Conv2d(3, 4, 1)
    try:
        yield
    finally:
        wrapper.requires_backends, wrapper._create_timm_model_with_error_handling = saved


def tiny_composite(model_type: str, seed: int = 0, text: dict | None = None):
    """The tiny random multimodal model of ``model_type`` (its own class, e.g. Gemma3ForConditionalGeneration);
    a timm vision tower is stood in (``timm_stood_in``)."""
    import torch
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    with timm_stood_in():
        return AutoModelForImageTextToText.from_config(composite_config(model_type, text)).eval()


def arch_config(model_type: str):
    """The tiny float32 config of ``model_type``."""
    from transformers import AutoConfig

    params = dict(_BASE)
    params.update(ARCHS[model_type])
    config = AutoConfig.for_model(model_type, **params)
    config.dtype = "float32"
    return config


def export_arch(model_type: str, dtype: str, out: Path) -> Path:
    """Export the tiny random ``model_type`` (seed 0, the weights every test of it sees) in ``dtype``."""
    from exporter.export import export_model
    from tests.tiny import tiny_model

    model = tiny_model(arch_config(model_type), seed=0)
    return export_model(model, None, out, dtype=dtype, source_info={"id": f"tiny-{model_type}"})


PROMPT_LEN = 8
NEW_TOKENS = 32
SEQ = 12


def reference_results(arch: str, model=None):
    """transformers' results for ``arch`` (``model``: default its tiny model, seed 0): the input ids
    ([2, SEQ] int64), their eager full-sequence logits (float32) and the NEW_TOKENS greedy tokens
    ``generate`` gives after the first row's PROMPT_LEN ids."""
    import torch

    from tests.tiny import tiny_model

    model = model if model is not None else tiny_model(arch_config(arch), seed=0)
    model.set_attn_implementation("eager")
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, SEQ), generator=gen)
    with torch.no_grad():
        logits = model(ids).logits.float().numpy()
        model.generation_config.eos_token_id = None
        prompt = ids[:1, :PROMPT_LEN]
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                             max_new_tokens=NEW_TOKENS, pad_token_id=0)
    return ids.numpy(), logits, out[0, PROMPT_LEN:].tolist()


class ArchCase:
    """One architecture: transformers' reference results and the exported program."""

    def __init__(self, arch: str, program_dir: Path, model=None, reference=None):
        """``model``: the reference transformers model (default: ``arch``'s tiny model, seed 0);
        ``reference``: its ``reference_results``, when already computed (tests/prefetch.py)."""
        import torch

        from interp.graph import GraphModel
        from interp.program import read_program

        ids, self.logits, self.greedy = reference if reference is not None else reference_results(arch, model)
        self.ids = torch.from_numpy(ids)
        self.dir = program_dir  # export_arch's export of this same seed-0 model
        self.model = GraphModel.from_program(read_program(self.dir))

    def errors(self, prefill: int) -> tuple[float, float, bool]:
        """The program against transformers: (max full-sequence logits error, max logits error through
        the cache after ``prefill`` tokens then one at a time, whether the greedy tokens are identical)."""
        import mlx.core as mx
        import numpy as np

        from interp.generate import generate_step

        def error(got) -> float:
            return float(np.max(np.abs(np.array(got.astype(mx.float32)) - self.logits)))

        ids = mx.array(self.ids.numpy())
        cache = self.model.make_cache()
        pieces = [self.model(ids[:, :prefill], cache=cache)]
        pieces += [self.model(ids[:, i : i + 1], cache=cache) for i in range(prefill, SEQ)]
        prompt = self.ids[0, :PROMPT_LEN].tolist()
        greedy = list(generate_step(self.model, prompt, self.model.make_cache(), max_tokens=NEW_TOKENS))
        return error(self.model(ids)), error(mx.concatenate(pieces, axis=1)), greedy == self.greedy
