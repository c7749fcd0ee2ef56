"""GGUF Q4_0, Q4_1 and Q8_0 weights kept as MLX affine blocks (``--quantize keep``), bit-exact.

The float reference is the same GGUF exported as today: transformers dequantizes every
block with ``gguf`` to float32. The kept program's weights, dequantized by MLX, must be
those floats bit for bit, and its logits must match.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

import paw_mlx
from exporter.export import export_source
from exporter.gguf_blocks import Q4_0, Q4_1, Q8_0, affine_from_blocks
from interp.errors import ExportError
from interp.program import load_consts, read_program
from tests.tiny_gguf import write_tiny_gguf

IDS = [[5, 17, 33, 90, 120, 7, 250, 3]]


@pytest.mark.parametrize("ggml_type", [Q4_0, Q4_1, Q8_0])
def test_blocks_dequantize_to_ggufs_own_values(ggml_type):
    import gguf

    rng = np.random.default_rng(ggml_type)
    values = rng.standard_normal((6, 128)).astype(np.float32) * np.array([1e-3, 1, 30, 1e4, 0.5, 2])[:, None]
    values[1, :32] = 0.0  # a block of zeros
    values[2, 32:64] = 5.0  # a constant block
    kind = gguf.GGMLQuantizationType(ggml_type)
    raw = gguf.quants.quantize(values, kind)
    expected = gguf.dequantize(raw, kind)
    codes, scales, biases = affine_from_blocks(raw, ggml_type)
    bits = 8 if ggml_type == Q8_0 else 4
    got = mx.dequantize(mx.array(codes), mx.array(scales), mx.array(biases), group_size=32, bits=bits)
    np.testing.assert_array_equal(np.array(got), expected)


@pytest.fixture(scope="module")
def programs(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("gguf-keep")
    source = str(write_tiny_gguf(root / "tiny.gguf", tiny_tokenizer, types={"ffn_down": "F16"}))
    return {"float": export_source(source, root / "float"),
            "keep": export_source(source, root / "keep", quantize="keep"),
            "keep16": export_source(source, root / "keep16", quantize="keep", dtype="float16"),
            "source": source}


def _quantized_weights(directory) -> dict[str, int]:
    spec = json.loads((directory / "prog.json").read_text())
    slot = {"quantized_linear": 1, "quantized_embedding": 0}
    return {node["inputs"][slot[node["op"]]]: node["attrs"]["bits"] for node in spec["nodes"] if node["op"] in slot}


@pytest.mark.parametrize("kept", ["keep", "keep16"])
def test_kept_blocks_are_the_float_exports_weights_bit_for_bit(programs, kept):
    """Dequantized in float32, a float32 or float16 program's blocks are the GGUF's values exactly."""
    floats = load_consts(read_program(programs["float"]))
    blocks = load_consts(read_program(programs[kept]))
    weights = _quantized_weights(programs[kept])
    # q/k (Q4_0, rows un-permuted as transformers does) + v (Q4_1) fused, o_proj, gate+up (Q8_0):
    # 3 per layer, and the tied embedding (Q8_0); ffn_down is F16 in this file and stays float.
    assert len(weights) == 3 * 2 + 1
    assert sorted(set(weights.values())) == [4, 8]
    assert not any("down_proj" in name for name in weights)
    for codes, bits in weights.items():
        base = codes.removesuffix(".qweight")
        scales, biases = (blocks[f"{base}.{kind}"].astype(mx.float32) for kind in ("scales", "biases"))
        got = mx.dequantize(blocks[codes], scales, biases, group_size=32, bits=bits)
        np.testing.assert_array_equal(np.array(got), np.array(floats[base + ".weight"]), err_msg=base)


def test_kept_blocks_give_the_float_programs_logits(programs):
    ids = mx.array(IDS)
    reference = paw_mlx.load(programs["float"]).model(ids)
    scale = float(mx.abs(reference).max())
    for kept, tolerance in (("keep", 1e-5), ("keep16", 2e-2)):  # relative: float32, float16 activations
        logits = paw_mlx.load(programs[kept]).model(ids).astype(mx.float32)
        assert float(mx.abs(logits - reference).max()) < tolerance * scale, kept


def test_keep_is_refused_where_nothing_can_be_kept(programs, tmp_path, tiny_tokenizer):
    with pytest.raises(ExportError, match="not --no-stream"):
        export_source(programs["source"], tmp_path / "a", quantize="keep", stream=False)
    floats = write_tiny_gguf(tmp_path / "f16.gguf", tiny_tokenizer, types=dict.fromkeys(
        ["token_embd", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"], "F16"))
    with pytest.raises(ExportError, match=r"no linear or embedding weight stored as Q4_0.*15 F16"):
        export_source(str(floats), tmp_path / "b", quantize="keep")
    assert not (tmp_path / "b").exists()
