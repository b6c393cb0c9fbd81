"""RemoteEngine: the Engine interface of an HTTP worker, as a client of the inference process.

One DEALER socket per worker carries every request (matched to replies by id). zmq's socket monitor
reports the connection: connected -> the worker asks for the model table and becomes ready;
disconnected (the inference process crashed or is restarting) -> not ready, and every request in
flight fails at once with EngineUnavailable (503), never hangs. zmq reconnects by itself when the
restarted inference process binds again after its warm-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from service.config import Settings
from service.engine.interface import (
    ERROR_TYPES,
    DeadlineExceeded,
    EngineClosed,
    EngineError,
    EngineUnavailable,
    ModelInfo,
    QueueFull,
    TooExpensive,
)
from service.engine.ipc import Outbox, messages, unpack
from service.families import NO_OPTIONS, Arrays, Family, Operation, Options, family_for
from service.logs import request_id_var
from service.metrics import Metrics

log = logging.getLogger(__name__)
REPLY_GRACE_S = 1.0  # the engine enforces deadlines itself; this only covers an engine that stalls
START_WAIT_S = 2.0  # how long a starting worker waits for the engine before it takes connections


class RemoteEngine:
    """Talks to the inference process at `endpoint` (ipc://...)."""

    def __init__(self, settings: Settings, endpoint: str, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.endpoint = endpoint
        self._metrics = metrics  # counts this worker's own (pre-body) refusals in vae_rejections_total
        self._ctx: zmq.asyncio.Context | None = None
        self._socket: zmq.asyncio.Socket | None = None
        self._ids = itertools.count()
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._connected = False
        self._infos: dict[str, dict[str, ModelInfo]] = {}
        self._refused: dict[str, str] = {}
        self._described = False
        self._describing: asyncio.Task[None] | None = None
        self.on_ready_change: Callable[[bool], None] = lambda ready: None
        # (model, version, graph) -> (seconds until that queue drains, seconds per row, when estimated)
        self._load: dict[tuple[str, str, str], tuple[float, float, float]] = {}
        self._outbox = Outbox(self._send_now)
        # Rows this worker has in the engine per (model, version, graph), for admission before any load
        # report has come back (a burst arrives faster than the engine can answer).
        self._own_rows: dict[tuple[str, str, str], int] = {}
        self._families: dict[tuple[str, str], Family] = {}  # the cost formula of each served model

    # -- Engine interface ---------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self._connected and self._described

    @property
    def models(self) -> Mapping[str, Mapping[str, ModelInfo]]:
        return self._infos

    @property
    def refused(self) -> Mapping[str, str]:
        return self._refused

    async def start(self) -> None:
        self._ctx = zmq.asyncio.Context()
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # queue nothing while disconnected: refuse at once instead
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        sock.connect(self.endpoint)
        self._socket = sock
        self._tasks = [asyncio.create_task(self._receive()), asyncio.create_task(self._watch(monitor))]
        # A (re)started worker accepts connections once its start-up is done (its own socket starts
        # listening, or it joins the shared one); accepting them before it reached the engine would
        # answer 503 to work its healthy peers could serve. Wait for the engine first, bounded: while
        # the engine is still loading, /healthz must answer.
        deadline = time.monotonic() + START_WAIT_S
        while not self.ready and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    def check_admission(self, model: str, version: str, operation: Operation, *, deadline: float,
                        items: int = 1, options: Options = NO_OPTIONS) -> None:
        """Refuse at once when the engine's last load report says a queue this request needs drains
        after its deadline. Rows per graph come from the model family's work(), as in the engine."""
        if not self.ready:
            raise EngineUnavailable("the inference process is not ready (starting or restarting)")
        info = self._infos.get(model, {}).get(version)
        family = self._families.get((model, version))
        if info is None or family is None:
            return  # unknown here: the engine answers 404
        now = time.monotonic()
        left = (deadline - now) * self.settings.admission_share
        for graph, rows in family.work(operation, items, options).items():
            key = (model, version, graph)
            drain_s, per_row_s, at = self._load.get(key, (0.0, info.seconds_per_row.get(graph, 0.0), now))
            # The larger of: the queue as last reported (drained since at the same pace), and what this
            # worker alone has sent since, counted once per worker (its peers see a similar share of load).
            own = self._own_rows.get(key, 0) * per_row_s * max(1, self.settings.worker_processes)
            alone = rows * per_row_s
            if alone > left:  # even on an idle device: retrying cannot help (what the engine answers too)
                self._count_refusal(model, version, graph, "too_expensive_before_body")
                raise TooExpensive(f"{model}:{version}/{operation}: this request needs about {alone:.2f}s of "
                                   f"device time, more than its deadline allows ({left:.2f}s); send fewer "
                                   "images or a smaller k")
            remaining = max(drain_s - (now - at), own) + alone
            if remaining > left:
                self._count_refusal(model, version, graph, "queue_estimate_before_body")
                raise QueueFull(f"{model}:{version}/{operation}: the {graph} queue needs about "
                                f"{remaining:.1f}s "
                                f"to drain, after this request's deadline ({left:.1f}s left)",
                                max(1, min(60, math.ceil(remaining - left))))

    def _count_refusal(self, model: str, version: str, graph: str, reason: str) -> None:
        """vae_rejections_total for a refusal this worker makes from load reports, before the body is
        read; its own reason labels keep it apart from the engine's (queue_full, too_expensive, ...)."""
        if self._metrics is not None:
            self._metrics.rejections.labels(model=model, version=version, graph=graph, reason=reason).inc()

    async def infer(self, model: str, version: str, operation: Operation, inputs: Arrays, *,
                    deadline: float, options: Options = NO_OPTIONS) -> Arrays:
        if not self.ready or self._socket is None:
            raise EngineUnavailable("the inference process is not ready (starting or restarting); "
                                    "retry shortly")
        request_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        work = self._work(model, version, operation, inputs, options)
        for key, rows in work.items():
            self._own_rows[key] = self._own_rows.get(key, 0) + rows
        try:
            self._outbox.put((), {
                "kind": "infer", "id": request_id, "model": model, "version": version, "op": operation,
                "inputs": inputs, "deadline": deadline, "options": options,
                "request_id": request_id_var.get()})
            timeout = max(0.0, deadline - time.monotonic()) + REPLY_GRACE_S
            try:
                reply = await asyncio.wait_for(future, timeout)
            except TimeoutError:
                self._cancel(request_id)
                raise DeadlineExceeded(f"{model}:{version}/{operation}: no answer before the deadline"
                                       ) from None
            except asyncio.CancelledError:
                self._cancel(request_id)  # the client left: the engine drops the queued rows
                raise
        finally:
            self._pending.pop(request_id, None)
            for key, rows in work.items():
                self._own_rows[key] -= rows
        if "error" in reply:
            name, message, retry_after = reply["error"]
            cls = ERROR_TYPES.get(name, EngineError)
            raise cls(message, retry_after) if cls is QueueFull else cls(message)
        return reply["outputs"]

    async def abort_pending(self) -> None:
        self._fail_pending(EngineClosed("the service is shutting down; retry on another replica"))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._fail_pending(EngineClosed("the service is shutting down"))
        if self._ctx is not None:
            self._ctx.destroy(linger=0)  # closes the DEALER and its monitor socket too

    # -- internals ----------------------------------------------------------------------------------------
    def _work(self, model: str, version: str, operation: Operation, inputs: Arrays,
              options: Options) -> dict[tuple[str, str, str], int]:
        """(model, version, graph) -> rows this request puts on the engine's batchers."""
        family = self._families.get((model, version))
        if family is None:
            return {}
        items = options.n if operation == "sample" else len(next(iter(inputs.values())))
        work = family.work(operation, items, options)
        return {(model, version, graph): rows for graph, rows in work.items()}

    def _cancel(self, request_id: int) -> None:
        if self._connected:
            self._outbox.put((), {"kind": "cancel", "id": request_id})

    def _send_now(self, route: list[bytes], frames: list[Any]) -> None:
        """Send without waiting (NOBLOCK); if the engine is not connected, fail what was in the message."""
        assert self._socket is not None
        sent = self._socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)

        def failed(done: asyncio.Future[Any]) -> None:
            if done.cancelled() or done.exception() is None:
                return
            for message in messages(unpack(frames)):
                future = self._pending.get(message.get("id", -1))
                if future is not None and not future.done():
                    future.set_exception(EngineUnavailable("the inference process is not connected; "
                                                           "retry shortly"))

        sent.add_done_callback(failed)

    def _fail_pending(self, exc: Exception) -> None:
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(exc)

    async def _receive(self) -> None:
        assert self._socket is not None
        while True:
            frames = await self._socket.recv_multipart(copy=False)
            try:
                message = unpack(frames)
                received = messages(message)
            except Exception:
                log.exception("unreadable reply from the inference process")
                continue
            if "load" in message:  # once per message: the engine's load report of that tick
                self._load.update(message["load"])
            for message in received:
                if message.get("kind") == "models_changed":  # a rescan in the engine: fetch the new table
                    self._describing = asyncio.create_task(self._describe())
                    continue
                future = self._pending.get(message.get("id", -1))
                if future is not None and not future.done():
                    future.set_result(message)

    async def _watch(self, monitor: zmq.asyncio.Socket) -> None:
        while True:
            event = parse_monitor_message(await monitor.recv_multipart())
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._connected = True
                self._describing = asyncio.create_task(self._describe())
            elif event["event"] == zmq.EVENT_DISCONNECTED and self._connected:
                self._connected = self._described = False
                self.on_ready_change(False)
                self._load.clear()
                log.error("lost the inference process; answering 503 until it is back")
                self._fail_pending(EngineUnavailable(
                    "the inference process stopped while handling this request; it is being restarted, "
                    "retry shortly"))

    async def _describe(self) -> None:
        """Fetch the model table from the engine; ready once it arrives."""
        assert self._socket is not None
        request_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            self._outbox.put((), {"kind": "describe", "id": request_id})
            reply = await asyncio.wait_for(future, 30.0)
        except (zmq.ZMQError, TimeoutError, EngineError) as exc:
            log.warning("could not describe the engine (%s); waiting for the next connection", exc)
            return
        finally:
            self._pending.pop(request_id, None)
        self._infos, self._refused = reply["models"], reply["refused"]
        self._families = {(name, version): family_for(info.manifest, info.chunk)
                          for name, versions in self._infos.items() for version, info in versions.items()}
        self._described = self._connected
        self.on_ready_change(self.ready)
        log.info("connected to the inference process: %s", ", ".join(
            f"{n}:{v}" for n, versions in self._infos.items() for v in versions))
