"""Programs whose consts are split into shards load like single-file ones; a bad index is one error."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

from interp.errors import WeightsError
from interp.graph import GraphModel
from interp.program import CONSTS_FILE, CONSTS_INDEX_FILE, load_consts, read_program
from tests.tiny import export_tiny, tiny_llama_config


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """The tiny Llama of the ``tiny_program`` fixture, its consts in shards of at most 200 kB."""
    return export_tiny(tiny_llama_config(), tmp_path_factory.mktemp("sharded") / "prog", max_shard_bytes=200_000)


def test_shards_hold_the_single_files_consts(sharded, tiny_program):
    files = sorted(p.name for p in sharded.iterdir() if p.name.startswith("consts"))
    count = len(files) - 1
    assert count > 2 and CONSTS_FILE not in files and CONSTS_INDEX_FILE in files
    assert files[:-1] == [f"consts-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    index = json.loads((sharded / CONSTS_INDEX_FILE).read_text())
    sizes = [(sharded / name).stat().st_size for name in files[:-1]]
    assert max(sizes) < 200_000 + 10_000  # a shard holds at most the limit, plus its header
    single = load_consts(read_program(tiny_program))
    program = read_program(sharded)
    assert len(program.consts_files) == count
    consts = load_consts(program)
    assert sorted(consts) == sorted(single) == sorted(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in single.values())
    for name, value in single.items():
        assert np.array_equal(np.array(consts[name]), np.array(value)), name
    ids = mx.array([[5, 9, 200, 17]])
    np.testing.assert_array_equal(np.array(GraphModel.from_program(program)(ids)),
                                  np.array(GraphModel.from_program(read_program(tiny_program))(ids)))
    manifest = json.loads((sharded / "manifest.json").read_text())
    assert set(files) <= set(manifest["files"]) and manifest["fingerprint"]


def test_a_subset_of_consts_opens_only_its_shards(sharded):
    program = read_program(sharded)
    wanted = {"model.norm.weight"}
    assert set(load_consts(program, wanted)) == wanted


@pytest.mark.parametrize("damage", ["missing shard", "wrong shard", "outside the directory", "const twice"])
def test_a_damaged_index_is_one_clear_error(sharded, tmp_path, damage):
    copy = tmp_path / "prog"
    shutil.copytree(sharded, copy)
    index_path = copy / CONSTS_INDEX_FILE
    index = json.loads(index_path.read_text())
    names = sorted(set(index["weight_map"].values()))
    const = next(iter(index["weight_map"]))
    if damage == "missing shard":
        (copy / names[-1]).unlink()
        expected = "missing weights file"
    elif damage == "wrong shard":
        index["weight_map"][const] = next(n for n in names if n != index["weight_map"][const])
        expected = f"puts '{const}' in"
    elif damage == "outside the directory":
        index["weight_map"][const] = "../consts-00001-of-00001.safetensors"
        expected = "is not a shard"
    else:
        shutil.copy(copy / index["weight_map"][const], copy / names[0] if index["weight_map"][const] != names[0]
                    else copy / names[1])
        expected = "is stored twice"
    index_path.write_text(json.dumps(index))
    with pytest.raises(WeightsError, match=expected) as raised:
        read_program(copy)
    assert "\n" not in str(raised.value)
