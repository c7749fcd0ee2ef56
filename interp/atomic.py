"""Write a directory (or a file) so that readers see all of it or nothing.

Every writer of a directory paw makes (``paw export``, compiled programs, the benchmark's
converted weights) goes through ``atomic_directory``:

- the files go into a hidden sibling, ``.NAME.partial-PID-XXXX``, renamed into place
  only when the block succeeds, so a failed or interrupted write leaves nothing behind;
- the rename happens under a lock on the parent directory, and refuses to replace a
  directory that appeared while we were writing (another export to the same place),
  unless replacing was asked for;
- a ``kill -9`` leaves its partial directory behind: the next write to the same place
  removes every such directory whose owner process (the PID in its name) is gone.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from interp.errors import PawError

try:  # POSIX; elsewhere the rename is atomic but unlocked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None


def _leftover_pattern(name: str) -> re.Pattern:
    return re.compile(rf"\.{re.escape(name)}\.(?:partial|old|tmp)-(\d+)-")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process (or a PID we cannot ask about): leave it alone
    return True


def remove_stale_leftovers(target: Path) -> list[Path]:
    """Delete the partial writes of ``target`` left by processes that no longer run; returns them."""
    pattern = _leftover_pattern(target.name)
    removed = []
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = pattern.match(entry.name)
        if match and not _process_alive(int(match.group(1))):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


@contextmanager
def _parent_locked(parent: Path) -> Iterator[None]:
    """An exclusive flock on ``parent`` (best effort: a filesystem without locks goes unlocked)."""
    fd = None
    if fcntl is not None:
        try:
            fd = os.open(parent, os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            if fd is not None:
                os.close(fd)
            fd = None
    try:
        yield
    finally:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def _occupied(path: Path) -> bool:
    """Whether writing ``path`` would replace something (an empty directory does not count)."""
    if path.is_symlink() or path.is_file():
        return True
    return path.is_dir() and any(path.iterdir())


def publish_permissions(directory: Path) -> None:
    """mkdtemp makes a private 0700 directory; what we publish is an ordinary shared artifact."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for path in directory.iterdir():
        if path.is_file() and not path.is_symlink():
            os.chmod(path, 0o666 & ~umask)


def check_writable(target: str | Path, error: type[PawError] = PawError, folder: bool = False) -> None:
    """Raise ``error`` now if ``target`` could not be written later: its nearest existing
    ancestor is not a directory, or no directory can be made in it (read-only, no permission,
    ``/proc``). Tried, not guessed from permission bits, which root ignores. Commands call it
    before their long work (an export, a compile), so that the write at the end cannot fail.
    ``folder``: ``target`` is to become a directory, which cannot replace a device, FIFO or
    socket (the rename at the end failed with "Not a directory", after the work).
    """
    target = Path(target).expanduser()
    if folder and target.exists() and not (target.is_symlink() or target.is_dir() or target.is_file()):
        raise error(f"cannot write {target}: it is a device, FIFO or socket, which a folder cannot replace")
    ancestor = target.parent.absolute()
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise error(f"cannot write {target}: {ancestor} is not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{target.name}.probe-", dir=ancestor))
    except OSError as exc:
        raise error(f"cannot write {target}: {exc.strerror or exc} ({ancestor})") from exc


def check_not_reading(target: str | Path, reads: Iterable[str | Path | None],
                      error: type[PawError] = PawError) -> None:
    """Raise ``error`` if ``target`` is one of the paths a command reads (its source model, its
    base program, its examples), or a folder holding one: ``--force`` would replace it and so
    delete what the output is made from."""
    target = Path(target).expanduser().resolve()
    for read in reads:
        if read is None or not Path(read).expanduser().exists():
            continue
        read = Path(read).expanduser().resolve()
        if read == target or target in read.parents:
            raise error(f"cannot write {target}: it {'is' if read == target else 'holds'} {read}, which this "
                        "command reads (replacing it would delete it); choose another output")


@contextmanager
def atomic_directory(target: str | Path, *, replace: bool = False,
                     error: type[PawError] = PawError) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``target`` only if the block succeeds.

    ``replace`` allows replacing an existing ``target``; without it, an existing non-empty
    ``target`` is refused up front, and one that appears during the block is not touched.
    """
    target = Path(target)
    if _occupied(target) and not replace:
        raise error(f"{target} already exists; pass --force to replace it")
    check_writable(target, error, folder=True)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise error(f"cannot write {target}: {exc.strerror or exc}") from exc
    remove_stale_leftovers(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-{os.getpid()}-", dir=target.parent))
    try:
        yield tmp
        publish_permissions(tmp)
        with _parent_locked(target.parent):
            if _occupied(target):
                if not replace:
                    raise error(f"{target} was created by another process while this one was writing it; "
                                "it was left as it is (pass --force to replace it)")
                trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-{os.getpid()}-", dir=target.parent))
                os.replace(target, trash / "old")
                os.replace(tmp, target)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.replace(tmp, target)  # onto nothing, or onto an empty directory
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``path`` through a temporary sibling and a rename (readers never see half a file)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``path`` through a temporary sibling and a rename (readers never see half a file).

    A path that names a device, FIFO or socket (``/dev/null``, ``/dev/stdout``, ``<(cat)``) is
    written through, never replaced (root could otherwise rename a file over ``/dev/null``);
    a symbolic link to a file keeps the link and replaces the file it names."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode  # follows links: /dev/stdout is one
    except OSError:
        mode = None
    if mode is not None and stat.S_ISDIR(mode):  # the rename would fail later, and on "." as "busy"
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    if mode is not None and not stat.S_ISREG(mode):
        with path.open("wb") as fh:
            fh.write(data)
        return path
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
