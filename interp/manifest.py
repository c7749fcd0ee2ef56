"""What manifest.json records about a directory's files, and checking the files against it.

A program (``prog.json`` + ``consts.safetensors`` + tokenizer files) and a compiled
program (``program.json`` + ``prefix.safetensors``) both carry a manifest with the
sha256 of every file and a fingerprint: the first 16 hex digits of the sha256 of the
hashes of the files that define it. ``verify_manifest`` recomputes all of it, so a
flipped byte anywhere is caught (``paw inspect --verify``, ``load(..., verify=True)``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from interp.errors import PawError, ProgramError


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_hashes(directory: Path, skip: str) -> dict[str, str]:
    """sha256 of every regular file directly in ``directory`` except ``skip``, by name."""
    return {p.name: sha256_file(p) for p in sorted(directory.iterdir()) if p.is_file() and p.name != skip}


def fingerprint(hashes: dict[str, str], names: Sequence[str]) -> str:
    """Identity of a directory: sha256 over the hashes of the files that define it, 16 hex digits."""
    digest = hashlib.sha256()
    for name in names:
        digest.update(hashes[name].encode())
    return digest.hexdigest()[:16]


def verify_manifest(directory: Path, manifest: dict, defining: Sequence[str], read_by_paw: Sequence[str] = (),
                    error: type[PawError] = ProgramError) -> int:
    """Check every file against its sha256 in ``manifest`` and the fingerprint against the hashes.

    ``defining``: the files the fingerprint is made of (they must be listed);
    ``read_by_paw``: other files paw reads, which must be listed if present (a file slipped
    in after export would change behaviour unseen). Returns how many files were checked.
    """
    files = manifest.get("files")
    if not files:
        raise error(f"{directory} has no manifest with file hashes to verify")
    for name in [*defining, *(n for n in read_by_paw if (directory / n).is_file())]:
        if name not in files:
            raise error(f"{directory / name} is not listed in the manifest")
    for name, expected in files.items():
        path = directory / name
        if Path(name).name != name or not path.is_file():
            raise error(f"{path} is listed in the manifest but missing")
        if sha256_file(path) != expected:
            raise error(f"{path} does not match its sha256 in the manifest (modified or corrupt)")
    if manifest.get("fingerprint") != fingerprint(files, defining):
        raise error(f"{directory}: the manifest's fingerprint does not match its files' hashes")
    return len(files)
