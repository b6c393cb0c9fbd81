"""The inference process: owns the runtime sessions and the batchers of one device.

It loads and warms up every model (a LocalEngine), then binds its ROUTER socket, so an HTTP worker
that is connected is talking to a ready engine. Every `infer` message becomes a task on this
process's event loop that submits rows to the shared batchers, so rows of all HTTP workers share
batches. The message carries a whole operation (service/families), which runs here with all its graph
calls. Each outgoing message (the replies of one event-loop tick) carries a small load report
(estimated drain time per graph) that the workers use to refuse hopeless requests before reading
their bodies.

Messages (engine/ipc.py), worker -> engine:
    {"kind": "describe", "id"}                         -> {"id", "models", "refused"}
    {"kind": "infer", "id", "model", "version", "op", "inputs", "deadline", "options", "request_id"}
                                                       -> {"id", "outputs"} | {"id", "error"}
    {"kind": "cancel", "id"}                           (the caller left: drop its queued rows)
engine -> every worker that has described it, unasked:
    {"kind": "models_changed"}                         (a rescan changed the served set: describe again)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import sys
import time
from multiprocessing.synchronize import Event
from typing import Any

import zmq
import zmq.asyncio

from service import gc_tuning, signals
from service.artifacts import ArtifactError
from service.config import Settings
from service.engine.interface import BatchFailed, EngineError, ModelInfo
from service.engine.ipc import Outbox, error_fields, messages, unpack
from service.engine.local import LocalEngine
from service.logs import request_id_var
from service.metrics import Metrics

log = logging.getLogger("service.engine")
STARTUP_FAILED = 3  # exit status: a model was refused (VAE_ON_BAD_MODEL=fail) or none could be loaded


class EngineServer:
    """The ROUTER loop in front of a LocalEngine."""

    def __init__(self, engine: LocalEngine, endpoint: str) -> None:
        self.engine = engine
        self.endpoint = endpoint
        self._ctx = zmq.asyncio.Context()
        self._socket = self._ctx.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.SNDHWM, 0)  # never drop replies; admission bounds the work instead
        self._socket.setsockopt(zmq.RCVHWM, 0)
        self._tasks: dict[tuple[bytes, int], asyncio.Task[None]] = {}
        self._peers: set[bytes] = set()  # workers that described us: told when the served models change
        engine.on_models_change = self.announce_models_change
        self._outbox = Outbox(self._send_now, report=lambda: {"load": self.load()})

    async def serve(self, stop: asyncio.Event) -> None:
        self._socket.bind(self.endpoint)
        receiver = asyncio.create_task(self._receive())
        try:
            await stop.wait()
        finally:
            receiver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await receiver
            await self.engine.abort_pending()  # everything still queued is answered 503, not dropped
            await asyncio.sleep(0)
            if self._tasks:
                await asyncio.wait(list(self._tasks.values()), timeout=2.0)
            self._socket.close(linger=200)
            self._ctx.destroy(linger=0)

    async def _receive(self) -> None:
        while True:
            frames = await self._socket.recv_multipart(copy=False)
            identity = frames[0].bytes
            try:
                received = messages(unpack(frames[1:]))
            except Exception:  # a peer speaking another protocol version: log and go on
                log.exception("unreadable message from an HTTP worker")
                continue
            for message in received:
                self._handle(identity, message)

    def _handle(self, identity: bytes, message: dict[str, Any]) -> None:
        kind = message.get("kind")
        key = (identity, message.get("id", -1))
        if kind == "infer":
            self._tasks[key] = asyncio.create_task(self._infer(identity, message))
        elif kind == "cancel":
            task = self._tasks.pop(key, None)
            if task is not None:
                task.cancel()
        elif kind == "describe":
            self._peers.add(identity)
            models = {name: {version: _for_http_workers(info) for version, info in versions.items()}
                      for name, versions in self.engine.refresh_infos().items()}
            self._send(identity, {"id": message["id"], "models": models,
                                  "refused": dict(self.engine.refused)})

    def announce_models_change(self) -> None:
        """Every worker describes the engine again (a worker that is gone never reads it: NOBLOCK)."""
        for identity in self._peers:
            self._send(identity, {"kind": "models_changed"})

    async def _infer(self, identity: bytes, message: dict[str, Any]) -> None:
        token = request_id_var.set(message.get("request_id", "-"))
        reply: dict[str, Any] = {"id": message["id"]}
        try:
            reply["outputs"] = await self.engine.infer(
                message["model"], message["version"], message["op"], message["inputs"],
                deadline=message["deadline"], options=message["options"])
        except asyncio.CancelledError:
            return  # the caller cancelled: nobody waits for a reply
        except EngineError as exc:
            reply["error"] = error_fields(exc)
        except Exception as exc:  # a bug, not an input problem: this request fails, the engine goes on
            log.exception("inference failed")
            reply["error"] = error_fields(BatchFailed(f"inference failed: {type(exc).__name__}"))
        finally:
            self._tasks.pop((identity, message["id"]), None)
            request_id_var.reset(token)
        self._send(identity, reply)

    def load(self) -> dict[tuple[str, str, str], tuple[float, float, float]]:
        """(model, version, graph) -> (seconds until its queue has drained, seconds per row, now)."""
        registry = self.engine.registry
        if registry is None:
            return {}
        now = time.monotonic()
        report = {}
        for (name, version), served in registry.models.items():
            for graph, batcher in served.batchers.items():
                drain = batcher.estimate_s(0) if batcher.busy else 0.0
                report[(name, version, graph)] = (drain, batcher.seconds_per_row, now)
        return report

    def _send(self, identity: bytes, message: dict[str, Any]) -> None:
        self._outbox.put((identity,), message)

    def _send_now(self, route: list[bytes], frames: list[Any]) -> None:
        # NOBLOCK: a reply to a worker that is gone fails at once instead of waiting; nobody to answer.
        sent = self._socket.send_multipart(route + frames, flags=zmq.NOBLOCK, copy=False)
        sent.add_done_callback(lambda f: f.cancelled() or f.exception())  # consume the error, if any


def _for_http_workers(info: ModelInfo) -> ModelInfo:
    """A model's info without what only the engine needs: the latent bank (the training images' codes,
    hundreds of KB) stays here, where the anomaly scores are computed."""
    cal = info.manifest.anomaly
    if cal is None:
        return info
    methods = {name: dataclasses.replace(c, latent_bank=None) for name, c in cal.methods.items()}
    manifest = dataclasses.replace(info.manifest, anomaly=dataclasses.replace(cal, methods=methods))
    return dataclasses.replace(info, manifest=manifest)


async def _main(settings: Settings, endpoint: str, ready: Event | None) -> int:
    metrics = Metrics()
    engine = LocalEngine(settings, metrics)
    try:
        await engine.start()
    except ArtifactError as exc:
        log.error("%s", exc)
        return STARTUP_FAILED
    gc_tuning.settle()  # the models are loaded: what start-up built is kept (service/gc_tuning.py)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Supervised, only the supervisor stops it (signals.DRAIN, once the HTTP workers have drained):
    # SIGTERM or SIGINT sent to the process group must not drop the work in flight.
    loop.add_signal_handler(signal.SIGTERM if signals.current is None else signals.DRAIN, stop.set)
    server = EngineServer(engine, endpoint)
    serving = asyncio.create_task(server.serve(stop))
    await asyncio.sleep(0)  # bound now
    log.info("inference process ready: %s", ", ".join(
        f"{name}:{version}" for name, versions in engine.models.items() for version in versions))
    if ready is not None:
        ready.set()
    await serving
    await engine.close()
    return 0


def run(settings: Settings, endpoint: str, ready: Event | None = None) -> None:
    """Entry point of the inference process (a child of the supervisor)."""
    if signals.current is None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; SIGTERM stops it
    try:
        import uvloop

        status = uvloop.run(_main(settings, endpoint, ready))
    except ImportError:
        status = asyncio.run(_main(settings, endpoint, ready))
    sys.exit(status)
