"""The one directory writer: all or nothing, no silent replacement, leftovers of killed runs removed."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from interp.atomic import atomic_directory, atomic_write_text, check_writable, remove_stale_leftovers
from interp.errors import ExportError
from tests.child_env import child_env

# No test here reaches a device predicate (interp/device.py), checked by instrumenting them
# (docs/devices.md): the fake-Mac pass would run the same branches again, so it leaves them out.
pytestmark = pytest.mark.not_fake_mac_pass

ROOT = Path(__file__).resolve().parents[2]


def write(target: Path, text: str, started: threading.Barrier | None = None, **options) -> None:
    with atomic_directory(target, error=ExportError, **options) as tmp:
        (tmp / "data.txt").write_text(text)
        if started is not None:
            started.wait(timeout=30)  # both writers are past their up-front check


def test_two_writers_started_together_one_wins_one_is_refused(tmp_path):
    """Both used to report success, the second silently replacing the first."""
    target = tmp_path / "out"
    started = threading.Barrier(2)
    outcomes: dict[str, object] = {}

    def run(name: str) -> None:
        try:
            write(target, name, started)
            outcomes[name] = "ok"
        except ExportError as exc:
            outcomes[name] = exc

    threads = [threading.Thread(target=run, args=(name,)) for name in ("first", "second")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    winners = [name for name, outcome in outcomes.items() if outcome == "ok"]
    losers = [outcome for outcome in outcomes.values() if outcome != "ok"]
    assert len(winners) == 1 and len(losers) == 1, outcomes
    assert "created by another process while this one was writing it" in str(losers[0])
    assert (target / "data.txt").read_text() == winners[0]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no partial directory left behind


def test_replace_only_when_asked(tmp_path):
    target = tmp_path / "out"
    write(target, "one")
    with pytest.raises(ExportError, match="already exists"):
        write(target, "two")
    write(target, "three", replace=True)
    assert (target / "data.txt").read_text() == "three"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_destination_that_cannot_be_written_is_one_clear_error(tmp_path):
    """Was an OSError (``FileNotFoundError: ...``) at the end of the work, after an export or compile."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(ExportError, match=r"cannot write .*a-file/x/y: .*a-file is not a directory"):
        check_writable(blocker / "x" / "y", ExportError)
    with pytest.raises(ExportError, match="cannot write"):
        write(blocker / "out", "one")
    check_writable(tmp_path / "new" / "deeper" / "out")  # missing parents are fine: they will be made
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # the check leaves nothing behind


def test_failure_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "out") as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


KILLED_WRITER = """
import os, sys
from pathlib import Path
from interp.atomic import atomic_directory
with atomic_directory(Path(sys.argv[1])) as tmp:
    (tmp / "consts.safetensors").write_bytes(b"w" * 1000)
    os.kill(os.getpid(), 9)
"""


def test_leftovers_of_a_killed_write_are_removed_by_the_next(tmp_path):
    target = tmp_path / "out"
    done = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(target)], cwd=ROOT, timeout=120,
                          env=child_env())
    assert done.returncode == -9
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]
    assert len(leftovers) == 1 and (leftovers[0] / "consts.safetensors").is_file()
    alive = tmp_path / f".out.partial-{os.getpid()}-mine"  # a write under way in a live process stays
    alive.mkdir()
    write(target, "next")
    assert sorted(p.name for p in tmp_path.iterdir()) == [alive.name, "out"]
    assert remove_stale_leftovers(target) == []


def test_atomic_write_text(tmp_path):
    path = atomic_write_text(tmp_path / "ids.txt", "1 2 3\n")
    assert path.read_text() == "1 2 3\n"
    assert [p.name for p in tmp_path.iterdir()] == ["ids.txt"]


def test_a_file_write_goes_through_a_fifo_and_a_link_instead_of_replacing_them(tmp_path):
    """`paw run --output-ids /dev/stdout` (or a FIFO, or /dev/null as root) renamed a regular file over
    the path: the reader got nothing, and /dev/null would have become a file."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    atomic_write_text(fifo, "1 2 3\n")
    reader.join(timeout=30)
    assert received == [b"1 2 3\n"] and fifo.is_fifo()
    (tmp_path / "target").write_text("old")
    (tmp_path / "link").symlink_to("target")
    atomic_write_text(tmp_path / "link", "new")
    assert (tmp_path / "link").is_symlink() and (tmp_path / "target").read_text() == "new"


def test_a_folder_output_over_a_fifo_is_refused_before_the_work(tmp_path):
    """`paw export ... -o FIFO --force` exported, then failed renaming the folder over it ("Not a directory")."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ExportError, match="it is a device, FIFO or socket, which a folder cannot replace"):
        check_writable(fifo, ExportError, folder=True)  # what the commands call before their work
    with pytest.raises(ExportError, match="which a folder cannot replace"):
        with atomic_directory(fifo, replace=True, error=ExportError) as tmp:
            (tmp / "data.txt").write_text("x")
    check_writable(fifo)  # a file output may go through it (atomic_write_bytes)
    assert fifo.is_fifo() and sorted(p.name for p in tmp_path.iterdir()) == ["fifo"]


def test_a_file_write_over_a_folder_says_so(tmp_path, monkeypatch):
    """`paw run --output-ids ""` (the path ".") said "cannot write .: Device or resource busy"."""
    monkeypatch.chdir(tmp_path)
    for target in (Path("."), tmp_path):
        with pytest.raises(IsADirectoryError):
            atomic_write_text(target, "1 2 3\n")
    assert list(tmp_path.iterdir()) == []
