"""Where the run-time API finds things on disk, without importing torch or the exporter.

The cache rule itself (``$PAW_CACHE`` or ``~/.cache/paw``) is ``interp.paths.cache_dir``,
shared with the exporter; importing the exporter must not be needed to start ``paw chat``.
"""

from __future__ import annotations

from pathlib import Path

from interp.paths import cache_dir

DEFAULT_MODEL_ALIAS = "smollm2"

__all__ = ["DEFAULT_MODEL_ALIAS", "cache_dir", "default_program_dir"]


def default_program_dir() -> Path:
    """Where ``paw chat`` looks for the default model's program when given no directory."""
    return cache_dir() / "programs" / DEFAULT_MODEL_ALIAS
