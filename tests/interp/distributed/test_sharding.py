"""Tensor-parallel plans: found in the graph, and exact when every rank's program runs in lockstep."""

from __future__ import annotations

import pytest

from interp.distributed.sharding import plan_tensor_parallel
from interp.errors import DistributedError
from interp.program import read_program
from tests.interp.distributed.conftest import LAYERED, LAYERS
from tests.interp.distributed.simulate import max_difference, read_whole, tensor_logits, whole_logits

PROMPT = [5, 17, 33, 90, 12, 7, 101]


@pytest.mark.parametrize("arch", LAYERED)
@pytest.mark.parametrize("ranks", [2, 3])
def test_tensor_split_gives_the_whole_programs_logits(layered_programs, arch, ranks):
    program, consts = read_whole(layered_programs[arch])
    expected, feeds = whole_logits(program, consts, PROMPT, steps=5)
    assert max_difference(expected, tensor_logits(program, consts, ranks, feeds)) < 1e-5


def test_llama_splits_like_megatron(layered_programs):
    """Per layer: the fused QKV and gate/up projections column-parallel, o_proj and down_proj
    row-parallel, one all_sum before each residual add; KV heads dealt out, weights cut to match."""
    program = read_program(layered_programs["llama"])
    plan = plan_tensor_parallel(program, 2)
    assert len(plan.column) == len(plan.row) == 2 * LAYERS
    local = plan.rank_program(1)
    sums = [i for i, node in enumerate(local.nodes) if node.op == "all_sum"]
    assert len(sums) == 2 * LAYERS
    assert all(local.nodes[i + 1].op == "add" for i in sums)
    shapes = {name: meta["shape"] for name, meta in local.spec["consts"].items()}
    assert shapes["model.layers.0.self_attn.q_proj+k_proj+v_proj.weight"] == [64, 64]  # 2 of 4 heads, 1 of 2 KV heads
    assert shapes["model.layers.0.self_attn.o_proj.weight"] == [64, 32]
    assert shapes["model.layers.0.mlp.down_proj.weight"] == [64, 64]
    assert shapes["lm_head.weight"] == [384, 64]  # the output head stays whole


def test_moe_keeps_the_router_and_shared_gate_whole(layered_programs):
    program = read_program(layered_programs["qwen2_moe"])
    local = plan_tensor_parallel(program, 2).rank_program(0)
    shapes = {name: meta["shape"] for name, meta in local.spec["consts"].items()}
    assert shapes["model.layers.0.mlp.gate.weight"] == [4, 64]  # softmax over experts needs every expert's logit
    assert shapes["model.layers.0.mlp.experts.gate_up_proj"] == [4, 32, 64]  # each expert's width halved
    # shared expert's gate and up halved, its one-column sigmoid gate kept whole on every rank
    fused = "model.layers.0.mlp.shared_expert.gate_proj+shared_expert.up_proj+shared_expert_gate.weight"
    assert shapes[fused] == [65, 64]


def test_too_few_kv_heads_keep_attention_whole(layered_programs):
    """Two KV heads over three ranks: attention stays whole on every rank, the MLP still splits."""
    program = read_program(layered_programs["llama"])
    plan = plan_tensor_parallel(program, 3)
    assert len(plan.column) == len(plan.row) == LAYERS
    shapes = plan.rank_program(2).spec["consts"]
    assert shapes["model.layers.0.self_attn.q_proj+k_proj+v_proj.weight"]["shape"] == [128, 64]


def test_quantized_weights_split_by_whole_groups(quantized_program):
    """4-bit weights: rows split freely, input features only by whole quantization groups."""
    program, consts = read_whole(quantized_program)
    expected, feeds = whole_logits(program, consts, PROMPT, steps=3)
    assert max_difference(expected, tensor_logits(program, consts, 2, feeds)) < 1e-5
    shapes = plan_tensor_parallel(program, 2).rank_program(1).spec["consts"]
    assert shapes["model.layers.0.self_attn.o_proj.qweight"]["shape"] == [64, 4]  # 32 of 64 inputs, 8 per uint32
    assert shapes["model.layers.0.self_attn.o_proj.scales"]["shape"] == [64, 1]  # one group of 32


def test_nothing_to_split_is_one_clear_error(layered_programs):
    program = read_program(layered_programs["llama"])
    with pytest.raises(DistributedError, match="nothing in this program to split over 200 ranks"):
        plan_tensor_parallel(program, 200)
