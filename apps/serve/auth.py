"""The API key check: a ``/v1`` request must carry ``Authorization: Bearer KEY``.

A plain ASGI middleware rather than ``@app.middleware("http")``: Starlette's
``BaseHTTPMiddleware`` hands the route a ``receive`` that never reports the client's
disconnect, so a non-streamed request whose client left (or gave up while queued) would
run to its end on the engine. A CORS preflight (``OPTIONS``) carries no credentials by
the Fetch standard, so it passes to the CORS middleware inside unchecked.
"""

from __future__ import annotations

import hmac

from apps.serve.errors import ApiError


class ApiKeyGuard:
    """ASGI middleware: a 401 for a ``/v1`` request without the bearer ``api_key``."""

    def __init__(self, app, api_key: str):
        self.app, self.api_key = app, api_key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1") and scope["method"] != "OPTIONS":
            given = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.api_key):
                error = ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                 code="invalid_api_key")
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)
