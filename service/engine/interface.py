"""The one interface between the HTTP side (service/api) and the device side (service/engine).

Every protocol's routes (/v1, /v2) call an `Engine`; they never see batchers, runtimes or processes.
Two implementations:
- `LocalEngine` (engine/local.py): models, batchers and the device thread in this process. Used by
  `VAE_HTTP_WORKERS=0` and by the in-process tests (`TestClient(create_app(settings))`).
- `RemoteEngine` (engine/remote.py): a client of the inference process (engine/server.py), used by
  each HTTP worker process, so rows from every worker share the same batches.

Operations are those of the model families (service/families/base.py has their inputs, options and
outputs): encode, decode, sample, reconstruct, log_likelihood, anomaly_score. Each runs whole in the
process that owns the device, so a request crosses the process boundary once each way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from service.artifacts import Manifest, version_key
from service.families import DEFAULT_CHUNK, NO_OPTIONS, Arrays, Operation, Options

log = logging.getLogger(__name__)


# -- errors: HTTP-agnostic; service/api/errors.py maps each to one status ------------------------------------
class EngineError(Exception):
    """Base of the errors an engine raises on purpose."""


class QueueFull(EngineError):
    """Admitting this work would overflow a queue or miss its deadline; retry after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class TooExpensive(EngineError):
    """The request alone needs more device time than its deadline allows; retrying cannot help."""


class DeadlineExceeded(EngineError):
    """The work was not finished before its deadline; what was left of it was dropped."""


class BatchFailed(EngineError):
    """The batch holding (some of) these rows raised in the runtime."""


class EngineClosed(EngineError):
    """The engine is shutting down (drain timeout or stop): retry on another replica."""


class EngineUnavailable(EngineError):
    """The inference process is not connected (starting, crashed, restarting): retry shortly."""


class UnknownModel(EngineError):
    """No such model (or version) is served."""


class OperationFailed(EngineError):
    """The operation ran but its result cannot be used (e.g. the model gave non-finite log-likelihoods)."""


ERROR_TYPES: dict[str, type[EngineError]] = {cls.__name__: cls for cls in (
    QueueFull, TooExpensive, DeadlineExceeded, BatchFailed, EngineClosed, EngineUnavailable, UnknownModel,
    OperationFailed)}


@dataclass(frozen=True)
class ModelInfo:
    """What the HTTP side knows of one served model version (no sessions, no batchers)."""

    manifest: Manifest
    runtime: str  # "onnx" | "torchscript"
    device: str  # "cpu" | "cuda:0"
    runtime_details: dict[str, Any] = field(default_factory=dict)
    # Measured at warm-up and while serving: seconds of device time per row of each graph.
    seconds_per_row: dict[str, float] = field(default_factory=dict)
    chunk: int = DEFAULT_CHUNK  # importance samples per log-weights row (the family's work() needs it)


class Engine(Protocol):
    """What the routes need from the device side."""

    # Called with the engine's readiness as it changes (an HTTP worker's slot among its peers).
    on_ready_change: Callable[[bool], None]

    @property
    def ready(self) -> bool:
        """True when models are loaded, warmed up and reachable."""
        ...

    @property
    def models(self) -> Mapping[str, Mapping[str, ModelInfo]]:
        """name -> version -> info, for every served version."""
        ...

    @property
    def refused(self) -> Mapping[str, str]:
        """version folder -> why its artifact was refused (VAE_ON_BAD_MODEL=skip)."""
        ...

    def check_admission(self, model: str, version: str, operation: Operation, *, deadline: float,
                        items: int = 1, options: Options = NO_OPTIONS) -> None:
        """Cheap early check before the body is read (`items` images, latents or samples): raise
        QueueFull / TooExpensive / EngineClosed / EngineUnavailable at once."""
        ...

    async def infer(self, model: str, version: str, operation: Operation, inputs: Arrays, *,
                    deadline: float, options: Options = NO_OPTIONS) -> Arrays:
        """Run one operation of one request; `deadline` is a time.monotonic() value."""
        ...

    async def start(self) -> None: ...

    async def abort_pending(self) -> None:
        """Answer everything still waiting with EngineClosed (the drain deadline passed)."""
        ...

    async def close(self) -> None: ...


# What an HTTP worker logs each time it becomes ready ("HTTP worker 0 ready to serve"): tests and scripts
# wait for every worker's line.
WORKER_READY = "ready to serve"


@dataclass
class WorkerSlot:
    """One HTTP worker's flag in a table shared by all workers (a multiprocessing Array of bytes)."""

    index: int
    flags: Any  # multiprocessing.Array("b", workers): 1 = that worker is connected to the engine

    def set_ready(self, ready: bool) -> None:
        if ready and not self.flags[self.index]:
            log.info("HTTP worker %d %s", self.index, WORKER_READY)
        self.flags[self.index] = 1 if ready else 0

    def all_ready(self) -> bool:
        return all(self.flags[:])


def default_version(models: Mapping[str, Mapping[str, ModelInfo]], name: str) -> str | None:
    """The highest version of `name`, or None if it is not served."""
    versions = models.get(name)
    return max(versions, key=version_key) if versions else None
