"""One warm interpreter (a loaded base program) per base model, shared by every function.

Loading a base reads its weights; functions made from many programs of the same base
share one copy. The cache is the one piece of global state, behind a lock; generation
itself is serialised by each ``LoadedProgram.lock``.
"""

from __future__ import annotations

import threading
from pathlib import Path

from interp.paths import DEFAULT_MODEL, require_default_program
from interp.program import PROGRAM_FILE, resolve_program_dir
from paw_mlx.runtime import LoadedProgram, load

_INTERPRETERS: dict[Path, LoadedProgram] = {}
_LOCK = threading.Lock()


def resolve_base(base: str | Path) -> Path:
    """A base program directory from a path (or its prog.json) or the default model's alias 'smollm2'.

    A program directory named like the alias wins over it, as in ``paw run smollm2``: the
    quick start exports the default model to ``./smollm2``, and ``--base smollm2`` (the
    default) then means that directory, not one in paw's cache.
    """
    if str(base) == DEFAULT_MODEL and not (Path(base) / PROGRAM_FILE).is_file():
        return require_default_program("pass --base DIR").resolve()
    return resolve_program_dir(base).resolve()


def interpreter(base: str | Path) -> LoadedProgram:
    """The shared loaded base program for ``base`` (loaded on first use).

    A base with recurrent state runs programs whose prefix its own run rebuilds
    (``recurrent_prefix.py``), one row at a time (``function.py``).
    """
    path = resolve_base(base)
    with _LOCK:
        prog = _INTERPRETERS.get(path)
        if prog is None:
            prog = _INTERPRETERS[path] = load(path)
        return prog


def forget_interpreters() -> None:
    """Drop every warm interpreter (frees their weights)."""
    with _LOCK:
        _INTERPRETERS.clear()
