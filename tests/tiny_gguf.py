"""A tiny random Llama written as a GGUF file with the ``gguf`` package, tokenizer included.

Laid out as llama.cpp writes SmolLM2: ``token_embd`` tied to the output, ``blk.N.*``
tensors, a GPT-2 style BPE vocabulary. Each weight is stored in the ggml type the test
asks for (F32, F16, Q4_0, Q4_1, Q8_0), quantized by ``gguf.quants``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS = 64, 128, 2, 4, 2

#: the ggml type of each kind of weight, unless the caller says otherwise
DEFAULT_TYPES = {"token_embd": "Q8_0", "attn_q": "Q4_0", "attn_k": "Q4_0", "attn_v": "Q4_1",
                 "attn_output": "Q4_1", "ffn_gate": "Q8_0", "ffn_up": "Q8_0", "ffn_down": "Q4_1"}


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


def write_tiny_gguf(path: Path, tokenizer, types: dict[str, str] | None = None, seed: int = 0) -> Path:
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
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(INTERMEDIATE)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
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
        else:
            writer.add_tensor(name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)

    add("token_embd.weight", vocab, HIDDEN, kinds["token_embd"])
    add("output_norm.weight", HIDDEN, None, "F32")
    head = HIDDEN // HEADS
    for layer in range(LAYERS):
        prefix = f"blk.{layer}."
        add(prefix + "attn_norm.weight", HIDDEN, None, "F32")
        add(prefix + "ffn_norm.weight", HIDDEN, None, "F32")
        add(prefix + "attn_q.weight", HIDDEN, HIDDEN, kinds["attn_q"])
        add(prefix + "attn_k.weight", KV_HEADS * head, HIDDEN, kinds["attn_k"])
        add(prefix + "attn_v.weight", KV_HEADS * head, HIDDEN, kinds["attn_v"])
        add(prefix + "attn_output.weight", HIDDEN, HIDDEN, kinds["attn_output"])
        add(prefix + "ffn_gate.weight", INTERMEDIATE, HIDDEN, kinds["ffn_gate"])
        add(prefix + "ffn_up.weight", INTERMEDIATE, HIDDEN, kinds["ffn_up"])
        add(prefix + "ffn_down.weight", HIDDEN, INTERMEDIATE, kinds["ffn_down"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
