"""Where paw keeps things on disk (no torch, no heavy imports)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """paw's cache root: $PAW_CACHE, else ~/.cache/paw."""
    root = os.environ.get("PAW_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "paw"


def default_program_dir() -> Path:
    """Where `paw export llama smollm2` output is looked for when a user names the alias 'smollm2'."""
    return cache_dir() / "programs" / "smollm2"
