"""Streamed export (exporter/checkpoint.py) writes the program the in-memory export writes, byte for byte.

Each source is a tiny random model saved to disk: a Hugging Face folder (safetensors) and
a GGUF file. The streamed export never loads the model's weights: its parameters stay
on the meta device and each const is read from the checkpoint as it is written.
"""

from __future__ import annotations

import filecmp
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from exporter.export import export_source
from interp.errors import ExportError
from tests.archs import arch_config
from tests.tiny import tiny_llama_config, tiny_model
from tests.tiny_gguf import write_tiny_gguf


def _same_files(a, b) -> None:
    compared = filecmp.dircmp(a, b)
    assert sorted(compared.left_list) == sorted(compared.right_list)
    _, mismatch, errors = filecmp.cmpfiles(a, b, compared.common_files, shallow=False)
    assert not mismatch and not errors, mismatch + errors


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_tokenizer):
    """Tiny llama and mixtral folders (transformers saves mixtral's experts one tensor per expert)."""
    root = tmp_path_factory.mktemp("sources")
    made = {}
    for name, config in (("llama", tiny_llama_config()), ("mixtral", arch_config("mixtral"))):
        model = tiny_model(config)
        model.save_pretrained(root / name)
        tiny_tokenizer.save_pretrained(root / name)
        made[name] = root / name
    return made


def test_streamed_folder_export_is_byte_identical(folders, tmp_path):
    """Experts stacked by transformers' converter, weights cast from float32 to bfloat16 on the way."""
    whole = export_source(str(folders["mixtral"]), tmp_path / "whole", dtype="bfloat16", stream=False)
    streamed = export_source(str(folders["mixtral"]), tmp_path / "streamed", dtype="bfloat16")
    _same_files(whole, streamed)


def test_streamed_gguf_export_is_byte_identical(tmp_path, tiny_tokenizer):
    """Tied embeddings, Llama's q/k un-permutation, dequantization; then quantized to 4 bits."""
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_tokenizer)
    whole = export_source(str(gguf), tmp_path / "whole", stream=False, quantize=4, group_size=32)
    streamed = export_source(str(gguf), tmp_path / "streamed", quantize=4, group_size=32)
    _same_files(whole, streamed)


def test_streaming_load_leaves_every_weight_on_disk(folders):
    from exporter.checkpoint import load_streaming

    model, weights = load_streaming(str(folders["mixtral"]), torch.float32)
    params = dict(model.named_parameters())
    assert params and all(p.is_meta for p in params.values())
    assert all(not b.is_meta for b in model.buffers())  # RoPE's inv_freq is computed, not read
    expert = "model.layers.0.mlp.experts.gate_up_proj"  # stacked from 4 x (w1, w3) by transformers' converter
    stored = load_file(folders["mixtral"] / "model.safetensors")
    w1, w3 = (stored[f"model.layers.0.block_sparse_moe.experts.2.{w}.weight"] for w in ("w1", "w3"))
    assert torch.equal(weights.plan.realize(expert)[2], torch.cat([w1, w3]))


def test_a_checkpoint_tensor_of_the_wrong_shape_is_one_error(folders, tmp_path, tiny_tokenizer):
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in folders["llama"].iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    tensors = load_file(broken / "model.safetensors")
    down = "model.layers.1.mlp.down_proj.weight"
    tensors[down] = tensors[down][:, :100].contiguous()
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((broken / "config.json").read_text())
    assert config["hidden_size"] == 64
    with pytest.raises(ExportError, match="down_proj.weight.*shape"):
        export_source(str(broken), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.partial-*"))


def test_pread_reads_of_gguf_tensors_equal_transformers_memory_map(tmp_path, tiny_tokenizer):
    """The newer GGUF path's lazy tensors (qwen3.5, lfm2 files) read with pread give the same tensors."""
    from transformers.integrations.gguf.reader import GgufHeader, load_gguf_state_dict

    from exporter.checkpoint import _PreadGgufTensor

    path = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_tokenizer, types={"ffn_down": "F16"})
    header = GgufHeader.from_file(str(path))
    lazy = load_gguf_state_dict(header)
    for info in header.tensors:
        read = _PreadGgufTensor(lazy[info.name], header.path, header.data_start + info.offset)[...]
        assert torch.equal(read, lazy[info.name][...]), info.name


def test_streamed_quantized_export_folds_experts_lazily(tmp_path, tiny_tokenizer, monkeypatch):
    """gpt-oss's transposed experts fold into 4-bit consts (exporter/fold.py) while every weight stays on
    disk until written: no checkpoint read happens before the writer starts, and the result is the
    in-memory export's, byte for byte."""
    from exporter import writer
    from exporter.checkpoint import LoadPlan

    folder = tmp_path / "gpt_oss"
    tiny_model(arch_config("gpt_oss")).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    whole = export_source(str(folder), tmp_path / "whole", stream=False, quantize=4, group_size=32)
    writing: list[bool] = []
    reads: list[bool] = []  # for each checkpoint read: whether the writer had started
    write_consts, realize = writer.write_consts, LoadPlan.realize

    def start_writing(*args, **kwargs):
        writing.append(True)
        return write_consts(*args, **kwargs)

    def read(self, name):
        reads.append(bool(writing))
        return realize(self, name)

    monkeypatch.setattr(writer, "write_consts", start_writing)
    monkeypatch.setattr(LoadPlan, "realize", read)
    streamed = export_source(str(folder), tmp_path / "streamed", quantize=4, group_size=32)
    _same_files(whole, streamed)
    assert reads and all(reads)
    spec = json.loads((streamed / "prog.json").read_text())
    assert not any(node["op"] == "expert_linear" for node in spec["nodes"])
