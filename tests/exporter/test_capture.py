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
@pytest.mark.parametrize("arch", ["llama", "cohere", "phi3"])
def test_the_captured_graph_lowers_to_the_decomposed_program(arch, decompositions):
    model = tiny_model(arch_config(arch))
    direct = _program(capture(model))
    assert decompositions == [], "the second trace was not skipped"
    assert direct == _program(capture(model, decompose=True))
    assert decompositions == [1]


def test_in_place_ops_still_go_through_the_decomposition(decompositions):
    exported = capture(tiny_model(arch_config("olmo")))  # clip_qkv is an in-place clamp_
    assert decompositions == [1]
    mutating = [n for n in exported.graph.nodes if n.op == "call_function"
                and isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable]
    assert mutating == []
