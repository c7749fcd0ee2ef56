"""A model that uses an op paw cannot lower fails with one line naming the op; nothing is written."""

from __future__ import annotations

import sys

import pytest
import torch

from exporter import aten_ops
from interp.errors import ExportError
from tests.archs import arch_config
from tests.tiny import tiny_model


class _Cumprod(torch.nn.Module):
    """A final-norm stand-in whose forward uses torch.cumprod, which no program op expresses."""

    def __init__(self, norm):
        super().__init__()
        self.norm = norm

    def forward(self, x):
        return self.norm(x) + torch.cumprod(x, dim=-1) * 0


def test_unknown_aten_op_names_the_op_and_writes_nothing(tmp_path):
    from exporter.export import export_model

    model = tiny_model(arch_config("qwen2"))
    model.model.norm = _Cumprod(model.model.norm)
    out = tmp_path / "prog"
    with pytest.raises(ExportError, match=r"aten\.cumprod"):
        export_model(model, None, out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_cli_export_hf_reports_a_missing_mapping_in_one_line(tmp_path, monkeypatch, capsys, tiny_tokenizer):
    """`paw export hf` on a MoE model whose routing op (topk) has no mapping: one line, exit 1."""
    from apps.cli import main

    folder = tmp_path / "src"
    tiny_model(arch_config("mixtral")).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    monkeypatch.delitem(aten_ops.ATEN, "aten.topk.default")
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["paw", "export", "hf", str(folder), "-o", str(out)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("paw: error: cannot export: op aten.topk.default")
    assert "Traceback" not in "\n".join(err)
    assert not out.exists()

