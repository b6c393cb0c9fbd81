"""The uvicorn server of one HTTP worker (or of the single process with VAE_HTTP_WORKERS=0).

On SIGTERM or Ctrl-C the server first marks itself draining (/readyz 503, new model work refused
with 503), keeps listening for VAE_DRAIN_DELAY_S so load balancers see it leave, lets in-flight
requests finish within VAE_DRAIN_TIMEOUT_S, answers what is left 503, then exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import math
import signal
import socket
import sys
import threading
from types import FrameType

import uvicorn

from service import gc_tuning, signals
from service.api.app import create_app
from service.api.http_protocol import http_protocol
from service.api.state import AppState
from service.config import Settings
from service.engine.interface import WorkerSlot
from service.logs import configure_logging
from service.metrics import enable_multiprocess
from service.supervisor import worker_socket

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """A uvicorn server that flips the app to draining the moment it is told to stop.

    Supervised (an HTTP worker), the supervisor tells it (signals.DRAIN, service/signals.py) and a
    SIGTERM or SIGINT that reaches the worker itself is passed on to the supervisor; alone
    (VAE_HTTP_WORKERS=0), SIGTERM and SIGINT act directly.
    """

    def __init__(self, config: uvicorn.Config, state: AppState) -> None:
        super().__init__(config)
        self.app_state = state

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """uvicorn's handler of SIGTERM and SIGINT."""
        if signals.current is not None:
            signals.current.request_stop()
            return
        self.drain(sig, now=sig != signal.SIGTERM)

    def on_drain_signal(self, sig: int, frame: FrameType | None) -> None:
        assert signals.current is not None
        self.drain(signal.SIGTERM, now=signals.current.drains_now())

    def drain(self, sig: int, now: bool) -> None:
        """Start draining; now=False keeps the port open (answering 503) for VAE_DRAIN_DELAY_S first.
        Asked again while draining, skip what is left of the delay."""
        delay = self.app_state.settings.drain_delay_s
        if not self.app_state.draining:
            self.app_state.draining = True
            log.info("signal %d: draining (readyz 503, new requests refused); port closes in %.1fs, "
                     "in-flight requests get up to %.1fs", sig, 0.0 if now else delay,
                     self.app_state.settings.drain_timeout_s)
            if delay > 0 and not now:
                # Keep listening (answering 503) so load balancers see readyz fail before the port
                # closes; a second signal or a Ctrl-C skips the wait.
                timer = threading.Timer(delay, self._exit_now, (sig, None))
                timer.daemon = True
                timer.start()
                return
        self._exit_now(sig, None)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)  # the lifespan (the models loaded), then listening
        gc_tuning.settle()  # what start-up built is kept from then on (service/gc_tuning.py)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """Uvicorn's shutdown (stop listening, wait for in-flight requests), with a drain deadline.

        At VAE_DRAIN_TIMEOUT_S every request still waiting on the engine is answered 503 (retry
        elsewhere) instead of being cut off, then uvicorn's own timeout (a little later) cancels
        anything left and the lifespan shutdown runs.
        """
        loop = asyncio.get_running_loop()
        aborting: list[asyncio.Task[None]] = []

        def abort() -> None:
            log.warning("drain timeout: answering the remaining requests 503")
            self.app_state.abort_uploads()
            aborting.append(loop.create_task(self.app_state.engine.abort_pending()))

        handle = loop.call_later(self.app_state.settings.drain_timeout_s, abort)
        try:
            await super().shutdown(sockets)
        finally:
            handle.cancel()
            for task in aborting:
                await task

    def _exit_now(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        # Uvicorn re-raises captured signals after shutdown, so the process would die "killed by
        # SIGTERM" (status 143). A completed drain is an orderly exit: status 0, as orchestrators expect.
        self._captured_signals = [s for s in self._captured_signals if s != signal.SIGTERM]


def uvicorn_config(app: object, settings: Settings, **kwargs: object) -> uvicorn.Config:
    return uvicorn.Config(app, log_config=None, access_log=False, lifespan="on", server_header=False,
                          timeout_graceful_shutdown=math.ceil(settings.drain_timeout_s) + 2,
                          http=http_protocol(settings.header_timeout_s, settings.coalesce_writes),
                          backlog=2048, **kwargs)  # type: ignore[arg-type]


def serve_single_process(settings: Settings) -> int:
    """Everything in this process: HTTP, the models and the device thread (VAE_HTTP_WORKERS=0)."""
    app = create_app(settings)
    server = DrainingServer(uvicorn_config(app, settings, host=settings.host, port=settings.port),
                            app.state.service)
    server.run()
    return 0 if server.started else 3


def run_worker(settings: Settings, sock: socket.socket, engine_endpoint: str | None, metrics_dir: str,
               slot: WorkerSlot) -> None:
    """Entry point of an HTTP worker process (a forked child of the supervisor); sock: the supervisor's
    (shared and listening, or the port's reservation when each worker listens on its own);
    engine_endpoint: the shared inference process, or None to load and run the models in this worker."""
    configure_logging(settings.log_level, settings.json_logs)
    enable_multiprocess(metrics_dir)
    slot.set_ready(False)
    if settings.listen_per_worker:
        sock = worker_socket(sock)
    app = create_app(settings, engine_endpoint, slot)
    server = DrainingServer(uvicorn_config(app, settings), app.state.service)
    signal.signal(signals.DRAIN, server.on_drain_signal)
    server.run(sockets=[sock])
    sys.exit(0 if server.started else 3)
