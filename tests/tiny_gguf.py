"""A tiny random Llama written as a GGUF file with the ``gguf`` package, tokenizer included.

Laid out as llama.cpp writes SmolLM2: ``token_embd`` tied to the output, ``blk.N.*``
tensors, a GPT-2 style BPE vocabulary. Each weight is stored in the ggml type the test
asks for (F32, F16, Q4_0, Q5_1, Q8_0, Q4_K, Q6_K, ...): quantized by ``gguf.quants`` where
it can, otherwise random blocks (``random_blocks``; K-quants need ``hidden`` and
``intermediate`` multiples of 256).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS = 64, 128, 2, 4, 2

#: the ggml type of each kind of weight, unless the caller says otherwise
DEFAULT_TYPES = {"token_embd": "Q8_0", "attn_q": "Q4_0", "attn_k": "Q4_0", "attn_v": "Q4_1",
                 "attn_output": "Q4_1", "ffn_gate": "Q8_0", "ffn_up": "Q8_0", "ffn_down": "Q4_1"}


#: byte offsets of each block's float16 constants (d, m, dmin), the fields random bytes must keep finite
FLOAT16_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
                  "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def random_blocks(rows: int, columns: int, kind: str, rng: np.random.Generator, std: float | None = None) -> np.ndarray:
    """Random valid blocks uint8 [rows, bytes] of ggml type ``kind`` for a [rows, columns] tensor.

    Every byte is random but the float16 constants: any finite float16 (subnormals and
    65504 included) when ``std`` is None, else scaled so that the weights' spread is ``std``
    (each format is linear in its float16 constants).
    """
    import gguf

    qtype = gguf.GGMLQuantizationType[kind]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, columns // block, size), dtype=np.uint8)
    offsets = FLOAT16_FIELDS[kind]
    fields = rng.integers(0, 1 << 16, (rows, columns // block, len(offsets)), dtype=np.uint16)
    fields[(fields & 0x7C00) == 0x7C00] ^= 0x4000  # exponent all ones (inf, NaN) -> a finite one

    def put(values: np.ndarray) -> np.ndarray:
        for i, offset in enumerate(offsets):
            raw[..., offset:offset + 2] = values[..., i:i + 1].astype("<f2").view(np.uint8)
        return raw.reshape(rows, -1)

    if std is None:
        return put(fields.view(np.float16))
    unit = rng.standard_normal(fields.shape).astype(np.float16)
    spread = float(gguf.dequantize(put(unit), qtype).std())
    return put(unit.astype(np.float32) * (std / spread))


def _vocabulary(tokenizer) -> tuple[list[str], list[int], list[str]]:
    """(tokens by id, ggml token types, merges) of a transformers BPE tokenizer."""
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = state["model"]["vocab"]
    tokens = [""] * len(vocab)
    for token, index in vocab.items():
        tokens[index] = token
    special = {t["content"] for t in state.get("added_tokens", []) if t.get("special")}
    types = [3 if t in special else 1 for t in tokens]  # 3: control, 1: normal
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]]
    return tokens, types, merges


def write_tiny_gguf(path: Path, tokenizer, types: dict[str, str] | None = None, seed: int = 0,
                    hidden: int = HIDDEN, intermediate: int = INTERMEDIATE) -> Path:
    """Write the model to ``path`` with each weight kind in its ggml type; returns ``path``."""
    import gguf
    from gguf import GGMLQuantizationType

    kinds = dict(DEFAULT_TYPES, **(types or {}))
    rng = np.random.default_rng(seed)
    tokens, token_types, merges = _vocabulary(tokenizer)
    vocab = len(tokens)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-random-llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(intermediate)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(hidden // HEADS)
    writer.add_vocab_size(vocab)
    writer.add_file_type(1)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(tokenizer.chat_template)

    def add(name: str, rows: int, columns: int | None, kind: str) -> None:
        shape = (rows,) if columns is None else (rows, columns)
        values = (rng.standard_normal(shape) * (1.0 if columns is None else 0.3)).astype(np.float32)
        if columns is None:
            values = 1.0 + 0.1 * values  # a norm's weight
        qtype = GGMLQuantizationType[kind]
        if qtype == GGMLQuantizationType.F32:
            writer.add_tensor(name, values)
        elif qtype == GGMLQuantizationType.F16:
            writer.add_tensor(name, values.astype(np.float16))
        elif qtype.name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
            writer.add_tensor(name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)
        else:  # gguf has no quantizer for K-quants
            writer.add_tensor(name, random_blocks(rows, columns, kind, rng, std=0.3), raw_dtype=qtype)

    add("token_embd.weight", vocab, hidden, kinds["token_embd"])
    add("output_norm.weight", hidden, None, "F32")
    head = hidden // HEADS
    for layer in range(LAYERS):
        prefix = f"blk.{layer}."
        add(prefix + "attn_norm.weight", hidden, None, "F32")
        add(prefix + "ffn_norm.weight", hidden, None, "F32")
        add(prefix + "attn_q.weight", hidden, hidden, kinds["attn_q"])
        add(prefix + "attn_k.weight", KV_HEADS * head, hidden, kinds["attn_k"])
        add(prefix + "attn_v.weight", KV_HEADS * head, hidden, kinds["attn_v"])
        add(prefix + "attn_output.weight", hidden, hidden, kinds["attn_output"])
        add(prefix + "ffn_gate.weight", intermediate, hidden, kinds["ffn_gate"])
        add(prefix + "ffn_up.weight", intermediate, hidden, kinds["ffn_up"])
        add(prefix + "ffn_down.weight", hidden, intermediate, kinds["ffn_down"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
