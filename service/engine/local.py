"""LocalEngine: the Engine interface over a ModelRegistry in this process and this event loop.

The inference process (engine/server.py) serves one of these to every HTTP worker; the single-process
mode (`VAE_HTTP_WORKERS=0`) and the in-process tests call it directly.
"""

from __future__ import annotations

from collections.abc import Mapping

from service.config import Settings
from service.engine.interface import EngineUnavailable, ModelInfo
from service.engine.registry import ModelRegistry
from service.families import NO_OPTIONS, Arrays, Operation, Options
from service.metrics import Metrics


class LocalEngine:
    """Loads, warms up and serves every configured model in this process."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.registry: ModelRegistry | None = None
        self._infos: dict[str, dict[str, ModelInfo]] = {}

    @property
    def ready(self) -> bool:
        return self.registry is not None

    @property
    def models(self) -> Mapping[str, Mapping[str, ModelInfo]]:
        return self._infos

    @property
    def refused(self) -> Mapping[str, str]:
        return self.registry.refused if self.registry is not None else {}

    async def start(self) -> None:
        self.registry = await ModelRegistry.open(self.settings, self.metrics)
        self._infos = self.registry.infos()

    def _registry(self) -> ModelRegistry:
        if self.registry is None:
            raise EngineUnavailable("models are not loaded yet")
        return self.registry

    def check_admission(self, model: str, version: str, operation: Operation, *, deadline: float,
                        items: int = 1, options: Options = NO_OPTIONS) -> None:
        self._registry().get(model, version).check_admission(operation, items, options, deadline)

    async def infer(self, model: str, version: str, operation: Operation, inputs: Arrays, *,
                    deadline: float, options: Options = NO_OPTIONS) -> Arrays:
        return await self._registry().get(model, version).infer(operation, inputs, deadline, options)

    def refresh_infos(self) -> dict[str, dict[str, ModelInfo]]:
        """Model infos with the current measured costs (sent to HTTP workers on request)."""
        self._infos = self._registry().infos()
        return self._infos

    async def abort_pending(self) -> None:
        if self.registry is not None:
            await self.registry.stop_batchers()

    async def close(self) -> None:
        registry, self.registry = self.registry, None
        if registry is not None:
            await registry.close()
