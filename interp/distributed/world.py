"""Whether this process is one rank of several, and its connection to the others.

``mlx.launch`` (ring, JACCL, NCCL) and ``mpirun`` start every rank with environment
variables that say where it belongs. Only then does paw call ``mx.distributed.init()``:
a plain ``paw run`` never touches the distributed layer. Connecting is the first wait on
other machines, so it runs under the watchdog (``interp/distributed/watchdog.py``): a
rank whose peers never come up says so in one line instead of hanging.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import socket
import stat
import threading
from dataclasses import dataclass, field

import mlx.core as mx

from interp.distributed.watchdog import Watchdog
from interp.errors import DistributedError

#: Seconds a rank waits for another before it gives up (connecting, a reply, a command).
DEFAULT_TIMEOUT = 60.0

#: Variables a launcher sets for each rank: mlx.launch's ring (hostfile, rank), JACCL,
#: NCCL, and MPI's (Open MPI, then the PMI of MPICH and others).
LAUNCH_VARIABLES = ("MLX_HOSTFILE", "MLX_RANK", "MLX_IBV_DEVICES", "MLX_JACCL_COORDINATOR", "MLX_WORLD_SIZE",
                    "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


@dataclass
class World:
    """This rank's place among the processes of one distributed run."""

    group: mx.distributed.Group
    watchdog: Watchdog
    timeout: float
    #: the ring backend's sockets to this rank's neighbours (empty when unknown: MPI, JACCL)
    sockets: list[int] = field(default_factory=list)
    #: rank 0's open distributed model: the other ranks serve one model at a time
    active: object | None = None

    @property
    def rank(self) -> int:
        return self.group.rank()

    @property
    def size(self) -> int:
        return self.group.size()

    @property
    def me(self) -> str:
        """'rank R of N', the start of every message this rank prints."""
        return f"rank {self.rank} of {self.size}"

    def wait_for_message(self) -> None:
        """Sleep until a neighbour has sent something (or hung up), before posting a receive.

        MLX's ring polls a socket with a posted receive in a busy loop, so a rank that waits
        for the next step (or rank 0 for its reply) would keep a core at 100%; ``select``
        waits for the first bytes without using the CPU.
        """
        if self.sockets:
            select.select(self.sockets, [], [])

    @property
    def previous(self) -> int:
        return (self.rank - 1) % self.size

    @property
    def next(self) -> int:
        return (self.rank + 1) % self.size


_world: World | None = None
_lock = threading.Lock()


def launched() -> bool:
    """Whether a distributed launcher started this process."""
    return any(os.environ.get(name) for name in LAUNCH_VARIABLES)


def default_timeout() -> float:
    """$PAW_DIST_TIMEOUT seconds, else DEFAULT_TIMEOUT."""
    raw = os.environ.get("PAW_DIST_TIMEOUT")
    if not raw:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        raise DistributedError(f"PAW_DIST_TIMEOUT must be a number of seconds, got {raw!r}") from None
    if value <= 0:
        raise DistributedError(f"PAW_DIST_TIMEOUT must be positive, got {raw!r}")
    return value


def connect(timeout: float | None = None) -> World | None:
    """The distributed world this process belongs to; None when it runs alone.

    Connects once per process (later calls return the same world). Gives up with one
    line on stderr, killing this rank, when the other ranks do not answer within
    ``timeout`` seconds.
    """
    global _world
    with _lock:
        if _world is not None:
            return _world
        if not launched():
            return None
        timeout = default_timeout() if timeout is None else timeout
        if timeout <= 0:
            raise DistributedError(f"the distributed timeout must be positive, got {timeout:g} s")
        watchdog = Watchdog()
        rank = next((os.environ[n] for n in ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK") if n in os.environ), "?")
        size = _expected_size()
        where = f"rank {rank} of {size}" if size else f"rank {rank}"
        try:
            with watchdog.deadline(timeout, f"{where}: could not connect to the other ranks within {timeout:g} s "
                                            "(did every rank start, and can each reach its neighbours' addresses?)"):
                group = mx.distributed.init()
        except (RuntimeError, ValueError) as exc:
            watchdog.close()
            raise DistributedError(f"{where}: could not connect to the other ranks: {exc}") from exc
        if group.size() == 1:
            watchdog.close()
            return None
        _world = World(group, watchdog, timeout, _ring_sockets(group.rank(), group.size()))
        atexit.register(watchdog.close)
        _report_termination(_world)
        return _world


def _expected_size() -> int:
    """The number of ranks the launcher announced, or 0 when it does not say."""
    for name in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MLX_WORLD_SIZE"):
        if os.environ.get(name, "").isdecimal():
            return int(os.environ[name])
    hostfile = os.environ.get("MLX_HOSTFILE")
    if hostfile and os.path.isfile(hostfile):
        try:
            with open(hostfile, encoding="utf-8") as fh:
                hosts = json.load(fh)
            return len(hosts) if isinstance(hosts, list) else 0
        except (OSError, ValueError):
            return 0
    return 0


def _ring_sockets(rank: int, size: int) -> list[int]:
    """File descriptors of the ring's connections: from this rank's address or to the next rank's."""
    hostfile = os.environ.get("MLX_HOSTFILE")
    try:
        with open(hostfile or "", encoding="utf-8") as fh:
            hosts = json.load(fh)
        mine = {_address(entry) for entry in hosts[rank]}
        theirs = {_address(entry) for entry in hosts[(rank + 1) % size]}
    except (OSError, ValueError, IndexError, TypeError):
        return []
    found = []
    for fd in range(3, 4096):
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            with socket.socket(fileno=os.dup(fd)) as sock:
                local, peer = sock.getsockname()[:2], sock.getpeername()[:2]
        except OSError:
            continue
        if local in mine or peer in theirs:
            found.append(fd)
    return found


def _address(entry: str) -> tuple[str, int]:
    host, _, port = entry.rpartition(":")
    return host.strip("[]"), int(port)


def _report_termination(world: World) -> None:
    """Say why this rank stops when the launcher ends it (mlx.launch does when another rank fails)."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return  # someone (a server) handles it already

    def stop(signum, frame) -> None:
        os.write(2, f"paw: error: {world.me}: stopped by the launcher (another rank failed, or the run "
                    "was interrupted)\n".encode())
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
