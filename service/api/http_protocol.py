"""uvicorn's HTTP protocol with three fixes: JSON errors for unparseable requests, a lingering close,
and a deadline for request headers; and one speed-up: a response's head and body in one send()
(LingeringTransport; 1.02-1.44x 1-image encodes at 64 connections, docs/benchmarks.md).

* uvicorn answers malformed HTTP (a bad request line, broken headers) with a text/plain 400 before any
  ASGI app sees the request; callers that parse every error as JSON then fail twice. The body here is
  the /v1 error shape (there is no request id: the request never existed as far as the app knows).
* Some answers go out while the request body is still arriving and close the connection: 408 for an
  upload too slow for its deadline, and any early answer (413, 429, 503 before the body) when the
  server shuts down. If the caller is still sending, its next bytes reach a closed socket and the
  server's kernel answers with a reset: the caller's send fails and the answer it had received but
  not yet read is usually lost with the connection (asyncio's reader discards it; most clients only
  read after sending the whole body). So, as RFC 9112 section 9.6 asks and nginx's lingering_close
  does, such a connection is half-closed instead (the answer, then FIN) and what the caller still
  sends is read and discarded until it stops (LINGER_IDLE_S without data), closes, or LINGER_TOTAL_S
  pass; then the connection is closed. A shutdown waits for lingering connections like for any other
  (uvicorn waits until every connection is closed), so it takes at most LINGER_TOTAL_S longer.
  Early answers that keep the connection open (413 from the Content-Length, 429 before the body)
  need none of this: uvicorn reads and drops the rest of that body, then serves the next request.
* uvicorn bounds the idle time between requests (keep-alive) and the app bounds the body
  (middleware), but nothing bounds the request line and headers: a slowloris caller that sends a
  header byte every few seconds, or opens connections and sends nothing, holds each connection (and
  a file descriptor) forever. Here a request's line and headers must arrive within header_timeout_s
  of its first byte (a connection's first request: of the connection opening), else 408 (JSON) and
  close; a new connection that has not started a request within header_timeout_s is closed without
  an answer (there is no request to answer), as nginx's client_header_timeout and Go's
  ReadHeaderTimeout do.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

LINGER_TOTAL_S = 5.0  # at most this long after an early answer (nginx's lingering_time is 30 s)
LINGER_IDLE_S = 1.0  # or until the caller has sent nothing for this long (nginx's lingering_timeout: 5 s)


class LingeringTransport:
    """The connection's transport, whose close() lingers when the request body is still arriving, and
    whose writes of one event-loop turn go out as one.

    uvicorn writes a response's status line and headers when the app sends http.response.start and the
    body when it sends http.response.body, and the transport sends each at once: two send() calls and
    two TCP segments for every small answer. Here writes are held and sent as one when the response is
    complete (the protocol's on_response_complete, called right after the last body write), or at the
    end of the loop's turn for what has not completed by then (a streamed body, 100 Continue), or
    before anything that ends the connection (close, write_eof): order and content never change, and a
    finished response never waits for the rest of its request's task (coalesce_writes).
    """

    def __init__(self, transport: asyncio.Transport, protocol: JsonErrorHttpToolsProtocol) -> None:
        self._transport = transport
        self._protocol = protocol
        self._held: list[bytes] = []  # written this turn of the loop, not yet handed to the transport

    def __getattr__(self, name: str) -> Any:  # all but write/close/write_eof/is_closing is the transport's
        return getattr(self._transport, name)

    def write(self, data: bytes) -> None:
        if not self._protocol.coalesce_writes:
            self._transport.write(data)
            return
        if not self._held:
            self._protocol.loop.call_soon(self.flush)
        self._held.append(data)

    def flush(self) -> None:
        if self._held:
            data = b"".join(self._held)
            self._held.clear()
            if not self._transport.is_closing():
                self._transport.write(data)

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def close(self) -> None:
        self.flush()
        if self._protocol.should_linger():
            self._protocol.start_lingering(self._transport)
        else:
            self._transport.close()

    def is_closing(self) -> bool:
        return self._protocol.lingering or self._transport.is_closing()


class JsonErrorHttpToolsProtocol(HttpToolsProtocol):
    """HttpToolsProtocol whose 400 for unparseable requests is JSON and whose early answers linger."""

    header_timeout_s = 10.0  # Settings.header_timeout_s, set by http_protocol()
    coalesce_writes = True  # LingeringTransport joins each loop turn's writes (Settings.coalesce_writes)
    lingering = False
    _linger_timer: asyncio.TimerHandle | None = None
    _linger_until = 0.0
    _last_data = 0.0
    _header_timer: asyncio.TimerHandle | None = None
    _request_begun = False  # a request's first byte has arrived, its headers not all yet

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(LingeringTransport(transport, self))  # type: ignore[arg-type]
        self._start_header_timer()  # the first request must begin, and its headers arrive, in time

    # -- header deadline ---------------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._request_begun = True
        if self._header_timer is None:  # a later request on a kept-alive connection
            self._start_header_timer()

    def on_response_complete(self) -> None:
        self.transport.flush()  # the response, head and body, in one send() (LingeringTransport)
        super().on_response_complete()

    def on_headers_complete(self) -> None:
        self._request_begun = False
        self._cancel_header_timer()
        super().on_headers_complete()

    def _start_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self._request_begun:
            self._send_json_error(408, "request_timeout", f"the request line and headers did not arrive "
                                  f"within {self.header_timeout_s:g} s (VAE_HEADER_TIMEOUT_S)")
        else:  # a connection that never started a request: nothing to answer
            self.transport.close()

    def should_linger(self) -> bool:
        """Linger only for an answer sent while the request body was still arriving."""
        cycle = self.cycle
        return not self.lingering and cycle is not None and cycle.more_body and cycle.response_complete

    def start_lingering(self, transport: asyncio.Transport) -> None:
        """Half-close (the queued answer, then FIN), then read and discard until the caller stops."""
        self.lingering = True
        try:
            transport.write_eof()
            transport.resume_reading()
        except (OSError, RuntimeError):
            transport.close()
            return
        now = self.loop.time()
        self._last_data, self._linger_until = now, now + LINGER_TOTAL_S
        self._linger_timer = self.loop.call_later(LINGER_IDLE_S, self._linger_check, transport)

    def _linger_check(self, transport: asyncio.Transport) -> None:
        now = self.loop.time()
        next_check = min(self._linger_until, self._last_data + LINGER_IDLE_S)
        if now >= next_check:
            transport.close()
        else:
            self._linger_timer = self.loop.call_later(next_check - now, self._linger_check, transport)

    def data_received(self, data: bytes) -> None:
        if self.lingering:  # the rest of a request already answered: discard
            self._last_data = self.loop.time()
            return
        super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        self._cancel_header_timer()
        super().connection_lost(exc)

    def shutdown(self) -> None:
        if not self.lingering:  # a lingering connection closes on its own, within LINGER_TOTAL_S
            super().shutdown()

    def send_400_response(self, msg: str) -> None:
        self._send_json_error(400, "bad_request", f"malformed HTTP request: {msg}")

    def _send_json_error(self, status: int, code: str, message: str) -> None:
        """The /v1 error shape, then close: for requests the app never saw (no request id)."""
        body = orjson.dumps({"error": {"code": code, "message": message, "request_id": None}})
        content = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            content.extend([name, b": ", value, b"\r\n"])
        content.extend([b"content-type: application/json\r\n",
                        b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
                        b"connection: close\r\n", b"\r\n", body])
        self.transport.write(b"".join(content))
        self.transport.close()


def http_protocol(header_timeout_s: float, coalesce_writes: bool = True) -> type[JsonErrorHttpToolsProtocol]:
    """The protocol class uvicorn instantiates per connection, with this service's header deadline."""
    return type("HttpProtocol", (JsonErrorHttpToolsProtocol,), {"header_timeout_s": header_timeout_s,
                                                                 "coalesce_writes": coalesce_writes})
