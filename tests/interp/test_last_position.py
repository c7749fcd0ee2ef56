"""Logits of the last position only (``last_only``): the same numbers as the full logits'
last row, the LM head cut where the graph allows it, and no cut where slicing would be wrong."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from interp.graph import GraphModel
from interp.last_position import last_position_cut
from interp.program import Node, read_program
from tests.archs import ARCHS

#: architectures whose head runs on the full hidden state: none today (each is listed here
#: with the reason when one appears), so every tiny architecture must get a cut
NO_CUT: dict[str, str] = {}


def _logits(model: GraphModel, ids: list[list[int]], last_only: bool, key_mask=None) -> np.ndarray:
    cache = model.make_cache()
    out = model(mx.array(ids, dtype=mx.int32), cache=cache, key_mask=key_mask, last_only=last_only)
    return np.array(out.astype(mx.float32))


@pytest.mark.parametrize("arch", ARCHS)
def test_last_only_gives_the_last_row_of_the_full_logits(arch_program, arch):
    model = GraphModel.from_program(read_program(arch_program(arch)))
    assert (model._last_cut is not None) == (arch not in NO_CUT), model._last_cut
    ids = [[5, 17, 42, 99, 3, 250, 11, 7], [9, 9, 120, 33, 64, 2, 18, 200]]
    full = _logits(model, ids, last_only=False)
    last = _logits(model, ids, last_only=True)
    assert last.shape == (2, 1, full.shape[-1])
    np.testing.assert_allclose(last[:, 0], full[:, -1], rtol=1e-4, atol=1e-4)
    assert np.array_equal(last[:, 0].argmax(-1), full[:, -1].argmax(-1))


def test_last_only_with_left_padding_and_a_cache(tiny_program):
    """As a batch of programs calls it: a cached prefix, rows left-padded and key-masked."""
    model = GraphModel.from_program(read_program(tiny_program))
    prefix = [[4, 8, 15, 16, 23, 42]] * 2
    rows = [[0, 0, 7, 8, 9], [11, 12, 13, 14, 15]]  # row 0 has two pads
    mask = mx.array([[True] * 6 + [False, False] + [True] * 3, [True] * 11])
    outs = []
    for last_only in (False, True):
        cache = model.make_cache()
        model(mx.array(prefix, dtype=mx.int32), cache=cache)
        positions = mx.array([[6, 6, 6, 7, 8], [6, 7, 8, 9, 10]], dtype=mx.int32)
        got = model(mx.array(rows, dtype=mx.int32), cache=cache, positions=positions, key_mask=mask,
                    last_only=last_only)
        outs.append(np.array(got[:, -1]))
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-5)


def _node(op, inputs, out):
    return Node(op, tuple(inputs), {}, (out,))


CONSTS = {"norm.w": mx.ones((4,)), "head.w": mx.ones((8, 4)), "scale": mx.array(2.0), "table": mx.ones((3, 4))}


def test_the_cut_is_the_residual_sum_before_norm_head_and_soft_cap():
    nodes = [_node("add", ["x", "y"], "h"), _node("rms_norm", ["h", "norm.w"], "n"),
             _node("linear", ["n", "head.w", None], "z"), _node("div", ["z", "scale"], "d"),
             _node("tanh", ["d"], "logits")]
    cut = last_position_cut(nodes, CONSTS, ["logits"])
    assert (cut.node, cut.value) == (1, "h")


def test_the_cut_stops_below_a_value_something_else_reads_in_full():
    """The residual sum also feeds another node: the head's input is sliced, not the sum."""
    nodes = [_node("add", ["x", "y"], "h"), _node("mul", ["h", "scale"], "side"),
             _node("rms_norm", ["h", "norm.w"], "n"), _node("linear", ["n", "head.w", None], "logits")]
    cut = last_position_cut(nodes, CONSTS, ["logits", "side"])
    assert (cut.node, cut.value) == (3, "n")


@pytest.mark.parametrize("case", ["normed state read twice", "normed state is an output", "no head",
                                  "head weight computed", "position-shaped constant"])
def test_no_cut_where_slicing_would_change_what_something_reads(case):
    residual, norm = _node("add", ["x", "y"], "h"), _node("rms_norm", ["h", "norm.w"], "n")
    head = _node("linear", ["n", "head.w", None], "logits")
    nodes, outputs = [residual, norm, head], ["logits"]
    if case == "normed state read twice":
        nodes = [residual, norm, _node("mul", ["n", "scale"], "other"), head]
    elif case == "normed state is an output":
        outputs = ["logits", "n"]
    elif case == "no head":
        nodes = [residual, _node("rms_norm", ["h", "norm.w"], "logits")]
    elif case == "head weight computed":  # a tied head read through a transpose: two computed inputs
        nodes = [residual, norm, _node("transpose", ["emb"], "wt"), _node("matmul", ["n", "wt"], "logits")]
    else:  # an elementwise constant with a position axis cannot be sliced with the hidden state
        nodes = [residual, norm, _node("linear", ["n", "head.w", None], "z"), _node("mul", ["z", "table"], "logits")]
    assert last_position_cut(nodes, CONSTS, outputs) is None


def test_last_index_picks_each_rows_own_position(tiny_program, monkeypatch):
    """Right-padded rows of different lengths (the server's prompts prefilled together): each
    row's logits at its own last token, with the cut and without one."""
    model = GraphModel.from_program(read_program(tiny_program))
    ids = mx.array([[5, 17, 42, 99, 3, 250], [9, 9, 120, 0, 0, 0], [7, 0, 0, 0, 0, 0]], dtype=mx.int32)
    last = mx.array([5, 2, 0], dtype=mx.int32)
    inputs = {"input_ids": ids, "position_ids": mx.broadcast_to(mx.arange(6, dtype=mx.int32), (3, 6))}
    full = np.array(model.run(inputs)["logits"])
    want = full[np.arange(3), np.array(last)]
    for cut in (model._last_cut, None):
        monkeypatch.setattr(model, "_last_cut", cut)
        got = np.array(model.run(inputs, last_only=True, last_index=last)["logits"])
        assert got.shape == (3, 1, full.shape[-1])
        np.testing.assert_allclose(got[:, 0], want, rtol=1e-5, atol=1e-5)


def test_last_index_must_be_one_position_per_row_with_last_only(tiny_program):
    from interp.errors import ProgramError

    model = GraphModel.from_program(read_program(tiny_program))
    inputs = {"input_ids": mx.array([[5, 17, 42]], dtype=mx.int32),
              "position_ids": mx.arange(3, dtype=mx.int32)[None]}
    for kwargs in ({"last_index": mx.array([1])}, {"last_only": True, "last_index": mx.array([[1]])}):
        with pytest.raises(ProgramError, match="one position per row"):
            model.run(inputs, **kwargs)
