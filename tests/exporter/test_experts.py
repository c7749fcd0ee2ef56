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
from tests.archs import MOE, VOCAB, arch_config
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


#: One family per way transformers stores expert weights: the experts interface's fused parameters
#: (``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I]; Mixtral alone, Qwen2-MoE beside a shared
#: expert), its ungated form (Nemotron-H: ``up_proj`` [E, I, H]), gpt-oss's transposed ones with biases,
#: DBRX's flat ones, JetMoE's and Llama 4's own classes.
#: Every other family's experts are the experts interface's class under another name (checked below):
#: two exports each would add seconds, not coverage.
EXPERT_LAYOUTS = ("mixtral", "qwen2_moe", "nemotron_h", "gpt_oss", "dbrx", "jetmoe", "llama4_text")


def _interface_experts(model) -> list:
    """The modules holding experts in the experts interface's layout: 3-D ``gate_up_proj`` [E, 2I, H] and
    ``down_proj`` [E, H, I] parameters."""
    found = []
    for module in model.modules():
        gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
        if isinstance(gate_up, torch.nn.Parameter) and isinstance(down, torch.nn.Parameter) and gate_up.ndim == 3:
            experts, twice_inner, hidden = gate_up.shape
            assert tuple(down.shape) == (experts, hidden, twice_inner // 2), type(module).__name__
            found.append(module)
    return found


@pytest.mark.parametrize("arch", [arch for arch in MOE if arch not in EXPERT_LAYOUTS])
def test_the_other_families_store_experts_as_the_experts_interface(arch):
    """What lets the quantization test below take one family per layout: a new family storing its
    experts another way fails here, and joins ``EXPERT_LAYOUTS``."""
    assert _interface_experts(tiny_model(arch_config(arch))), f"{arch}: no experts in the interface's layout"


@pytest.mark.parametrize("arch", EXPERT_LAYOUTS)
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
