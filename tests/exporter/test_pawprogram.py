"""Converting an original programasweights artifact (torch KV prefix) into a paw program."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
import torch

import paw_mlx
from exporter.pawprogram import convert_program
from interp.errors import ArtifactError
from paw_mlx.programs.artifact import read_artifact

SPEC = "Label the sentiment: positive or negative."


def original_artifact(directory, prefix, form: str, spec: str = SPEC, extra: dict | None = None):
    directory.mkdir()
    (directory / "program.json").write_text(json.dumps({"spec": spec, **(extra or {})}), encoding="utf-8")
    pairs = [(torch.from_numpy(np.array(k)), torch.from_numpy(np.array(v))) for k, v in prefix]
    if form == "pairs":
        obj = tuple(pairs)
    elif form == "past_key_values":
        obj = {"past_key_values": [list(p) for p in pairs]}
    else:
        obj = {f"layers.{i}.{n}": t[0] for i, (k, v) in enumerate(pairs) for n, t in (("keys", k), ("values", v))}
    torch.save(obj, directory / "prefix.pt")
    return directory


@pytest.mark.parametrize("form", ["pairs", "past_key_values", "flat"])
def test_converted_program_equals_compiled_one(tiny_program, tmp_path, form):
    compiled = paw_mlx.compile(SPEC, base=tiny_program)
    src = original_artifact(tmp_path / "orig", compiled.prefix, form)
    convert_program(src, tmp_path / "out", base=tiny_program)
    back = read_artifact(tmp_path / "out")
    assert back.prefix_ids == compiled.prefix_ids
    for (k1, v1), (k2, v2) in zip(compiled.prefix, back.prefix, strict=True):
        assert mx.array_equal(k1, k2).item() and mx.array_equal(v1, v2).item()
    f, g = paw_mlx.function(tmp_path / "out", max_new_tokens=6), paw_mlx.function(compiled, max_new_tokens=6)
    assert f(["I loved it", "awful"]) == g(["I loved it", "awful"])


def test_wrong_length_and_layer_count_are_clear_errors(tiny_program, tmp_path):
    compiled = paw_mlx.compile(SPEC, base=tiny_program)
    src = original_artifact(tmp_path / "short", [(k[:, :, :3], v[:, :, :3]) for k, v in compiled.prefix], "pairs")
    with pytest.raises(ArtifactError, match="cover 3 tokens"):
        convert_program(src, tmp_path / "out", base=tiny_program)
    src = original_artifact(tmp_path / "one", compiled.prefix[:1], "pairs")
    with pytest.raises(ArtifactError, match="has 1 layers; the base model has 2"):
        convert_program(src, tmp_path / "out", base=tiny_program)
    assert not (tmp_path / "out").exists()


def test_pickled_objects_are_refused(tiny_program, tmp_path):
    src = tmp_path / "evil"
    src.mkdir()
    (src / "program.json").write_text(json.dumps({"spec": SPEC}), encoding="utf-8")
    torch.save({"past_key_values": [(ArtifactError("x"), 1)]}, src / "prefix.pt")
    with pytest.raises(ArtifactError, match="cannot read .* as tensors"):
        convert_program(src, tmp_path / "out", base=tiny_program)
