"""Which served model version a request addresses, with its deadline: shared by every protocol."""

import time
from dataclasses import dataclass

import numpy as np
from fastapi import Request

from service.api.errors import InvalidInput, ModelNotFound, Unavailable
from service.api.state import AppState
from service.artifacts import MODEL_NAME_RE, VERSION_RE, Manifest
from service.config import Settings
from service.engine.interface import ModelInfo, default_version
from service.families import NO_OPTIONS, Operation, Options

TIMEOUT_HEADER = "x-request-timeout"
_TIMEOUT_KEY = TIMEOUT_HEADER.encode("latin-1")


@dataclass(frozen=True)
class ModelRef:
    """One served model version, resolved from the path, with the request's deadline."""

    name: str
    version: str
    info: ModelInfo
    state: AppState
    deadline: float  # time.monotonic() value

    @property
    def manifest(self) -> Manifest:
        return self.info.manifest

    def admit(self, operation: Operation, items: int = 1, options: Options = NO_OPTIONS) -> None:
        """Refuse at once (before the body is read) work the engine cannot finish in time."""
        self.state.engine.check_admission(self.name, self.version, operation, deadline=self.deadline,
                                          items=items, options=options)

    async def run(self, operation: Operation, inputs: dict[str, np.ndarray],
                  options: Options = NO_OPTIONS) -> dict[str, np.ndarray]:
        """One operation of this request, run whole by the engine."""
        out = await self.state.engine.infer(self.name, self.version, operation, inputs,
                                            deadline=self.deadline, options=options)
        if operation == "anomaly_score":  # every protocol's answers pass here: one count of the flags
            self.state.metrics.anomaly_results(self.name, self.version, options.method, out["is_anomaly"])
        return out


def request_deadline(request: Request, settings: Settings) -> float:
    """The server's deadline, or the caller's shorter one from `X-Request-Timeout: <seconds>`."""
    timeout = settings.request_timeout_s
    # The raw (lower-cased, ASGI) header list: starlette's Headers.get raises and catches a KeyError
    # inside when the header is absent, as on nearly every request.
    given = next((value.decode("latin-1") for name, value in request.scope.get("headers", ())
                  if name == _TIMEOUT_KEY), None)
    if given is not None:
        try:
            asked = float(given)
        except ValueError:
            asked = float("nan")
        if not 0.0 < asked < float("inf"):
            raise InvalidInput("header X-Request-Timeout must be a positive number of seconds, "
                               f"got {given!r}")
        timeout = min(timeout, asked)
    return time.monotonic() + timeout


def resolve_model(state: AppState, request: Request, model: str, version: str | None) -> ModelRef:
    """Look the model (and version) up among the served ones; names are never used to build paths."""
    engine = state.engine
    if not engine.ready:
        raise Unavailable("models are not loaded yet, or the inference process is restarting")
    served = sorted(engine.models)
    if not MODEL_NAME_RE.fullmatch(model):
        raise ModelNotFound(f"no such model; names match {MODEL_NAME_RE.pattern} (served: {served})")
    if model not in engine.models:
        raise ModelNotFound(f"model {model!r} is not served (served: {served})")
    versions = engine.models[model]
    version = version if version is not None else default_version(engine.models, model)
    if version is None or not VERSION_RE.fullmatch(version) or version not in versions:
        raise ModelNotFound(f"model {model!r} has no version {version!r} (served: {sorted(versions)})")
    return ModelRef(model, version, versions[version], state, request_deadline(request, state.settings))
