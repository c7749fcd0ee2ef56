"""Read a prompt or inputs from stdin with a bound, so `paw run < /dev/zero` stops with one line.

``sys.stdin.read()`` reads until end of file: from ``/dev/zero`` or a runaway pipe it grew until
the machine ran out of memory. No prompt needs more than ``STDIN_LIMIT`` characters (a real
model's context holds well under a million tokens), so more is refused as it arrives.
"""

from __future__ import annotations

import sys

from interp.errors import InputError

#: characters read from stdin at most
STDIN_LIMIT = 64 << 20
_CHUNK = 1 << 20


def read_stdin(what: str, limit: int = STDIN_LIMIT) -> str:
    """All of stdin as text (``what`` names it in the error: "the prompt"); InputError past ``limit``."""
    pieces: list[str] = []
    total = 0
    while piece := sys.stdin.read(_CHUNK):
        total += len(piece)
        if total > limit:
            raise InputError(f"{what} on stdin is longer than {limit >> 20} Mi characters")
        pieces.append(piece)
    return "".join(pieces)
