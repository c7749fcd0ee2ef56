"""A deadline keeper that lives outside the rank's process, so a blocked MLX call cannot stop it.

``mx.distributed.init()`` on the ring backend holds the GIL while it waits for its peers,
and a ``recv`` from a peer that stopped answering (a Mac that slept, a cable pulled)
waits forever: no thread of the waiting process can act then. So each rank starts this
file as a tiny child process (``python -I watchdog.py PARENT_PID``, standard library
only) and tells it, through a pipe, what it is about to wait for and for how long. When
a deadline passes, the child prints ``paw: error: MESSAGE`` on the rank's stderr and
kills the rank. When the rank exits, the pipe closes and the child exits with it.

A peer that *dies* is noticed sooner: MLX's ring raises "connection to a peer was lost"
within a second, and ``interp.distributed.driver`` turns that into one line itself. MLX
first prints a dozen "[ring] Socket N was closed by the peer" lines of its own; so the
rank's stderr runs through this child too, which drops those lines (unless
MLX_RING_VERBOSE is set) and passes everything else on. Output written to the pipe before
a rank dies still comes out: the child drains it before it exits.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager


class Watchdog:
    """The rank's side of the child process: ``arm`` a deadline, ``disarm`` it, ``close``.

    ``filter_stderr`` routes this process's stderr (file descriptor 2) through the child.
    """

    def __init__(self, filter_stderr: bool = True) -> None:
        read_end = write_end = None
        if filter_stderr and not os.environ.get("MLX_RING_VERBOSE"):
            read_end, write_end = os.pipe()
        command = [sys.executable, "-I", "-S", os.path.abspath(__file__), str(os.getpid())]
        if read_end is not None:
            command.append(str(read_end))
        self._child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, close_fds=True,
                                       pass_fds=() if read_end is None else (read_end,))
        self._pipe = self._child.stdin
        self._stderr: int | None = None
        if read_end is not None:
            os.close(read_end)
            sys.stderr.flush()
            self._stderr = os.dup(2)
            os.dup2(write_end, 2)
            os.close(write_end)

    def arm(self, seconds: float, message: str) -> None:
        """Kill this process with ``paw: error: message`` unless disarmed within ``seconds``."""
        self._send(f"arm {seconds:.3f} {' '.join(message.split())}")

    def disarm(self) -> None:
        self._send("disarm")

    @contextmanager
    def deadline(self, seconds: float, message: str) -> Iterator[None]:
        self.arm(seconds, message)
        try:
            yield
        finally:
            self.disarm()

    def close(self) -> None:
        """Stop the child; stderr goes straight out again, after what the child still holds."""
        if self._pipe is None or self._pipe.closed:
            return
        if self._stderr is not None:
            sys.stderr.flush()
            os.dup2(self._stderr, 2)
            os.close(self._stderr)
            self._stderr = None
        self._pipe.close()
        try:
            self._child.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._child.kill()

    def _send(self, line: str) -> None:
        try:
            self._pipe.write(line.encode() + b"\n")
            self._pipe.flush()
        except (BrokenPipeError, ValueError):
            pass  # the child is gone: the process is already on its way out


#: MLX's ring logs a line per failed socket read before it raises; paw says it once, better
_NOISE = b"[ring] "
#: seconds past a deadline before the watchdog acts: a rank that is failing with its own line
#: (a lost connection found at the same moment) exits in that time, and its line says more
GRACE = 0.2


def _watch(parent: int, stderr: int | None) -> int:
    """The child's loop: enforce the current deadline, pass the rank's stderr on (without ring noise)."""
    deadline: float | None = None
    message = ""
    commands = b""
    text = b""
    sources = [0] if stderr is None else [0, stderr]

    def forward(final: bool = False) -> None:
        nonlocal text
        while b"\n" in text:
            line, text = text.split(b"\n", 1)
            if not line.startswith(_NOISE):
                os.write(2, line + b"\n")
        if text and (final or not _NOISE.startswith(text[: len(_NOISE)])):
            os.write(2, text)  # a partial line that cannot be ring noise
            text = b""

    def drain(seconds: float) -> None:
        nonlocal text
        end = time.monotonic() + seconds
        while stderr is not None and stderr in sources:
            ready, _, _ = select.select([stderr], [], [], max(0.0, end - time.monotonic()))
            chunk = os.read(stderr, 65536) if ready else b""
            if not chunk:
                break
            text += chunk
            forward()
        forward(final=True)

    expiring = False  # the deadline passed: a short grace for the rank's own line or a late disarm
    while True:
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, _, _ = select.select(sources, [], [], wait)
        if not ready:
            if not expiring:
                expiring, deadline = True, time.monotonic() + GRACE
                continue
            drain(0.1)
            os.write(2, f"paw: error: {message}\n".encode())
            try:
                os.kill(parent, signal.SIGKILL)
            except ProcessLookupError:
                pass
            drain(1.0)
            return 1
        if stderr in ready:
            chunk = os.read(stderr, 65536)
            if chunk:
                text += chunk
                forward()
            else:
                sources.remove(stderr)
                forward(final=True)
        if 0 in ready:
            chunk = os.read(0, 65536)
            if not chunk:  # the rank closed the pipe or exited: pass on what it wrote last
                drain(1.0)
                return 0
            commands += chunk
            while b"\n" in commands:
                line, commands = commands.split(b"\n", 1)
                command, _, rest = line.decode(errors="replace").partition(" ")
                if command == "arm":
                    seconds, _, message = rest.partition(" ")
                    deadline, expiring = time.monotonic() + float(seconds), False
                elif command == "disarm":
                    deadline, expiring = None, False


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the rank's business, not the watchdog's
    sys.exit(_watch(int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else None))
