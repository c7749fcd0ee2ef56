"""A source whose config does not match its weights is one SourceError, before the model is built
or after it is filled: transformers would build every declared layer and invent missing weights."""

from __future__ import annotations

import json
import re
import time

import pytest
from safetensors.numpy import load_file, save_file

from exporter.export import export_source
from exporter.source_checks import stored_layers
from interp.errors import SourceError


@pytest.fixture
def hf_folder(tiny_hf_folder):
    return tiny_hf_folder


def copy_folder(source, target):
    target.mkdir()
    for item in source.iterdir():
        (target / item.name).write_bytes(item.read_bytes())
    return target


def test_layer_indices_are_read_off_every_naming():
    assert stored_layers(["model.layers.0.mlp.up_proj.weight", "model.layers.11.input_layernorm.weight"]) == 12
    assert stored_layers(["transformer.h.3.attn.c_attn.weight", "blk.7.attn_q.weight"]) == 8
    assert stored_layers(["model.embed_tokens.weight", "lm_head.weight"]) is None


@pytest.mark.parametrize("stream", [True, False])
def test_a_config_with_an_absurd_layer_count_is_refused_before_building(hf_folder, tmp_path, stream):
    folder = copy_folder(hf_folder, tmp_path / "src")
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = 100_000  # built as declared, this took minutes (and random weights)
    (folder / "config.json").write_text(json.dumps(config))
    start = time.monotonic()
    with pytest.raises(SourceError, match=r"declares 100000 layers but the checkpoint holds weights for 2"):
        export_source(str(folder), tmp_path / "out", stream=stream)
    assert time.monotonic() - start < 30
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("stream", [True, False])
def test_a_checkpoint_missing_a_weight_is_refused(hf_folder, tmp_path, stream):
    folder = copy_folder(hf_folder, tmp_path / "src")
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]  # exported with random values before
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SourceError, match=r"no weights for the model's model\.layers\.1\.mlp\.up_proj\.weight"):
        export_source(str(folder), tmp_path / "out", stream=stream)
    assert not (tmp_path / "out").exists()


def test_a_gguf_file_declaring_more_blocks_than_it_holds_is_refused(tmp_path, tiny_tokenizer, monkeypatch):
    import gguf

    from tests.tiny_gguf import LAYERS, write_tiny_gguf

    add_block_count = gguf.GGUFWriter.add_block_count
    monkeypatch.setattr(gguf.GGUFWriter, "add_block_count", lambda self, n: add_block_count(self, 50_000))
    path = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_tokenizer)
    with pytest.raises(SourceError, match=f"declares 50000 layers but the checkpoint holds weights for {LAYERS}"):
        export_source(str(path), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_architectures_that_are_not_a_list_of_names_are_refused(hf_folder, tmp_path):
    folder = copy_folder(hf_folder, tmp_path / "src")
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = 5  # a TypeError at the end of the export before
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(SourceError, match="architectures must be a list of class names, not 5"):
        export_source(str(folder), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_context_longer_than_a_program_may_declare_is_refused_at_export(hf_folder, tmp_path):
    from interp.errors import ExportError

    folder = copy_folder(hf_folder, tmp_path / "src")
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = 10**12  # exported, then every load refused the program
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match=r"max_position_embeddings is 1000000000000; a program holds at most"):
        export_source(str(folder), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("file, value", [("config.json", 10**30), ("config.json", -5),
                                         ("generation_config.json", [2**40])])
def test_an_eos_id_no_program_may_hold_is_refused_before_the_capture(hf_folder, tmp_path, monkeypatch, file, value):
    import exporter.export as export_module
    from interp.errors import ExportError

    folder = copy_folder(hf_folder, tmp_path / "src")
    config = json.loads((folder / file).read_text())
    config["eos_token_id"] = value  # exported, then every load refused the program
    (folder / file).write_text(json.dumps(config))
    monkeypatch.setattr(export_module, "capture", lambda *a, **k: pytest.fail("captured"))
    with pytest.raises(ExportError, match=r"eos_token_id is .*, which is no token id"):
        export_source(str(folder), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_nan_weights_are_refused_at_export_not_at_every_load(hf_folder, tmp_path):
    from interp.errors import ExportError

    folder = copy_folder(hf_folder, tmp_path / "src")
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")  # exported; paw run then refused it
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ExportError, match=r"model\.layers\.1\.mlp\..*up_proj\.weight' holds NaN values"):
        export_source(str(folder), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no output, not even a partial one


@pytest.mark.parametrize("damage", [lambda data: b"garbage" * 100, lambda data: data[:1000]])
def test_a_damaged_gguf_file_is_named_in_the_error(tmp_path, tiny_tokenizer, damage):
    from tests.tiny_gguf import write_tiny_gguf

    path = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_tokenizer)
    path.write_bytes(damage(path.read_bytes()))
    # was "could not load FOLDER: index 0 is out of bounds for axis 0 with size 0": the folder, numpy's words
    with pytest.raises(SourceError, match=f"^{re.escape(str(path))} is not a readable GGUF file"):
        export_source(str(path), tmp_path / "out")
    assert not (tmp_path / "out").exists()
