"""One pure-ASGI middleware for what every request needs before and after the routes.

- a request id (`X-Request-ID`: the caller's if sane, else a fresh one) on the response and in logs;
- while draining, model requests (every path but the operations paths, ops.is_ops_path, whatever the
  protocol) are refused with 503 before any work starts;
- admission by memory, not by count (api/memory_budget.py): a model request holds its body's bytes,
  and the decoder the pixels of its images, against this worker's budgets (`max_inflight_bytes`,
  `max_inflight_pixels`); past them it is answered 429 at once. What the work costs in time is the
  engine's deadline-aware admission. `max_inflight_requests` stays as a backstop on the count (429
  before the body is read). A request counts from the moment its whole body is in: uploads that stall
  never hold anything, so they cannot lock other callers out (they are bounded by the body deadline);
- the body: Content-Length is checked up front and bytes are counted while streaming (413); the body
  must arrive within `body_timeout_s` plus its length at `min_upload_bytes_per_s`, else 408 (and the
  connection is closed); a request still sending its body at the drain deadline gets 503;
- HTTP hygiene: HEAD is answered wherever GET is (the GET response without its body); a
  `Content-Encoding` other than identity is refused with 415 (no compressed bodies: no zip bombs); a
  trailing slash is ignored rather than redirected (a redirect would echo the Host header);
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
import itertools
import logging
import re
import time
import uuid
from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import (
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    ServiceError,
    Unavailable,
    error_response,
)
from service.api.memory_budget import MemoryBudget, Reservation, current_reservation
from service.api.ops import is_ops_path
from service.api.state import AppState
from service.logs import request_id_var

log = logging.getLogger("service.access")
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
CLIENT_CLOSED = 499  # nginx's convention for "client closed the connection before the response"


class RequestMiddleware:
    def __init__(self, app: ASGIApp, state: AppState) -> None:
        self.app = app
        self.state = state
        self.inflight = 0  # model requests whose body is in (or that have none), until their response
        self.inflight_peak = 0
        self._inflight_pending = False  # a write of the in-flight gauge is scheduled for this turn's end
        self.uploading: dict[_Body, None] = {}  # bodies being read: from the first read until complete
        settings = state.settings
        self.memory = MemoryBudget(settings.max_inflight_bytes, settings.max_inflight_pixels, state.metrics)
        state.abort_uploads = self.abort_uploads
        state.saturated = lambda: self.inflight >= state.settings.max_inflight_requests
        # Request ids: 32 hex digits like a uuid4's, a random prefix per process (each worker builds its
        # own middleware after the fork) and a counter: unique without a getrandom() call per request.
        prefix, counter = uuid.uuid4().hex[:16], itertools.count()
        self._new_id = lambda: f"{prefix}{next(counter):016x}"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = dict((k.lower(), v) for k, v in scope.get("headers", []))
        incoming = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if _REQUEST_ID_RE.fullmatch(incoming) else self._new_id()
        token = request_id_var.set(request_id)
        response: dict[str, Any] = {"status": CLIENT_CLOSED, "started": False}
        head = scope.get("method") == "HEAD"
        scope = _normalised(scope)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                response.update(status=message["status"], started=True)
                MutableHeaders(scope=message)["X-Request-ID"] = request_id
            elif head and message["type"] == "http.response.body":
                message = {**message, "body": b""}  # HEAD: the GET's headers, no body
            await send(message)

        settings = self.state.settings
        path = scope["path"]
        body: _Body | None = None
        try:
            limit = settings.max_upload_bytes
            declared = headers.get(b"content-length", b"").decode("latin-1")
            encoding = headers.get(b"content-encoding", b"identity").decode("latin-1").strip().lower()
            is_work = not is_ops_path(path)
            if self.state.draining and is_work:
                await error_response(503, "unavailable", "the service is shutting down; retry on another "
                                     "replica", {"Retry-After": "1"}, path=path)(scope, receive, send_with_id)
            elif encoding not in ("", "identity"):
                message = (f"Content-Encoding {encoding!r} is not accepted; send the body uncompressed "
                           "(images are compressed already)")
                await error_response(415, "unsupported_media_type", message, path=path)(
                    scope, receive, send_with_id)
            elif declared and (not declared.isdigit() or int(declared) > limit):
                message = f"request body of {declared} bytes exceeds the limit of {limit} bytes"
                await error_response(413, "payload_too_large", message, path=path)(
                    scope, receive, send_with_id)
            elif is_work and self.inflight >= settings.max_inflight_requests:
                self._refuse_inflight()
                await error_response(429, "overloaded", self._inflight_message(), {"Retry-After": "1"},
                                     path=path)(scope, receive, send_with_id)
            else:
                body = _Body(self, receive, limit, int(declared) if declared else None, is_work)
                if scope.get("method") in ("GET", "HEAD"):
                    body.complete()  # no body to wait for
                await self._call_app(scope, body, send_with_id)
        except ClientDisconnect:
            # The client went away while sending its body: nothing was queued; 499 in the access log.
            response["status"] = CLIENT_CLOSED
        except Exception:
            log.exception("unhandled error")
            if not response["started"]:
                await error_response(500, "internal_error", "internal error; the request id is in the logs",
                                     path=path)(scope, receive, send_with_id)
        finally:
            if body is not None:
                body.close()
            self._record(scope, response["status"], time.perf_counter() - started)
            request_id_var.reset(token)

    def _refuse_inflight(self) -> None:
        self.state.metrics.rejections.labels("-", "-", "-", "inflight_limit").inc()

    def _inflight_message(self) -> str:
        return (f"the service is at capacity ({self.inflight} requests in flight, limit "
                f"{self.state.settings.max_inflight_requests}); retry after the Retry-After seconds")

    def abort_uploads(self) -> None:
        """The drain deadline: every request still waiting for body bytes is answered 503."""
        for body in list(self.uploading):
            body.abort("shutdown")

    def _enter(self) -> None:
        self.inflight += 1
        if self.inflight > self.inflight_peak:
            self.inflight_peak = self.inflight
            self.state.metrics.inflight_peak.set(self.inflight_peak)
        self._publish_inflight_soon()

    def _leave(self) -> None:
        self.inflight -= 1
        self._publish_inflight_soon()

    def _publish_inflight_soon(self) -> None:
        """The in-flight gauge is written once per turn of the event loop, with the count at its end,
        rather than twice per request: what /metrics shows is the same (a scrape runs in a later turn)."""
        if not self._inflight_pending:
            self._inflight_pending = True
            asyncio.get_running_loop().call_soon(self._publish_inflight)

    def _publish_inflight(self) -> None:
        self._inflight_pending = False
        self.state.metrics.inflight.set(self.inflight)

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
        self.state.metrics.request_done(endpoint, method, status, seconds)
        log.info("%s %s %d %.1fms", method, scope.get("path", ""), status, seconds * 1000.0)


def _normalised(scope: Scope) -> Scope:
    """HEAD is served as GET (the body is dropped on the way out); a trailing slash is ignored."""
    path = scope["path"]
    if scope.get("method") != "HEAD" and not (len(path) > 1 and path.endswith("/")):
        return scope
    scope = dict(scope)
    if scope["method"] == "HEAD":
        scope["method"] = "GET"
    if len(path) > 1 and path.endswith("/"):
        scope["path"] = path.rstrip("/") or "/"
        scope["raw_path"] = scope["path"].encode("latin-1")
    return scope


class _Body:
    """The app's `receive` for one request: size limit, upload deadline, admission once complete.

    The deadline is a timer, not a wait_for around every receive: most bodies arrive in one message
    and the timer is cancelled at once; when it fires while the handler still waits for bytes, the
    handler is cancelled and the cancellation becomes a 408 (or a 503 at the drain deadline).
    """

    def __init__(self, owner: RequestMiddleware, receive: Receive, limit: int, declared: int | None,
                 counted: bool) -> None:
        self.owner = owner
        self.receive = receive
        self.limit = limit
        self.declared = declared
        self.counted = counted  # a model request: enters the in-flight count once its body is in
        self.received = 0
        self.entered = False
        self.done = False
        self.started = time.monotonic()
        self.timer: asyncio.TimerHandle | None = None
        self.aborted: str | None = None  # "timeout" | "shutdown" when the timer or the drain cancelled us
        self.task: asyncio.Task[Any] | None = None  # the handler reading the body (from its first read)
        self.waiting = False  # the handler is waiting for body bytes now
        self.reservation: Reservation | None = None  # bytes and pixels held while the request is handled

    async def __call__(self) -> Message:
        uploading = not self.done  # once the body is in, only the disconnect watcher reads: no deadline
        if uploading:
            if self.aborted is not None:  # the deadline passed while the handler was between two reads
                raise self._aborted_error()
            if self.task is None:  # the first read: the deadline starts, the drain can abort us
                self.task = asyncio.current_task()
                self.owner.uploading[self] = None
                self._arm()
        self.waiting = uploading
        try:
            message = await self.receive()
        except asyncio.CancelledError:
            if not uploading or self.aborted is None:
                raise
            task = asyncio.current_task()
            assert task is not None
            task.uncancel()
            raise self._aborted_error() from None
        finally:
            self.waiting = False
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.limit:
                raise PayloadTooLarge(f"request body exceeds the limit of {self.limit} bytes")
            if not message.get("more_body", False):
                self.complete()
            elif self.timer is not None and self.declared is None:
                self._arm()  # chunked: the deadline moves with the bytes received
        else:
            self.complete()
        return message

    def _aborted_error(self) -> ServiceError:
        if self.aborted == "shutdown":
            return Unavailable("the service is shutting down while this request was still being sent; "
                               "retry on another replica")
        settings = self.owner.state.settings
        return RequestTimeout(f"the request body did not arrive in time ({self.received} bytes in "
                              f"{time.monotonic() - self.started:.1f}s; bodies must arrive within "
                              f"{settings.body_timeout_s:g}s plus {settings.min_upload_bytes_per_s} "
                              "bytes/s)")

    def _arm(self) -> None:
        settings = self.owner.state.settings
        expected = max(self.declared or 0, self.received)
        deadline = self.started + settings.body_timeout_s + expected / settings.min_upload_bytes_per_s
        if self.timer is not None:
            self.timer.cancel()
        loop = asyncio.get_running_loop()
        self.timer = loop.call_at(loop.time() + max(0.0, deadline - time.monotonic()), self.abort, "timeout")

    def abort(self, reason: str) -> None:
        """The deadline or the drain: a handler waiting for bytes is cancelled (its read raises 408 or
        503); one busy between two reads gets the error at its next read."""
        if self.done or self.aborted is not None:
            return
        self.aborted = reason
        if self.waiting and self.task is not None:
            self.task.cancel()

    def complete(self) -> None:
        """The whole body is in: stop the deadline, and count the request (or refuse it: 429)."""
        if self.done:
            return
        self.done = True
        self.owner.uploading.pop(self, None)
        if self.timer is not None:
            self.timer.cancel()
        if not self.counted:
            return
        owner = self.owner
        if owner.inflight >= owner.state.settings.max_inflight_requests:
            owner._refuse_inflight()
            raise Overloaded(owner._inflight_message())
        reservation = Reservation(owner.memory)
        reservation.add("bytes", self.received)  # 429 when the worker holds too many bytes already
        self.reservation = reservation
        current_reservation.set(reservation)  # the handler's task: the image decoder adds its pixels
        self.entered = True
        owner._enter()

    def close(self) -> None:
        self.owner.uploading.pop(self, None)
        if self.timer is not None:
            self.timer.cancel()
        if self.entered:
            self.entered = False
            self.owner._leave()
        if self.reservation is not None:
            self.reservation.release()
            self.reservation = None
