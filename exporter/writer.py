"""Write a program directory atomically and deterministically.

Everything goes into a temporary sibling directory that is renamed into place at the
end (``interp.atomic``), so an interrupted export leaves nothing half-made and two
exports to the same place cannot silently replace each other. Nothing time-dependent
is written: exporting the same source twice gives byte-identical files.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from exporter.consts_writer import DEFAULT_SHARD_BYTES, write_consts
from interp import atomic
from interp.errors import ExportError
from interp.manifest import file_hashes, fingerprint
from interp.program import MANIFEST_FILE, PROGRAM_FILE, defining_files


def canonical_json(data: dict) -> str:
    """The one JSON layout paw writes: sorted keys where order carries no meaning."""
    return json.dumps(data, indent=1, ensure_ascii=False) + "\n"


def write_manifest(directory: Path, info: dict) -> dict:
    """manifest.json: ``info``, every file's sha256, and the fingerprint (graph + weights,
    not the tokenizer files' layout; ``interp.program.defining_files``)."""
    hashes = file_hashes(directory, skip=MANIFEST_FILE)
    manifest = dict(info)
    manifest["files"] = hashes
    manifest["fingerprint"] = fingerprint(hashes, defining_files(hashes))
    (directory / MANIFEST_FILE).write_text(canonical_json(manifest), encoding="utf-8")
    return manifest


@contextmanager
def atomic_directory(target: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``target`` only if the block succeeds."""
    with atomic.atomic_directory(target, replace=force, error=ExportError) as tmp:
        yield tmp


def write_program(directory: Path, spec: dict, consts: dict, save_tokenizer: Callable[[Path], None] | None,
                  max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                  progress: Callable[[int, int], None] | None = None) -> None:
    """prog.json, the consts (materialized one at a time, sharded above ``max_shard_bytes``), the tokenizer."""
    (directory / PROGRAM_FILE).write_text(canonical_json(spec), encoding="utf-8")
    write_consts(directory, consts, max_shard_bytes, progress)
    if save_tokenizer is not None:
        save_tokenizer(directory)
