"""The mutable state of one app: its engine and the draining flag."""

from __future__ import annotations

from dataclasses import dataclass

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

    @property
    def ready(self) -> bool:
        return self.started and self.engine.ready and not self.draining
