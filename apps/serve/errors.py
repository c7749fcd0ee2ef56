"""Every failure as OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``.

Bad requests get a 4xx and one clear message; they never reach the engine, so they
never disturb the rows being generated. A 5xx is reserved for the server's own faults.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.routing import Match, Route

from interp.errors import OverloadedError, PawError, RequestError

log = logging.getLogger("paw.serve")

#: what a client that calls a route paw does not have is told
ROUTES = "GET /v1/models, GET /v1/models/{id}, POST /v1/chat/completions, POST /v1/completions, GET /health"

#: OpenAI's own API says invalid_request_error for a wrong key and an unknown model or route too
_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          405: "invalid_request_error", 408: "timeout_error", 413: "invalid_request_error",
          415: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error",
          504: "timeout_error"}


class ApiError(HTTPException):
    """An HTTP error with OpenAI's fields; raised anywhere in a route.

    An ``HTTPException``, so that FastAPI passes it on unchanged when it comes from reading
    the body (``apps/serve/limits.py``) instead of turning it into "error parsing the body".
    """

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None, type_: str | None = None):
        super().__init__(status, message, headers)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}
        self.type = type_ or _TYPES.get(status, "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def from_paw_error(exc: PawError) -> ApiError:
    if isinstance(exc, OverloadedError):
        seconds = max(1, int(round(exc.retry_after)))
        return ApiError(429, str(exc), code="overloaded", headers={"Retry-After": str(seconds)})
    if isinstance(exc, RequestError):
        status = 404 if exc.code == "model_not_found" else 400
        return ApiError(status, str(exc), param=exc.param or ("model" if status == 404 else None), code=exc.code)
    return ApiError(400, str(exc))


def _location(loc: tuple) -> str | None:
    """A field's dotted path; pydantic's names of union branches (``str``, ``list[int]``) left out."""
    parts = [str(p) for p in loc if p != "body" and not _is_branch(p)]
    return ".".join(parts) or None


def _is_branch(part) -> bool:
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "dict", "list") or "[" in part
                                      or part.startswith("function-"))


#: pydantic's names of a union's branches, as a client reads them
_FORMS = {"str": "a string", "list[str]": "an array of strings", "list[int]": "an array of token ids",
          "list[list[int]]": "an array of arrays of token ids", "list[dict[str,any]]": "an array of content parts"}


def _union(loc: tuple) -> tuple[str, str] | None:
    """(the field, the form tried) when ``loc`` is inside a branch of a union field, else None."""
    for i, part in enumerate(loc):
        if _is_branch(part):
            field = _location(loc[:i])
            return (field, _FORMS.get(part, part)) if field else None
    return None


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One line for the first problem pydantic found, and the field it concerns."""
    errors = exc.errors()
    if not errors:
        return "the request body is invalid", None
    first = errors[0]
    where = _location(tuple(first.get("loc", ())))
    if where is None:  # the body itself: empty or not an object (what is not JSON is refused as it is read)
        if first.get("type") == "missing":
            return "the request body is empty: send a JSON object", None
        return "the request body must be a JSON object", None
    if first.get("type") == "missing":
        return f"'{where}' is required", where
    message = first.get("msg", "invalid value")
    union = _union(tuple(first.get("loc", ())))
    if union is not None:  # every form the field may take failed: name the forms, not the first one's error
        where = union[0]
        tried = [t for t in (_union(tuple(e.get("loc", ()))) for e in errors) if t is not None and t[0] == where]
        forms = list(dict.fromkeys(form for _, form in tried))
        message = f"must be {', '.join(forms[:-1])}{' or ' if len(forms) > 1 else ''}{forms[-1]}"
        return f"'{where}' {message}{_more(len(errors) - len(tried))}", where
    same_field = [e for e in errors if _location(tuple(e.get("loc", ()))) == where]
    more = _more(len(errors) - len(same_field))
    return (f"'{where}': {message}{more}" if where else f"{message}{more}"), where


def _more(problems: int) -> str:
    return f" (and {problems} more problems)" if problems > 0 else ""


def allowed_methods(request: Request, default: str = "another method") -> str:
    """The methods the routes at ``request``'s path take (GET and HEAD are separate routes here)."""
    methods = set()
    for route in request.app.routes:
        if isinstance(route, Route) and route.matches(request.scope)[0] is not Match.NONE:
            methods |= route.methods or set()
    return ", ".join(sorted(methods)) or default


def install(app: FastAPI) -> None:
    """Route every failure of ``app`` through OpenAI's error shape."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(PawError)
    async def _paw_error(request: Request, exc: PawError) -> JSONResponse:
        return from_paw_error(exc).response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc)
        return ApiError(400, message, param=param, code="invalid_request").response()

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        headers = dict(exc.headers or {})
        if exc.status_code == 404:  # e.g. an OpenAI endpoint paw does not have: embeddings, responses
            message = f"no route {request.method} {request.url.path}; this server's API is {ROUTES}"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}: use {allowed_methods(request)}"
            # Starlette's Allow names the last route tried alone (HEAD, where GET is a route of its own)
            headers["Allow"] = allowed_methods(request, default="")
        return ApiError(exc.status_code, message, headers=headers).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:  # a bug: say so, keep serving
        log.exception("unexpected failure in %s %s", request.method, request.url.path)
        return ApiError(500, f"internal error: {type(exc).__name__}: {exc}").response()
