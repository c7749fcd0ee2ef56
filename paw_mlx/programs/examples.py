"""Examples of a task: JSON lines of {"input", "output"} (optionally "split": "train" | "test")."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

from interp.errors import PawError
from interp.paths import require_file

#: byte-order marks of UTF-16 (little- and big-endian)
_UTF16_MARKS = (b"\xff\xfe", b"\xfe\xff")


def read_task_file(path: str | Path, what: str) -> str:
    """The text of a task's file (``what``: "spec", "examples"; UTF-8, or UTF-16 with a byte-order
    mark), with newlines as ``\\n``; or one PawError line naming it."""
    path = Path(path)
    require_file(path, f"{what} file")
    try:
        data = path.read_bytes()
        # UTF-16 with its byte-order mark is what Windows PowerShell's `>` writes; UTF-8's mark
        # (Windows editors) is dropped by -sig
        text = data.decode("utf-16" if data[:2] in _UTF16_MARKS else "utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise PawError(f"cannot read the {what} file {path}: {exc} (save it as UTF-8)") from exc
    return text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as text mode reads


def load_examples(path: str | Path) -> list[dict]:
    """Rows of a JSON-lines file, each {"input": str, "output": str[, "split": "train"|"test"]}."""
    text = read_task_file(path, "examples")
    rows = []
    # "\n" only (the file is read with universal newlines, so CRLF is "\n" too): str.splitlines
    # also splits at U+2028, U+0085 and others, which JSON strings may hold unescaped
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as exc:  # RecursionError: nested too deeply
            raise PawError(f"{path}:{n}: not JSON: {exc}") from None
        _check_row(row, f"{path}:{n}", "one example per line")
        rows.append(row)
    if not rows:
        raise PawError(f"{path} holds no examples")
    return rows


def check_examples(rows: Sequence) -> list[dict]:
    """``rows`` given in Python, checked like a file's: dicts with string "input" and "output"."""
    for n, row in enumerate(rows):
        _check_row(row, f"example {n}", "each example")
    if not rows:
        raise PawError("no examples given")
    return list(rows)


def distinct(rows: Sequence[dict]) -> tuple[list[dict], int]:
    """``rows`` without repeats of an earlier (input, output) pair, and how many were dropped.

    A repeated example would sit on both sides of a cross-validation split and flatter the
    candidates that memorise; the same input with another output is kept (it is data).
    """
    seen: set[tuple[str, str]] = set()
    kept = []
    for row in rows:
        key = (row["input"], row["output"])
        if key not in seen:
            seen.add(key)
            kept.append(row)
    return kept, len(rows) - len(kept)


#: JSON types by the name a user knows them by, for error messages
_JSON_TYPES = {bool: "true/false", int: "a number", float: "a number", list: "a list", dict: "an object",
               type(None): "null"}


def _check_row(row: object, where: str, unit: str) -> None:
    """One example: an object with string "input" and "output" (and "split" "train" or
    "test"), or one PawError line saying what is wrong with it (``unit`` names an example
    as the user gave it: "one example per line", "each example").

    Values are not coerced: a number's text (``1.0`` or ``1``?) and a list's (which
    separators?) are the user's choice, and the exact-match score compares text.
    """
    if not isinstance(row, dict):
        raise PawError(f'{where}: {_JSON_TYPES.get(type(row), "a string")}, not an object: {unit} is '
                       '{"input": "...", "output": "..."}')
    for key in ("input", "output"):
        if key not in row:
            found = ", ".join(f'"{k}"' for k in row) or "none"
            raise PawError(f'{where}: no "{key}" key (found {found}); each example is '
                           '{"input": "...", "output": "..."}')
        if not isinstance(row[key], str):
            raise PawError(f'{where}: "{key}" is {_JSON_TYPES.get(type(row[key]), "not a string")}, not a string: '
                           f"write it as the exact text wanted, e.g. {json.dumps(json.dumps(row[key]))[:60]}")
    if row.get("split", "train") not in ("train", "test"):
        raise PawError(f'{where}: "split" must be "train" or "test", not {row["split"]!r}')


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


def partitions(count: int, k: int, repeats: int, seed: int = 0) -> list[list[list[int]]]:
    """``repeats`` partitions of ``count`` rows into ``k`` folds (``folds``), each from its
    own shuffle (seeds ``seed``, ``seed + 1``, ...). A partition equal to an earlier one
    (with k >= count every fold is one row, whatever the shuffle) is left out: it would only
    repeat the same fits."""
    chosen: list[list[list[int]]] = []
    seen: set[frozenset] = set()
    for r in range(repeats):
        partition = folds(count, k, seed + r)
        key = frozenset(tuple(f) for f in partition)
        if key not in seen:
            seen.add(key)
            chosen.append(partition)
    return chosen
