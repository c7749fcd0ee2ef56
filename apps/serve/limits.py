"""Limits on what a client may send: the body's size, and the time to send a request.

A body counts against the size limit (8 MB) whether it announces its length or comes in
chunks (``Transfer-Encoding: chunked`` has no ``Content-Length`` to check up front), so a
client cannot make the server hold an unbounded body in memory. A client that opens a
connection and sends its request slowly, or stops half-way (a slow-loris attack), gets
``--read-timeout`` seconds for the request's head and as many for its body; then a 408
(body) or a closed connection (head), so idle sockets and half-read requests never pile up.
uvicorn has neither limit itself: its keep-alive timeout applies only between requests.
A request that is not HTTP at all is answered with OpenAI's error object too.
"""

from __future__ import annotations

import asyncio
import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from apps.serve.errors import ApiError

#: a refused request's connection is closed: the rest of its body is never read
CLOSE = {"Connection": "close"}


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large", headers=CLOSE)


def too_slow(seconds: float) -> ApiError:
    return ApiError(408, f"the request body did not arrive within {seconds:g} s (paw serve --read-timeout)",
                    code="request_timeout", headers=CLOSE)


class RequestLimits:
    """ASGI middleware: a body over ``max_body_bytes`` gets a 413, one slower than ``read_timeout`` a 408,
    a compressed one a 415.

    The refusals are ``ApiError``s raised from ``receive`` while the route reads the body.

    ``receive`` is wrapped only until the body is complete: afterwards it is the server's
    own, so a streamed response can still wait for the client's disconnect.
    """

    def __init__(self, app, max_body_bytes: int, read_timeout: float | None):
        self.app, self.max_body_bytes, self.read_timeout = app, max_body_bytes, read_timeout

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        encoding = headers.get(b"content-encoding", b"identity").strip().lower()
        if encoding not in (b"identity", b""):  # a compressed body could expand past any limit (a zip bomb): not read
            error = ApiError(415, f"Content-Encoding {encoding.decode('latin-1')!r} is not supported: send the body "
                             "uncompressed", code="unsupported_encoding", headers=CLOSE)
            await error.response()(scope, receive, send)
            return
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            await too_large(self.max_body_bytes).response()(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = None if not self.read_timeout else loop.time() + self.read_timeout
        received, complete = 0, False

        async def limited_receive():
            nonlocal received, complete
            if complete:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), None if deadline is None else deadline - loop.time())
            except TimeoutError:
                raise too_slow(self.read_timeout) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise too_large(self.max_body_bytes)
                complete = not message.get("more_body", False)
            else:  # http.disconnect
                complete = True
            return message

        # what limited_receive raises is an ApiError: FastAPI passes it on, the app answers it
        await self.app(scope, limited_receive, send)


def bounded_protocol(read_timeout: float | None) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection whose request head takes over ``read_timeout`` s.

    The clock starts when the connection opens and again after each response; it stops
    mattering once a whole request head has arrived (the body's time is ``RequestLimits``').
    """

    class BoundedH11Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._start_head_clock()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._start_head_clock()

        def connection_lost(self, exc) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            super().connection_lost(exc)

        def _start_head_clock(self) -> None:
            if not read_timeout:
                return
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_timer = self.loop.call_later(read_timeout, self._head_late)

        def send_400_response(self, msg: str) -> None:
            """A request that is not HTTP uvicorn can read: OpenAI's error object, not uvicorn's plain text.

            A request whose head was fine and whose body is not (a broken chunk) is already running:
            its cycle is marked disconnected first, so that its own response is dropped instead of
            failing in h11 (a traceback and a 500 attempt), and it is sent no second response.
            """
            cycle = self.cycle
            if cycle is not None and not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()  # a route waiting for its body reads a disconnect
                if cycle.response_started:
                    self.transport.close()
                    return
            error = ApiError(400, "the request is not valid HTTP/1.1", code="invalid_request")  # msg: uvicorn's
            body = json.dumps(error.body()).encode()
            head = h11.Response(status_code=400, reason=b"Bad Request", headers=[
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                (b"connection", b"close")])
            for event in (head, h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self.transport.close()

        def _head_late(self) -> None:
            self._head_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()  # no request head since the clock started: a stalled client

    return BoundedH11Protocol
