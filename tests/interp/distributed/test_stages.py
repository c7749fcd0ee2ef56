"""The pipeline cut: computed from the graph, balanced by weight bytes, and exact when simulated."""

from __future__ import annotations

import re

import pytest

from interp.distributed.stages import const_bytes, layer_cuts, plan_pipeline
from interp.errors import DistributedError
from interp.program import read_program
from tests.interp.distributed.conftest import LAYERED, LAYERS
from tests.interp.distributed.simulate import max_difference, pipeline_logits, read_whole, whole_logits

PROMPT = [5, 17, 33, 90, 12, 7, 101]


def _total_bytes(program) -> int:
    return sum(const_bytes(meta) for meta in program.spec["consts"].values())


@pytest.mark.parametrize("arch", LAYERED)
@pytest.mark.parametrize("ranks", [2, 3])
def test_pipeline_split_gives_the_whole_programs_logits(layered_programs, arch, ranks):
    program, consts = read_whole(layered_programs[arch])
    expected, feeds = whole_logits(program, consts, PROMPT, steps=6)
    got = pipeline_logits(program, consts, ranks, feeds)
    assert max_difference(expected, got) < 1e-5


@pytest.mark.parametrize("arch", LAYERED)
def test_stages_cover_every_node_and_layer_once(layered_programs, arch):
    program = read_program(layered_programs[arch])
    plan = plan_pipeline(program, 3)
    assert [stage.rank for stage in plan.stages] == [0, 1, 2, 0]
    layers = [layer for stage in plan.stages for layer in stage.layers]
    assert layers == list(range(LAYERS)) and all(stage.layers for stage in plan.stages[:-1])
    computed = [i for stage in plan.stages for i in stage.nodes if program.nodes[i].op not in ("sym_size",)]
    # every node runs on exactly one stage, except the input-only ones each stage recomputes
    assert set(computed) == set(range(len(program.nodes))) - {
        i for i, node in enumerate(program.nodes) if node.op == "sym_size"}
    for stage, following in zip(plan.stages, plan.stages[1:], strict=False):
        assert stage.sends == following.receives
    # the tail sits on rank 0 and receives the last rank's hidden state, not logits
    assert plan.stages[-1].receives and "logits" not in plan.stages[-1].receives


@pytest.mark.slow
def test_smollm2_split_balances_weight_bytes(smollm2_program):
    """Reading prog.json only: each rank holds about 1/n of the weights, whole layers each."""
    program = read_program(smollm2_program)
    total = _total_bytes(program)
    for ranks in (2, 3):
        plan = plan_pipeline(program, ranks)
        layer = total / program.num_layers
        held: dict[str, int] = {}  # const -> how many ranks load it
        for rank in range(ranks):
            for name in {name for stage in plan.for_rank(rank) for name in stage.consts}:
                held[name] = held.get(name, 0) + 1
        shared = {name for name, times in held.items() if times > 1}
        # only vectors (RoPE frequencies) sit on several ranks; the tied embedding and output head on rank 0 alone
        assert shared and all(len(program.spec["consts"][name]["shape"]) < 2 for name in shared)
        assert sum(plan.weight_bytes) - total == sum(
            const_bytes(program.spec["consts"][name]) * (held[name] - 1) for name in shared)
        assert max(plan.weight_bytes) <= total / ranks + layer
        for stage in plan.stages[:-1]:  # a layer's weights never straddle two ranks
            owned = {int(m.group(1)) for name in stage.consts if (m := re.search(r"layers\.(\d+)\.", name))}
            assert owned == set(stage.layers)
        assert plan.stages[-1].consts == ("lm_head.weight",)


@pytest.mark.slow
def test_pipeline_shares_give_a_bigger_mac_more_layers(smollm2_program):
    program = read_program(smollm2_program)
    plan = plan_pipeline(program, 2, shares=[3, 1])
    assert [plan.describe(rank) for rank in (0, 1)] == ["layers 0-20 + output head", "layers 21-29"]
    assert plan.weight_bytes[0] > 3 * plan.weight_bytes[1] * 0.9
    with pytest.raises(DistributedError, match="pipeline shares must be 2 positive numbers, one per rank; got 3, 0"):
        plan_pipeline(program, 2, shares=[3, 0])


def test_cuts_fall_after_each_layers_last_add(layered_programs):
    program = read_program(layered_programs["llama"])
    cuts, tail = layer_cuts(program)
    assert len(cuts) == LAYERS - 1
    for cut in cuts:
        assert program.nodes[cut - 1].op == "add" and program.nodes[cut].op == "rms_norm"
    assert program.nodes[tail].op == "linear" and tail == len(program.nodes) - 1


def test_more_ranks_than_layers_is_one_clear_error(layered_programs):
    program = read_program(layered_programs["llama"])
    with pytest.raises(DistributedError, match=f"has {LAYERS} layers, too few for 5 pipeline ranks"):
        plan_pipeline(program, 5)
