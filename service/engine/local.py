"""LocalEngine: the Engine interface over a ModelRegistry in this process and this event loop.

The inference process (engine/server.py) serves one of these to every HTTP worker; an HTTP worker with
engines per worker (VAE_ENGINE_PLACEMENT), the single-process mode (`VAE_HTTP_WORKERS=0`) and the
in-process tests call it directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Mapping

from service import gc_tuning
from service.config import Settings
from service.engine.interface import EngineUnavailable, ModelInfo
from service.engine.registry import ModelRegistry
from service.families import NO_OPTIONS, Arrays, Operation, Options
from service.metrics import Metrics

log = logging.getLogger(__name__)


class LocalEngine:
    """Loads, warms up and serves every configured model in this process."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.registry: ModelRegistry | None = None
        self._infos: dict[str, dict[str, ModelInfo]] = {}
        self.on_models_change: Callable[[], None] = lambda: None  # the inference process tells its workers
        self.on_ready_change: Callable[[bool], None] = lambda ready: None  # an HTTP worker's readiness slot
        self._rescan_lock = asyncio.Lock()
        self._background: set[asyncio.Task[None]] = set()

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
        # New model versions without a restart: on SIGHUP (in the process's main thread: the inference
        # process, an HTTP worker running its own engine, or the whole service with VAE_HTTP_WORKERS=0)
        # and, if set, every VAE_MODEL_POLL_S.
        if threading.current_thread() is threading.main_thread():
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.request_rescan)
        if self.settings.model_poll_s > 0:
            self._spawn(self._poll())
        self.on_ready_change(True)

    def request_rescan(self) -> None:
        """Look for new, changed and removed model versions soon (a signal handler's entry point)."""
        self._spawn(self.rescan())

    async def rescan(self) -> None:
        """One rescan of the models directory at a time (registry.rescan); tell the listener on change."""
        async with self._rescan_lock:
            if self.registry is None:
                return
            if await self.registry.rescan(self.settings, self.metrics):
                gc_tuning.refreeze()  # the replaced models were frozen at start-up (service/gc_tuning.py)
                self._infos = self.registry.infos()
                self.on_models_change()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.settings.model_poll_s)
            try:
                await self.rescan()
            except Exception:  # a rescan must never end the polling, nor the process
                log.exception("rescanning the models failed")

    def _spawn(self, coroutine: object) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)  # type: ignore[arg-type]
        self._background.add(task)
        task.add_done_callback(self._background.discard)

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
        self.on_ready_change(False)
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        registry, self.registry = self.registry, None
        if registry is not None:
            await registry.close()
