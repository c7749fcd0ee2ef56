"""Mixture-of-experts blocks: routed experts only (``expert_linear``), the dense switch, quantized experts.

Parity of the sparse programs with transformers is in test_architectures.py (mixtral,
qwen2_moe, olmoe); here: what the programs hold and that the other forms agree with it.
"""

from __future__ import annotations

import json
from collections import Counter

import mlx.core as mx
import numpy as np
import pytest
import torch

from interp.graph import GraphModel
from interp.program import load_consts, read_program
from tests.archs import INDEXED, MOE, RECURRENT, VOCAB, arch_config
from tests.tiny import tiny_model

IDS = np.random.default_rng(3).integers(3, VOCAB, (2, 70))  # 140 routed pairs: the grouped-by-expert path too


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    from exporter.export import export_model

    root = tmp_path_factory.mktemp("experts")
    model = tiny_model(arch_config("mixtral"))
    with torch.no_grad():
        reference = model(torch.from_numpy(IDS)).logits.numpy()
    programs = {mode: export_model(model, None, root / mode, experts=mode) for mode in ("sparse", "dense")}
    programs["q4"] = export_model(model, None, root / "q4", quantize=4, group_size=32)
    return programs, reference


def _ops(directory) -> Counter:
    return Counter(node["op"] for node in json.loads((directory / "prog.json").read_text())["nodes"])


def _logits(directory, consts=None) -> np.ndarray:
    program = read_program(directory)
    model = GraphModel(program, consts or load_consts(program))
    return np.array(model(mx.array(IDS)))


def test_sparse_program_reads_routed_experts_and_dense_all(mixtral):
    programs, reference = mixtral
    layers = arch_config("mixtral").num_hidden_layers
    assert _ops(programs["sparse"])["expert_linear"] == 2 * layers
    assert _ops(programs["dense"])["expert_linear"] == 0
    for mode in ("sparse", "dense"):
        assert np.abs(_logits(programs[mode]) - reference).max() < 1e-4, mode


def _dequantized(quantized, plain) -> dict:
    """``plain``'s consts, each weight ``quantized`` holds in 4 bits (groups of 32) replaced by its dequantization."""
    consts = load_consts(read_program(quantized))
    floats = load_consts(read_program(plain))
    for name in [n for n in consts if n.endswith(".qweight")]:
        base = name.removesuffix(".qweight")
        weight = base if base in floats else base + ".weight"
        floats[weight] = mx.dequantize(consts[name], consts[base + ".scales"], consts[base + ".biases"],
                                       group_size=32, bits=4)
    return floats


def test_quantized_experts_compute_with_their_dequantized_weights(mixtral):
    programs, _ = mixtral
    layers = arch_config("mixtral").num_hidden_layers
    assert _ops(programs["q4"])["quantized_expert_linear"] == 2 * layers
    floats = _dequantized(programs["q4"], programs["sparse"])
    np.testing.assert_allclose(_logits(programs["q4"]), _logits(programs["sparse"], floats), atol=1e-4, rtol=0)


# The hybrids' experts (Qwen3-Next's, Qwen3.5-MoE's, Kimi Linear's, Nemotron-H's, Granite 4's) are the
# experts interface's, as their attention-only relatives' here, and the sparse-attention families' experts
# are DeepSeek-V3's class under another name: an export each adds seconds, not coverage.
@pytest.mark.parametrize("arch", [arch for arch in MOE if arch not in RECURRENT + INDEXED])
def test_every_expert_weight_is_quantized(tmp_path, arch):
    """gpt-oss and DBRX reach their experts through a transpose or reshape of the stored weight
    (exporter/fold.py folds it): in every family each expert weight ends up 4-bit, none in float."""
    from exporter.export import export_model

    model = tiny_model(arch_config(arch))
    plain = export_model(model, None, tmp_path / "float")
    quantized = export_model(model, None, tmp_path / "q4", quantize=4, group_size=32)
    experts = {node["inputs"][1] for node in json.loads((plain / "prog.json").read_text())["nodes"]
               if node["op"] == "expert_linear"}
    spec = read_program(quantized).spec
    assert experts and all(name in read_program(plain).spec["consts"] for name in experts)
    assert _ops(quantized)["expert_linear"] == 0
    assert _ops(quantized)["quantized_expert_linear"] == _ops(plain)["expert_linear"]
    for name in experts:  # gone from the consts, held as codes, scales and biases instead
        assert name not in spec["consts"]
        assert spec["consts"][name.removesuffix(".weight") + ".qweight"]["dtype"] == "uint32"
    floats, dequantized = load_consts(read_program(plain)), _dequantized(quantized, plain)
    scales = load_consts(read_program(quantized))
    for name in experts:  # each 4-bit weight is the float program's own, in its layout, within one step
        step = scales[name.removesuffix(".weight") + ".scales"]  # [E, out, groups]
        error = mx.abs(dequantized[name] - floats[name]).reshape(*step.shape, 32)
        assert mx.all(error <= mx.abs(step)[..., None] + 1e-6).item(), name  # MLX may store a negative scale
    # the quantized program computes exactly with those weights (routing flips make a tiny random
    # MoE's 4-bit logits differ widely from its float ones, for families quantized before too)
    np.testing.assert_allclose(_logits(quantized), _logits(plain, dequantized), atol=1e-4, rtol=0)


#: families whose expert blocks bypass the experts interface (exporter/recipes.py), and how many
#: expert_linear ops stay in their dense program: JetMoE's attention experts are routed in both modes;
#: Llama 4 runs every expert densely in transformers' own form, each on the token scaled by its score
RECIPE_EXPERTS = {"dbrx": 0, "jetmoe": 2, "llama4_text": 0}


@pytest.mark.parametrize("arch", sorted(RECIPE_EXPERTS))
def test_recipe_expert_blocks_follow_the_experts_mode(tmp_path, arch):
    from exporter.export import export_model

    model = tiny_model(arch_config(arch))
    with torch.no_grad():
        reference = model(torch.from_numpy(IDS)).logits.numpy()
    counts = {}
    for mode in ("sparse", "dense"):
        program = export_model(model, None, tmp_path / mode, experts=mode)
        counts[mode] = _ops(program)["expert_linear"]
        assert np.abs(_logits(program) - reference).max() < 1e-4, mode
    assert counts["dense"] == RECIPE_EXPERTS[arch] * arch_config(arch).num_hidden_layers
    assert counts["sparse"] > counts["dense"]
