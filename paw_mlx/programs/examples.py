"""Examples of a task: JSON lines of {"input", "output"} (optionally "split": "train" | "test")."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

from interp.errors import PawError


def load_examples(path: str | Path) -> list[dict]:
    """Rows of a JSON-lines file, each {"input": str, "output": str[, "split": "train"|"test"]}."""
    path = Path(path)
    if not path.is_file():
        raise PawError(f"no such examples file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PawError(f"cannot read the examples file {path}: {exc}") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as exc:  # RecursionError: nested too deeply
            raise PawError(f"{path}:{n}: not JSON: {exc}") from None
        if not isinstance(row, dict) or not isinstance(row.get("input"), str) or not isinstance(row.get("output"), str):
            raise PawError(f'{path}:{n}: each line must be {{"input": "...", "output": "..."}}')
        if row.get("split", "train") not in ("train", "test"):
            raise PawError(f'{path}:{n}: "split" must be "train" or "test", not {row["split"]!r}')
        rows.append(row)
    if not rows:
        raise PawError(f"{path} holds no examples")
    return rows


def check_examples(rows: Sequence) -> list[dict]:
    """``rows`` given in Python, checked like a file's: dicts with string "input" and "output"."""
    checked = []
    for n, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("input"), str) or not isinstance(row.get("output"), str):
            raise PawError(f'example {n}: each example must be a dict {{"input": str, "output": str}}')
        if row.get("split", "train") not in ("train", "test"):
            raise PawError(f'example {n}: "split" must be "train" or "test", not {row["split"]!r}')
        checked.append(row)
    if not checked:
        raise PawError("no examples given")
    return checked


def split_examples(rows: Sequence[dict], holdout: float = 0.25, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, held-out): by each row's "split" field if any row has one, else a seeded shuffle."""
    if any("split" in r for r in rows):
        train = [r for r in rows if r.get("split", "train") == "train"]
        held = [r for r in rows if r.get("split", "train") != "train"]
    else:
        order = list(rows)
        random.Random(seed).shuffle(order)
        cut = len(order) - int(round(len(order) * holdout))
        train, held = order[:cut], order[cut:]
    if not train:
        raise PawError("no training examples left after the held-out split")
    return train, held


def folds(count: int, k: int, seed: int = 0) -> list[list[int]]:
    """``k`` validation folds over ``count`` rows (row indices), from a seeded shuffle."""
    order = list(range(count))
    random.Random(seed).shuffle(order)
    k = max(1, min(k, count))
    return [sorted(order[i::k]) for i in range(k)]
