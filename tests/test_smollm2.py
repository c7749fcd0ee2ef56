"""The real default model, SmolLM2-135M-Instruct: paw's greedy tokens equal transformers'.

Uses the program named by $PAW_SMOLLM2_PROGRAM (CI exports it once with the README's
command); otherwise exports it here from the PyPI package (about two minutes).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

PROMPTS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write one sentence about the sea.",
]
MAX_NEW = 24


GGUF_PARSES: list[str] = []  # the GGUF reads of the fixture's load, counted below


@pytest.fixture(scope="module")
def hf_model():
    import gguf

    from exporter.sources import load_source, resolve_source

    real = gguf.GGUFReader

    def counted(path, *args, **kwargs):
        GGUF_PARSES.append(str(path))
        return real(path, *args, **kwargs)

    source = resolve_source("smollm2", progress=False)
    gguf.GGUFReader = counted
    try:
        model, tokenizer = load_source(source, "float32")
    finally:
        gguf.GGUFReader = real
    model.eval()
    return model, tokenizer


def test_loading_the_gguf_parses_it_once(hf_model):
    """transformers would parse it three times (config, weights, tokenizer): 4-5 s each."""
    assert len(GGUF_PARSES) == 1, GGUF_PARSES


@pytest.fixture(scope="module")
def prog(smollm2_program):
    import paw_mlx

    return paw_mlx.load(smollm2_program)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_tokens_equal_transformers(prompt, prog, hf_model):
    import torch

    import paw_mlx

    model, tokenizer = hf_model
    hf_ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                           tokenize=True, return_dict=False)
    paw_ids = paw_mlx.prompt_ids(prog, prompt)
    assert paw_ids == list(hf_ids), "chat template rendering differs from transformers'"
    with torch.no_grad():
        out = model.generate(torch.tensor([hf_ids]), max_new_tokens=MAX_NEW, do_sample=False)
    expected = out[0, len(hf_ids):].tolist()
    eos = set(prog.eos_token_ids)
    if expected and expected[-1] in eos:
        expected = expected[:-1]
    got = list(paw_mlx.stream_tokens(prog, paw_ids, max_tokens=MAX_NEW))
    assert got == expected, (tokenizer.decode(got), tokenizer.decode(expected))


def test_paw_run_answers_the_capital_of_france(smollm2_program):
    done = subprocess.run([sys.executable, "-m", "apps.cli", "run", str(smollm2_program / "prog.json"),
                           "--prompt", "What is the capital of France?"],
                          capture_output=True, text=True, cwd=Path(__file__).parents[1], timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "The capital of France is Paris."


def test_streamed_weights_equal_the_loaded_models(hf_model):
    """SmolLM2's GGUF read a tensor at a time (exporter/checkpoint.py) gives every weight transformers loads."""
    import torch

    from exporter.checkpoint import load_streaming
    from exporter.sources import parse_gguf_once, resolve_source

    model, _ = hf_model
    source = resolve_source("smollm2", progress=False)
    with parse_gguf_once():
        empty, weights = load_streaming(source.location, torch.float32, gguf_file=source.gguf_file)
    assert all(p.is_meta for p in empty.parameters())
    for name, param in model.named_parameters():
        planned = weights.parameter_name("model." + name)
        assert torch.equal(weights.plan.realize(planned), param.detach()), name
    for (name, buffer), (_, loaded) in zip(empty.named_buffers(), model.named_buffers(), strict=True):
        assert torch.equal(buffer, loaded), name


def test_kept_q4_1_blocks_still_answer_paris(tmp_path):
    import paw_mlx
    from exporter.export import export_source

    prog = paw_mlx.load(export_source("smollm2", tmp_path / "kept", quantize="keep"))
    ops = {node.op for node in prog.program.nodes}
    assert {"quantized_linear", "quantized_embedding"} <= ops and "linear" not in ops
    assert paw_mlx.generate(prog, "What is the capital of France?").strip() == "The capital of France is Paris."
