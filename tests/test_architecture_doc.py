"""docs/architecture.md names files a newcomer will open: each of them must exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP = ("interp/", "exporter/", "paw_mlx/", "apps/", "tests/", "docs/", "scripts/", "examples/")
#: a path in backticks or on a line of the flow diagram: a top-level folder, then a path
PATH = re.compile(r"(?<![\w/.])((?:" + "|".join(re.escape(t) for t in TOP) + r")[\w./-]*)")


def test_every_path_in_the_architecture_page_exists():
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    named = {m.rstrip(".") for m in PATH.findall(text)}
    assert len(named) > 30, named  # the page does name the files
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"docs/architecture.md names paths that do not exist: {missing}"

