"""One pure-ASGI middleware for what every request needs before and after the routes.

- a request id (`X-Request-ID`: the caller's if sane, else a fresh one) on the response and in logs;
- while draining, model requests (every path but the operations paths, ops.OPS_PATHS, whatever the
  protocol) are refused with 503 before any work starts;
- at most `max_inflight_requests` model requests are handled at once; one more is answered 429 at
  once, before its body is read, so bodies and decoded images in memory stay bounded under any burst;
- the body limit: Content-Length is checked up front, and bytes are counted while streaming (a
  chunked upload cannot get around it); the count raises PayloadTooLarge inside the body reader;
- a client that disconnects after sending its body cancels the handler, so its queued rows are
  dropped from the batchers instead of being computed for nobody; one that disconnects while
  sending it ends the handler in the body reader (nothing was queued yet); both are logged as 499,
  not as errors;
- request count and latency metrics by route template, one access-log line, and a JSON 500 for
  anything unexpected (never a stack trace to the caller).

Pure ASGI rather than BaseHTTPMiddleware: it streams the body through untouched and keeps the
handler in the same task, so contextvars (the request id) reach the handlers and their logs.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import PayloadTooLarge, error_response
from service.api.ops import OPS_PATHS
from service.api.state import AppState
from service.logs import request_id_var

log = logging.getLogger("service.access")
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
CLIENT_CLOSED = 499  # nginx's convention for "client closed the connection before the response"


class RequestMiddleware:
    def __init__(self, app: ASGIApp, state: AppState) -> None:
        self.app = app
        self.state = state
        self.inflight = 0  # model requests between admission here and their response
        self.inflight_peak = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = dict((k.lower(), v) for k, v in scope.get("headers", []))
        incoming = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if _REQUEST_ID_RE.fullmatch(incoming) else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        response: dict[str, Any] = {"status": CLIENT_CLOSED, "started": False}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                response.update(status=message["status"], started=True)
                MutableHeaders(scope=message)["X-Request-ID"] = request_id
            await send(message)

        settings = self.state.settings
        path = scope["path"]
        counted = False
        try:
            limit = settings.max_upload_bytes
            declared = headers.get(b"content-length", b"").decode("latin-1")
            is_work = path not in OPS_PATHS
            if self.state.draining and is_work:
                await error_response(503, "unavailable", "the service is shutting down; retry on another "
                                     "replica", {"Retry-After": "1"}, path=path)(scope, receive, send_with_id)
            elif declared and (not declared.isdigit() or int(declared) > limit):
                message = f"request body of {declared} bytes exceeds the limit of {limit} bytes"
                await error_response(413, "payload_too_large", message, path=path)(
                    scope, receive, send_with_id)
            elif is_work and self.inflight >= settings.max_inflight_requests:
                self.state.metrics.rejections.labels("-", "-", "-", "inflight_limit").inc()
                message = (f"the service is at capacity ({self.inflight} requests in flight, limit "
                           f"{settings.max_inflight_requests}); retry after the Retry-After seconds")
                await error_response(429, "overloaded", message, {"Retry-After": "1"}, path=path)(
                    scope, receive, send_with_id)
            else:
                if is_work:
                    counted = True
                    self._enter()
                await self._call_app(scope, self._limited(receive, limit), send_with_id)
        except ClientDisconnect:
            # The client went away while sending its body: nothing was queued; 499 in the access log.
            response["status"] = CLIENT_CLOSED
        except Exception:
            log.exception("unhandled error")
            if not response["started"]:
                await error_response(500, "internal_error", "internal error; the request id is in the logs",
                                     path=path)(scope, receive, send_with_id)
        finally:
            if counted:
                self._leave()
            self._record(scope, response["status"], time.perf_counter() - started)
            request_id_var.reset(token)

    def _enter(self) -> None:
        self.inflight += 1
        self.inflight_peak = max(self.inflight_peak, self.inflight)
        self.state.metrics.inflight.set(self.inflight)
        self.state.metrics.inflight_peak.set(self.inflight_peak)

    def _leave(self) -> None:
        self.inflight -= 1
        self.state.metrics.inflight.set(self.inflight)

    @staticmethod
    def _limited(receive: Receive, limit: int) -> Receive:
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
            return message

        return limited_receive

    async def _call_app(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the app; once the body has been read, a disconnect of the client cancels it.

        Plain asyncio (one watcher task per request, started only once the body is in) rather than an
        anyio task group: this runs for every request, and the task group cost more than the route.
        """
        handler = asyncio.current_task()
        assert handler is not None
        watcher: asyncio.Task[None] | None = None
        state = {"disconnected": False, "responded": False}

        async def watch_disconnect() -> None:
            # The app has the whole body and will not call receive again, so the next message is
            # http.disconnect: the connection dropped, or (harmlessly) the response is complete.
            while (await receive())["type"] != "http.disconnect":
                pass
            if not state["responded"]:
                state["disconnected"] = True
                handler.cancel()

        def start_watching() -> None:
            nonlocal watcher
            if watcher is None:
                watcher = asyncio.get_running_loop().create_task(watch_disconnect())

        async def tracking_receive() -> Message:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                start_watching()
            return message

        async def tracking_send(message: Message) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                state["responded"] = True
            await send(message)

        if scope.get("method") in ("GET", "HEAD"):
            start_watching()  # these routes never read a body; any that was sent is skipped
        try:
            await self.app(scope, tracking_receive, tracking_send)
        except asyncio.CancelledError:
            if not state["disconnected"]:
                raise  # the server is cancelling us (shutdown): not ours to swallow
            handler.uncancel()
            raise ClientDisconnect() from None
        finally:
            if watcher is not None:
                watcher.cancel()

    def _record(self, scope: Scope, status: int, seconds: float) -> None:
        route = scope.get("route")
        endpoint = getattr(route, "path", None) or "unmatched"  # a template, never the raw path
        method = scope.get("method", "")
        metrics = self.state.metrics
        metrics.requests.labels(endpoint, method, str(status)).inc()
        metrics.request_latency.labels(endpoint, method, str(status)).observe(seconds)
        log.info("%s %s %d %.1fms", method, scope.get("path", ""), status, seconds * 1000.0)
