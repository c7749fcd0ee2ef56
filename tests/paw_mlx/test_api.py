"""The Python API: load, generate, stream_generate, sampling options, mlx-lm compatibility."""

from __future__ import annotations

import mlx.core as mx
import pytest

import paw_mlx
from interp.errors import PawError
from interp.generate import generate_step
from interp.sampling import make_sampler


@pytest.fixture(scope="module")
def prog(tiny_program):
    return paw_mlx.load(tiny_program / "prog.json")


def test_generate_equals_joined_stream(prog):
    text = paw_mlx.generate(prog, "Hello", max_tokens=12)
    pieces = list(paw_mlx.stream_generate(prog, "Hello", max_tokens=12))
    assert isinstance(text, str) and text
    assert "".join(pieces) == text
    assert all(isinstance(p, str) for p in pieces)
    last = pieces[-1]
    assert last.finish_reason in ("stop", "length")
    assert last.stats.prompt_tokens == len(paw_mlx.prompt_ids(prog, "Hello"))
    assert last.stats.generation_tokens >= 1


def test_chat_template_is_applied_unless_raw(prog):
    templated = paw_mlx.prompt_ids(prog, "Hello")
    raw = paw_mlx.prompt_ids(prog, "Hello", raw=True)
    assert prog.tokenizer.decode(templated).startswith("<|im_start|>user\nHello<|im_end|>")
    assert prog.tokenizer.decode(raw) == "Hello"
    with_system = paw_mlx.prompt_ids(prog, "Hello", system="Be brief.")
    assert prog.tokenizer.decode(with_system).startswith("<|im_start|>system\nBe brief.")


def test_sampling_is_reproducible_with_a_seed(prog):
    a = paw_mlx.generate(prog, "Hello", max_tokens=16, temperature=1.5, seed=7)
    b = paw_mlx.generate(prog, "Hello", max_tokens=16, temperature=1.5, seed=7)
    assert a == b


def test_top_k_one_is_greedy(prog):
    ids = paw_mlx.prompt_ids(prog, "Hello")
    greedy = list(paw_mlx.stream_tokens(prog, ids, max_tokens=10))
    top1 = list(paw_mlx.stream_tokens(prog, ids, max_tokens=10, temperature=0.9, top_k=1, seed=3))
    assert greedy == top1


def test_top_p_keeps_only_the_nucleus():
    logits = mx.array([[10.0, 9.0, -5.0, -6.0]])
    sampler = make_sampler(temperature=1.0, top_p=0.5)
    mx.random.seed(0)
    draws = {sampler(logits).item() for _ in range(50)}
    assert draws == {0}


def test_bad_sampling_options_are_pawerrors(prog):
    with pytest.raises(PawError, match="top-p"):
        list(paw_mlx.stream_tokens(prog, [1, 2, 3], top_p=0.0))


def test_max_tokens_is_respected(prog):
    ids = paw_mlx.prompt_ids(prog, "Hello")
    assert len(list(paw_mlx.stream_tokens(prog, ids, max_tokens=5))) <= 5


def test_mlx_lm_generate_step_drives_the_program(prog):
    import importlib

    # mlx-lm is a dev dependency (the benchmark's competitor); its package re-exports a
    # function named `generate`, so the submodule is fetched by name.
    mlx_lm_generate = importlib.import_module("mlx_lm.generate")

    ids = paw_mlx.prompt_ids(prog, "Hello")
    ours = list(generate_step(prog.model, ids, prog.make_cache(), max_tokens=8))
    theirs = [tok for tok, _ in mlx_lm_generate.generate_step(mx.array(ids), prog.model, max_tokens=8)]
    assert ours == theirs


def test_a_program_loaded_on_one_thread_runs_on_others(tiny_program):
    import threading

    prog = paw_mlx.load(tiny_program)
    expected = paw_mlx.generate(prog, "Hello", max_tokens=6)
    results: list = []

    def work():
        try:
            results.append(paw_mlx.generate(prog, "Hello", max_tokens=6))
        except Exception as exc:  # collected and asserted below
            results.append(exc)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [expected] * 3
