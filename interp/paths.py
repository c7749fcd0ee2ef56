"""Where paw keeps things on disk (``$PAW_CACHE`` or ``~/.cache/paw``) and the default model's name.

It lives in ``interp`` because every other package may import ``interp`` (and nothing
heavier), so the exporter, the run-time API, the apps and the BLAS shim share these rules.
"""

from __future__ import annotations

import os
from pathlib import Path

from interp.errors import PawError, ProgramError

# The default model's alias: `paw export llama smollm2` fetches SmolLM2-135M-Instruct, its
# program lives at default_program_dir(), and `paw chat`, `paw serve` and `paw compile` use it.
DEFAULT_MODEL = "smollm2"


def cache_dir() -> Path:
    """paw's cache: $PAW_CACHE or ~/.cache/paw."""
    root = os.environ.get("PAW_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "paw")
    return Path(root)


def default_program_dir() -> Path:
    """Where the default model's program lives: $PAW_CACHE/programs/smollm2."""
    return cache_dir() / "programs" / DEFAULT_MODEL


def require_default_program(otherwise: str) -> Path:
    """The default model's program directory, or a ProgramError saying how to create it.

    ``otherwise`` names the caller's alternative (e.g. "pass --base DIR").
    """
    from interp.program import PROGRAM_FILE  # not at the top: the BLAS shim imports this module early

    path = default_program_dir()
    if not (path / PROGRAM_FILE).is_file():
        raise ProgramError(f"the default model's program is missing at {path}: create it once with "
                           f"`paw export llama {DEFAULT_MODEL} -o {path}` (or {otherwise})")
    return path


def require_file(path: Path, what: str, error: type[PawError] = PawError) -> None:
    """``error`` unless ``path`` is a regular file (``what`` names it: "ids file"), saying what is
    there instead: nothing, a folder, or a device, FIFO or socket (``/dev/null``, ``<(cmd)``), which
    "no such file" misdescribed."""
    if path.is_file():
        return
    if path.is_dir():
        raise error(f"{path} is a folder; the {what} must be a file")
    if path.exists():
        raise error(f"{path} is a device, FIFO or socket; the {what} must be a regular file")
    raise error(f"no such {what}: {path}")
