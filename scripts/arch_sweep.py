"""Sweep transformers causal-LM architectures that tests/archs.py does not cover: export, compare, tabulate.

    python scripts/arch_sweep.py                    # every candidate in CANDIDATES, one subprocess each
    python scripts/arch_sweep.py qwen3_moe gptj     # just these
    python scripts/arch_sweep.py --all              # every model_type in MODEL_FOR_CAUSAL_LM_MAPPING not in ARCHS

Each model_type is built tiny and random the way tests/archs.py builds its architectures
(its ``_BASE`` config plus the overrides below, and ``_TINY_FIELDS`` for the size fields
those leave at their real value), exported with paw, and checked as
tests/exporter/test_architectures.py checks: full-sequence logits, logits through the KV
cache and greedy tokens against transformers. A model runs in its own subprocess with a
timeout, so one crash or hang does not stop the sweep. It is a tool for finding what
breaks, not a test: an architecture that passes belongs in tests/archs.py ``ARCHS``.

A multimodal (composite) model_type, whose config nests a ``text_config`` (gemma3, llama4,
mistral3, ...), is built as tests/archs.py ``composite_config`` builds one: the overrides
go to its text config, its vision (and audio) towers are shrunk (a timm tower is stood in:
tests/archs.py ``timm_stood_in``). It is saved to a folder
and exported from there, as paw exports such a checkpoint (its text model alone), and
compared with the composite model's own forward on text.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 300
#: a "tiny" model above this many parameters is not built (a multimodal config's defaults run to billions)
MAX_PARAMS = 50_000_000

_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
# multi-head latent attention (DeepSeek-V2/V3 and kin): k and v come out with every query head
_MLA = dict(num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8,
            v_head_dim=16, head_dim=8)
_ROUTED = dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
               first_k_dense_replace=1, n_group=2, topk_group=1)

#: model_type -> config overrides on top of tests/archs.py's _BASE (tiny, yet exercising the family).
CANDIDATES: dict[str, dict] = {
    "qwen3_moe": dict(head_dim=16, decoder_sparse_step=1, norm_topk_prob=True, **_MOE),
    "granitemoe": dict(num_local_experts=4, num_experts_per_tok=2, embedding_multiplier=2.0, logits_scaling=4.0,
                       residual_multiplier=0.5, attention_multiplier=0.2),
    "granitemoeshared": dict(num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=64),
    "cohere2": dict(sliding_window=4 + 1, layer_types=["sliding_attention", "full_attention"], logit_scale=0.5),
    "glm": dict(head_dim=16, partial_rotary_factor=0.5),
    "glm4": dict(head_dim=16, partial_rotary_factor=0.5),
    "glm4_moe": dict(head_dim=16, partial_rotary_factor=0.5, n_routed_experts=4, num_experts_per_tok=2,
                     moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1, n_group=1,
                     topk_group=1, use_qk_norm=True),
    "deepseek_v2": dict(_MLA, **_ROUTED),
    "deepseek_v3": dict(_MLA, **_ROUTED),
    "phimoe": dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=4 + 1),
    "mpt": dict(d_model=64, n_heads=4, n_layers=2, expansion_ratio=2, max_seq_len=256),
    "falcon": dict(new_decoder_architecture=True, num_kv_heads=2, alibi=False, parallel_attn=True, bias=False),
    "gptj": dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=256),
    "codegen": dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=256, n_ctx=256),
    "gpt_bigcode": dict(n_embd=64, n_layer=2, n_head=4, n_inner=128, n_positions=256, multi_query=True),
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]], window_size=4 + 1, num_layers=2, num_heads=4),
    "xglm": dict(d_model=64, num_layers=2, attention_heads=4, ffn_dim=128),
    "persimmon": dict(partial_rotary_factor=0.5, qk_layernorm=True),
    "nemotron": dict(partial_rotary_factor=0.5, head_dim=16),
    "olmo3": dict(sliding_window=4 + 1, layer_types=["sliding_attention", "full_attention"]),
    "arcee": {},
    "apertus": {},
    "hunyuan_v1_dense": dict(head_dim=16),
    "hunyuan_v1_moe": dict(head_dim=16, num_experts=4, moe_topk=2, moe_intermediate_size=32),
    "ernie4_5": dict(head_dim=16),
    "ernie4_5_moe": dict(head_dim=16, moe_num_experts=4, moe_k=2, moe_intermediate_size=32, moe_layer_start_index=1,
                         moe_num_shared_experts=1),
    "seed_oss": dict(head_dim=16),
    "dots1": dict(head_dim=16, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                  n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1),
    "minimax": dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                    layer_types=["full_attention", "full_attention"]),
    "bitnet": {},
    "doge": {},
    "llama4_text": dict(head_dim=16, num_local_experts=4, num_experts_per_tok=1, intermediate_size_mlp=128,
                        interleave_moe_layer_step=1, no_rope_layers=[1, 0], attention_chunk_size=256),
    "gpt_oss": dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=4 + 1,
                    layer_types=["sliding_attention", "full_attention"]),
    "biogpt": {},
    "openai-gpt": dict(n_embd=64, n_layer=2, n_head=4, n_positions=256),
    "ctrl": dict(n_embd=64, n_layer=2, n_head=4, dff=128, n_positions=256),
    "jetmoe": dict(num_local_experts=4, num_experts_per_tok=2, kv_channels=16),
    "dbrx": dict(d_model=64, n_heads=4, n_layers=2, max_seq_len=256,
                 attn_config=dict(kv_n_heads=2, clip_qkv=4.0, rope_theta=10000.0),
                 ffn_config=dict(ffn_hidden_size=64, moe_num_experts=4, moe_top_k=2)),
    "granitemoehybrid": dict(num_local_experts=4, num_experts_per_tok=2, layer_types=["mamba", "attention"]),
    "qwen3_next": {},
    "falcon_h1": {},
    "mamba": {},
    "zamba2": {},
    "jamba": {},
    "cohere2_moe": {},
    "deepseek_v32": dict(_MLA, **_ROUTED),
    "glm_moe_dsa": dict(_MLA, **_ROUTED),
    "axk2": dict(_MLA, **_ROUTED),
    "hy_v4": dict(_MLA, **_ROUTED),
    "glm4_moe_lite": dict(_MLA, **_ROUTED),
    "minimax_m2": dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2),
    "ministral3": {},
    "vaultgemma": dict(head_dim=16),
    "internlm3": {},
    "diffllama": {},
    "minicpm3": dict(_MLA, **_ROUTED),
    "exaone_moe": {},
    "flex_olmo": dict(num_experts=4, num_experts_per_tok=2),
    "afmoe": dict(head_dim=16, **_MOE),  # its router gate starts at zero: every expert ties (see the report)
    "nanochat": {},
    "granite_swa": {},
    "granitemoe_swa": {},
    "qwen3_5_text": {},
    "qwen3_5_moe_text": {},
    # the last two layers read the first two's keys and values (KV sharing); the first two's MLPs are sparse,
    # as E2B's and E4B's first ten are
    "gemma3n_text": dict(num_hidden_layers=4, num_kv_shared_layers=2, head_dim=16, sliding_window=4 + 1,
                         layer_types=["sliding_attention", "full_attention"] * 2,
                         activation_sparsity_pattern=[0.95, 0.95, 0.0, 0.0], vocab_size_per_layer_input=384,
                         hidden_size_per_layer_input=16),
    "gemma4_text": {},
    "hyperclovax": {},
    "jais2": {},
    "solar_open": {},
    "youtu": dict(_MLA, **_ROUTED),
    "mellum": {},
    "iquestcoder": {},
    "cwm": {},
    "longcat_flash": dict(_MLA, **_ROUTED),
    "mimo_v2_flash": {},
    "zamba": {},
    "recurrent_gemma": {},
    "rwkv": {},
    # per-layer-type rotary, none on the global layers (NoPE, as Cohere 2's)
    "cohere_compass_text": dict(sliding_window=4 + 1, layer_types=["sliding_attention", "full_attention"],
                                rope_parameters=dict(sliding_attention=dict(rope_type="default", rope_theta=10000.0),
                                                     full_attention=None)),
    # latent attention whose sliding layers' heads are qk_nope + qk_rope wide, with an indexer
    "dots3_note_text": dict(_MLA, **_ROUTED, index_head_dim=16, index_n_heads=4),
    # with a window of 5 transformers' own generate (through its cache) leaves its own full forward, which
    # paw's logits match both ways (1.1e-05): the greedy check compares windows no longer than the test
    "moshi": dict(sliding_window=256),
    # multimodal checkpoints: the overrides go to the text config (default: the text model_type's
    # entry); the vision tower is shrunk (tests/archs.py composite_config) and left out of the export
    "gemma3": {},
    "gemma4": {},
    "llama4": {},
    "mistral3": {},
    "gemma3n": {},
    # GLM-4.1V and kin: M-RoPE text models, as tests/archs.py COMPOSITES builds them
    "glm4v": {},
    "glm46v": {},
    "glm_ocr": {},
    "glmga": {},
    "glm4v_moe": {},
    # a causal LM whose embedding holds its vision and audio encoders: shrunk, they stay in the graph unused
    "phi4_multimodal": dict(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=2),
                            audio_config=dict(hidden_size=32, intermediate_size=64, num_blocks=1,
                                              num_attention_heads=2, ext_pw_out_channel=32,
                                              depthwise_separable_out_channel=32, nemo_conv_channels=32)),
}


#: Sizes a config keeps at its real value unless told, made tiny wherever a config has the field and the
#: sweep's overrides leave it: expert counts and widths, head sizes (multi-head latent attention's
#: together, as ``_MLA``), linear-attention heads, per-layer inputs, windows. Only fields a config
#: declares are set, so each family keeps its own form (a latent rank it lacks is never added).
_TINY_FIELDS = dict(
    num_experts=4, n_routed_experts=4, num_local_experts=4, moe_num_experts=4,
    num_experts_per_tok=2, num_experts_per_token=2, moe_topk=2, moe_k=2,
    moe_intermediate_size=32, shared_expert_intermediate_size=32, moe_shared_expert_intermediate_size=32,
    head_dim=16, swa_head_dim=16, swa_num_attention_heads=4, swa_num_key_value_heads=2,
    linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=8,
    vocab_size_per_layer_input=384, hidden_size_per_layer_input=16, sliding_window=5,
    index_head_dim=16, index_n_heads=4, index_topk=4,  # DSA's indexer keeps fewer keys than the test's 12
)


def tiny_defaults(model_type: str, overrides: dict) -> dict:
    """``_TINY_FIELDS`` (and ``_MLA`` for latent attention) for the fields ``model_type``'s config declares
    with a value larger than the tiny one and ``overrides`` does not set."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.for_model(model_type)
    except Exception:  # transformers raises anything: its own default is invalid, which the build reports
        return {}
    if getattr(config, "text_config", None) is not None:
        config = config.text_config
    declared = config.to_dict()
    tiny = dict(_TINY_FIELDS, **_MLA) if declared.get("kv_lora_rank") else dict(_TINY_FIELDS)
    if declared.get("q_lora_rank") is None:
        tiny.pop("q_lora_rank", None)
    picked = {key: value for key, value in tiny.items()
              if isinstance(declared.get(key), int) and declared[key] > value and key not in overrides}
    if isinstance(declared.get("n_group"), int) and declared["n_group"] > 1 and "n_group" not in overrides:
        picked.update(n_group=2, topk_group=1)  # groups of two of the four experts
    return picked


#: composite model_type -> overrides of the composite config itself (tests/archs.py ``COMPOSITES`` form)
COMPOSITE_EXTRAS: dict[str, dict] = {
    # Emu3's image tokens live in its text vocabulary; the map names two of them
    "emu3": dict(vocabulary_map={"<image>": 380, "<|extra_200|>": 381},
                 vq_config=dict(model_type="emu3_vqgan", codebook_size=64, base_channels=32, channel_multiplier=[1, 2],
                                num_res_blocks=1, attn_resolutions=[], hidden_size=32)),
}


def check_one(model_type: str, overrides: dict, out: Path) -> dict:
    """Build, export and compare one architecture; the outcome as a dict (status, detail, errors)."""
    sys.path.insert(0, str(ROOT))
    import torch
    from transformers import AutoConfig

    from exporter.composite import is_composite
    from interp.errors import PawError
    from tests import archs
    from tests.exporter.test_architectures import PREFILL, TOLERANCE

    try:
        composite = is_composite(AutoConfig.for_model(model_type))
    except Exception as exc:  # transformers raises anything: its default config is invalid on its own
        return {"status": "transformers fails", "detail": _first_line(exc)}
    if model_type in COMPOSITE_EXTRAS:
        archs.COMPOSITES.setdefault(model_type, COMPOSITE_EXTRAS[model_type])
    if not composite:
        overrides = {**tiny_defaults(model_type, overrides), **overrides}
    archs.ARCHS[model_type] = overrides
    try:
        if composite:  # a multimodal checkpoint: its text model is what paw exports
            config = archs.composite_config(model_type, _composite_text(model_type, overrides))
        else:
            config = archs.arch_config(model_type)
        params = _count_parameters(config, composite)
        if params > MAX_PARAMS:
            return {"status": "not tiny", "detail": f"{params / 1e6:.0f}M parameters with the tiny overrides "
                                                     "(a sub-config keeps its real size): not built"}
        if composite:
            reference = archs.tiny_composite(model_type, text=_composite_text(model_type, overrides))
        else:
            from tests.tiny import tiny_model

            reference = tiny_model(config, seed=0)
        reference.set_attn_implementation("eager")
        _randomize_zero_matrices(reference, config)
        with torch.no_grad():
            reference(torch.randint(3, archs.VOCAB, (1, 4)), use_cache=False)
    except PawError as exc:
        return {"status": "export error", "detail": _first_line(exc)}
    except Exception as exc:  # transformers raises anything; the family cannot be built tiny this way
        return {"status": "transformers fails", "detail": _first_line(exc)}
    started = time.perf_counter()
    try:
        if composite:  # saved and exported from the folder, as a user's checkpoint would be
            from exporter.export import export_source
            from tests.tiny import make_tokenizer

            reference.save_pretrained(out.parent / "checkpoint")
            make_tokenizer().save_pretrained(out.parent / "checkpoint")
            export_source(str(out.parent / "checkpoint"), out)
        else:  # a copy of the reference (its zero matrices made random): capture may patch what it exports
            import copy

            from exporter.export import export_model

            export_model(copy.deepcopy(reference), None, out, dtype="float32",
                         source_info={"id": f"tiny-{model_type}"})
    except PawError as exc:
        return {"status": "export error", "detail": _first_line(exc)}
    except Exception as exc:  # an exporter bug rather than a refusal: show the type too
        return {"status": "export crash", "detail": f"{type(exc).__name__}: {_first_line(exc)}"}
    export_s = time.perf_counter() - started
    try:
        case = archs.ArchCase(model_type, out, model=reference)
        full, cached, greedy = case.errors(PREFILL)
    except Exception as exc:  # the program loads or runs wrong: report where
        return {"status": "run error", "detail": f"{type(exc).__name__}: {_first_line(exc)}"}
    ok = full < TOLERANCE and cached < TOLERANCE and greedy
    result = {"status": "passes" if ok else "mismatch", "logits": full, "cached": cached, "greedy": greedy,
              "export_s": round(export_s, 1)}
    if composite:
        result["text_model"] = config.text_config.model_type
    return result


def _randomize_zero_matrices(model, config) -> None:
    """Give every all-zero weight matrix of ``model`` random values (seed 0, the config's initializer range).

    Some families initialise a matrix to zero that training fills (AFMoE's router gate): untrained, every
    expert ties, and which of equal scores a top-k picks is the library's choice, not the model's."""
    import torch

    std = getattr(getattr(config, "text_config", None) or config, "initializer_range", 0.02)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2 and param.is_floating_point() and not param.any():
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def _composite_text(model_type: str, overrides: dict) -> dict | None:
    """A composite's text-config overrides: the sweep's, else the defaults of tests/archs.py or of its text type."""
    from transformers import AutoConfig

    from tests.archs import ARCHS, COMPOSITES

    if overrides:
        return overrides
    if "text" in COMPOSITES.get(model_type, {}):
        return None
    text_type = AutoConfig.for_model(model_type).text_config.model_type
    text = ARCHS.get(text_type, CANDIDATES.get(text_type, {}))
    return {**tiny_defaults(model_type, text), **text}


def _count_parameters(config, composite: bool) -> int:
    """Parameters of the model a config builds, counted on the meta device (no memory)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from tests.archs import timm_stood_in

    auto = AutoModelForImageTextToText if composite else AutoModelForCausalLM
    with torch.device("meta"), timm_stood_in():  # as tests/archs.py tiny_composite builds it
        return sum(p.numel() for p in auto.from_config(config).parameters())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    first = text.splitlines()[0]
    if first.endswith(":") and exc.__cause__ is not None:  # a config validator's wrapper: say what it found
        first = f"{first} {_first_line(exc.__cause__)}"
    return first[:200]


def run_isolated(model_type: str, overrides: dict, timeout: float) -> dict:
    """``check_one`` in a subprocess: a crash or a hang becomes a row, not the end of the sweep."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, __file__, "--one", model_type, "--overrides", json.dumps(overrides),
               "--out", str(Path(tmp) / "prog")]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        except subprocess.TimeoutExpired:
            return {"status": "timeout", "detail": f"over {timeout:.0f} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return {"status": "crashed", "detail": f"exit {done.returncode}: {tail[:200]}"}


def row(model_type: str, result: dict) -> str:
    status = result["status"]
    if status in ("passes", "mismatch"):
        detail = (f"logits {result['logits']:.1e}, cached {result['cached']:.1e}, "
                  f"greedy {'identical' if result['greedy'] else 'differ'}, export {result['export_s']} s")
        if "text_model" in result:
            detail = f"its text model {result['text_model']}: {detail}"
    else:
        detail = result.get("detail", "")
    return f"| `{model_type}` | {status} | {detail.replace('|', '/')} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("types", nargs="*", help="model_types to sweep (default: CANDIDATES)")
    parser.add_argument("--all", action="store_true", help="every causal-LM model_type not in tests/archs.py")
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds per model")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--overrides", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(check_one(args.one, json.loads(args.overrides), args.out)))
        return
    sys.path.insert(0, str(ROOT))
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    from tests.archs import ARCHS

    if args.types:
        types = args.types
    elif args.all:
        types = sorted(t for t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if t not in ARCHS)
    else:
        known = {*MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, *MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES}
        types = [t for t in CANDIDATES if t in known]
    print("| model_type | status | detail |\n| --- | --- | --- |", flush=True)
    for model_type in types:
        overrides = ARCHS.get(model_type, CANDIDATES.get(model_type, {}))
        print(row(model_type, run_isolated(model_type, overrides, args.timeout)), flush=True)


if __name__ == "__main__":
    main()
