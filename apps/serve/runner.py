"""Load what ``paw serve`` serves and run uvicorn: in the foreground, or in a thread for tests.

Model names: a base program is served under its directory's name (and its source id, as
an alias); a compiled program under its path relative to the ``--programs`` folder it was
found in. A program that cannot be served (made for a base that is not served, or
malformed) is skipped with a warning.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from interp.errors import PawError
from paw_mlx.engine import Engine, EngineConfig, ModelCatalog
from paw_mlx.programs.artifact import ARTIFACT_FILE

log = logging.getLogger("paw.serve")

def find_compiled_programs(root: Path) -> list[Path]:
    """Compiled-program directories under ``root`` (``root`` itself if it is one)."""
    if not root.is_dir():
        raise PawError(f"--programs {root}: no such directory")
    if (root / ARTIFACT_FILE).is_file():
        return [root]
    return sorted(p.parent for p in root.rglob(ARTIFACT_FILE) if not any(part.startswith(".") for part in p.parts))


def build_catalog(bases: Sequence[str | Path], program_roots: Sequence[str | Path] = (),
                  warn: Callable[[str], None] = log.warning) -> ModelCatalog:
    """Load the base programs and list every compiled program on them."""
    import paw_mlx
    from interp.paths import require_default_program

    catalog = ModelCatalog()
    if not bases:
        bases = [require_default_program("pass a program directory")]
    from apps.cli import show_ranks

    for base in bases:
        prog = paw_mlx.load(base)
        show_ranks(prog)  # under mlx.launch: what each rank holds (rank 0 is the only one here)
        catalog.add_base(prog)
    for root in program_roots:
        root = Path(root)
        for directory in find_compiled_programs(root):
            name = directory.name if directory == root else directory.relative_to(root).as_posix()
            try:
                catalog.add_program(directory, name=name)
            except PawError as exc:  # one unusable program does not keep the others from being served
                warn(f"skipping program {name}: {exc}")
    return catalog


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: a free one), for uvicorn to serve on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise PawError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def uvicorn_server(app, log_level: str = "warning"):
    """uvicorn for ``app``, on the h11 protocol bounded by the app's ``read_timeout`` (``apps/serve/limits.py``)."""
    import uvicorn

    from apps.serve.limits import bounded_protocol

    protocol = bounded_protocol(app.state.config.read_timeout)
    config = uvicorn.Config(app, log_level=log_level, access_log=log_level in ("debug", "info"),
                            timeout_graceful_shutdown=5, lifespan="on", ws="none", http=protocol)
    return uvicorn.Server(config)


class BackgroundServer:
    """A server on a loopback port, in a thread of this process (tests, benchmarks).

        with BackgroundServer(app) as server:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="-")
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, start_timeout: float = 60.0):
        self._sock = bind(host, port)
        self.host, self.port = self._sock.getsockname()[:2]
        self.url = f"http://{host}:{self.port}"
        self._server = uvicorn_server(app)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name="paw-serve", daemon=True)
        self._start_timeout = start_timeout

    def __enter__(self) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + self._start_timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self, timeout: float = 15.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)
        self._sock.close()


def serve(catalog: ModelCatalog, engine_config: EngineConfig, serve_config, host: str, port: int,
          log_level: str = "info", ready: Callable[[str], None] | None = None) -> None:
    """Run the server in the foreground until Ctrl+C (or SIGTERM)."""
    from apps.serve.app import create_app

    sock = bind(host, port)
    actual = sock.getsockname()[1]
    engine = Engine(engine_config)
    app = create_app(catalog, engine, serve_config)
    server = uvicorn_server(app, log_level)
    if ready is not None:
        shown = f"[{host}]" if ":" in host else host
        ready(f"http://{shown}:{actual}")
    try:
        server.run(sockets=[sock])
    finally:
        engine.stop()
        sock.close()
