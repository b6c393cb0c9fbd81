"""uvicorn's HTTP protocol with two fixes: JSON errors for unparseable requests, and a lingering close.

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
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

LINGER_TOTAL_S = 5.0  # at most this long after an early answer (nginx's lingering_time is 30 s)
LINGER_IDLE_S = 1.0  # or until the caller has sent nothing for this long (nginx's lingering_timeout: 5 s)


class LingeringTransport:
    """The connection's transport, whose close() lingers when the request body is still arriving."""

    def __init__(self, transport: asyncio.Transport, protocol: JsonErrorHttpToolsProtocol) -> None:
        self._transport = transport
        self._protocol = protocol

    def __getattr__(self, name: str) -> Any:  # everything but close() and is_closing() is the transport's
        return getattr(self._transport, name)

    def close(self) -> None:
        if self._protocol.should_linger():
            self._protocol.start_lingering(self._transport)
        else:
            self._transport.close()

    def is_closing(self) -> bool:
        return self._protocol.lingering or self._transport.is_closing()


class JsonErrorHttpToolsProtocol(HttpToolsProtocol):
    """HttpToolsProtocol whose 400 for unparseable requests is JSON and whose early answers linger."""

    lingering = False
    _linger_timer: asyncio.TimerHandle | None = None
    _linger_until = 0.0
    _last_data = 0.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(LingeringTransport(transport, self))  # type: ignore[arg-type]

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
        super().connection_lost(exc)

    def shutdown(self) -> None:
        if not self.lingering:  # a lingering connection closes on its own, within LINGER_TOTAL_S
            super().shutdown()

    def send_400_response(self, msg: str) -> None:
        body = orjson.dumps({"error": {"code": "bad_request", "message": f"malformed HTTP request: {msg}",
                                       "request_id": None}})
        content = [STATUS_LINE[400]]
        for name, value in self.server_state.default_headers:
            content.extend([name, b": ", value, b"\r\n"])
        content.extend([b"content-type: application/json\r\n",
                        b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
                        b"connection: close\r\n", b"\r\n", body])
        self.transport.write(b"".join(content))
        self.transport.close()
