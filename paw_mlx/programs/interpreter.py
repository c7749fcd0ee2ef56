"""One warm interpreter (a loaded base program) per base model, shared by every function.

Loading a base reads its weights; functions made from many programs of the same base
share one copy. The cache is the one piece of global state, behind a lock; generation
itself is serialised by each ``LoadedProgram.lock``.
"""

from __future__ import annotations

import threading
from pathlib import Path

from interp.errors import PawError
from paw_mlx.paths import default_program_dir
from paw_mlx.runtime import LoadedProgram, load

DEFAULT_BASE = "smollm2"

_INTERPRETERS: dict[Path, LoadedProgram] = {}
_LOCK = threading.Lock()


def resolve_base(base: str | Path) -> Path:
    """A base program directory from a path or the alias 'smollm2' (the default export location)."""
    if str(base) == DEFAULT_BASE:
        path = default_program_dir()
        if not (path / "prog.json").is_file():
            raise PawError(f"the default base program is missing at {path}: "
                           f"run `paw export llama smollm2 -o {path}` first (or pass --base DIR)")
        return path.resolve()
    path = Path(base).expanduser()
    if path.name == "prog.json":
        path = path.parent
    if not (path / "prog.json").is_file():
        raise PawError(f"{base} is not a program directory (no prog.json); export one with `paw export llama`")
    return path.resolve()


def interpreter(base: str | Path) -> LoadedProgram:
    """The shared loaded base program for ``base`` (loaded on first use)."""
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
