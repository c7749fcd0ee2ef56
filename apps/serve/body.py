"""A request body read as JSON whatever its ``Content-Type`` says, with paw's own parser.

Clients do not always label their JSON: ``curl -d '{...}'`` sends
``application/x-www-form-urlencoded``, scripts send ``text/plain`` or nothing. FastAPI reads
a body as JSON only when it is labelled so; here any body is, and it is served if it parses
as a JSON object. Only a multipart body (a form upload, which no route of this API takes)
is refused, with a 415.

Parsing is ``interp.jsonfile.parse_json``'s, the parser of every JSON file paw reads: a body
nested too deeply or holding an integer of thousands of digits is one 400 naming the
problem, not FastAPI's "There was an error parsing the body".
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

from apps.serve.errors import ApiError
from apps.serve.limits import CLOSE
from interp.errors import PawError
from interp.jsonfile import parse_json

#: what FastAPI must see to hand the body to ``Request.json``
JSON_TYPE = b"application/json"


class JsonBody(Request):
    """A request whose ``json()`` is paw's parser, refusing with an ``ApiError`` (400)."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            try:
                self._json = parse_json(await self.body(), "the request body", PawError, standard=True)
            except PawError as exc:  # an HTTPException, so FastAPI passes it on as it is
                raise ApiError(400, str(exc), code="invalid_request") from None
        return self._json


class JsonBodyRoute(APIRoute):
    """A route that reads its body as JSON whatever its ``Content-Type`` (multipart: a 415)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()
        if self.body_field is None:  # a GET: nothing to read
            return handle

        async def read_as_json(request: Request) -> Response:
            headers = [(k, v) for k, v in request.scope["headers"] if k != b"content-type"]
            given = request.headers.get("content-type", "")
            if given.strip().lower().startswith("multipart/"):
                raise ApiError(415, f"Content-Type {given.split(';')[0]!r} is not supported: send the request as "
                               "a JSON object (Content-Type: application/json)", code="unsupported_media_type",
                               headers=CLOSE)  # its body is never read
            scope = {**request.scope, "headers": [*headers, (b"content-type", JSON_TYPE)]}
            return await handle(JsonBody(scope, request.receive))

        return read_as_json
