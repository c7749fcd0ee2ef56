"""Argument types and table output shared by the small benchmark scripts."""

from __future__ import annotations

import argparse
from pathlib import Path


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1 (a count of rounds, tokens or turns)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def emit_table(lines: list[str], out: Path | None) -> None:
    """Print a markdown table, and write it to ``out`` too when given."""
    table = "\n".join(lines)
    print(table)
    if out:
        out.write_text(table + "\n")
