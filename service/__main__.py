"""`python -m service` / `vae-serve`: start the service with uvicorn.

Flags override the environment (`VAE_*`); everything else comes from the environment. On SIGTERM or
Ctrl-C the server first marks itself draining (/readyz 503, new /v1 work refused with 503), lets
in-flight requests finish within VAE_DRAIN_TIMEOUT_S, then exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import signal
import socket
import sys
import threading
from types import FrameType

import uvicorn
from pydantic import ValidationError

from service.app import create_app
from service.artifacts import ArtifactError, discover
from service.config import Settings
from service.logs import configure_logging
from service.state import AppState


class DrainingServer(uvicorn.Server):
    """A uvicorn server that flips the app to draining the moment a shutdown signal arrives."""

    def __init__(self, config: uvicorn.Config, state: AppState) -> None:
        super().__init__(config)
        self.app_state = state

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        delay = self.app_state.settings.drain_delay_s
        if not self.app_state.draining:
            self.app_state.draining = True
            logging.getLogger(__name__).info(
                "signal %d: draining (readyz 503, new requests refused); port closes in %.1fs, in-flight "
                "requests get up to %.1fs", sig, delay, self.app_state.settings.drain_timeout_s)
            if delay > 0 and sig == signal.SIGTERM:
                # Keep listening (answering 503) so load balancers see readyz fail before the port
                # closes; a second SIGTERM or a Ctrl-C skips the wait.
                timer = threading.Timer(delay, self._exit_now, (sig, frame))
                timer.daemon = True
                timer.start()
                return
        self._exit_now(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """Uvicorn's shutdown (stop listening, wait for in-flight requests), with a drain deadline.

        At VAE_DRAIN_TIMEOUT_S the batchers stop: requests still queued or running are answered 503
        (retry elsewhere) instead of being cut off, then uvicorn's own timeout (a little later)
        cancels anything left and the lifespan shutdown runs.
        """
        loop = asyncio.get_running_loop()
        aborting: list[asyncio.Task[None]] = []

        def abort() -> None:
            registry = self.app_state.registry
            if registry is not None:
                logging.getLogger(__name__).warning("drain timeout: answering the remaining requests 503")
                aborting.append(loop.create_task(registry.stop_batchers()))

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


def parse_args(argv: list[str] | None) -> dict[str, object]:
    parser = argparse.ArgumentParser(prog="vae-serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", help="bind address (VAE_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (VAE_PORT, default 8000)")
    parser.add_argument("--models-dir", help="model repository (VAE_MODELS_DIR, default ./models)")
    parser.add_argument("--models", help="comma-separated name[:version] to load (VAE_MODELS, default all)")
    parser.add_argument("--runtime", choices=["onnx", "torchscript"], help="VAE_RUNTIME, default onnx")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="VAE_DEVICE, default auto")
    parser.add_argument("--log-level", help="VAE_LOG_LEVEL, default INFO")
    parser.add_argument("--json-logs", action="store_true", default=None, help="VAE_JSON_LOGS")
    args = vars(parser.parse_args(argv))
    return {k: v for k, v in args.items() if v is not None}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `vae-serve` console script."""
    overrides = parse_args(argv)
    try:
        settings = Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = "\n".join(f"  {'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}"
                             for e in exc.errors())
        print(f"vae-serve: invalid settings (environment variables VAE_<NAME> or flags):\n{problems}",
              file=sys.stderr)
        return 2
    try:  # the commonest mistake (no or wrong models directory) gets one line, not a traceback
        discover(settings.models_dir, settings.models)
    except ArtifactError as exc:
        print(f"vae-serve: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.json_logs)
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None, access_log=False,
                            lifespan="on", timeout_graceful_shutdown=math.ceil(settings.drain_timeout_s) + 2,
                            server_header=False)
    server = DrainingServer(config, app.state.service)
    server.run()
    return 0 if server.started else 3


if __name__ == "__main__":
    sys.exit(main())
