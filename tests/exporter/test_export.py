"""Export behaviour: determinism, atomic writes, clear errors, manifest contents."""

from __future__ import annotations

import json

import pytest

from exporter import aten_ops
from exporter.export import export_model
from exporter.sources import resolve_source
from interp.errors import ExportError, SourceError
from interp.program import read_program
from tests.tiny import tiny_llama_config, tiny_model


def _files(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_export_is_deterministic(tmp_path, tiny_tokenizer):
    config = tiny_llama_config()
    a = export_model(tiny_model(config), tiny_tokenizer, tmp_path / "a")
    b = export_model(tiny_model(config), tiny_tokenizer, tmp_path / "b")
    files_a, files_b = _files(a), _files(b)
    assert sorted(files_a) == ["chat_template.jinja", "consts.safetensors", "manifest.json", "prog.json",
                               "tokenizer.json", "tokenizer_config.json"]
    for name in files_a:
        assert files_a[name] == files_b[name], f"{name} differs between two exports"


def test_manifest_records_hashes_source_and_versions(tmp_path):
    out = export_model(tiny_model(tiny_llama_config()), None, tmp_path / "p", source_info={"id": "tiny"})
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["files"]) == {"prog.json", "consts.safetensors"}
    assert manifest["source"] == {"id": "tiny"}
    assert {"torch", "transformers"} <= set(manifest["versions"])
    assert read_program(out).fingerprint == manifest["fingerprint"]


def test_unsupported_op_is_named_and_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.delitem(aten_ops.ATEN, "aten.silu.default")
    with pytest.raises(ExportError, match=r"aten\.silu\.default"):
        export_model(tiny_model(tiny_llama_config()), None, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_interrupted_export_leaves_nothing(tmp_path, monkeypatch):
    import exporter.export as export_module

    def explode(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export_module, "write_manifest", explode)
    with pytest.raises(KeyboardInterrupt):
        export_model(tiny_model(tiny_llama_config()), None, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_existing_directory_needs_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(ExportError, match="--force"):
        export_model(tiny_model(tiny_llama_config()), None, out)
    assert (out / "keep.txt").read_text() == "precious"
    export_model(tiny_model(tiny_llama_config()), None, out, force=True)
    assert not (out / "keep.txt").exists() and (out / "prog.json").is_file()


def test_capture_failure_names_the_construct(tmp_path):
    model = tiny_model(tiny_llama_config())

    class Branchy(type(model.model.layers[0].mlp)):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.export cannot capture it
                return x
            return -x

    model.model.layers[0].mlp.__class__ = Branchy
    with pytest.raises(ExportError, match="torch.export could not capture"):
        export_model(model, None, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_sources_are_resolved_with_clear_errors(tmp_path):
    with pytest.raises(SourceError, match="no such GGUF"):
        resolve_source(str(tmp_path / "x.gguf"))
    with pytest.raises(SourceError, match="not a file, a folder, a hub id"):
        resolve_source("definitely-not-a-model")
    assert resolve_source("HuggingFaceTB/SmolLM2-135M-Instruct").kind == "hub"
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert resolve_source(str(folder)).kind == "folder"


def test_pickle_only_weights_are_refused_before_anything_unpickles_them(tmp_path, monkeypatch):
    """A folder whose weights are only torch.save pickles: one SourceError, and torch.load never runs."""
    import torch

    from exporter.sources import Source, load_source

    folder = tmp_path / "m"
    model = tiny_model(tiny_llama_config())
    model.save_pretrained(folder)
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")  # what older transformers saved

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load ran on a user's file")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(SourceError, match="only as pickle files .pytorch_model.bin"):
        resolve_source(str(folder))
    # a source that reached the loader anyway (a hub repo with .bin files only) is held to safetensors too
    with pytest.raises(SourceError):
        load_source(Source("folder", str(folder), None, {}), "float32")


def test_dtype_export_stores_that_dtype(tmp_path):
    out = export_model(tiny_model(tiny_llama_config()), None, tmp_path / "bf16", dtype="bfloat16")
    spec = read_program(out).spec
    assert spec["model"]["dtype"] == "bfloat16"
    dtypes = {meta["dtype"] for name, meta in spec["consts"].items() if name.endswith("proj.weight")}
    assert dtypes == {"bfloat16"}


def test_a_gguf_file_is_parsed_once_per_load(tmp_path):
    """Inside ``parse_gguf_once`` the same file shares one reader; outside, nothing changes."""
    import gguf
    import numpy as np

    from exporter.sources import parse_gguf_once

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint32("llama.block_count", 2)
    writer.add_tensor("token_embd.weight", np.arange(12, dtype=np.float32).reshape(3, 4))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    original = gguf.GGUFReader
    with parse_gguf_once():
        first = gguf.GGUFReader(str(path))
        assert gguf.GGUFReader(tmp_path / "." / "tiny.gguf") is first  # the same file by another spelling
        assert int(first.fields["llama.block_count"].parts[-1][0]) == 2
        np.testing.assert_array_equal(np.array(first.tensors[0].data).reshape(3, 4),
                                      np.arange(12, dtype=np.float32).reshape(3, 4))
    assert gguf.GGUFReader is original
    assert gguf.GGUFReader(str(path)) is not first


def test_a_tensor_name_map_is_built_once_per_load():
    """transformers builds gguf's TensorNameMap once per module; inside the block it is shared."""
    import gguf

    from exporter.sources import parse_gguf_once

    original = gguf.get_tensor_name_map
    with parse_gguf_once():
        first = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is first
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 3) is not first
        assert first.get_name("model.layers.1.self_attn.q_proj") == "blk.1.attn_q"
    assert gguf.get_tensor_name_map is original
