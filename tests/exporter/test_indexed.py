"""DeepSeek Sparse Attention (deepseek_v32, glm_moe_dsa): the indexer's choice is in the program and matters.

tests/exporter/test_architectures.py holds both families to transformers (logits, cached
decoding, greedy tokens); these tests show that those checks exercise the indexer: its
top-k drops keys in the test's sequences, each indexer caches its keys in a KV slot, and
GLM-5's shared layers reuse the previous indexer's choice rather than run their own.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
import torch

from tests.archs import INDEXED, SEQ, arch_config


def _nodes(case, op: str) -> list[dict]:
    spec = json.loads((case.dir / "prog.json").read_text())
    return [node for node in spec["nodes"] if node["op"] == op]


@pytest.mark.parametrize("arch", INDEXED)
def test_the_indexer_drops_keys_in_the_tested_sequences(arch_cases, arch):
    """With every key kept the same weights give other logits: the tested top-k (4 of 12) really selects."""
    from tests.tiny import tiny_model

    config = arch_config(arch)
    assert config.index_topk < SEQ
    config.index_topk = SEQ
    dense = tiny_model(config, seed=0)
    dense.set_attn_implementation("eager")
    with torch.no_grad():
        logits = dense(arch_cases(arch).ids).logits.numpy()
    assert np.max(np.abs(logits - arch_cases(arch).logits)) > 1e-2


def _indexer_kinds(config) -> list[str]:
    """Per layer: "full" (an indexer of its own), "shared" (the previous indexer's choice) or "none" (dots.3's
    sliding layers)."""
    kinds = getattr(config, "indexer_types", None) or ["full"] * config.num_hidden_layers
    return [kind if layer == "indexed_attention" else "none" for kind, layer in zip(kinds, config.layer_types,
                                                                                    strict=True)]


@pytest.mark.parametrize("arch", INDEXED)
def test_indexers_keep_their_keys_in_kv_slots(arch_cases, arch):
    case = arch_cases(arch)
    config = arch_config(arch)
    kinds = _indexer_kinds(config)
    indexers, attention = _nodes(case, "index_topk"), _nodes(case, "attention")
    assert len(indexers) == kinds.count("full") and len(attention) == config.num_hidden_layers
    assert {node["attrs"]["topk"] for node in indexers} == {config.index_topk}
    slots = sorted(node["attrs"]["layer"] for node in indexers + attention)
    assert slots == list(range(len(slots))) == list(range(case.model.program.num_layers))
    # each indexed layer's attention reads the keep mask of the last indexer up to it (a shared layer: the
    # previous one's); a layer without an indexer reads none
    masks = iter(node["outputs"][0] for node in indexers)
    owners, last = [], None
    for kind in kinds:
        last = next(masks) if kind == "full" else last
        owners.append(None if kind == "none" else last)
    assert [(node["inputs"] + [None])[4] for node in attention] == owners


@pytest.mark.parametrize("arch", INDEXED)
def test_cached_indexer_keys_are_trimmed_with_the_kv(arch_cases, arch):
    """Going back in the cache (paw chat's retry) forgets the indexer's keys with the others: decoding again
    from the trimmed cache gives the logits of a fresh cache."""
    case = arch_cases(arch)
    ids = mx.array(case.ids[:1].numpy())
    cache = case.model.make_cache()
    case.model(ids[:, :10], cache=cache)
    for layer in cache:
        assert layer.trim(3) == 3
    again = case.model(ids[:, 7:SEQ], cache=cache)
    fresh = case.model(ids[:, :SEQ])[:, 7:]
    np.testing.assert_allclose(np.array(again), np.array(fresh), atol=1e-5)


def test_an_indexer_slot_past_the_kv_cache_is_refused(arch_cases, tmp_path):
    import shutil

    from interp.errors import ProgramError
    from interp.program import read_program

    copy = tmp_path / "program"
    shutil.copytree(arch_cases("deepseek_v32").dir, copy)
    spec = json.loads((copy / "prog.json").read_text())
    slots = spec["state"]["kv_cache"]["layers"]
    next(node for node in spec["nodes"] if node["op"] == "index_topk")["attrs"]["layer"] = slots
    (copy / "prog.json").write_text(json.dumps(spec))
    with pytest.raises(ProgramError, match=rf"\(index_topk\): layer {slots} is not below state.kv_cache.layers"):
        read_program(copy)


def test_indexed_layers_without_a_recipe_are_refused_by_name(monkeypatch):
    """An indexed family no recipe captures (as a new one would be) stops before tracing, in one line."""
    from exporter import recipes
    from exporter.capture import check_layer_types
    from interp.errors import ExportError
    from tests.tiny import tiny_model

    model = tiny_model(arch_config("deepseek_v32"), seed=0)
    check_layer_types(model)
    monkeypatch.delitem(recipes.RECIPES, "deepseek_v32")
    with pytest.raises(ExportError, match=r"^cannot export: DeepseekV32ForCausalLM has indexed_attention layers"):
        check_layer_types(model)


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_training_cuts_the_graph_between_layers_not_inside_one(arch_cases, layers):
    """Tuning the top ``layers`` decoder layers of GLM-5's (an indexer, a shared layer, an indexer) cuts the graph
    after a frozen attention: each tuned attention's indexer is tuned with it, every frozen one stays in front."""
    from paw_mlx.programs.train import SplitModel, TrainOptions, first_tuned_layer, first_tuned_slot

    model = arch_cases("glm_moe_dsa").model
    options = TrainOptions(layers=layers)
    first = first_tuned_slot(model.program, options)
    split = SplitModel(model, first)
    slots = [[node.attrs["layer"] for node in part.program.nodes if node.op in ("attention", "index_topk")]
             for part in (split.front, split.back)]
    assert all(slot < first for slot in slots[0]) and all(slot >= first for slot in slots[1])
    tuned = [node for node in split.back.program.nodes if node.op == "attention"]
    assert len(tuned) == layers == 3 - first_tuned_layer(model.program, options)


def test_an_indexer_of_unknown_form_is_refused_by_name(monkeypatch):
    from exporter import indexed
    from exporter.capture import capture
    from interp.errors import ExportError
    from tests.tiny import tiny_model

    monkeypatch.delitem(indexed.INDEXERS, "DeepseekV32Indexer")
    with pytest.raises(ExportError, match=r"^cannot export: paw does not know how DeepseekV32Indexer rotates"):
        capture(tiny_model(arch_config("deepseek_v32"), seed=0))
