"""Exporting ternary programs: post-hoc ternarization and exact BitNet import, against transformers."""

from __future__ import annotations

import copy
import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors import safe_open

from exporter.export import export_model, export_source
from exporter.ternary import reference_weights
from interp.errors import ExportError
from interp.graph import GraphModel
from interp.kernels import ternary as tp
from interp.program import read_program
from tests.tiny import tiny_llama_config, tiny_model

IDS = torch.tensor([[5, 17, 200, 33, 9, 120, 7, 64, 300], [1, 2, 3, 4, 5, 6, 7, 8, 9]])


def _program_logits(directory, ids=IDS) -> np.ndarray:
    model = GraphModel.from_program(read_program(directory))
    return np.array(model(mx.array(ids.numpy())))


def _ternarized_reference(model: torch.nn.Module) -> torch.nn.Module:
    """The same model with each linear layer's weight replaced by t * s (lm_head untouched)."""
    ref = copy.deepcopy(model)
    for name, module in ref.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            t, s = tp.ternarize_absmean(module.weight.detach().numpy())
            module.weight.data = reference_weights(t, s)
    return ref


@pytest.mark.parametrize(("weights", "tied"), [("ternary", False), ("ternary-base3", True)])
def test_ternarized_tiny_llama_matches_transformers_on_unpacked_weights(tmp_path, weights, tied):
    model = tiny_model(tiny_llama_config(tie_word_embeddings=tied))
    reference = _ternarized_reference(model)
    out = export_model(model, None, tmp_path / "p", weights=weights)
    with torch.no_grad():
        want = reference(IDS).logits.numpy()
    got = _program_logits(out)
    assert np.abs(got - want).max() <= 1e-5

    spec = json.loads((out / "prog.json").read_text())
    ops = [n["op"] for n in spec["nodes"]]
    assert ops.count("ternary_linear") == 14  # 7 per layer, 2 layers
    assert ops.count("linear") == 1  # lm_head stays float
    packing = "base3" if weights == "ternary-base3" else "2bit"
    assert spec["model"]["ternary"] == {"packing": packing, "linear_weights": 14}
    consts = spec["consts"]
    assert "model.layers.0.self_attn.q_proj.weight" not in consts
    q = consts["model.layers.0.self_attn.q_proj.ternary_packed"]
    assert q["dtype"] == "uint8" and q["shape"] == [64, tp.packed_length(64, packing)]
    assert consts["model.layers.0.self_attn.q_proj.ternary_scale"] == {"dtype": "float32", "shape": [64]}
    embedding = next(n for n in spec["nodes"] if n["op"] == "embedding")["inputs"][0]  # tied: any FQN
    assert consts[embedding]["dtype"] == "float32"
    # the packed bytes are the absmean trits of the original weight, losslessly
    with safe_open(str(out / "consts.safetensors"), "np") as fh:
        packed = fh.get_tensor("model.layers.1.mlp.down_proj.ternary_packed")
    t, _ = tp.ternarize_absmean(model.model.layers[1].mlp.down_proj.weight.detach().numpy())
    np.testing.assert_array_equal(tp.unpack(packed, 128, packing), t)


def test_ternary_program_decodes_with_its_cache_like_a_full_forward(tmp_path):
    out = export_model(tiny_model(tiny_llama_config()), None, tmp_path / "p", weights="ternary")
    model = GraphModel.from_program(read_program(out))
    ids = mx.array(IDS[:1].numpy())
    full = model(ids)
    cache = model.make_cache()
    steps = [model(ids[:, :5], cache=cache)[:, -1]]
    for i in range(5, ids.shape[1]):
        steps.append(model(ids[:, i:i + 1], cache=cache)[:, -1])
    np.testing.assert_allclose(np.array(mx.stack(steps, axis=1)), np.array(full[:, 4:]), atol=1e-5)


def _bitnet_checkpoint(directory, linear_class: str):
    """A tiny random BitNet saved the way BitNet checkpoints are: packed uint8 weights + weight_scale."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, BitNetConfig
    from transformers.integrations.bitnet import pack_weights

    config = BitNetConfig(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                          bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_config(config).eval()
    state = {k: v.detach().clone() for k, v in plain.state_dict().items()}
    for name, module in plain.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            t, s = tp.ternarize_absmean(module.weight.detach().numpy(), per_row=False)
            state[f"{name}.weight"] = pack_weights(torch.from_numpy(t.astype(np.int64)))
            # BitLinear divides its output by weight_scale; AutoBitLinear multiplies by it.
            scale = 1.0 / s[0] if linear_class == "bitlinear" else s[0]
            state[f"{name}.weight_scale"] = torch.tensor([scale], dtype=torch.float32)
    config.quantization_config = {"quant_method": "bitnet", "linear_class": linear_class,
                                  "quantization_mode": "offline"}
    config.save_pretrained(directory)
    save_file(state, str(directory / "model.safetensors"))
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


@pytest.mark.parametrize("linear_class", ["bitlinear", "autobitlinear"])
def test_packed_bitnet_checkpoint_imports_exactly(tmp_path, linear_class):
    model = _bitnet_checkpoint(tmp_path / "ckpt", linear_class)
    expected_class = "BitLinear" if linear_class == "bitlinear" else "AutoBitLinear"
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == expected_class
    with torch._dynamo.config.patch(disable=True), torch.no_grad():  # BitLinear's torch.compile, run eagerly
        want = model(IDS).logits.numpy()
    out = export_model(model, None, tmp_path / "prog")
    got = _program_logits(out)
    assert np.abs(got - want).max() <= 1e-5

    spec = json.loads((out / "prog.json").read_text())
    ops = [n["op"] for n in spec["nodes"]]
    assert ops.count("ternary_linear") == 14 and ops.count("act_quant") == 14
    assert spec["consts"]["model.layers.0.mlp.up_proj.ternary_scale"]["shape"] == [1]  # BitNet: per tensor
    # the export put the original layers back
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == expected_class


def test_a_bitnet_folder_is_loaded_whole_by_paw_export(tmp_path, tiny_tokenizer):
    """Library-quantized weights cannot stream: the exporter loads them whole (NotStreamable was turned
    into a SourceError by the loader's error wrapper, so `paw export` of a BitNet folder failed)."""
    _bitnet_checkpoint(tmp_path / "ckpt", "autobitlinear")
    tiny_tokenizer.save_pretrained(tmp_path / "ckpt")
    said: list[str] = []
    out = export_source(str(tmp_path / "ckpt"), tmp_path / "prog", progress=said.append)
    assert f"loading {tmp_path / 'ckpt'} whole: its weights are quantized by a library (bitnet)" in said
    ops = [n["op"] for n in json.loads((out / "prog.json").read_text())["nodes"]]
    assert ops.count("ternary_linear") == 14


def test_unknown_weights_mode_is_refused_before_loading(tmp_path):
    with pytest.raises(ExportError, match="ternary-base3"):
        export_source("no-such-model-anywhere", tmp_path / "x", weights="ternary4")
