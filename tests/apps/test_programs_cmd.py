"""paw compile / paw call / paw export program through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

from typer.testing import CliRunner

import paw_mlx
from apps.cli import app

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


def test_compile_with_examples_tunes(tiny_program, tmp_path):
    rows = tmp_path / "ex.jsonl"
    rows.write_text("".join(json.dumps({"input": f"(A) {w}", "output": f'["{w}"]'}) + "\n"
                            for w in ["cat", "dog", "bird", "fish"]), encoding="utf-8")
    out = tmp_path / "tuned"
    result = runner.invoke(app, ["compile", SPEC, "-o", str(out), "--base", str(tiny_program), "--examples",
                                 str(rows), "--steps", "2", "--layers", "0"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "program.json").read_text())["tuning"]["steps"] == 2


def test_errors_are_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "apps.cli", "call", str(tmp_path / "nope"), "x"],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"paw: error: no such program: {tmp_path / 'nope'}"


def test_cli_tuning_defaults_are_the_tuners():
    """The CLI spells its defaults out (so `--help` shows them without importing MLX); they must
    stay the tuner's own."""
    import inspect

    from apps.programs_cmd import compile_cmd, eval_cmd
    from paw_mlx.programs.tune import TuneOptions

    for command in (compile_cmd, eval_cmd):
        params = inspect.signature(command).parameters
        assert params["steps"].default == TuneOptions.steps
        assert params["lr"].default == TuneOptions.learning_rate
        assert params["layers"].default == TuneOptions.layers
