"""Write a program directory atomically and deterministically.

Everything goes into a temporary sibling directory that is renamed into place at the
end, so an interrupted export leaves nothing half-made. Nothing time-dependent is
written: exporting the same source twice gives byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from exporter.consts_writer import DEFAULT_SHARD_BYTES, write_consts
from interp.errors import ExportError
from interp.program import CONSTS_FILE, CONSTS_INDEX_FILE, MANIFEST_FILE, PROGRAM_FILE


def canonical_json(data: dict) -> str:
    """The one JSON layout paw writes: sorted keys where order carries no meaning."""
    return json.dumps(data, indent=1, ensure_ascii=False) + "\n"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(directory: Path, hashes: dict[str, str]) -> str:
    """Identity of a program: its graph and its weights (not its tokenizer files' layout).

    A sharded program's weights are its index and then its shards, in order.
    """
    digest = hashlib.sha256()
    digest.update(hashes[PROGRAM_FILE].encode())
    if CONSTS_FILE in hashes:
        digest.update(hashes[CONSTS_FILE].encode())
    else:
        for name in [CONSTS_INDEX_FILE, *sorted(n for n in hashes if n.startswith("consts-"))]:
            digest.update(hashes[name].encode())
    return digest.hexdigest()[:16]


def write_manifest(directory: Path, info: dict) -> dict:
    hashes = {
        p.name: sha256_file(p) for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST_FILE
    }
    manifest = dict(info)
    manifest["files"] = hashes
    manifest["fingerprint"] = fingerprint(directory, hashes)
    (directory / MANIFEST_FILE).write_text(canonical_json(manifest), encoding="utf-8")
    return manifest


@contextmanager
def atomic_directory(target: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``target`` only if the block succeeds."""
    target = Path(target)
    if target.exists() and not force:
        if not target.is_dir() or any(target.iterdir()):
            raise ExportError(f"{target} already exists; pass --force to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield tmp
        _publish_permissions(tmp)
        if target.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, trash / "old")
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _publish_permissions(directory: Path) -> None:
    """mkdtemp makes a private 0700 directory; a program is an ordinary shared artifact."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for path in directory.iterdir():
        if path.is_file():
            os.chmod(path, 0o666 & ~umask)


def write_program(directory: Path, spec: dict, consts: dict, save_tokenizer: Callable[[Path], None] | None,
                  max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                  progress: Callable[[int, int], None] | None = None) -> None:
    """prog.json, the consts (materialized one at a time, sharded above ``max_shard_bytes``), the tokenizer."""
    (directory / PROGRAM_FILE).write_text(canonical_json(spec), encoding="utf-8")
    write_consts(directory, consts, max_shard_bytes, progress)
    if save_tokenizer is not None:
        save_tokenizer(directory)
