"""Rewrite a generated block of a Markdown page between two marker comments.

The op table (``interp.schema``), the benchmark table (``apps.benchmarks.harness``) and the
architecture coverage table (``scripts/coverage_table.py``) are generated into the docs
this way; they share this one function, and ``interp`` is the layer all three import.
"""

from __future__ import annotations

from pathlib import Path


def replace_block(path: Path, start: str, end: str, body: str) -> None:
    """Put ``body`` between the ``start`` and ``end`` markers of ``path``, keeping the rest.

    Raises ValueError when the page lacks a marker, rather than appending to it.
    """
    page = path.read_text(encoding="utf-8")
    if start not in page or end not in page:
        raise ValueError(f"{path} has no {start} ... {end} section")
    head, rest = page.split(start, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{start}\n{body}{end}{tail}", encoding="utf-8")
