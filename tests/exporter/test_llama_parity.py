"""Tiny random Llamas: the interpreter's logits and greedy tokens equal transformers'."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch

from interp.generate import generate_step
from paw_mlx import load
from tests.tiny import export_tiny, tiny_llama_config, tiny_model

CONFIGS = {
    "gqa-untied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "mha-tied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
    "llama3-rope-scaling": dict(
        num_attention_heads=4, num_key_value_heads=1, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64}),
    "biases-and-head-dim": dict(num_attention_heads=2, num_key_value_heads=2, head_dim=48, attention_bias=True,
                                mlp_bias=True),
}
PROMPT = [5, 17, 99, 3, 250, 42, 7, 300, 11, 64, 128, 9]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def exported(request, tmp_path_factory):
    # A larger init spreads the logits so greedy choices are not near-ties.
    config = tiny_llama_config(initializer_range=0.2, **CONFIGS[request.param])
    out = export_tiny(config, tmp_path_factory.mktemp("llama") / request.param)
    model = tiny_model(config)
    model.config._attn_implementation = "eager"
    return model, load(out)


def test_exported_program_is_one_graph_for_every_length(exported):
    _, prog = exported
    spec = prog.program.spec
    assert spec["inputs"][0]["shape"] == ["batch", "seq"]
    assert spec["state"]["kv_cache"]["layers"] == 2


def test_logits_match_transformers(exported):
    model, prog = exported
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        expected = model(ids).logits.numpy()
    got = np.array(prog.model(mx.array([PROMPT])))
    assert np.abs(got - expected).max() < 1e-4


def test_incremental_decoding_matches_full_sequence(exported):
    model, prog = exported
    with torch.no_grad():
        expected = model(torch.tensor([PROMPT])).logits.numpy()
    cache = prog.make_cache()
    pieces = [np.array(prog.model(mx.array([PROMPT[:5]]), cache=cache))]
    pieces.append(np.array(prog.model(mx.array([PROMPT[5:9]]), cache=cache)))
    for token in PROMPT[9:]:
        pieces.append(np.array(prog.model(mx.array([[token]]), cache=cache)))
    got = np.concatenate(pieces, axis=1)
    assert np.abs(got - expected).max() < 1e-4


def test_batched_rows_match_single_rows(exported):
    _, prog = exported
    rows = [PROMPT[:6], PROMPT[6:]]
    together = np.array(prog.model(mx.array(rows)))
    for i, row in enumerate(rows):
        alone = np.array(prog.model(mx.array([row])))
        assert np.abs(together[i] - alone[0]).max() < 1e-5


def test_32_greedy_tokens_match_transformers(exported):
    model, prog = exported
    with torch.no_grad():
        out = model.generate(torch.tensor([PROMPT]), max_new_tokens=32, do_sample=False, min_new_tokens=32,
                             pad_token_id=0)
    expected = out[0, len(PROMPT):].tolist()
    got = list(generate_step(prog.model, PROMPT, prog.make_cache(), max_tokens=32))
    assert got == expected
