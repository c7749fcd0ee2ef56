"""Layout ops over stored weights fold into the weights (exporter/fold.py), lazily and only where safe."""

from __future__ import annotations

import pytest
import torch

from exporter.export import _fold_layouts
from exporter.fold import fold_layouts, unfolded_weights
from exporter.lazy import LazyTensor, materialize
from exporter.lower import Lowering

STORED = torch.arange(2 * 6 * 4, dtype=torch.float32).reshape(2 * 6, 4)  # DBRX-like [E * in, out]


def _lazy(tensor: torch.Tensor, reads: list[int]) -> LazyTensor:
    """A weight read from 'disk': each read is counted."""

    def read() -> torch.Tensor:
        reads.append(1)
        return tensor.clone()

    return LazyTensor(tensor.shape, tensor.dtype, read)


def _node(op: str, inputs: list, attrs: dict, output: str) -> dict:
    return {"op": op, "inputs": inputs, "attrs": attrs, "outputs": [output]}


def _expert_program(weight) -> Lowering:
    """x -> expert_linear(x, transpose(reshape(w, [2, 6, 4]), 1, 2)), as DBRX's recipe lowers."""
    return Lowering(consts={"w": weight}, nodes=[
        _node("reshape", ["w"], {"shape": [-1, 6, 4]}, "v1"),
        _node("transpose", ["v1"], {"dim0": 1, "dim1": 2}, "v2"),
        _node("expert_linear", ["x", "v2", "ids", None], {}, "y"),
    ])


def test_a_layout_chain_folds_into_one_lazy_const_read_once():
    reads: list[int] = []
    low = _expert_program(_lazy(STORED, reads))
    assert unfolded_weights(low) == ["w"]
    assert fold_layouts(low, ["y"]) == 2
    assert [node["op"] for node in low.nodes] == ["expert_linear"]
    assert low.nodes[0]["inputs"] == ["x", "w", "ids", None]
    folded = low.consts["w"]
    assert isinstance(folded, LazyTensor) and list(folded.shape) == [2, 4, 6]
    assert reads == []  # nothing is read until the writer asks
    assert torch.equal(materialize(folded), STORED.reshape(2, 6, 4).transpose(1, 2))
    assert len(reads) == 1 and unfolded_weights(low) == []


def test_identical_layout_readers_share_one_folded_const():
    low = Lowering(consts={"w": STORED}, nodes=[
        _node("transpose", ["w"], {"dim0": 0, "dim1": 1}, "a"),
        _node("transpose", ["w"], {"dim0": 0, "dim1": 1}, "b"),
        _node("linear", ["x", "a", None], {}, "y"),
        _node("linear", ["x", "b", None], {}, "z"),
    ])
    assert fold_layouts(low, ["y", "z"]) == 2
    assert list(low.consts) == ["w"] and list(low.consts["w"].shape) == [4, 12]
    assert [node["inputs"][1] for node in low.nodes] == ["w", "w"]


def test_a_weight_read_two_ways_stays_unfolded_and_is_named():
    chains = Lowering(consts={"w": STORED}, nodes=[
        _node("transpose", ["w"], {"dim0": 0, "dim1": 1}, "a"),
        _node("reshape", ["w"], {"shape": [2, 6, 4]}, "b"),
        _node("linear", ["x", "a", None], {}, "y"),
        _node("expert_linear", ["x", "b", "ids", None], {}, "z"),
    ])
    tied = Lowering(consts={"w": STORED}, nodes=[  # an embedding table also read transposed as the lm_head
        _node("embedding", ["w", "ids"], {}, "h"),
        _node("transpose", ["w"], {"dim0": 0, "dim1": 1}, "t"),
        _node("matmul", ["h", "t"], {}, "y"),
    ])
    for low, outputs in ((chains, ["y", "z"]), (tied, ["y"])):
        nodes = [dict(node) for node in low.nodes]
        assert fold_layouts(low, outputs) == 0
        assert low.nodes == nodes and low.consts["w"] is STORED
        said: list[str] = []
        _fold_layouts(low, outputs, said.append)
        assert said == ["note: w reaches its op through layout ops whose weight has other readers; left unfolded, "
                        "so --quantize and ternary packing leave it in float"]


def test_a_layout_op_torch_refuses_is_left_to_the_interpreter():
    for refused in (_node("select", ["w"], {"dim": 0, "index": 40}, "a"),  # past the axis: the interpreter says so
                    _node("slice", ["w"], {"dim": 0, "start": 0, "end": None, "step": -1}, "a")):
        low = Lowering(consts={"w": STORED}, nodes=[refused, _node("linear", ["x", "a", None], {}, "y")])
        assert fold_layouts(low, ["y"]) == 0
        assert len(low.nodes) == 2


#: one case per layout op the pass folds: attributes, with negative axes where the op takes them
LAYOUT_CASES = {"reshape": {"shape": [3, -1, 4]}, "transpose": {"dim0": -1, "dim1": 0}, "permute": {"dims": [2, 0, 1]},
                "unsqueeze": {"dim": -2}, "squeeze": {"dims": [1, -1]}, "select": {"dim": -2, "index": -1},
                "slice": {"dim": 0, "start": 1, "end": 99, "step": 2}}


def test_every_folded_layout_op_gives_what_the_interpreter_computes():
    import mlx.core as mx
    import numpy as np

    from exporter.fold import LAYOUT_OPS
    from interp.ops.registry import REGISTRY

    assert sorted(LAYOUT_CASES) == sorted(LAYOUT_OPS)
    stored = torch.arange(4 * 1 * 6, dtype=torch.float32).reshape(4, 1, 6)
    for op, attrs in LAYOUT_CASES.items():
        low = Lowering(consts={"w": stored}, nodes=[_node(op, ["w"], attrs, "a"), _node("neg", ["a"], {}, "y")])
        assert fold_layouts(low, ["y"]) == 1, op
        expected = np.array(REGISTRY[op].fn(mx.array(stored.numpy()), **attrs))
        np.testing.assert_array_equal(materialize(low.consts["w"]).numpy(), expected, err_msg=op)


def test_slices_and_selects_fold_as_the_interpreter_computes_them():
    low = Lowering(consts={"w": STORED}, nodes=[
        _node("select", ["w"], {"dim": 1, "index": -1}, "a"),
        _node("slice", ["a"], {"dim": 0, "start": 2, "end": 100, "step": 3}, "b"),
        _node("unsqueeze", ["b"], {"dim": -1}, "c"),
        _node("squeeze", ["c"], {"dims": []}, "d"),
        _node("permute", ["d"], {"dims": [0]}, "e"),
        _node("mul", ["x", "e"], {}, "y"),
    ])
    assert fold_layouts(low, ["y"]) == 5
    assert low.nodes == [_node("mul", ["x", "w"], {}, "y")]
    assert torch.equal(materialize(low.consts["w"]), STORED[:, -1][2:100:3])


def test_a_graph_output_is_not_folded_away():
    low = Lowering(consts={"w": STORED}, nodes=[_node("transpose", ["w"], {"dim0": 0, "dim1": 1}, "y")])
    assert fold_layouts(low, ["y"]) == 0 and len(low.nodes) == 1


def test_a_matmul_by_a_stored_weight_becomes_a_linear_by_its_transpose():
    reads: list[int] = []
    low = Lowering(consts={"w": _lazy(STORED, reads), "shared": STORED}, nodes=[
        _node("matmul", ["x", "w"], {}, "y"),  # GPT-2's Conv1D: [in, out]
        _node("matmul", ["x", "shared"], {}, "z"),
        _node("add", ["shared", 1.0], {}, "u"),  # read another way: stays a matmul
    ])
    assert fold_layouts(low, ["y", "z", "u"]) == 1
    assert low.nodes[0] == _node("linear", ["x", "w", None], {}, "y") and low.nodes[1]["op"] == "matmul"
    assert reads == [] and torch.equal(materialize(low.consts["w"]), STORED.T) and low.consts["shared"] is STORED


@pytest.mark.parametrize("arch", ["gpt2", "falcon"])
def test_matmul_weights_are_quantized(tmp_path, arch):
    """GPT-2 and Falcon multiply by stored (or transposed) weights with matmul: every one ends up 4-bit."""
    import json

    from exporter.export import export_model
    from tests.archs import arch_config
    from tests.tiny import tiny_model

    program = export_model(tiny_model(arch_config(arch)), None, tmp_path / "q4", quantize=4, group_size=32)
    spec = json.loads((program / "prog.json").read_text())
    floats = {name for name, const in spec["consts"].items() if const["dtype"] == "float32" and len(const["shape"]) == 2
              and not name.endswith((".scales", ".biases"))}
    assert not floats
    assert not any(node["op"] == "matmul" and node["inputs"][1] in spec["consts"] for node in spec["nodes"])
