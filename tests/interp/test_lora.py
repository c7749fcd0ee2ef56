"""The LoRA rewrite: sites of fused and Conv1D layers, rewrite vs merged weights, per-row adapters."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import paw_mlx
from interp.errors import ArtifactError
from interp.graph import GraphModel
from interp.lora import ADAPTER_INPUT, linear_sites, merged_model, merged_weights, with_adapters

IDS = mx.array([[5, 9, 33, 17, 2, 88, 41]], dtype=mx.int32)


def random_adapter(sites, rank: int = 3, seed: int = 0, scale: float = 0.2) -> dict:
    rng = np.random.default_rng(seed)
    return {m: (rng.standard_normal((rank, s.in_features)).astype(np.float32) * scale,
                rng.standard_normal((s.out_features, rank)).astype(np.float32) * scale)
            for m, s in sites.items() if s.layer is not None}


def test_sites_unfuse_projections(tiny_program):
    sites = linear_sites(paw_mlx.load(tiny_program).program)
    q, k, v = (sites[f"model.layers.1.self_attn.{p}_proj"] for p in "qkv")
    assert q.node == k.node == v.node  # one fused product
    assert q.rows == (0, 64) and k.rows == (64, 96) and v.rows == (96, 128)
    assert sites["model.layers.0.mlp.down_proj"].in_features == 128 and sites["lm_head"].layer is None


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_rewrite_equals_merged_weights_and_decodes_the_same(arch, tiny_program, tmp_path, tiny_tokenizer):
    if arch == "gpt2":  # Conv1D layers: matmul with [in, out] weights
        from tests.archs import arch_config
        from tests.tiny import export_tiny

        tiny_program = export_tiny(arch_config("gpt2"), tmp_path / "gpt2", tokenizer=tiny_tokenizer)
    prog = paw_mlx.load(tiny_program)
    adapter = random_adapter(linear_sites(prog.program))
    adapted = with_adapters(prog.model, [adapter])
    merged = GraphModel(prog.program, merged_weights(prog.model, adapter))
    base, got, want = prog.model(IDS), adapted(IDS), merged(IDS)
    assert mx.abs(got - base).max().item() > 1e-2  # the adapter changes the logits
    assert mx.allclose(got, want, atol=2e-5).item()
    cache = adapted.make_cache()
    adapted(IDS[:, :-1], cache=cache)
    step = adapted(IDS[:, -1:], cache=cache)  # the compiled decode step
    assert mx.allclose(step[:, -1], got[:, -1], atol=2e-5).item()


def test_merged_model_only_where_it_equals_the_rewrite(tiny_program, tmp_path, tiny_tokenizer):
    from tests.tiny import export_tiny, tiny_llama_config

    prog = paw_mlx.load(tiny_program)
    adapter = random_adapter(linear_sites(prog.program))
    merged = merged_model(prog.model, adapter)
    assert merged is not None and not any(n.op == "lora" for n in merged.program.nodes)
    assert mx.allclose(merged(IDS), with_adapters(prog.model, [adapter])(IDS), atol=2e-5).item()
    assert mx.abs(prog.model(IDS) - merged(IDS)).max().item() > 1e-2  # the base's own weights are untouched
    # half-precision weights would round the update into them
    half = GraphModel(prog.program, {k: v.astype(mx.bfloat16) if v.dtype == mx.float32 else v
                                     for k, v in prog.model.consts.items()})
    assert merged_model(half, adapter) is None
    # a tied LM head's weight is the embedding's too: merging into it would change both
    tied = paw_mlx.load(export_tiny(tiny_llama_config(tie_word_embeddings=True), tmp_path / "tied",
                                    tokenizer=tiny_tokenizer))
    head = linear_sites(tied.program)["lm_head"]
    rng = np.random.default_rng(3)
    on_head = {"lm_head": (rng.standard_normal((2, head.in_features)).astype(np.float32),
                           rng.standard_normal((head.out_features, 2)).astype(np.float32))}
    assert merged_model(tied.model, on_head) is None
    assert merged_model(tied.model, random_adapter(linear_sites(tied.program))) is not None


def test_rows_of_one_batch_take_their_own_adapter(tiny_program):
    prog = paw_mlx.load(tiny_program)
    sites = linear_sites(prog.program)
    first, second = random_adapter(sites, seed=1), random_adapter(sites, rank=2, seed=2)
    attention_only = {m: w for m, w in second.items() if "self_attn" in m}
    stacked = with_adapters(prog.model, [first, None, attention_only], indexed=True)
    assert ADAPTER_INPUT in stacked.input_names
    batch = mx.concatenate([IDS, IDS, IDS])
    index = mx.array([2, 0, 1], dtype=mx.int32)
    logits = stacked(batch, extra_inputs={ADAPTER_INPUT: index})
    alone = [with_adapters(prog.model, [attention_only])(IDS), with_adapters(prog.model, [first])(IDS), prog.model(IDS)]
    for row, want in enumerate(alone):
        assert mx.allclose(logits[row], want[0], atol=2e-5).item(), row
    cache = stacked.make_cache()
    stacked(batch[:, :-1], cache=cache, extra_inputs={ADAPTER_INPUT: index})
    step = stacked(batch[:, -1:], cache=cache, extra_inputs={ADAPTER_INPUT: index})
    assert mx.allclose(step[:, -1], logits[:, -1], atol=2e-5).item()


def test_adapter_that_does_not_fit_is_named(tiny_program):
    prog = paw_mlx.load(tiny_program)
    with pytest.raises(ArtifactError, match="does not have"):
        with_adapters(prog.model, [{"model.layers.9.self_attn.q_proj": (np.zeros((2, 64)), np.zeros((64, 2)))}])
    with pytest.raises(ArtifactError, match="64 x 64 in the base program"):
        with_adapters(prog.model, [{"model.layers.0.self_attn.q_proj": (np.zeros((2, 32)), np.zeros((64, 2)))}])
