"""The CLI on hybrid programs (tests/archs.py's tiny LFM2, Qwen3.5, Mamba2 and RecurrentGemma): ``paw run`` and
``paw inspect``
work, ``paw compile`` trains a LoRA on them and refuses a tuned prefix in one line
(``paw serve``: tests/apps/test_serve_hybrid.py)."""

from __future__ import annotations

import json

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


def test_compile_trains_a_lora_and_refuses_a_tuned_prefix_in_one_line(hybrid_program, tmp_path):
    examples = tmp_path / "examples.jsonl"
    examples.write_text("".join(json.dumps({"input": word, "output": digit}) + "\n"
                                for word, digit in (("one", "1"), ("two", "2"), ("three", "3"))))
    common = ["compile", "Write the number as digits.", "--base", str(hybrid_program), "--examples", str(examples)]
    assert_one_line_error(paw(*common, "--candidates", "prefix", "-o", str(tmp_path / "refused")),
                          "candidate prefix cannot be built on", "recurrent state", "--candidates spec,fewshot,lora")
    assert not (tmp_path / "refused").exists()
    done = paw(*common, "--steps", "2", "--rank", "2", "-o", str(tmp_path / "digits"))
    assert done.returncode == 0, done.stderr
    assert "paw: note: candidate prefix is not tried: it keeps recurrent state (lfm2)" in done.stderr
    report = json.loads((tmp_path / "digits" / "program.json").read_text())["selection"]
    assert [c["name"] for c in report["candidates"]] == ["spec", "fewshot", "lora"]
    called = paw("call", str(tmp_path / "digits"), "four", "--base", str(hybrid_program))
    assert called.returncode == 0, called.stderr


def test_run_and_inspect_a_gated_delta_program(gated_delta_program):
    done = paw("run", str(gated_delta_program), "--prompt", "one two three", "--max-tokens", "5")
    assert done.returncode == 0, done.stderr
    shown = paw("inspect", str(gated_delta_program))
    assert shown.returncode == 0, shown.stderr
    text = " ".join(shown.stdout.split())
    assert "1 attention layers; 3 conv layers, 3 delta layers (recurrent state)" in text
    # conv: 3 layers of (K - 1 + depth) = 35 rows of 96 channels; delta: 3 layers of 4 heads x 16 x 8; float32
    assert "recurrent state │ float32 │ 46.5 KB" in text and "gated_delta_rule" in text


def test_run_and_inspect_a_state_space_program(ssm_program):
    """The tiny Mamba2: no attention, a conv and an SSM state per layer."""
    done = paw("run", str(ssm_program), "--prompt", "one two three", "--max-tokens", "5")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()
    shown = paw("inspect", str(ssm_program))
    assert shown.returncode == 0, shown.stderr
    text = " ".join(shown.stdout.split())
    assert "0 attention layers; 2 conv layers, 2 SSM layers (recurrent state)" in text
    # 2 layers of [1, 8 heads, 16, 16] float32; the conv states: 2 layers of 35 rows of 192 channels
    assert "recurrent state │ float32 │ 70.1 KB" in text
    assert "ssm_scan" in text


def test_run_and_inspect_a_recurrent_gemma_program(recurrent_gemma_program):
    """The tiny RecurrentGemma: two RG-LRU blocks (a conv and an LRU state each), then windowed attention."""
    done = paw("run", str(recurrent_gemma_program), "--prompt", "one two three", "--max-tokens", "5")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()
    shown = paw("inspect", str(recurrent_gemma_program))
    assert shown.returncode == 0, shown.stderr
    text = " ".join(shown.stdout.split())
    assert "1 attention layers; 2 conv layers, 2 LRU layers (recurrent state)" in text
    # conv: 2 layers of (K - 1 + depth) = 35 rows of 64 channels; LRU: 2 layers of 64; float32
    assert "recurrent state │ float32 │ 18.4 KB" in text  # 18,432 bytes
    assert "lru_scan" in text


def test_a_bad_delta_chunk_size_is_one_line(gated_delta_program, monkeypatch):
    """PAW_DELTA_CHUNK (docs/speed.md) is read when a prompt reaches a Gated DeltaNet layer."""
    monkeypatch.setenv("PAW_DELTA_CHUNK", "12")
    assert_one_line_error(paw("run", str(gated_delta_program), "--prompt", "one two three", "--max-tokens", "2"),
                          "PAW_DELTA_CHUNK must be 0 (the scan) or a power of two from 2 to 1024; got '12'")


def test_a_bad_ssm_scan_mode_is_one_line(ssm_program, monkeypatch):
    """PAW_SSM_SCAN (docs/speed.md) takes chunked or sequential; a typo is not silently the default."""
    monkeypatch.setenv("PAW_SSM_SCAN", "seq")
    assert_one_line_error(paw("run", str(ssm_program), "--prompt", "one two three", "--max-tokens", "2"),
                          "PAW_SSM_SCAN must be chunked (the default) or sequential; got 'seq'")
