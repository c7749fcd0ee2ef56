"""Prefix tuning on the tiny model: the loss falls, the base stays frozen, artifacts round-trip."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest

import paw_mlx
from interp.errors import PawError
from paw_mlx.programs.artifact import read_artifact
from paw_mlx.programs.interpreter import interpreter
from paw_mlx.programs.tune import SplitModel, TrainableCache, load_examples, split_examples

EXAMPLES = [{"input": f"(A) {a} (B) {b}", "output": f'["{a}", "{b}"]'}
            for a, b in [("cat", "dog"), ("dog", "bird"), ("bird", "cat"), ("cat", "cat"), ("dog", "dog"),
                         ("bird", "bird")]]


def test_split_model_equals_the_whole_graph(tiny_program):
    prog = interpreter(tiny_program)
    art = paw_mlx.compile("Parse the options.", base=tiny_program)
    ids = mx.array([[5, 9, 33, 70, 12]], dtype=mx.int32)
    start = art.prefix_length
    pos = mx.arange(start, start + 5, dtype=mx.int32)[None]
    whole = prog.model(ids, cache=[TrainableCache(k, v) for k, v in art.prefix], positions=pos)
    split = SplitModel(prog.model, first_tuned_layer=1)
    front = split.front.run({"input_ids": ids, "position_ids": pos},
                            cache=[TrainableCache(*art.prefix[0]), None])
    hidden = split.back.run(front, cache=[None, TrainableCache(*art.prefix[1])])[split.back.output_names[0]]
    assert split.head is not None  # the LM head was split off
    assert mx.allclose(split.scores(hidden), whole, atol=1e-5).item()


def test_tuning_lowers_the_loss_and_round_trips(tiny_program, tmp_path):
    examples = tmp_path / "ex.jsonl"
    examples.write_text("".join(json.dumps(r) + "\n" for r in EXAMPLES), encoding="utf-8")
    seen = []
    art = paw_mlx.compile("Parse the options into a JSON list.", base=tiny_program, out_dir=tmp_path / "prog",
                          examples=examples, tune_options={"steps": 8, "layers": 0, "holdout": 0.34,
                                                           "learning_rate": 5e-2},
                          progress=lambda step, total, loss: seen.append(step))
    info = art.tuning
    assert seen == list(range(1, 9))
    assert info["first_batch_loss"][1] < info["first_batch_loss"][0]
    assert info["tuned_layers"] == [0, 1] and info["heldout_examples"] == 2
    back = read_artifact(tmp_path / "prog")
    assert back.tuning == json.loads(json.dumps(info))
    for (k1, _), (k2, _) in zip(art.prefix, back.prefix, strict=True):
        assert mx.array_equal(k1, k2).item()
    spec_only = paw_mlx.compile("Parse the options into a JSON list.", base=tiny_program)
    assert not mx.array_equal(spec_only.prefix[1][0], back.prefix[1][0]).item()  # the prefix moved
    assert isinstance(paw_mlx.function(tmp_path / "prog", max_new_tokens=4)("(A) cat (B) dog"), str)


def test_top_layers_only_leave_the_rest_untouched(tiny_program):
    spec_only = paw_mlx.compile("Parse.", base=tiny_program)
    art = paw_mlx.compile("Parse.", base=tiny_program, examples=EXAMPLES,
                          tune_options={"steps": 2, "layers": 1})
    assert art.tuning["tuned_layers"] == [1]
    assert mx.array_equal(art.prefix[0][0], spec_only.prefix[0][0]).item()


def test_examples_file_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "x"}\n', encoding="utf-8")
    with pytest.raises(PawError, match="bad.jsonl:1"):
        load_examples(bad)
    with pytest.raises(PawError, match="no such examples file"):
        load_examples(tmp_path / "none.jsonl")


def test_split_field_wins_over_random_holdout():
    rows = [{"input": str(i), "output": str(i), "split": "test" if i % 3 == 0 else "train"} for i in range(9)]
    train, held = split_examples(rows, holdout=0.5)
    assert [r["input"] for r in held] == ["0", "3", "6"] and len(train) == 6
