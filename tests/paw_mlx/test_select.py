"""Compiling from examples on the tiny model: training (LoRA, prefix), cross-validation, the kept
candidate, and artifacts that round-trip."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest

import paw_mlx
from interp.errors import PawError
from paw_mlx.programs.adapter import LoraAdapter, mean_adapter
from paw_mlx.programs.artifact import GenerationSettings, read_artifact
from paw_mlx.programs.compile import demo_spans
from paw_mlx.programs.examples import folds, load_examples, partitions, split_examples
from paw_mlx.programs.interpreter import interpreter
from paw_mlx.programs.select import Builder, CandidateScore, Selection, SelectOptions
from paw_mlx.programs.train import SplitModel, TrainableCache, TrainOptions, train

SPEC = "Upper."
ROWS = [{"input": w, "output": w.upper()} for w in ["cat", "dog", "sun", "red", "hat", "pen"]]
QUICK = SelectOptions(candidates=("spec", "fewshot", "lora"), folds=2,
                      lora=TrainOptions(steps=4, layers=1, rank=2, eval_every=2))


@pytest.fixture(scope="module")
def builder(tiny_program):
    prog = interpreter(tiny_program)
    return Builder(prog, SPEC, str(tiny_program), GenerationSettings(max_new_tokens=8))


def test_split_model_equals_the_whole_graph(tiny_program):
    prog = interpreter(tiny_program)
    art = paw_mlx.compile("Parse the options.", base=tiny_program)
    ids = mx.array([[5, 9, 33, 70, 12]], dtype=mx.int32)
    start = art.prefix_length
    pos = mx.arange(start, start + 5, dtype=mx.int32)[None]
    whole = prog.model(ids, cache=[TrainableCache(k, v) for k, v in art.prefix], positions=pos)
    split = SplitModel(prog.model, first_tuned_layer=1)
    front = split.front.run({"input_ids": ids, "position_ids": pos}, cache=[TrainableCache(*art.prefix[0]), None])
    hidden = split.back.run(front, cache=[None, TrainableCache(*art.prefix[1])])[split.back.output_names[0]]
    assert split.head is not None  # the LM head was split off
    assert mx.allclose(split.scores(hidden), whole, atol=1e-5).item()


def test_demo_spans_hold_each_demo(builder):
    artifact = builder.prompted(ROWS[:3])
    spans = demo_spans(builder.prog.tokenizer, artifact.layout, SPEC, artifact.demos)
    assert [e - s > 0 for s, e in spans] == [True] * 3 and spans[0][1] == spans[1][0]
    for (start, end), row in zip(spans, ROWS[:3], strict=True):
        text = builder.prog.tokenizer.decode(artifact.prefix_ids[start:end])
        assert row["input"] in text and row["output"] in text and ROWS[3]["input"] not in text


def test_lora_training_lowers_the_loss_and_round_trips(builder, tiny_program, tmp_path):
    consts = (tiny_program / "consts.safetensors").read_bytes()
    options = TrainOptions(steps=16, layers=0, rank=4, learning_rate=5e-2)
    artifact, result = builder.build("lora", ROWS, options)
    # two mini-batches take turns: compare each with itself
    assert result.losses[14] < result.losses[0] and result.losses[15] < result.losses[1], result.losses
    assert set(artifact.adapter.modules) >= {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.o_proj"}
    assert artifact.prefix is builder.prompted(ROWS).prefix  # LoRA leaves the prefix alone
    paw_mlx.programs.write_artifact(artifact, tmp_path / "prog")
    back = read_artifact(tmp_path / "prog")
    assert back.adapter.alpha == options.alpha and back.adapter.rank == 4
    assert json.loads((tmp_path / "prog" / "program.json").read_text())["adapter"]["rank"] == 4
    f, g = paw_mlx.function(tmp_path / "prog", max_new_tokens=6), paw_mlx.function(artifact, max_new_tokens=6)
    plain = paw_mlx.function(builder.prompted(ROWS), max_new_tokens=6)
    assert f(["cow", "bee"]) == g(["cow", "bee"])
    assert f.runner.model is not plain.runner.model and plain.runner is plain.base
    # float32 weights: the adapter is merged into copies of them, no lora nodes in the graph
    assert f.runner.model.program is f.base.model.program
    changed = [k for k, v in f.runner.model.consts.items() if v is not f.base.model.consts[k]]
    assert changed and all(f.base.model.consts[k].dtype == mx.float32 for k in changed)
    assert (tiny_program / "consts.safetensors").read_bytes() == consts  # the base never changes


def test_a_rank_above_the_narrowest_adapted_layer_is_refused_before_training(builder):
    # the tiny model's key and value projections have 32 outputs: rank 33 and up add nothing but cost
    with pytest.raises(PawError, match="rank 100000 is more than the narrowest layer it adapts [(]32"):
        builder.build("lora", ROWS, TrainOptions(steps=1, layers=1, rank=100_000))


def test_early_stopping_keeps_the_best_validation_step(builder):
    options = TrainOptions(steps=40, layers=1, rank=2, learning_rate=0.5, eval_every=2, patience=2)
    _, result = builder.build("lora", ROWS[:4], options, validation=ROWS[4:])
    losses = [v for _, _, v in result.history]
    assert result.steps_run < 40  # stopped early: a huge rate overshoots
    assert losses[[s for s, _, _ in result.history].index(result.best_step)] == min(losses)


def test_training_prepares_only_the_rows_its_steps_reach(builder, monkeypatch):
    """With many rows and few steps, the frozen front pass runs for the rows the steps use."""
    import paw_mlx.programs.train as train_module

    prepared = []
    original = train_module._prepare

    def spy(split, prog, artifact, rows, *args):
        prepared.append(len(rows))
        return original(split, prog, artifact, rows, *args)

    monkeypatch.setattr(train_module, "_prepare", spy)
    rows = [{"input": f"w{i}", "output": f"W{i}"} for i in range(30)]
    result = train(builder.prog, builder.prompted([]), rows, TrainOptions(steps=3, batch_size=2, layers=1, rank=2))
    assert prepared == [6, 0] and result.steps_run == 3  # 3 steps x 2 rows; no validation rows


def test_a_training_answer_keeps_special_token_text_as_text(builder):
    """An output holding ``<|im_end|>`` (a task about chat formats) trains the text a call can
    write, not an end-of-turn token in mid-answer that would stop every call there."""
    from paw_mlx.programs.train import _encode, end_token

    eos = end_token(builder.prog)
    row = {"input": "<|im_end|> closes a turn", "output": "it ends with <|im_end|> here"}
    ids, start = _encode(builder.prog, builder.prompted([]), row, eos)
    assert ids[-1] == eos and eos not in ids[start:-1]
    assert builder.prog.tokenizer.decode(ids[start:-1]) == row["output"]


def test_an_example_with_special_token_text_is_never_a_demonstration(tiny_program):
    """Rendered into the prefix, ``<|im_end|>`` would end its turn early; the example still
    trains and is predicted held out."""
    rows = ROWS[:4] + [{"input": "say <|im_end|>", "output": "SAY"}, {"input": "end", "output": "<|im_start|>"}]
    art = paw_mlx.compile(SPEC, base=tiny_program, examples=rows, options=replace(QUICK, candidates=("fewshot",)))
    assert [d["input"] for d in art.demos] == [r["input"] for r in ROWS[:4]]
    assert art.selection["demonstrations"] == {"shown": 4, "examples": 6}
    assert art.selection["candidates"][0]["total"] == 6


def test_prefix_training_moves_only_the_top_layers(builder):
    options = TrainOptions(method="prefix", steps=3, layers=1, learning_rate=5e-2)
    artifact, result = builder.build("prefix", ROWS, options)
    before = builder.prompted(ROWS).prefix
    assert result.tuned_layers == [1] and artifact.adapter is None
    assert mx.array_equal(artifact.prefix[0][0], before[0][0]).item()
    assert not mx.array_equal(artifact.prefix[1][0], before[1][0]).item()


def test_prefix_then_lora_trains_both_and_shares_the_prefix_folds(builder, monkeypatch, tmp_path):
    import paw_mlx.programs.select as select_module

    trained = []
    original = select_module.train

    def spy(prog, artifact, rows, options, **kw):
        trained.append(options.method)
        return original(prog, artifact, rows, options, **kw)

    monkeypatch.setattr(select_module, "train", spy)
    options = SelectOptions(candidates=("prefix", "prefix+lora"), folds=2,
                            lora=TrainOptions(steps=4, layers=1, rank=2, eval_every=2, learning_rate=5e-2),
                            prefix=TrainOptions(method="prefix", steps=4, layers=1, eval_every=2,
                                                learning_rate=5e-2))
    selection = Selection(builder.prog, builder, ROWS, options)
    scores = selection.cross_validate()
    # two folds: prefix tuned twice, and prefix+lora reuses those tunings for its first stage
    assert trained == ["prefix", "prefix", "lora", "lora"]
    assert len(scores["prefix+lora"].stage_steps) == 2 == len(scores["prefix+lora"].best_steps)
    assert scores["prefix+lora"].stage_steps == scores["prefix"].best_steps
    artifact = selection.rebuild("prefix+lora")
    before = builder.prompted(ROWS).prefix
    assert artifact.adapter is not None and not mx.array_equal(artifact.prefix[1][0], before[1][0]).item()
    assert artifact.tuning["method"] == "prefix+lora"
    assert artifact.tuning["prefix_stage"]["method"] == "prefix"
    paw_mlx.programs.write_artifact(artifact, tmp_path / "both")
    back = read_artifact(tmp_path / "both")
    assert mx.array_equal(back.prefix[1][0], artifact.prefix[1][0]).item() and back.adapter.rank == 2
    f, g = paw_mlx.function(tmp_path / "both", max_new_tokens=6), paw_mlx.function(artifact, max_new_tokens=6)
    assert f(["cow", "bee"]) == g(["cow", "bee"])
    with pytest.raises(PawError, match="prefix stage"):
        builder.build("prefix+lora", ROWS, options.lora)


def test_cross_validation_never_shows_a_fold_its_own_rows(builder, monkeypatch):
    calls = []
    original = Builder.build

    def spy(self, name, rows, options, **kw):
        calls.append((name, [r["input"] for r in rows], [r["input"] for r in kw.get("validation", ())]))
        return original(self, name, rows, options, **kw)

    monkeypatch.setattr(Builder, "build", spy)
    selection = Selection(builder.prog, builder, ROWS, QUICK)
    scores = selection.cross_validate()
    for name, fit, held in calls:
        assert not set(fit) & set(held), (name, fit, held)
    assert all(s.total == len(ROWS) for s in scores.values())  # every row predicted once
    assert sorted(i for f in selection.folds for i in f) == list(range(len(ROWS)))


def test_repeated_cross_validation_predicts_each_row_once_per_shuffle(builder, monkeypatch):
    """``repeats=2``: two partitions from two shuffles, each fold fitted without its own rows;
    trained candidates predict every row twice, the spec once, and the choice compares rates;
    a third shuffle equal to one already made (folds of one row) is not fitted again."""
    calls = []
    original = Builder.build

    def spy(self, name, rows, options, **kw):
        calls.append((name, frozenset(r["input"] for r in kw.get("validation", ()))))
        return original(self, name, rows, options, **kw)

    monkeypatch.setattr(Builder, "build", spy)
    options = replace(QUICK, candidates=("spec", "lora"), repeats=2)
    selection = Selection(builder.prog, builder, ROWS, options)
    first, second = selection.folds[:2], selection.folds[2:]
    assert len(selection.folds) == 4 and {frozenset(f) for f in first} != {frozenset(f) for f in second}
    for partition in (first, second):
        assert sorted(i for f in partition for i in f) == list(range(len(ROWS)))
    scores = selection.cross_validate()
    assert scores["spec"].total == len(ROWS) and scores["lora"].total == 2 * len(ROWS)
    assert len(scores["lora"].best_steps) == 4 and len(scores["lora"].outputs) == len(ROWS)
    assert [held for name, held in calls if name == "lora"] == [
        frozenset(ROWS[i]["input"] for i in f) for f in selection.folds]
    assert "repeated over 2 shuffles (4 folds)" in selection.report()["method"]
    selection.scores = {"spec": CandidateScore("spec", 3, 6), "lora": CandidateScore("lora", 6, 12)}
    assert selection.kept == "spec"  # 6/12 ties 3/6: the simpler one
    selection.scores["lora"].correct = 7
    assert selection.kept == "lora"
    assert partitions(3, 4, repeats=3) == [folds(3, 4)]
    with pytest.raises(PawError, match="repeats must be 1-10"):
        replace(QUICK, repeats=0).check()
    for bad in ({"folds": "8"}, {"folds": 2.5}, {"repeats": True}):
        with pytest.raises(PawError, match="must be a whole number"):
            replace(QUICK, **bad).check()

def _updates(adapter):
    return {m: b @ a for m, (a, b) in adapter.scaled().items()}


def test_kept_lora_is_the_mean_of_the_fold_adapters(builder, tmp_path):
    """The kept LoRA is not trained again: the few-shot prefix of all rows with the mean of
    the folds' adapters, each validated at its own best step."""
    options = replace(QUICK, candidates=("fewshot", "lora"))
    selection = Selection(builder.prog, builder, ROWS, options)
    folds = selection.cross_validate()["lora"].adapters
    assert len(folds) == 2 and all(a.rank == 2 for a in folds)
    artifact = selection.rebuild("lora")
    assert artifact.adapter.rank == 4 and artifact.prefix is builder.prompted(ROWS).prefix
    got, each = _updates(artifact.adapter), [_updates(a) for a in folds]
    for module, update in got.items():
        assert np.allclose(update, (each[0][module] + each[1][module]) / 2, atol=1e-6), module
    assert "mean of the 2 folds' adapters" in artifact.tuning["rebuild"]
    assert selection.final_training("lora") == options.lora  # the folds' options: nothing retrained
    paw_mlx.programs.write_artifact(artifact, tmp_path / "bag")
    f, g = paw_mlx.function(tmp_path / "bag", max_new_tokens=6), paw_mlx.function(artifact, max_new_tokens=6)
    assert f(["cow", "bee"]) == g(["cow", "bee"])


def test_bagged_adapter_recomputes_an_adapted_prefix(builder):
    """``adapt_prefix`` (how a .paw bundle runs): the kept prefix is computed through the mean adapter."""
    from paw_mlx.programs.compile import compute_prefix
    from paw_mlx.programs.function import adapted

    options = replace(QUICK, candidates=("lora",), lora=replace(QUICK.lora, adapt_prefix=True))
    selection = Selection(builder.prog, builder, ROWS, options)
    selection.cross_validate()
    artifact = selection.rebuild("lora")
    want = compute_prefix(adapted(builder.prog, artifact.adapter), artifact.prefix_ids)
    plain = builder.prompted(ROWS).prefix
    assert all(mx.allclose(k, wk, atol=1e-5).item() for (k, _), (wk, _) in zip(artifact.prefix, want, strict=True))
    assert not mx.allclose(artifact.prefix[-1][0], plain[-1][0]).item()


def test_mean_adapter_is_exact_or_the_best_truncation():
    rng = np.random.default_rng(0)

    def random_adapter(rank, alpha):
        return LoraAdapter({"q": (rng.normal(size=(rank, 20)).astype(np.float32),
                                  rng.normal(size=(12, rank)).astype(np.float32)),
                            "v": (rng.normal(size=(rank, 20)).astype(np.float32),
                                  rng.normal(size=(4, rank)).astype(np.float32))}, alpha)

    adapters = [random_adapter(8, 16.0), random_adapter(8, 16.0), random_adapter(4, 2.0)]
    want = {m: sum(_updates(a)[m] for a in adapters) / 3 for m in ("q", "v")}
    mean = mean_adapter(adapters)
    assert mean.rank == 20 and mean.alpha == 20.0
    assert all(np.allclose(_updates(mean)[m], want[m], atol=1e-4) for m in want)
    short = mean_adapter(adapters, max_rank=6)
    assert short.rank == 6  # "v" (4 outputs) is exact at rank 4, padded with zeros to 6
    assert np.allclose(_updates(short)["v"], want["v"], atol=1e-4)
    tail = np.linalg.svd(want["q"], compute_uv=False)[6:]
    assert np.isclose(np.linalg.norm(_updates(short)["q"] - want["q"]), np.sqrt((tail ** 2).sum()), rtol=1e-4)
    with pytest.raises(ValueError, match="same modules"):
        mean_adapter([adapters[0], LoraAdapter({"q": adapters[0].modules["q"]}, 16.0)])


def test_ties_keep_the_simpler_candidate(builder):
    selection = Selection(builder.prog, builder, ROWS, QUICK)
    selection.scores = {"spec": CandidateScore("spec", 3, 6), "fewshot": CandidateScore("fewshot", 4, 6),
                        "lora": CandidateScore("lora", 4, 6, best_steps=[2, 4])}
    assert selection.kept == "fewshot"
    selection.scores["lora"].correct = 5
    assert selection.kept == "lora" and selection.final_training("lora").steps == 3
    assert "next best fewshot (4/6)" in selection.report()["reason"]


def test_a_tie_keeps_a_bagged_lora(builder):
    """The mean of the folds' adapters is fitted on every example between them, so its
    cross-validated score (each fold's adapter alone) understates it: it wins a tie."""
    selection = Selection(builder.prog, builder, ROWS, QUICK)
    one = LoraAdapter({"q": (np.zeros((2, 4), np.float32), np.zeros((4, 2), np.float32))}, 4.0)
    selection.scores = {"fewshot": CandidateScore("fewshot", 4, 6),
                        "lora": CandidateScore("lora", 4, 6, best_steps=[2, 4], adapters=[one, one])}
    assert selection.kept == "lora"
    assert "tied with fewshot, the LoRA is kept" in selection.report()["reason"]
    selection.scores["lora"].adapters = []  # not bagged: the simpler candidate wins the tie
    assert selection.kept == "fewshot"


def test_compile_reports_candidates_and_scores_test_rows_last(tiny_program, tmp_path):
    rows = [dict(r, split="train") for r in ROWS[:4]] + [dict(r, split="test") for r in ROWS[4:]]
    seen = []
    art = paw_mlx.compile(SPEC, base=tiny_program, examples=rows, options=QUICK, out_dir=tmp_path / "p",
                          progress=lambda text, done, total: seen.append((done, total)))
    info = read_artifact(tmp_path / "p").selection
    assert info == json.loads(json.dumps(art.selection))
    assert [c["name"] for c in info["candidates"]] == ["spec", "fewshot", "lora"] and info["kept"] in QUICK.candidates
    assert info["test"]["total"] == 2 and not {"hat", "pen"} & {i for f in info["folds"] for i in f}
    assert "inputs_also_in_training" not in info["test"]
    assert seen and seen[-1][0] == seen[-1][1]  # the progress ends full
    kept_demos = [r["input"] for r in ROWS[:4]] if art.selection["kept"] != "spec" else []
    assert [d["input"] for d in art.demos] == kept_demos


def test_candidates_are_scored_under_the_output_constraint(tiny_program):
    choices = [r["output"] for r in ROWS]
    art = paw_mlx.compile(SPEC, base=tiny_program, examples=ROWS[:4], options=QUICK, returns=choices)
    for candidate in art.selection["candidates"]:
        assert all(o in choices for o in candidate["outputs"]), candidate
    assert paw_mlx.function(art)("bee") in choices


def test_example_outputs_the_constraint_forbids_are_refused(tiny_program, tmp_path):
    """An output the constraint cannot write would never match, and would teach a forbidden form."""
    with pytest.raises(PawError, match=r"1 of the 4 example outputs cannot be written .* e\.g\. 'SUN'"):
        paw_mlx.compile(SPEC, base=tiny_program, examples=ROWS[:4], options=QUICK, out_dir=tmp_path / "no",
                        returns=["CAT", "DOG", "RED"])
    rows = [{"input": "a", "output": '{"x": 1}'}, {"input": "b", "output": '{"x":2}'}]
    with pytest.raises(PawError, match="', ' and ': '"):
        paw_mlx.compile(SPEC, base=tiny_program, examples=rows, options=QUICK, returns="json")
    assert not (tmp_path / "no").exists()


def test_the_output_budget_fits_the_longest_example(tiny_program):
    rows = [{"input": w, "output": " ".join([w] * 50)} for w in ["cat", "dog", "sun"]]
    options = replace(QUICK, candidates=("fewshot",))
    art = paw_mlx.compile(SPEC, base=tiny_program, examples=rows, options=options)
    longest = max(len(interpreter(tiny_program).tokenizer.encode(r["output"], add_special_tokens=False))
                  for r in rows)
    assert longest > 64 and art.generation.max_new_tokens == longest + 8
    assert paw_mlx.compile(SPEC, base=tiny_program).generation.max_new_tokens == 64
    with pytest.raises(PawError, match=f"an example output is {longest} tokens, more than the output budget of 20"):
        paw_mlx.compile(SPEC, base=tiny_program, examples=rows, options=options, max_new_tokens=20)
    for bad in (0, "5", True):
        with pytest.raises(PawError, match="max_new_tokens must be a positive integer"):
            paw_mlx.compile(SPEC, base=tiny_program, max_new_tokens=bad)


def test_an_example_longer_than_the_context_is_refused_before_training(tiny_program, tmp_path, monkeypatch):
    """No call could write its output (a call stops at the context's end): one error before any
    training, instead of minutes of compiling to a program whose budget exceeds the context."""
    import paw_mlx.programs.select as select_module

    monkeypatch.setattr(select_module, "select", lambda *a, **k: pytest.fail("trained anyway"))
    rows = ROWS[:3] + [{"input": "sun", "output": " ".join(["sun"] * 600)}]
    with pytest.raises(PawError, match=r"1 of the 4 examples do not fit the base model's context of 512 tokens "
                                       r"after the spec's \d+: the longest \(input 'sun'\) takes \d+ with its output"):
        paw_mlx.compile(SPEC, base=tiny_program, examples=rows, options=QUICK, out_dir=tmp_path / "p")
    assert not (tmp_path / "p").exists()
    long_input = [{"input": "dog " * 600, "output": "DOG"}, *ROWS[:3]]
    with pytest.raises(PawError, match="1 of the 4 examples do not fit"):
        paw_mlx.compile(SPEC, base=tiny_program, examples=long_input, options=QUICK)


def test_bad_options_and_examples(tiny_program, tmp_path):
    with pytest.raises(PawError, match="unknown candidate magic"):
        paw_mlx.compile(SPEC, base=tiny_program, examples=ROWS, options=SelectOptions(candidates=("magic",)))
    with pytest.raises(PawError, match='example 1: "input" is a number, not a string'):
        paw_mlx.compile(SPEC, base=tiny_program, examples=[ROWS[0], {"input": 1, "output": "x"}])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "x"}\n', encoding="utf-8")
    with pytest.raises(PawError, match="bad.jsonl:1"):
        load_examples(bad)
    bad.write_text('{"input": "x", "output": "y", "split": "dev"}\n', encoding="utf-8")
    with pytest.raises(PawError, match='"split" must be'):
        load_examples(bad)
    with pytest.raises(PawError, match="no such examples file"):
        load_examples(tmp_path / "none.jsonl")
    with pytest.raises(PawError, match="is a folder; the examples file must be a file"):
        load_examples(tmp_path)


@pytest.mark.parametrize(("line", "message"), [
    ('{"prompt": "a", "completion": "b"}', r'ex.jsonl:2: no "input" key \(found "prompt", "completion"\)'),
    ('{"input": "a", "output": 12}', r'ex.jsonl:2: "output" is a number, not a string: .* e\.g\. "12"'),
    ('{"input": "a b", "output": ["a", "b"]}', r'"output" is a list, not a string: .* e\.g\. "\[\\"a\\", \\"b'),
    ('{"input": null, "output": "b"}', '"input" is null, not a string'),
    ('[{"input": "a", "output": "b"}]', r'ex.jsonl:2: a list, not an object: one example per line is \{"input"'),
    ('{"input": "a", "output": "b",}', "ex.jsonl:2: not JSON: Expecting property name"),
])
def test_a_malformed_example_line_is_named_with_what_is_wrong(tmp_path, line, message):
    """Values are not coerced (a number's or a list's text is the user's to choose): the error says
    which key is missing or not a string, and how to write it."""
    path = tmp_path / "ex.jsonl"
    path.write_text('{"input": "x", "output": "y"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(PawError, match=message):
        load_examples(path)


def test_example_strings_may_hold_unicode_line_separators(tmp_path):
    """JSON writers leave U+2028, U+2029 and U+0085 unescaped (json.dumps with ensure_ascii=False);
    they are text inside a string, not line ends, while CRLF and blank lines are."""
    rows = [{"input": f"a{sep}b", "output": f"x{sep}y"} for sep in ("\u2028", "\u2029", "\x85", "\x0c", "\x1e")]
    path = tmp_path / "ex.jsonl"
    path.write_bytes(("\r\n\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\r\n").encode())
    assert load_examples(path) == rows


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be"])
def test_utf16_task_files_with_a_byte_order_mark_are_read(tmp_path, encoding):
    """Windows PowerShell's `>` writes UTF-16 with a byte-order mark; line ends may be CRLF or CR."""
    from paw_mlx.programs.compile import read_spec

    rows = [{"input": "\u05e9\u05dc\u05d5\u05dd \U0001f600", "output": "x"}, ROWS[0]]
    path = tmp_path / "ex.jsonl"
    path.write_bytes("\ufeff".encode(encoding) + "\r\n".join(json.dumps(r) for r in rows).encode(encoding))
    assert load_examples(path) == rows
    (tmp_path / "spec.txt").write_bytes("\ufeffUpper.\rLine two.".encode(encoding))
    assert read_spec(f"@{tmp_path / 'spec.txt'}") == "Upper.\nLine two."
    path.write_bytes(b"\xff{}")  # neither UTF-8 nor marked UTF-16
    with pytest.raises(PawError, match=r"cannot read the examples file .*\(save it as UTF-8\)"):
        load_examples(path)


def test_repeated_examples_are_dropped_and_a_byte_order_mark_is_read(tiny_program, tmp_path):
    """A repeated example would be on both sides of a fold; a BOM is what Windows editors write."""
    path = tmp_path / "ex.jsonl"
    lines = [json.dumps(r) for r in ROWS[:4] + ROWS[:2]] + [json.dumps({"input": "cat", "output": "Cat"})]
    path.write_text("\ufeff" + "\r\n".join(lines) + "\r\n", encoding="utf-8")
    assert load_examples(path)[0] == ROWS[0]
    art = paw_mlx.compile(SPEC, base=tiny_program, examples=path, options=replace(QUICK, candidates=("fewshot",)))
    assert art.selection["repeated_examples_dropped"] == 2
    assert art.selection["conflicting_inputs"] == 1  # "cat": "CAT" and "Cat"; no program matches both
    assert [(d["input"], d["output"]) for d in art.demos] == [(r["input"], r["output"]) for r in ROWS[:4]] + [
        ("cat", "Cat")]  # the same input with another output is data, kept


def test_a_test_row_with_a_training_input_is_counted(tiny_program):
    """Its score is not held-out (the input is a demonstration): the report says how many."""
    rows = [dict(r, split="train") for r in ROWS[:4]] + [dict(ROWS[0], input=f" {ROWS[0]['input']} ", split="test"),
                                                        dict(ROWS[5], split="test")]
    art = paw_mlx.compile(SPEC, base=tiny_program, examples=rows, options=replace(QUICK, candidates=("fewshot",)))
    assert art.selection["test"]["total"] == 2 and art.selection["test"]["inputs_also_in_training"] == 1


def test_split_field_and_folds():
    rows = [{"input": str(i), "output": str(i), "split": "test" if i % 3 == 0 else "train"} for i in range(9)]
    train, held = split_examples(rows, holdout=0.5)
    assert [r["input"] for r in held] == ["0", "3", "6"] and len(train) == 6
    assert sorted(len(f) for f in folds(8, 4)) == [2, 2, 2, 2] and folds(3, 4) == folds(3, 3)


def test_training_the_base_weights_never_changes_files(tiny_program):
    digest = hashlib.sha256((tiny_program / "consts.safetensors").read_bytes()).hexdigest()
    train(interpreter(tiny_program), paw_mlx.compile(SPEC, base=tiny_program), ROWS, TrainOptions(steps=1, layers=1))
    assert hashlib.sha256((tiny_program / "consts.safetensors").read_bytes()).hexdigest() == digest


#: a task whose held-out answers differ from every training answer, within the base model's
#: reach (uppercasing words, this test's task before, is not: SmolLM2-135M's few-shot prefix
#: spells 5-6 of 12 unseen words right with or without leads, so a threshold on it measured noise)
PAST_TRAIN = [("walk", "walked"), ("jump", "jumped"), ("eat", "ate"), ("go", "went"), ("see", "saw"),
              ("play", "played")]
PAST_HELD_OUT = [("talk", "talked"), ("sing", "sang"), ("buy", "bought"), ("watch", "watched"), ("run", "ran"),
                 ("write", "wrote")]


UPPER_TRAIN = ["apple", "river", "hello", "table", "garden", "music"]
UPPER_HELD_OUT = ["house", "water", "bridge", "candle", "forest", "pencil"]
QUICK_SMOLLM2 = SelectOptions(candidates=("spec", "fewshot", "lora"), folds=2,
                              lora=TrainOptions(steps=4, layers=2, rank=4, eval_every=2))


@pytest.mark.slow
def test_smollm2_kept_program_answers_new_inputs_not_training_outputs(smollm2_program):
    """The failure this compiler exists to avoid: a program that repeats training answers (issue
    16's: "uppercase" answered HELLO or TABLE whatever the word); and on a task within the
    base model's reach, it answers unseen inputs right."""
    rows = [{"input": w, "output": w.upper()} for w in UPPER_TRAIN]
    art = paw_mlx.compile("Return the user's word in uppercase letters. Answer with the word only.",
                          base=smollm2_program, examples=rows, options=QUICK_SMOLLM2, max_new_tokens=8)
    outputs = paw_mlx.function(art)(UPPER_HELD_OUT)
    assert not set(outputs) & {r["output"] for r in rows} and len(set(outputs)) == len(outputs), outputs
    rows = [{"input": i, "output": o} for i, o in PAST_TRAIN]
    art = paw_mlx.compile("Give the past tense of the user's verb. Answer with the verb only.",
                          base=smollm2_program, examples=rows, options=QUICK_SMOLLM2, max_new_tokens=8)
    outputs = paw_mlx.function(art)([i for i, _ in PAST_HELD_OUT])
    assert not set(outputs) & {r["output"] for r in rows}, outputs
    correct = sum(o == want for o, (_, want) in zip(outputs, PAST_HELD_OUT, strict=True))
    assert correct >= len(PAST_HELD_OUT) // 2, (art.selection["kept"], outputs)
    assert art.selection["kept"] != "spec"
    assert {c["name"] for c in art.selection["candidates"]} == {"spec", "fewshot", "lora"}


def test_demos_are_all_rows_that_fit_else_a_spread_of_every_output():
    from paw_mlx.programs.demos import choose_demos

    rows = [{"input": f"x{i}", "output": "ab"[i % 2] if i < 90 else "c"} for i in range(100)]  # "c" only at the end
    assert choose_demos(rows[:5], lambda r: 3, budget=100) == rows[:5]  # all fit: all, in order
    chosen = choose_demos(rows, lambda r: 3, budget=100, limit=8)
    assert len(chosen) == 8 and {r["output"] for r in chosen} == {"a", "b", "c"}
    assert chosen == sorted(chosen, key=rows.index)  # the file's order among the chosen
    assert chosen == choose_demos(rows, lambda r: 3, budget=100, limit=8)  # deterministic
    tight = choose_demos(rows, lambda r: 3, budget=10, limit=8)
    assert len(tight) == 3 and {r["output"] for r in tight} == {"a", "b", "c"}  # the token budget binds
    assert choose_demos(rows, lambda r: 50, budget=10) == []  # nothing fits: the spec alone


def test_many_examples_compile_with_a_bounded_prefix(tiny_program, monkeypatch):
    """More examples than a prefix can show: the prefix holds a spread within its budget, every
    example still trains and is scored, and a row the prefix does not show hides nothing."""
    import paw_mlx.programs.select as select_module
    from paw_mlx.programs.demos import MAX_DEMOS, demo_budget

    labels = ["yes", "no", "maybe"]
    rows = [{"input": f"item {i} of the list", "output": labels[i % 3]} for i in range(150)]
    hidden_seen = []
    original = select_module.train

    def spy(prog, artifact, fit, options, *, hidden_spans=None, **kw):
        shown = {d["input"] for d in artifact.demos}
        hidden_seen.append([(r["input"] in shown, span is not None) for r, span in zip(fit, hidden_spans, strict=True)])
        return original(prog, artifact, fit, options, hidden_spans=hidden_spans, **kw)

    monkeypatch.setattr(select_module, "train", spy)
    art = paw_mlx.compile(SPEC, base=tiny_program, examples=rows, options=QUICK)
    prog = interpreter(tiny_program)
    fewshot = Builder(prog, SPEC, str(tiny_program), GenerationSettings(max_new_tokens=8)).prompted(rows)
    assert 3 <= len(fewshot.demos) <= MAX_DEMOS and {d["output"] for d in fewshot.demos} == set(labels)
    assert fewshot.prefix_length - Builder(prog, SPEC, "", GenerationSettings(8)).prompted([]).prefix_length \
        <= demo_budget(prog.context_length)
    info = art.selection
    assert info["demonstrations"] == {"shown": len(art.demos), "examples": 150} and len(art.demos) < 150
    assert all(c["total"] == 150 for c in info["candidates"])  # every example predicted held out
    assert hidden_seen and all(in_prefix == hidden for fit in hidden_seen for in_prefix, hidden in fit)
    assert any(not in_prefix for fit in hidden_seen for in_prefix, _ in fit)


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_a_lora_trains_on_a_mixture_of_experts_base(arch, tiny_tokenizer, tmp_path_factory):
    """A router's chosen experts (its top-k indices, and the gathers they drive) are integer paths: the
    gradient of a LoRA behind them must not enter them (MLX refuses a VJP into indices)."""
    from tests.archs import arch_config
    from tests.tiny import export_tiny

    base = export_tiny(arch_config(arch), tmp_path_factory.mktemp("moe") / arch, tokenizer=tiny_tokenizer)
    moe = Builder(interpreter(base), SPEC, str(base), GenerationSettings(max_new_tokens=8))
    _, result = moe.build("lora", ROWS, TrainOptions(steps=12, layers=0, rank=2, learning_rate=5e-2))
    assert sum(result.losses[-4:]) < sum(result.losses[:4]), result.losses
