"""`paw export hf` exports a non-Llama architecture from a local folder, and `paw run` runs it."""

from __future__ import annotations

import json
import sys

import pytest

from tests.archs import arch_config
from tests.tiny import tiny_model


def _paw(monkeypatch, *args: str) -> None:
    from apps.cli import main

    monkeypatch.setattr(sys, "argv", ["paw", *args])
    try:
        main()
    except SystemExit as exc:  # main() exits only on errors
        pytest.fail(f"paw {' '.join(args)} exited with {exc.code}")


def test_export_hf_then_run(tmp_path, monkeypatch, tiny_tokenizer):
    folder = tmp_path / "neox"
    tiny_model(arch_config("gpt_neox")).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    out = tmp_path / "prog"
    _paw(monkeypatch, "export", "hf", str(folder), "-o", str(out))
    spec = json.loads((out / "prog.json").read_text())
    assert spec["model"]["model_type"] == "gpt_neox"
    assert (out / "manifest.json").is_file() and (out / "tokenizer.json").is_file()

    prompt, produced = tmp_path / "prompt.txt", tmp_path / "out.txt"
    prompt.write_text("5 17 42 9")
    _paw(monkeypatch, "run", str(out), "--prompt-ids", str(prompt), "-n", "6", "--output-ids", str(produced))
    ids = [int(t) for t in produced.read_text().split()]
    assert len(ids) == 6 and all(0 <= t < 384 for t in ids)
