"""The CLI on a hybrid program (tests/archs.py's tiny LFM2): ``paw run`` and ``paw inspect`` work,
``paw compile`` refuses it in one line (``paw serve``: tests/apps/test_serve_hybrid.py)."""

from __future__ import annotations

from tests.apps.test_cli import assert_one_line_error, paw


def test_run_generates_and_inspect_shows_the_conv_state(hybrid_program):
    done = paw("run", str(hybrid_program), "--prompt", "one two three", "--max-tokens", "5")
    assert done.returncode == 0, done.stderr
    shown = paw("inspect", str(hybrid_program))
    assert shown.returncode == 0, shown.stderr
    text = " ".join(shown.stdout.split())  # rich wraps lines at the terminal's width
    assert "1 attention layers; 3 conv layers (recurrent state)" in text
    # 3 layers of (K - 1 + depth) = 34 rows of 64 float32 channels
    assert "conv state │ float32 │ 26.1 KB" in text and "causal_conv1d" in text


def test_compile_refuses_it_in_one_line(hybrid_program, tmp_path):
    assert_one_line_error(paw("compile", "Answer yes.", "--base", str(hybrid_program), "-o", str(tmp_path / "out")),
                          "programs as weights (paw compile, paw_mlx.function) does not run programs with recurrent")
    assert not (tmp_path / "out").exists()
