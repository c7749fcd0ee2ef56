"""Capture without ``run_decompositions``: the same program, or the decomposition when needed."""

from __future__ import annotations

import pytest
import torch

from exporter.capture import capture
from exporter.fuse import fuse
from exporter.lower import eliminate_dead_code, lower
from tests.archs import arch_config
from tests.tiny import tiny_model


def _program(exported) -> tuple[list, list]:
    low, outputs = lower(exported)
    eliminate_dead_code(low, outputs)
    fuse(low)
    eliminate_dead_code(low, outputs)
    return [(n["op"], n["inputs"], n["attrs"], n["outputs"]) for n in low.nodes], sorted(low.consts)


@pytest.fixture
def decompositions(monkeypatch):
    """Counts the calls of ExportedProgram.run_decompositions."""
    calls = []
    real = torch.export.ExportedProgram.run_decompositions

    def counting(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.export.ExportedProgram, "run_decompositions", counting)
    return calls


# llama: the common case; cohere: flatten (interleaved RoPE); phi3: chunk, dropout. Every
# architecture of tests/archs.py gave the same program both ways when this was written; the
# architecture tests check every one against transformers through the direct path.
#: phi3 here with plain rotary: tests/archs.py gives it longrope, whose in-place buffer write
#: takes the decomposition (as test_in_place_ops_still_go_through_the_decomposition shows)
DIRECT_OVERRIDES = {"phi3": dict(partial_rotary_factor=0.5)}


@pytest.mark.parametrize("arch", ["llama", "cohere", "phi3"])
def test_the_captured_graph_lowers_to_the_decomposed_program(arch, decompositions, monkeypatch):
    from tests import archs

    if arch in DIRECT_OVERRIDES:
        monkeypatch.setitem(archs.ARCHS, arch, DIRECT_OVERRIDES[arch])
    model = tiny_model(arch_config(arch))
    direct = _program(capture(model))
    assert decompositions == [], "the second trace was not skipped"
    assert direct == _program(capture(model, decompose=True))
    assert decompositions == [1]


@pytest.mark.parametrize("arch", ["olmo", "phi3"])  # olmo: clip_qkv's clamp_; phi3: longrope's copy_
def test_in_place_ops_still_go_through_the_decomposition(decompositions, arch):
    exported = capture(tiny_model(arch_config(arch)))
    assert decompositions == [1]
    mutating = [n for n in exported.graph.nodes if n.op == "call_function"
                and isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable]
    assert mutating == []


def test_dynamic_ntk_rotary_exports_and_matches_within_the_context(tmp_path, monkeypatch):
    """rope_type "dynamic" rescales only past max_position_embeddings (the program's context),
    with a Python if on the positions: capture runs it plain, and the logits match."""
    import mlx.core as mx
    import numpy as np

    from tests import archs

    monkeypatch.setitem(archs.ARCHS, "llama", dict(rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0,
                                                                           factor=2.0)))
    case = archs.ArchCase("llama", archs.export_arch("llama", "float32", tmp_path / "prog"))
    got = np.array(case.model(mx.array(case.ids.numpy())))
    np.testing.assert_allclose(got, case.logits, atol=1e-4)
    model = tiny_model(arch_config("llama"))
    assert model.model.rotary_emb.rope_type == "dynamic"  # only changed for the capture


# llama: set_attn_implementation; mixtral: the experts interface too; bloom: hand-written attention (a recipe),
# whose config is switched directly
@pytest.mark.parametrize("arch", ["llama", "mixtral", "bloom"])
def test_capture_leaves_the_model_running_as_before(arch):
    """A model captured (exported from Python) runs transformers' own attention and experts afterwards, in the
    mode it was in: capture switches them to paw's only while it traces."""
    model = tiny_model(arch_config(arch))
    model.set_attn_implementation("eager")
    model.train()
    ids = torch.randint(3, 300, (1, 6))
    implementations = model.config._attn_implementation, model.config._experts_implementation
    capture(model)
    assert (model.config._attn_implementation, model.config._experts_implementation) == implementations
    assert model.training
    model.eval()
    with torch.no_grad():
        got = model(ids).logits
    want = tiny_model(arch_config(arch))
    want.set_attn_implementation("eager")
    with torch.no_grad():
        torch.testing.assert_close(got, want(ids).logits)
