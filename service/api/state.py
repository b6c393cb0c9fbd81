"""The mutable state of one app: its engine and the draining flag."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from starlette.requests import Request

from service.config import Settings
from service.engine.interface import Engine
from service.metrics import Metrics


@dataclass
class AppState:
    settings: Settings
    metrics: Metrics
    engine: Engine
    started: bool = False  # the lifespan has started the engine (its models may still be loading)
    draining: bool = False  # set on SIGTERM / shutdown: /readyz 503, new model work refused
    # With several HTTP workers on one port: whether every worker is connected to the engine (a load
    # balancer cannot tell the workers apart, so the service is ready only when all of them are).
    peers_ready: Callable[[], bool] | None = None
    # Set by the request middleware: answer every request still sending its body 503 (drain deadline),
    # and whether this worker is at its in-flight limit (readiness says so).
    abort_uploads: Callable[[], None] = lambda: None
    saturated: Callable[[], bool] = lambda: False

    @property
    def ready(self) -> bool:
        peers = self.peers_ready is None or self.peers_ready()
        return self.started and self.engine.ready and not self.draining and peers


async def app_state(request: Request) -> AppState:
    """FastAPI dependency: the state of the app serving this request."""
    return request.app.state.service
