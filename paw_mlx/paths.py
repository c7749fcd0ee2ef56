"""Where paw keeps things on disk, without importing torch or the exporter.

``exporter.sources.cache_dir`` follows the same rule (``$PAW_CACHE`` or ``~/.cache/paw``);
a test keeps the two in step. The exporter is not imported here because importing it
must not be needed to start ``paw chat``.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL_ALIAS = "smollm2"


def cache_dir() -> Path:
    """paw's cache: $PAW_CACHE or ~/.cache/paw."""
    root = os.environ.get("PAW_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "paw")
    return Path(root)


def default_program_dir() -> Path:
    """Where ``paw chat`` looks for the default model's program when given no directory."""
    return cache_dir() / "programs" / DEFAULT_MODEL_ALIAS
