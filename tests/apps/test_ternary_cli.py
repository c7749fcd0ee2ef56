"""The --weights option of `paw export llama`."""

from __future__ import annotations

from typer.testing import CliRunner

from apps.cli import app
from interp.errors import PawError


def test_export_help_lists_ternary_weights():
    result = CliRunner().invoke(app, ["export", "llama", "--help"])
    assert result.exit_code == 0
    assert "--weights" in result.output and "ternary-base3" in result.output


def test_unknown_weights_mode_is_one_clear_error(tmp_path):
    result = CliRunner().invoke(app, ["export", "llama", "smollm2", "-o", str(tmp_path / "o"), "--weights", "int3"])
    assert isinstance(result.exception, PawError)
    assert "unknown weights mode 'int3'" in str(result.exception)
    assert not (tmp_path / "o").exists()
