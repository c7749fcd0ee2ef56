"""Where paw keeps things on disk: ``$PAW_CACHE`` or ``~/.cache/paw``.

It lives in ``interp`` because every other package may import ``interp`` (and nothing
heavier), so the exporter, the run-time API and the BLAS shim all share this one rule.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """paw's cache: $PAW_CACHE or ~/.cache/paw."""
    root = os.environ.get("PAW_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "paw")
    return Path(root)
