"""The command line the single-program benchmarks share: ``--base DIR --rounds N --out FILE``."""

from __future__ import annotations

import argparse
from pathlib import Path


def base_rounds_out(doc: str, default_rounds: int) -> argparse.Namespace:
    """Parsed ``--base`` (a program directory, checked), ``--rounds`` (at least 1) and ``--out``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--base", required=True, help="a float32 program directory (paw export)")
    parser.add_argument("--rounds", type=int, default=default_rounds)
    parser.add_argument("--out", type=Path, help="also write the results here as JSON")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    if not (Path(args.base) / "prog.json").is_file():
        parser.error(f"--base {args.base} is not a program directory (no prog.json): make one with paw export")
    return args
