"""Trained programs on bases with recurrent state (tests/archs.py's tiny LFM2, Qwen3.5, Mamba2, Jamba
and RecurrentGemma): a LoRA trains with each row behind a prefix without its own demonstration (no key mask, which a
recurrent layer cannot honour), and the kept program's call equals the prompt through the model
with the adapter merged into its weights. A tuned prefix is refused on such a base."""

from __future__ import annotations

from dataclasses import replace

import mlx.core as mx
import pytest

import paw_mlx
from interp.errors import ArtifactError, PawError
from interp.lora import merged_model
from paw_mlx.programs.compile import prefixes_without
from paw_mlx.programs.select import DEFAULT_CANDIDATES, SelectOptions
from paw_mlx.programs.train import TrainOptions, end_token
from tests.paw_mlx.test_hybrid import EXAMPLES, HYBRIDS

SPEC = "Write the number as digits."
#: Mamba2 has no attention projection to adapt: its LoRA targets every linear layer
TARGETS = {"hybrid_program": "attention", "gated_delta_program": "attention", "ssm_program": "all",
           "jamba_program": "attention", "recurrent_gemma_program": "attention"}


def quick(base: str, **lora) -> SelectOptions:
    return SelectOptions(candidates=("lora",), folds=3,
                         lora=TrainOptions(steps=4, rank=2, eval_every=2, learning_rate=5e-2, targets=TARGETS[base],
                                           **lora))


@pytest.fixture(scope="module", params=HYBRIDS)
def base(request) -> tuple:
    """(fixture name, the program's directory, the loaded program)."""
    directory = request.getfixturevalue(request.param)
    return request.param, directory, paw_mlx.load(directory)


def merged(prog, adapter):
    """``prog`` with ``adapter`` merged into its float32 weights: the reference's model."""
    model = merged_model(prog.model, adapter.scaled())
    assert model is not None
    return replace(prog, model=model)


def reference(prog, artifact, text: str, adapted_prefix: bool) -> str:
    """The greedy reply to prefix + input: the prefix through the base (or, ``adapted_prefix``, the
    merged model), the input and the reply through the merged model."""
    model = merged(prog, artifact.adapter)
    ids = artifact.prefix_ids + paw_mlx.function(artifact, base=prog.path).token_ids(text)
    if adapted_prefix:
        out = list(paw_mlx.stream_tokens(model, ids, max_tokens=6))
    else:
        cache = prog.make_cache()
        prog.model(mx.array([artifact.prefix_ids], dtype=mx.int32), cache=cache)
        out = list(paw_mlx.stream_tokens(model, ids[len(artifact.prefix_ids):], max_tokens=6, cache=cache))
    return prog.tokenizer.decode_finished(out, skip_special_tokens=True)


@pytest.mark.parametrize("adapt_prefix", [False, True])
def test_a_lora_program_calls_as_the_merged_model(base, adapt_prefix):
    """The kept (bagged) adapter is not zero, and each call equals the merged model's reply; its prefix
    state is the base's run (or, with ``adapt_prefix``, the adapted run), as on a KV base."""
    name, directory, prog = base
    program = paw_mlx.compile(SPEC, base=directory, examples=EXAMPLES, max_new_tokens=6,
                              options=quick(name, adapt_prefix=adapt_prefix))
    assert program.selection["kept"] == "lora" and program.adapter is not None
    assert any(abs(b).max() > 0 for _, b in program.adapter.modules.values())
    f = paw_mlx.function(program, base=directory)
    inputs = ["seven", "x", "four five"]
    assert [f(text) for text in inputs] == [reference(prog, program, text, adapt_prefix) for text in inputs]
    # every state a call starts from (recurrent ones too, the only ones Mamba2 has) is that model's run
    runner = merged(prog, program.adapter) if adapt_prefix else prog
    want = runner.make_cache()
    runner.model(mx.array([program.prefix_ids], dtype=mx.int32), cache=want)
    for got, expected in zip(f.start_cache(), want, strict=True):
        assert all(mx.allclose(a, b, atol=1e-5).item() for a, b in zip(got.state, expected.state, strict=True))


def test_a_row_never_sees_its_own_demonstration(base):
    """The first step's loss (the adapter is zero there) is the base's loss of each row behind the prefix
    without its own demonstration, not behind the kept prefix that shows it."""
    from paw_mlx.programs.artifact import GenerationSettings
    from paw_mlx.programs.select import Builder

    name, directory, prog = base
    builder = Builder(prog, SPEC, str(directory), GenerationSettings(6))
    options = TrainOptions(steps=1, batch_size=len(EXAMPLES), rank=2, targets=TARGETS[name])
    artifact, result = builder.build("lora", EXAMPLES, options)
    kept = builder.prompted(EXAMPLES)

    def loss(prefixes: list[list[int]]) -> float:
        total, count = 0.0, 0
        for row, prefix in zip(EXAMPLES, prefixes, strict=True):
            prompt = paw_mlx.function(kept, base=directory).token_ids(row["input"])
            answer = prog.tokenizer.encode_literal(row["output"]) + [end_token(prog)]
            ids = prefix + prompt + answer
            logits = prog.model(mx.array([ids], dtype=mx.int32))[0].astype(mx.float32)
            for t in range(len(prefix) + len(prompt) - 1, len(ids) - 1):
                total += (mx.logsumexp(logits[t]) - logits[t, ids[t + 1]]).item()
                count += 1
        return total / count

    hidden = loss(prefixes_without(prog.tokenizer, kept.layout, SPEC, kept.demos))
    shown = loss([kept.prefix_ids] * len(EXAMPLES))
    assert abs(result.losses[0] - hidden) < 1e-4 * max(1.0, hidden)
    assert abs(hidden - shown) > 1e-3


def test_a_lora_program_with_a_changed_prefix_is_refused(hybrid_program):
    """The stored keys and values still have to be the run the prefix state is rebuilt from."""
    program = paw_mlx.compile(SPEC, base=hybrid_program, examples=EXAMPLES, max_new_tokens=6,
                              options=quick("hybrid_program"))
    tuned = replace(program, prefix=[(k + 0.5, v) for k, v in program.prefix])
    with pytest.raises(ArtifactError, match="not its base model's own run"):
        paw_mlx.function(tuned, base=hybrid_program)("one")


def test_the_default_candidates_drop_only_what_the_base_cannot_build(hybrid_program, ssm_program):
    """A tuned prefix is never tried on a recurrent base; LoRA is, where there is a layer to adapt."""
    options = SelectOptions()
    assert "prefix" in options.check_base(hybrid_program)
    assert options.candidates == ("spec", "fewshot", "lora")
    options = SelectOptions()
    note = options.check_base(ssm_program)
    assert options.candidates == ("spec", "fewshot") and "no linear layers" in note
    assert SelectOptions(candidates=DEFAULT_CANDIDATES).candidates == DEFAULT_CANDIDATES


@pytest.mark.parametrize("candidates", [("fewshot", "prefix"), ("lora", "prefix+lora")])
def test_a_tuned_prefix_is_refused_before_loading(hybrid_program, tmp_path, candidates):
    with pytest.raises(PawError, match=r"^candidate prefix(\+lora)? cannot be built on .*recurrent state.*"
                                       r"spec, fewshot, lora work on it"):
        paw_mlx.compile("Answer yes.", base=hybrid_program, out_dir=tmp_path / "out", examples=EXAMPLES,
                        options=SelectOptions(candidates=candidates))
    assert not (tmp_path / "out").exists()


def test_paw_compile_of_a_tuned_prefix_is_one_line_and_writes_nothing(hybrid_program, tmp_path):
    import json

    from tests.apps.test_cli import assert_one_line_error, paw

    examples = tmp_path / "examples.jsonl"
    examples.write_text("".join(json.dumps(row) + "\n" for row in EXAMPLES))
    done = paw("compile", SPEC, "--base", str(hybrid_program), "--examples", str(examples),
               "--candidates", "prefix", "-o", str(tmp_path / "out"))
    assert_one_line_error(done, "candidate prefix cannot be built", "recurrent state")
    assert not (tmp_path / "out").exists()
