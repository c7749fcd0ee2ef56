"""A deadline keeper that lives outside the rank's process, so a blocked MLX call cannot stop it.

``mx.distributed.init()`` on the ring backend holds the GIL while it waits for its peers,
and a ``recv`` from a peer that stopped answering (a Mac that slept, a cable pulled)
waits forever: no thread of the waiting process can act then. So each rank starts this
file as a tiny child process (``python -I watchdog.py PARENT_PID``, standard library
only) and tells it, through a pipe, what it is about to wait for and for how long. When
a deadline passes, the child prints ``paw: error: MESSAGE`` on the rank's stderr and
kills the rank. When the rank exits, the pipe closes and the child exits with it.

A peer that *dies* is noticed sooner: MLX's ring raises "connection to a peer was lost"
within a second, and ``interp.distributed.pipeline`` turns that into one line itself.
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
    """The rank's side of the child process: ``arm`` a deadline, ``disarm`` it, ``close``."""

    def __init__(self) -> None:
        self._child = subprocess.Popen(
            [sys.executable, "-I", "-S", os.path.abspath(__file__), str(os.getpid())],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, close_fds=True,
        )
        self._pipe = self._child.stdin

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
        if self._pipe is not None and not self._pipe.closed:
            self._pipe.close()
            self._child.wait(timeout=5)

    def _send(self, line: str) -> None:
        try:
            self._pipe.write(line.encode() + b"\n")
            self._pipe.flush()
        except (BrokenPipeError, ValueError):
            pass  # the child is gone: the process is already on its way out


def _watch(parent: int) -> int:
    """The child's loop: read commands from stdin, enforce the current deadline."""
    deadline: float | None = None
    message = ""
    pending = b""
    while True:
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, _, _ = select.select([0], [], [], wait)
        if not ready:
            os.write(2, f"paw: error: {message}\n".encode())
            try:
                os.kill(parent, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return 1
        chunk = os.read(0, 65536)
        if not chunk:  # the rank closed the pipe or exited
            return 0
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            command, _, rest = line.decode(errors="replace").partition(" ")
            if command == "arm":
                seconds, _, message = rest.partition(" ")
                deadline = time.monotonic() + float(seconds)
            elif command == "disarm":
                deadline = None


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the rank's business, not the watchdog's
    sys.exit(_watch(int(sys.argv[1])))
