"""The OpenAI-compatible HTTP API over the batching engine (FastAPI on uvicorn).

Routes: ``GET /v1/models`` (and ``/v1/models/{id}``), ``POST /v1/chat/completions``,
``POST /v1/completions`` (streamed as server-sent events when ``stream`` is true),
``GET /health``. With an API key every ``/v1`` route wants ``Authorization: Bearer KEY``.
The engine's worker thread does all MLX work; the event loop only parses, tokenizes (in
a thread), submits and writes.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from dataclasses import dataclass

import mlx.core as mx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from apps.serve import errors
from apps.serve.auth import ApiKeyGuard
from apps.serve.body import JsonBodyRoute
from apps.serve.completions import Generation, run_to_end, stream_events
from apps.serve.errors import ApiError
from apps.serve.limits import RequestLimits
from apps.serve.prepare import prepare
from apps.serve.schemas import ChatCompletionRequest, CompletionRequest, ErrorResponse
from interp import device
from paw_mlx.engine import Engine, ModelCatalog

ERROR_STATUSES = (400, 401, 404, 405, 408, 413, 415, 429, 500, 503, 504)
ERROR_RESPONSES = {status: {"model": ErrorResponse} for status in ERROR_STATUSES}


@dataclass
class ServeConfig:
    api_key: str | None = None
    max_tokens: int = 4096  # most tokens one request may ask for
    max_body_bytes: int = 8 * 2**20
    read_timeout: float | None = 10.0  # seconds to send a request's head, and as many for its body; None: no limit
    allow_origins: tuple[str, ...] = ()  # browser origins allowed to call the API (CORS); "*" for any


def create_app(catalog: ModelCatalog, engine: Engine, config: ServeConfig | None = None) -> FastAPI:
    """The ASGI app; the engine starts with it and stops when it shuts down."""
    config = config or ServeConfig()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="paw", version="1", lifespan=lifespan,
                  description="OpenAI-compatible API: every base program and compiled program is a model.")
    app.router.route_class = JsonBodyRoute  # bodies read as JSON whatever their Content-Type (apps/serve/body.py)
    errors.install(app)
    # innermost, so that its refusals reach the route as they are (the middlewares above group them)
    app.add_middleware(RequestLimits, max_body_bytes=config.max_body_bytes, read_timeout=config.read_timeout)
    if config.allow_origins:
        from starlette.middleware.cors import CORSMiddleware

        # any request header an allowed origin asks for: the openai JS client sends its X-Stainless-* headers
        app.add_middleware(CORSMiddleware, allow_origins=list(config.allow_origins), allow_methods=["GET", "POST"],
                           allow_headers=["*"])
    if config.api_key:  # outermost: a request without the key reaches nothing else
        app.add_middleware(ApiKeyGuard, api_key=config.api_key)
    app.state.catalog, app.state.engine, app.state.config = catalog, engine, config

    def model_card(model) -> dict:
        return {"id": model.name, "object": "model", "created": model.created, "owned_by": "paw",
                "kind": "program" if model.is_program else "base", "base": model.base.name,
                "context_length": model.context_length}

    @app.get("/v1/models", responses=ERROR_RESPONSES)
    @app.head("/v1/models", include_in_schema=False)
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card(m) for m in catalog]}

    @app.get("/v1/models/{model_id:path}", responses=ERROR_RESPONSES)
    @app.head("/v1/models/{model_id:path}", include_in_schema=False)
    async def get_model(model_id: str) -> dict:
        return model_card(catalog.get(model_id))

    @app.get("/health")
    @app.head("/health", include_in_schema=False)  # load balancers' checks; no body, so not in the schema
    async def health() -> JSONResponse:
        stats = engine.stats()
        ok = stats["failure"] is None
        body = {"status": "ok" if ok else "failed", "models": len(catalog), **stats, "memory": memory()}
        return JSONResponse(body, status_code=200 if ok else 503)

    async def generate(body, kind: str, request: Request):
        model = catalog.get(body.model)
        prepared = await run_in_threadpool(prepare, body, model, config.max_tokens)
        choices, room = len(prepared.prompts) * prepared.n, engine.config.max_rows + engine.config.max_queue
        if choices > room:  # a 429 would invite a retry that can never succeed
            raise ApiError(400, f"this request asks for {choices} choices (prompts times n); this server holds at "
                           f"most {room} at once (--max-rows + --max-queue)", param="n")
        generation = Generation(engine, prepared, model.name, kind)
        generation.submit(await run_in_threadpool(prepared.requests))  # row constraints compile there
        if body.stream:
            generation.include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(stream_events(generation), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        body = await run_to_end(generation, request.is_disconnected)
        return await run_in_threadpool(JSONResponse, body)  # serialized there: a body can be tens of MB

    @app.post("/v1/chat/completions", responses=ERROR_RESPONSES)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await generate(body, "chat", request)

    @app.post("/v1/completions", responses=ERROR_RESPONSES)
    async def completions(body: CompletionRequest, request: Request):
        return await generate(body, "text", request)

    return app


def memory() -> dict:
    """This process's resident memory and MLX's allocations, in bytes."""
    info = {"mlx_active": mx.get_active_memory(), "mlx_cache": mx.get_cache_memory(), "mlx_peak": mx.get_peak_memory()}
    rss = device.resident_bytes()
    if rss:
        info["rss"] = rss
    return info
