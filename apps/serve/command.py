"""``paw serve``: the Typer face of the server. FastAPI and uvicorn load inside the command."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from interp.errors import PawError


def serve(
    programs: Annotated[list[Path] | None, typer.Argument(
        help="Base program directories to serve (each one a model). Default: the smollm2 program in "
             "paw's cache ($PAW_CACHE/programs/smollm2).", show_default=False)] = None,
    program_dirs: Annotated[list[Path] | None, typer.Option(
        "--programs", help="A folder of compiled programs (`paw compile`); each becomes a model named by "
                           "its path in the folder. Repeatable.", show_default=False)] = None,
    host: Annotated[str, typer.Option(help="Address to listen on. The default answers this machine only; "
                                           "0.0.0.0 exposes the server to your network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0: any free port, printed at start).", min=0, max=65535)] = 8000,
    api_key: Annotated[str | None, typer.Option(
        "--api-key", envvar="PAW_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1 routes "
                                                "(or set $PAW_API_KEY).", show_default=False)] = None,
    max_rows: Annotated[int, typer.Option("--max-rows", min=1, max=1024,
                                          help="Requests generating at once (rows of the batch).")] = 32,
    max_queue: Annotated[int, typer.Option("--max-queue", min=0,
                                           help="Requests waiting for a row; more get HTTP 429.")] = 256,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1,
                                            help="Most tokens one request may ask for.")] = 4096,
    timeout: Annotated[float, typer.Option("--timeout", min=0,
                                           help="Seconds a request may take from arrival to its last token "
                                                "(0: no limit).")] = 600.0,
    read_timeout: Annotated[float, typer.Option("--read-timeout", min=0,
                                                help="Seconds a client has to send a request's head, and as "
                                                     "many for its body; slower ones are cut off (0: no "
                                                     "limit).")] = 10.0,
    prefill_chunk: Annotated[int, typer.Option("--prefill-chunk", min=1,
                                               help="Prompt tokens prefilled between two decode steps while "
                                                    "other requests stream (smaller: smoother streams, "
                                                    "slower first tokens).")] = 64,
    prompt_cache_mb: Annotated[int, typer.Option("--prompt-cache-mb", min=0,
                                                 help="Memory for cached prompt prefixes (a chat's next turn "
                                                      "prefills only its new tokens).")] = 512,
    allow_origin: Annotated[list[str] | None, typer.Option(
        "--allow-origin", help="A browser origin allowed to call the API (CORS), e.g. http://localhost:3000; "
                               "'*' for any. Repeatable. Default: none.", show_default=False)] = None,
    log_level: Annotated[str, typer.Option("--log-level", help="debug, info, warning or error.")] = "info",
) -> None:
    """Serve programs over an OpenAI-compatible HTTP API, all requests batched together.

    Every base program and every compiled program under --programs is a model; requests for
    different programs on one base share one batch. Point any OpenAI client at
    http://HOST:PORT/v1 (endpoints: /v1/models, /v1/chat/completions, /v1/completions, /health).
    """
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise PawError(f"paw serve needs FastAPI and uvicorn ({exc.name} is missing): "
                       "pip install -e '.[serve]' in paw's checkout") from exc
    if not host.strip():  # an unset variable in `--host "$HOST"`: the socket would answer every interface
        raise PawError("--host is empty: name an address (127.0.0.1 for this machine, 0.0.0.0 for every interface)")
    if log_level not in ("debug", "info", "warning", "error"):
        raise PawError(f"--log-level must be debug, info, warning or error, not {log_level!r}")
    import logging

    from apps.serve.app import ServeConfig
    from apps.serve.runner import build_catalog
    from apps.serve.runner import serve as run_server
    from paw_mlx.engine import EngineConfig

    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    catalog = build_catalog(programs or [], program_dirs or [],
                            warn=lambda msg: typer.echo(f"paw: warning: {msg}", err=True))
    engine_config = EngineConfig(max_rows=max_rows, max_queue=max_queue, prefill_chunk=prefill_chunk,
                                 prompt_cache_bytes=prompt_cache_mb * 2**20, timeout=timeout or None)
    serve_config = ServeConfig(api_key=api_key or None, max_tokens=max_tokens, allow_origins=tuple(allow_origin or ()),
                               read_timeout=read_timeout or None)

    def ready(url: str) -> None:
        names = ", ".join(m.name for m in catalog)
        typer.echo(f"paw serve: {len(catalog)} model(s): {names}", err=True)
        typer.echo(f"paw serve: listening on {url}/v1 (OpenAI-compatible; Ctrl+C stops)"
                   + (" - API key required" if api_key else ""), err=True)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_server(catalog, engine_config, serve_config, host, port, log_level=log_level, ready=ready)
