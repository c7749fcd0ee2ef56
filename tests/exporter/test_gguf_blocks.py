"""GGUF Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K and Q5_K weights kept as MLX affine blocks (``--quantize keep``).

The float reference is the same GGUF exported as today: transformers dequantizes every
block with ``gguf`` to float32. The kept program's weights, dequantized by MLX, must be
those floats bit for bit, and its logits must match.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
import torch

import paw_mlx
from exporter.export import export_source
from exporter.gguf_affine import FORMATS, affine_from_blocks
from interp.errors import ExportError
from interp.program import load_consts, read_program
from tests.tiny_gguf import random_blocks, write_tiny_gguf

IDS = [[5, 17, 33, 90, 120, 7, 250, 3]]
KEPT = {fmt.name: ggml_type for ggml_type, fmt in FORMATS.items()}


def _assert_same_bits(raw: np.ndarray, kind: str) -> None:
    """MLX's dequantization of our affine form of ``raw`` is gguf's float32 dequantization, bit for bit."""
    import gguf

    expected = gguf.dequantize(raw, gguf.GGMLQuantizationType[kind])
    codes, scales, biases = affine_from_blocks(raw, KEPT[kind])
    got = np.array(mx.dequantize(mx.array(codes), mx.array(scales), mx.array(biases), group_size=32,
                                 bits=FORMATS[KEPT[kind]].bits))
    assert got.shape == expected.shape
    # + 0.0 turns -0 into +0: gguf's d * (q - 16) is -0 for a negative d where code * d - 16 d is +0
    np.testing.assert_array_equal((got + 0.0).view(np.uint32), (expected + 0.0).view(np.uint32))


def test_every_kept_format_is_tested():
    assert sorted(KEPT) == ["Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q8_0"]


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_blocks_dequantize_to_ggufs_own_values(kind):
    import gguf

    rng = np.random.default_rng(KEPT[kind])
    values = rng.standard_normal((6, 128)).astype(np.float32) * np.array([1e-3, 1, 30, 1e4, 0.5, 2])[:, None]
    values[1, :32] = 0.0  # a block of zeros
    values[2, 32:64] = 5.0  # a constant block
    _assert_same_bits(gguf.quants.quantize(values, gguf.GGMLQuantizationType[kind]), kind)


@pytest.mark.parametrize("kind", sorted(KEPT))
def test_random_blocks_dequantize_to_ggufs_own_bits(kind):
    """Any bytes are a valid block: every code, 6-bit scale and min, and float16 constant from subnormal to 65504."""
    rng = np.random.default_rng(len(kind) + KEPT[kind])
    _assert_same_bits(random_blocks(8, 1024, kind, rng), kind)


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


#: a Q4_K_M-like mix (Q6_K for v and down, as llama.cpp picks), with every other kept type in it
MIXED_TYPES = {"token_embd": "Q4_K", "attn_q": "Q4_K", "attn_k": "Q4_K", "attn_v": "Q6_K", "attn_output": "Q5_K",
               "ffn_gate": "Q5_0", "ffn_up": "Q5_1", "ffn_down": "Q6_K"}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("gguf-keep-k")
    source = str(write_tiny_gguf(root / "mixed.gguf", tiny_tokenizer, types=MIXED_TYPES, hidden=256,
                                 intermediate=512))
    said: list[str] = []
    return {"float": export_source(source, root / "float", fuse=False),  # every weight under its own name
            "keep": export_source(source, root / "keep", quantize="keep", progress=said.append),
            "keep16": export_source(source, root / "keep16", quantize="keep", dtype="float16"),
            "said": said}


def test_k_quants_and_q5_blocks_are_kept_and_q6_k_dequantized(mixed):
    weights = _quantized_weights(mixed["keep"])
    # q+k (Q4_K, rows un-permuted) fused, o_proj (Q5_K), gate (Q5_0) + up (Q5_1) fused: 3 per layer,
    # and the tied embedding (Q4_K); v and down are Q6_K and stay float
    assert len(weights) == 3 * 2 + 1
    assert sorted(set(weights.values())) == [4, 5]
    assert not any("v_proj" in name or "down_proj" in name for name in weights)
    assert any("dequantized 4 Q6_K" in message for message in mixed["said"]), mixed["said"]


def test_kept_k_quants_are_the_float_exports_weights(mixed):
    """float32: every kept weight is gguf's value bit for bit; float16: K-quant scales round, Q5_0/Q5_1 stay exact."""
    floats = load_consts(read_program(mixed["float"]))
    for kept in ("keep", "keep16"):
        blocks = load_consts(read_program(mixed[kept]))
        for codes, bits in _quantized_weights(mixed[kept]).items():
            base = codes.removesuffix(".qweight")
            scales, biases = (blocks[f"{base}.{kind}"].astype(mx.float32) for kind in ("scales", "biases"))
            got = np.array(mx.dequantize(blocks[codes], scales, biases, group_size=32, bits=bits))
            layer, dot, members = base.rpartition(".")  # fused projections: "...q_proj+k_proj"
            expected = np.concatenate([np.array(floats[f"{layer}{dot}{part}.weight"]) for part in members.split("+")])
            if kept == "keep" or bits == 5 and "o_proj" not in base:
                np.testing.assert_array_equal(got, expected, err_msg=f"{kept} {base}")
            else:  # d sc_j and dmin m_j rounded to float16: relative error 2^-11 of each term
                np.testing.assert_allclose(got, expected, rtol=0, atol=2e-3 * np.abs(expected).max(), err_msg=base)


def test_kept_k_quants_give_the_float_programs_logits(mixed):
    ids = mx.array(IDS)
    reference = paw_mlx.load(mixed["float"]).model(ids)
    scale = float(mx.abs(reference).max())
    for kept, tolerance in (("keep", 1e-5), ("keep16", 2e-2)):  # relative: float32, float16 activations
        logits = paw_mlx.load(mixed[kept]).model(ids).astype(mx.float32)
        assert float(mx.abs(logits - reference).max()) < tolerance * scale, kept


def test_block_scales_beyond_the_program_dtype_are_refused():
    from exporter.gguf_blocks import _lazy_blocks

    class Reader:  # a Q8_0 tensor whose d is 65504: its bias -128 d overflows float16, not float32
        name, shape = "blk.0.ffn_up.weight", (2, 32)

        def raw(self):
            blocks = np.zeros((2, 34), dtype=np.uint8)
            blocks[:, 0:2] = np.array([65504], dtype="<f2").view(np.uint8)
            return blocks

    order = np.arange(2)
    codes, scales, biases = _lazy_blocks(Reader(), KEPT["Q8_0"], order, torch.float32)
    assert float(biases.materialize()[0, 0]) == -128 * 65504
    with pytest.raises(ExportError, match="blk.0.ffn_up.weight has block scales beyond float16's range"):
        _lazy_blocks(Reader(), KEPT["Q8_0"], order, torch.float16)[2].materialize()
