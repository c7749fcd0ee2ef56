"""Fusion and quantization passes: fused programs compute what unfused ones do."""

from __future__ import annotations

import json
from collections import Counter

import mlx.core as mx
import numpy as np
import pytest
import torch

from interp.graph import GraphModel
from interp.program import read_program
from tests.tiny import export_tiny, tiny_llama_config, tiny_model

IDS = [[5, 17, 42, 99, 7, 250, 31, 8, 64, 3, 120, 77]]


def _ops(path) -> Counter:
    return Counter(n["op"] for n in json.loads((path / "prog.json").read_text())["nodes"])


def _logits(path, ids=IDS, compile_decode=False) -> np.ndarray:
    model = GraphModel.from_program(read_program(path))
    model.compile_decode = compile_decode
    cache = model.make_cache()
    # prefill all but the last 3 tokens, then decode one at a time (exercises cache offsets)
    outs = [model(mx.array([row[:-3] for row in ids]), cache=cache)]
    for i in range(3, 0, -1):
        outs.append(model(mx.array([[row[-i]] for row in ids]), cache=cache))
    return np.array(mx.concatenate(outs, axis=1).astype(mx.float32))


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuse")
    config = tiny_llama_config(rope_theta=10000.0)
    return {
        "fused": export_tiny(config, root / "fused"),
        "plain": export_tiny(config, root / "plain", fuse=False),
        "q4": export_tiny(config, root / "q4", quantize=4, group_size=32),
        "config": config,
    }


def test_fusion_replaces_norm_and_rope_patterns(programs):
    fused, plain = _ops(programs["fused"]), _ops(programs["plain"])
    layers = programs["config"].num_hidden_layers
    assert fused["rms_norm"] == 2 * layers + 1 and plain["rms_norm"] == 0
    assert fused["rope"] == 2 * layers and plain["rope"] == 0
    assert fused["rsqrt"] == 0 and fused["neg"] == 0 and fused["cos"] == 0
    assert sum(fused.values()) < sum(plain.values()) / 2
    # q/k/v and gate/up read the same input: one matmul each, split afterwards
    assert plain["linear"] == 7 * layers + 1 and fused["linear"] == 4 * layers + 1
    assert fused["split"] == 2 * layers and plain["split"] == 0
    names = read_program(programs["fused"]).spec["consts"]
    assert "model.layers.0.self_attn.q_proj+k_proj+v_proj.weight" in names
    assert "model.layers.0.mlp.gate_proj+up_proj.weight" in names
    assert not any(n.startswith("model.layers.0.self_attn.q_proj.") for n in names)


def test_fused_program_matches_unfused_and_transformers(programs):
    fused, plain = _logits(programs["fused"]), _logits(programs["plain"])
    np.testing.assert_allclose(fused, plain, atol=1e-5, rtol=0)
    with torch.no_grad():
        ref = tiny_model(programs["config"])(torch.tensor(IDS)).logits.numpy()
    np.testing.assert_allclose(fused, ref, atol=1e-4, rtol=0)


def test_compiled_decode_matches_eager(programs):
    for name in ("fused", "plain", "q4"):
        eager = _logits(programs[name])
        compiled = _logits(programs[name], compile_decode=True)
        np.testing.assert_allclose(compiled, eager, atol=1e-5, rtol=0, err_msg=name)


def test_rope_explicit_positions_match_fast_path(programs):
    """Caller-given positions (e.g. padded batches) take the explicit path and agree."""
    model = GraphModel.from_program(read_program(programs["fused"]))
    ids = mx.array(IDS)
    fast = model(ids, cache=model.make_cache())
    positions = mx.arange(ids.shape[1], dtype=mx.int32)[None]
    explicit = model(ids, cache=model.make_cache(), positions=positions)
    np.testing.assert_allclose(np.array(fast), np.array(explicit), atol=1e-5, rtol=0)


def test_quantized_program_matches_mlx_quantized_reference(programs):
    ops = _ops(programs["q4"])
    assert ops["quantized_linear"] == 4 * programs["config"].num_hidden_layers + 1
    assert ops["quantized_embedding"] == 1 and ops["linear"] == 0
    # Same model, weights round-tripped through mx.quantize/dequantize: the float program
    # with dequantized weights must give the quantized program's logits.
    q4 = _logits(programs["q4"])
    fused = _logits(programs["fused"])
    assert np.abs(q4 - fused).max() < 0.5  # 4-bit weights change logits, but not wildly
    program = read_program(programs["q4"])
    consts = mx.load(str(program.consts_path))
    deq = {}
    for name in [n for n in consts if n.endswith(".qweight")]:
        base = name.removesuffix(".qweight")
        deq[base + ".weight"] = mx.dequantize(consts[name], consts[base + ".scales"], consts[base + ".biases"],
                                              group_size=32, bits=4)
    fused = read_program(programs["fused"])
    ref_model = GraphModel(fused, {**mx.load(str(fused.consts_path)), **deq})
    ref = ref_model(mx.array(IDS), cache=ref_model.make_cache())
    got = GraphModel.from_program(program)(mx.array(IDS), cache=None)
    np.testing.assert_allclose(np.array(got), np.array(ref), atol=1e-4, rtol=0)


def test_bfloat16_program_fuses_rope_with_upcast_frequencies(tmp_path):
    """A bf16 model keeps inv_freq in bf16 and upcasts it: the pattern still fuses."""
    config = tiny_llama_config(num_hidden_layers=1)
    path = export_tiny(config, tmp_path / "bf16", dtype="bfloat16")
    ops = _ops(path)
    assert ops["rope"] == 2 and ops["rms_norm"] == 3 and ops["cos"] == 0
    plain = export_tiny(config, tmp_path / "bf16-plain", dtype="bfloat16", fuse=False)
    np.testing.assert_allclose(_logits(path), _logits(plain), atol=0.1, rtol=0)
