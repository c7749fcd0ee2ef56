"""The environment for a test's child Python process that must import this checkout."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child_env(root: Path = ROOT, **extra: str) -> dict[str, str]:
    """This process's environment with ``root`` first on ``PYTHONPATH`` (what was there
    stays after it: MLX or other dependencies may be on the path, not installed) and
    ``extra`` on top."""
    path = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}
