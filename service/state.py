"""The mutable state of one app: loaded models and the ready/draining flags."""

from __future__ import annotations

from dataclasses import dataclass

from service.config import Settings
from service.metrics import Metrics
from service.registry import ModelRegistry


@dataclass
class AppState:
    settings: Settings
    metrics: Metrics
    registry: ModelRegistry | None = None  # set once every model is loaded and warmed up
    draining: bool = False  # set on SIGTERM / shutdown: /readyz 503, new /v1 work refused

    @property
    def ready(self) -> bool:
        return self.registry is not None and not self.draining
