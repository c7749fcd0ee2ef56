"""paw compile / paw call / paw export program through the CLI."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

import paw_mlx
from apps.cli import app
from interp.errors import PawError

runner = CliRunner()
SPEC = "Parse the options into a JSON list."


def test_compile_then_call_prints_one_line_per_input(tiny_program, tmp_path):
    spec_file = tmp_path / "spec.txt"
    spec_file.write_text(SPEC, encoding="utf-8")
    out = tmp_path / "prog"
    result = runner.invoke(app, ["compile", f"@{spec_file}", "-o", str(out), "--base", str(tiny_program), "-n", "5"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "program.json").read_text())["spec"] == SPEC
    result = runner.invoke(app, ["call", str(out), "(A) cat (B) dog", "(A) 1"])
    assert result.exit_code == 0, result.output
    f = paw_mlx.function(paw_mlx.compile(SPEC, base=tiny_program), max_new_tokens=5)
    want = [o.replace("\\", "\\\\").replace("\n", "\\n") for o in f(["(A) cat (B) dog", "(A) 1"])]
    assert result.stdout.splitlines() == want


def test_call_prints_each_output_on_one_line_with_controls_escaped():
    """One output per line for every reader (str.splitlines also ends lines at \\r, U+0085,
    U+2028 ...) and no raw escape sequence reaches the terminal; tab and text stay as they are."""
    from apps.programs_cmd import one_line

    text = "a\\b\nc\rd\te\x1b[31mf\x00\x7f\x85g\u2028h\u2029i \u05e9\u05dc\u05d5\u05dd \U0001f600\u200d\u200f"
    line = one_line(text)
    assert line == ("a\\\\b\\nc\\rd\te\\x1b[31mf\\x00\\x7f\\x85g\\u2028h\\u2029i "
                    "\u05e9\u05dc\u05d5\u05dd \U0001f600\u200d\u200f")
    assert line.splitlines() == [line]


def test_call_reads_one_input_per_stdin_line(tiny_program, tmp_path, monkeypatch):
    """Only a newline ends an input on stdin: U+2028 or a form feed inside a line is part of it."""
    from types import SimpleNamespace

    from paw_mlx.programs.function import Completion

    seen = []
    program = SimpleNamespace(complete=lambda inputs: seen.extend(inputs) or [Completion("ok", 1, False)] * len(inputs))
    monkeypatch.setattr(sys.modules["paw_mlx.programs.function"], "function", lambda *a, **k: program)
    result = runner.invoke(app, ["call", str(tiny_program)], input="one\u2028two\r\n\n  \nthree\x0cfour\n")
    assert result.exit_code == 0, result.output
    assert seen == ["one\u2028two", "three\x0cfour"] and result.stdout == "ok\nok\n"


def test_call_notes_each_output_cut_off_at_the_budget(tiny_program, tmp_path):
    """stdout keeps one output per line; stderr says which were cut off, and by what."""
    from apps.programs_cmd import one_line

    out = tmp_path / "prog"
    assert runner.invoke(app, ["compile", SPEC, "-o", str(out), "--base", str(tiny_program)]).exit_code == 0
    f = paw_mlx.function(out, max_new_tokens=3)
    inputs = ["(A) cat (B) dog", "(A) 1", "2024-01-05"]
    cut = [n for n, c in enumerate(f.complete(inputs), 1) if c.truncated]
    assert cut  # the random model writes on past 3 tokens
    result = runner.invoke(app, ["call", str(out), "-n", "3", *inputs])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [one_line(o) for o in f(inputs)]
    assert result.stderr.splitlines() == [
        f"note: the output for input {n} was cut off at the output budget of 3 tokens (raise --max-new-tokens)"
        for n in cut]


def test_compile_with_examples_chooses_and_reports(tiny_program, tmp_path):
    rows = tmp_path / "ex.jsonl"
    rows.write_text("".join(json.dumps({"input": w, "output": w.upper()}) + "\n"
                            for w in ["cat", "dog", "sun", "red"]), encoding="utf-8")
    out = tmp_path / "chosen"
    result = runner.invoke(app, ["compile", "Upper.", "-o", str(out), "--base", str(tiny_program), "--examples",
                                 str(rows), "--steps", "2", "--layers", "1", "--rank", "2", "--folds", "2"])
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "program.json").read_text())
    assert [c["name"] for c in meta["selection"]["candidates"]] == ["spec", "fewshot", "prefix", "lora"]
    assert "held-out exact match" in result.output and f"kept {meta['selection']['kept']}" in result.output
    assert f"the program: {meta['selection']['rebuild']}" in " ".join(result.output.split())
    result = runner.invoke(app, ["compile", "Upper.", "-o", str(out), "--base", str(tiny_program), "--examples",
                                 str(rows), "--candidates", "fewshot,magic"])
    assert result.exit_code != 0 and "already exists" in str(result.exception)


def test_compile_refuses_an_unwritable_destination_before_training(tiny_program, tmp_path, monkeypatch):
    """Was a ``FileNotFoundError`` line after every candidate had been trained."""
    def no_base(*args):
        raise AssertionError("the base model loaded before the destination was checked")

    monkeypatch.setattr(importlib.import_module("paw_mlx.programs.compile"), "interpreter", no_base)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    rows = tmp_path / "ex.jsonl"
    rows.write_text("".join(json.dumps({"input": w, "output": w.upper()}) + "\n" for w in ["cat", "dog", "sun"]),
                    encoding="utf-8")
    result = runner.invoke(app, ["compile", "Upper.", "-o", str(blocker / "prog"), "--base", str(tiny_program),
                                 "--examples", str(rows), "--candidates", "fewshot"])
    assert result.exit_code != 0
    assert isinstance(result.exception, PawError) and "is not a directory" in str(result.exception)


def test_compile_warns_when_a_test_row_repeats_a_training_input(tiny_program, tmp_path):
    rows = tmp_path / "ex.jsonl"
    rows.write_text("".join(json.dumps({"input": w, "output": w.upper(), "split": s}) + "\n"
                            for w, s in [("cat", "train"), ("dog", "train"), ("cat", "test"), ("sun", "test")]),
                    encoding="utf-8")
    result = runner.invoke(app, ["compile", "Upper.", "-o", str(tmp_path / "p"), "--base", str(tiny_program),
                                 "--examples", str(rows), "--candidates", "fewshot"])
    assert result.exit_code == 0, result.output
    assert "warning: 1 of these rows share an input with a training example" in " ".join(result.output.split())


def test_errors_are_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "apps.cli", "call", str(tmp_path / "nope"), "x"],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"paw: error: no such program: {tmp_path / 'nope'}"


@pytest.mark.parametrize(("flags", "line"), [
    (["--lr", "nan"], "paw: error: the learning rate must be a positive number, not nan"),
    (["--candidates", "lora,magic"], "paw: error: unknown candidate magic: choose from spec, fewshot, prefix, lora, "
                                     "prefix+lora"),
    (["--repeats", "0"], "paw: error: cross-validation repeats must be 1-10, got 0"),
])
def test_bad_training_flags_are_one_line_before_any_work(tiny_program, tmp_path, flags, line):
    rows = tmp_path / "ex.jsonl"
    rows.write_text('{"input": "a", "output": "A"}\n{"input": "b", "output": "B"}\n', encoding="utf-8")
    for fmt in ("dir", "paw"):
        out = tmp_path / f"out.{fmt}"
        proc = subprocess.run([sys.executable, "-m", "apps.cli", "compile", "Upper.", "-o", str(out), "--base",
                               str(tiny_program), "--examples", str(rows), "--format", fmt, *flags],
                              capture_output=True, text=True)
        assert proc.returncode == 1 and proc.stderr.strip() == line, (fmt, proc.stderr)
        assert not out.exists()


def test_a_rank_wider_than_the_layers_is_refused_before_the_weights_load(tiny_program, tmp_path):
    """Read off prog.json's shapes: the base's weights here are NaN, so loading them would be another error."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_program, base)
    consts = base / "consts.safetensors"
    data = bytearray(consts.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    data[start:] = b"\xff" * (len(data) - start)  # every float32 weight NaN
    consts.write_bytes(bytes(data))
    rows = tmp_path / "ex.jsonl"
    rows.write_text('{"input": "a", "output": "A"}\n{"input": "b", "output": "B"}\n', encoding="utf-8")
    for fmt in ("dir", "paw"):
        out = tmp_path / f"out.{fmt}"
        proc = subprocess.run([sys.executable, "-m", "apps.cli", "compile", "Upper.", "-o", str(out), "--base",
                               str(base), "--examples", str(rows), "--format", fmt, "--rank", "100000"],
                              capture_output=True, text=True)
        assert proc.returncode == 1 and proc.stderr.strip() == (
            "paw: error: LoRA rank 100000 is more than the narrowest layer it adapts (32 features); use a rank of "
            "at most 32"), (fmt, proc.stderr)
        assert not out.exists()


def test_cli_training_defaults_are_the_trainers():
    """The CLI spells its defaults out (so `--help` shows them without importing MLX); they must
    stay the trainer's and the selector's own."""
    import inspect

    from apps.programs_cmd import compile_cmd, eval_cmd
    from paw_mlx.programs.select import SelectOptions
    from paw_mlx.programs.train import TrainOptions

    for command in (compile_cmd, eval_cmd):
        params = inspect.signature(command).parameters
        assert params["steps"].default == TrainOptions.steps
        assert params["lr"].default == TrainOptions.learning_rate
        assert params["layers"].default == TrainOptions.layers
        assert params["rank"].default == TrainOptions.rank
        assert params["folds"].default == SelectOptions.folds
        assert params["repeats"].default == SelectOptions.repeats
        assert tuple(params["candidates"].default.split(",")) == SelectOptions().candidates


def test_eval_programs_reports_every_row_and_resumes(tiny_program, tmp_path):
    task = tmp_path / "tasks" / "upper"
    task.mkdir(parents=True)
    (task / "spec.txt").write_text("Upper.\n", encoding="utf-8")
    (task / "examples.jsonl").write_text("".join(
        json.dumps({"input": w, "output": w.upper(), "split": "test" if i >= 4 else "train"}) + "\n"
        for i, w in enumerate(["cat", "dog", "sun", "red", "hat", "pen"])), encoding="utf-8")
    args = ["eval-programs", "--tasks", str(tmp_path / "tasks"), "--base", str(tiny_program), "--candidates",
            "spec,fewshot,lora", "--steps", "2", "--layers", "1", "--rank", "2", "--folds", "2",
            "--out", str(tmp_path / "report.json"), "--cache", str(tmp_path / "cache")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    row = report["tasks"][0]
    assert set(row["rows"]) == {"spec prompt", "few-shot prompt", "spec", "fewshot", "lora"}
    assert row["kept"] in ("spec", "fewshot", "lora") and row["test"] == 2
    assert all(r["ttft_ms"] > 0 and len(r["outputs"]) == 2 for r in row["rows"].values())
    assert row["rows"]["lora"]["cv_exact_match"] >= 0 and report["summary"]["tasks"] == 1
    again = runner.invoke(app, args)
    assert "from the cache" in again.output and json.loads((tmp_path / "report.json").read_text())["tasks"] == [row]
    shown = runner.invoke(app, ["eval-programs", "--show", str(tmp_path / "report.json")])
    assert shown.exit_code == 0 and shown.output.startswith("| task | held-out | spec prompt | few-shot prompt")


def test_time_to_first_token_is_timed_after_warm_passes_over_the_timed_rows():
    """Every column runs each row it is timed on twice, untimed, before any timed round (a
    call's input is traced the second time its length is seen), then each column is timed
    once per round on the round's row."""
    from paw_mlx.programs import evaluate

    log: list[tuple[str, int]] = []
    rows = [{"input": str(i)} for i in range(3)]
    columns = {name: (lambda ids, name=name: log.append((name, ids[0])), lambda row: [int(row["input"])])
               for name in ("a", "b")}
    medians = evaluate.interleaved_ttft(columns, rows)
    warm = evaluate.WARMUP_PASSES * len(rows) * len(columns)
    assert sorted(log[:warm]) == sorted([(name, i) for name in "ab" for i in range(3)] * evaluate.WARMUP_PASSES)
    timed = log[warm:]
    assert len(timed) == evaluate.TTFT_SAMPLES * len(columns)
    assert [i for _, i in timed[::2]] == [r % 3 for r in range(evaluate.TTFT_SAMPLES)]
    assert set(medians) == {"a", "b"} and all(ms >= 0 for ms in medians.values())


def _selection(correct: int, total: int, examples: int) -> dict:
    candidate = {"name": "lora", "correct": correct, "total": total, "exact_match": correct / total,
                 "seconds": 1.0, "fold_seconds": [1.0]}
    return {"method": "cv", "candidates": [candidate], "kept": "lora", "reason": "r",
            "demonstrations": {"shown": examples, "examples": examples}}


@pytest.mark.parametrize("correct, total, examples, notes", [
    (8, 8, 8, []),
    (2, 3, 3, ["with 3 examples"]),
    (1, 8, 8, ["answered 1 of 8 held-out examples exactly"]),
    (0, 4, 4, ["with 4 examples", "answered 0 of 4"]),
])
def test_compile_report_advises_on_few_examples_and_a_failing_task(capsys, correct, total, examples, notes):
    from apps.programs_cmd import print_selection

    print_selection(_selection(correct, total, examples))
    err = " ".join(capsys.readouterr().err.split())
    assert err.count("note:") == len(notes)
    for note in notes:
        assert note in err


def test_compile_report_notes_inputs_given_with_different_outputs(capsys):
    from apps.programs_cmd import print_selection

    print_selection(dict(_selection(6, 8, 8), conflicting_inputs=2))
    err = " ".join(capsys.readouterr().err.split())
    assert err.count("note:") == 1 and "note: 2 input(s) are given with different outputs" in err


@pytest.mark.parametrize("report, fragment", [
    ("[" * 100_000, "nested too deeply"),  # RecursionError escaped as a traceback
    ('{"options": []}', "not a paw eval-programs report: AttributeError"),  # AttributeError escaped too
    ("[]", "must hold a JSON object"),
], ids=["deep", "options-list", "list"])
def test_eval_show_of_a_malformed_report_is_one_line(tmp_path, report, fragment):
    from tests.apps.test_cli import assert_one_line_error, paw

    (tmp_path / "report.json").write_text(report)
    assert_one_line_error(paw("eval-programs", "--show", str(tmp_path / "report.json")), fragment)


@pytest.mark.parametrize("option, fragment", [("--out", "is a folder; the report is a file"),
                                              ("--cache", "is not a folder")])
def test_eval_outputs_that_cannot_be_written_are_refused_before_the_evaluation(tiny_program, tmp_path, monkeypatch,
                                                                              option, fragment):
    """The report was written, and the cache's first entry, after minutes of training."""
    from paw_mlx.programs import evaluate

    monkeypatch.setattr(evaluate, "evaluate", lambda *a, **k: pytest.fail("the evaluation ran"))
    (tmp_path / "a-file").write_text("x")
    target = {"--out": tmp_path, "--cache": tmp_path / "a-file"}[option]
    result = runner.invoke(app, ["eval-programs", "--tasks", str(tmp_path), "--base", str(tiny_program),
                                 option, str(target)])
    assert isinstance(result.exception, PawError) and fragment in str(result.exception)


def test_a_damaged_cache_entry_is_run_again_not_fatal(tmp_path):
    """A run killed while it wrote an entry left half a JSON file, and every later run failed on it."""
    from paw_mlx.programs.evaluate import _read_cached

    (tmp_path / "half.json").write_text('{"rows": {"spec": ')
    (tmp_path / "good.json").write_text('{"task": "t", "rows": {}}')
    assert _read_cached(tmp_path / "half.json") is None and _read_cached(tmp_path / "missing.json") is None
    assert _read_cached(tmp_path / "good.json") == {"task": "t", "rows": {}}
