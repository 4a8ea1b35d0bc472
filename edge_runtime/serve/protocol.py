"""The HTTP/1.1 connection of `hy-edge serve`: uvicorn's h11 protocol with the two guards uvicorn lacks.

- **Header timeout.** A connection whose request line and headers are not complete `header_timeout` seconds
  after it opened (on a kept-alive connection: after the first byte of its next request) is closed, after a
  408 if part of a request came (`_headers_timed_out` says why); without it a client that sends half a request
  and then nothing (slowloris) holds a connection, and a place under the cap, forever. The clock stops when h11
  has parsed the headers: a slow body is the business of the body limit (http.Front) and of
  --request-timeout. An idle kept-alive connection is uvicorn's keep-alive's.
- **Connection cap.** At most `max_connections` connections are served: a connection is admitted when it opens
  if a place is free, or else when its request arrives if one has come free by then; otherwise that request
  gets 503 in OpenAI's error shape, with Retry-After and Connection: close, then the connection is closed; the
  app never sees it. uvicorn's own `limit_concurrency` answers in plain text, and compares every open
  connection with the limit on every request, so while one connection too many is open, requests on the
  connections already served are refused as well.

uvicorn takes the protocol as a class (`uvicorn.Config(http=...)`): `protocol_class` makes one per server,
holding that server's limits and its set of admitted connections."""

from __future__ import annotations

import asyncio
import http
import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .http import RETRY_AFTER_S, error_body

HTTP_CLOSE_TIMEOUT_S = 5.0  # after the drain: how long uvicorn waits for connections before cancelling them
KEEP_ALIVE_S = 5  # an idle connection between two requests is closed after this long
HEADER_TIMEOUT_S = 10.0  # default of --header-timeout: ample for a client on a slow link, short for a slot


class GuardedH11Protocol(H11Protocol):
    """H11Protocol with a header timeout and a connection cap (the module's docstring says how)."""

    max_connections: int
    header_timeout: float | None  # None: no header timeout
    admitted: set  # the connections being served, shared by every connection of one server

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._app, self.app = self.app, self._gate  # uvicorn calls self.app for each request
        self._header_timer: asyncio.TimerHandle | None = None

    @staticmethod
    def on_reject(status: str) -> None:
        """Called with "408" or "503" for each connection this protocol answers itself (the metrics)."""

    # -- the connection cap --------------------------------------------------------------------------------
    def _admit(self) -> bool:
        if self not in self.admitted and len(self.admitted) < self.max_connections:
            self.admitted.add(self)
        return self in self.admitted

    async def _gate(self, scope, receive, send) -> None:
        if self._admit():  # a second chance: a place may have come free since the connection opened
            return await self._app(scope, receive, send)
        self.on_reject("503")
        message = f"the server is serving its limit of {self.max_connections} connections; retry later"
        body = json.dumps(error_body(message, "server_error", code="server_busy")).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", str(RETRY_AFTER_S).encode()),
            (b"connection", b"close"),  # uvicorn closes the connection once this response is written
        ]
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    # -- the header timeout ----------------------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._admit()
        self._start_header_clock()

    def data_received(self, data: bytes) -> None:
        if self._header_timer is None and self.conn.their_state is h11.IDLE:
            self._start_header_clock()  # the first bytes of the next request on a kept-alive connection
        super().data_received(data)
        self._stop_header_clock_once_parsed()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # a pipelined request already buffered is parsed here; a partial one is left to uvicorn's keep-alive
        # timer (armed above, cancelled only by new bytes, which restart this clock in data_received)
        self._stop_header_clock_once_parsed()

    def connection_lost(self, exc) -> None:
        self._cancel_header_clock()
        self.admitted.discard(self)
        super().connection_lost(exc)

    def _start_header_clock(self) -> None:
        if self.header_timeout is not None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._headers_timed_out)

    def _stop_header_clock_once_parsed(self) -> None:
        if self.conn.their_state is not h11.IDLE:  # h11 produced the Request event (or failed: 400, closed)
            self._cancel_header_clock()

    def _cancel_header_clock(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_timed_out(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.conn.trailing_data[0]:
            # part of a request came: answer it, so that a slow but honest client learns why (RFC 9110's 408,
            # with Connection: close) rather than seeing a reset it might retry at once
            self.on_reject("408")
            message = f"the request's headers did not arrive within {self.header_timeout:g} s"
            self._answer_and_close(408, error_body(message, code="request_timeout"))
        else:
            # nothing was asked (a client's pre-opened socket, say): nothing to answer, as at keep-alive's end
            self.conn.send(h11.ConnectionClosed())
            self.transport.close()

    def _answer_and_close(self, status: int, obj: dict) -> None:
        """A response written through h11 for a request that was never parsed, then close."""
        body = json.dumps(obj).encode()
        headers = [
            *self.server_state.default_headers,
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        response = h11.Response(status_code=status, headers=headers, reason=http.HTTPStatus(status).phrase)
        for event in (response, h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.conn.send(h11.ConnectionClosed())
        self.transport.close()


def protocol_class(max_connections: int, header_timeout: float | None, on_reject=None) -> type[GuardedH11Protocol]:
    """The protocol class of one server: `max_connections` served at once, `header_timeout` seconds for a
    request's headers (None: no limit); `on_reject(status)` counts the 408s and 503s it answers."""
    fields = {"max_connections": max_connections, "header_timeout": header_timeout, "admitted": set()}
    if on_reject is not None:
        fields["on_reject"] = staticmethod(on_reject)
    return type("GuardedH11Protocol", (GuardedH11Protocol,), fields)


def http_config(
    app,
    max_connections: int,
    header_timeout: float | None = HEADER_TIMEOUT_S,
    log_level: str = "info",
    on_reject=None,
):
    """uvicorn's configuration for the app: the guarded h11 protocol (above), and an idle connection closed
    KEEP_ALIVE_S after its last response."""
    import uvicorn

    return uvicorn.Config(
        app,
        http=protocol_class(max_connections, header_timeout, on_reject),
        # no route speaks WebSocket; and an upgraded connection would leave the protocol without connection_lost,
        # keeping its place under the cap for good (with websockets installed, uvicorn's "auto" would upgrade)
        ws="none",
        lifespan="off",
        log_level=log_level,
        # the drain (cli/serve.py's _server) has ended every stream by now; this bounds only a client that reads nothing
        timeout_graceful_shutdown=HTTP_CLOSE_TIMEOUT_S,
        timeout_keep_alive=KEEP_ALIVE_S,
        # limit_concurrency stays unset: the protocol's cap replaces it (the two would count connections twice)
    )
