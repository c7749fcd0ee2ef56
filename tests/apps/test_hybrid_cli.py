"""The CLI on hybrid programs (tests/archs.py's tiny LFM2 and Qwen3.5): ``paw run`` and ``paw inspect`` work,
``paw serve`` and ``paw compile`` refuse it in one line."""

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
    assert "recurrent state │ float32 │ 26.1 KB" in text and "causal_conv1d" in text


def test_serve_and_compile_refuse_it_in_one_line(hybrid_program, tmp_path):
    assert_one_line_error(paw("serve", str(hybrid_program), "--port", "0"),
                          "paw serve's batching engine does not run programs with recurrent state")
    assert_one_line_error(paw("compile", "Answer yes.", "--base", str(hybrid_program), "-o", str(tmp_path / "out")),
                          "programs as weights (paw compile, paw_mlx.function) does not run programs with recurrent")
    assert not (tmp_path / "out").exists()


def test_run_and_inspect_a_gated_delta_program(gated_delta_program):
    done = paw("run", str(gated_delta_program), "--prompt", "one two three", "--max-tokens", "5")
    assert done.returncode == 0, done.stderr
    shown = paw("inspect", str(gated_delta_program))
    assert shown.returncode == 0, shown.stderr
    text = " ".join(shown.stdout.split())
    assert "1 attention layers; 3 conv layers, 3 delta layers (recurrent state)" in text
    # conv: 3 layers of (K - 1 + depth) = 35 rows of 96 channels; delta: 3 layers of 4 heads x 16 x 8; float32
    assert "recurrent state │ float32 │ 46.5 KB" in text and "gated_delta_rule" in text


def test_a_bad_delta_chunk_size_is_one_line(gated_delta_program, monkeypatch):
    """PAW_DELTA_CHUNK (docs/speed.md) is read when a prompt reaches a Gated DeltaNet layer."""
    monkeypatch.setenv("PAW_DELTA_CHUNK", "12")
    assert_one_line_error(paw("run", str(gated_delta_program), "--prompt", "one two three", "--max-tokens", "2"),
                          "PAW_DELTA_CHUNK must be 0 (the scan) or a power of two from 2 to 1024; got '12'")
