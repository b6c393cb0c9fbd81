"""create_app(): wires settings, the engine, middleware, error handlers and routers together.

Heavy work (loading models, or connecting to the inference process) happens in the lifespan, never
at import, so tests can build many apps and `with TestClient(app)` runs the real start-up.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from service.anomaly import METHODS
from service.api.errors import install_error_handlers
from service.api.fastpath import FastPath
from service.api.middleware import RequestMiddleware
from service.api.ops import build_ops_router
from service.api.schemas import ErrorResponse
from service.api.state import AppState
from service.api.v1 import ImageOperations, build_v1_router
from service.api.v2 import OPERATIONS as V2_OPERATIONS
from service.api.v2 import build_v2_health_router, build_v2_router
from service.config import Settings
from service.engine.interface import Engine, WorkerSlot
from service.explorer import build_explorer_router
from service.metrics import Metrics

log = logging.getLogger(__name__)

DESCRIPTION = """
Serves exported VAE artifacts (`models/<name>/<version>/`, see docs/artifact-format.md).

* **encode** an image to its posterior mean and variance, **decode** latents, **sample** from the prior,
  **reconstruct** images;
* **log-likelihood**: importance-weighted estimate of log p(x) with k samples (seeded, batch-invariant);
* **anomaly-score**: an anomaly score per image with its conformal p-value against held-out normal
  data and the decision at level alpha. Methods: METHOD_LIST, as each
  model's calibration offers; the default is per model (its manifest's `anomaly.default_method`), and
  the answer names the method used.

Images go in as multipart files (field `images`), JSON base64 (`{"images": [...]}`) or JSON arrays
(`{"inputs": [C x H x W floats]}`); options are query parameters. Every error answers
`{"error": {"code", "message", "request_id"}}`. All model work is dynamically batched.
""".replace("METHOD_LIST", ", ".join(f"`{m}`" for m in METHODS))  # the one list: service/anomaly.py


def _document_served_models(app: FastAPI, state: AppState) -> None:
    """List the served model names as the enum of every `{model}` path parameter once they are known.

    The schema then tells callers (and fuzzers) exactly which names exist; any other name is a 404.
    """
    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        schema = default_openapi()  # built once and cached by FastAPI; patched in place
        if state.engine.ready:
            names = sorted(state.engine.models)
            versions = sorted({v for name in names for v in state.engine.models[name]})
            v2_names = [f"{name}.{op}" for name in names for op in V2_OPERATIONS]
            enums = {"model": names, "version": versions, "name": v2_names}
            for operations in schema["paths"].values():
                for operation in operations.values():
                    for param in operation.get("parameters", []):
                        if param["in"] == "path" and param["name"] in enums:
                            values = enums[param["name"]]
                            param["schema"] = {**param["schema"], "enum": values, "examples": values[:1]}
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


class ServiceApp(FastAPI):
    """FastAPI with this service's own pure-ASGI layers in front of FastAPI's stack, for HTTP requests:
    [CORS ->] RequestMiddleware (request ids, drain, admission, body limits, metrics, access log) ->
    FastPath (the hot /v1 image routes) -> FastAPI (every other route, with its own middleware).

    In front rather than inside (app.add_middleware): profiled on a 1-image encode, FastAPI's own
    layers (telemetry check, error and body-limit middleware, exception middleware) cost the fast path
    about 8% of an HTTP worker without doing anything it needs.
    """

    front: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.front is not None:
            await self.front(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)

    async def through_fastapi(self, scope: Scope, receive: Receive, send: Send) -> None:
        await super().__call__(scope, receive, send)


def _make_engine(settings: Settings, metrics: Metrics, engine_endpoint: str | None) -> Engine:
    if engine_endpoint is not None:
        from service.engine.remote import RemoteEngine

        return RemoteEngine(settings, engine_endpoint, metrics)
    from service.engine.local import LocalEngine

    return LocalEngine(settings, metrics)


def create_app(settings: Settings | None = None, engine_endpoint: str | None = None,
               worker: WorkerSlot | None = None) -> FastAPI:
    """A new app with its own metrics registry.

    engine_endpoint: the inference process to talk to (an HTTP worker with a shared engine); None runs
    the models in this process (an HTTP worker with its own engine, single-process mode, in-process
    tests). worker: this HTTP worker's readiness slot among its peers.
    """
    settings = settings or Settings()
    metrics = Metrics()
    engine = _make_engine(settings, metrics, engine_endpoint)
    state = AppState(settings=settings, metrics=metrics, engine=engine)
    if worker is not None:
        state.peers_ready = worker.all_ready
        engine.on_ready_change = worker.set_ready

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.draining = False
        await state.engine.start()
        state.started = True
        try:
            yield
        finally:
            # Uvicorn gets here after in-flight requests finished (or the drain timeout passed).
            state.draining = True
            await state.engine.close()
            log.info("stopped")

    app = ServiceApp(
        title="VAE service",
        version="1",
        description=DESCRIPTION,
        lifespan=lifespan,
        responses={500: {"model": ErrorResponse, "description": "Internal error"}},
    )
    app.state.service = state
    _document_served_models(app, state)
    install_error_handlers(app)
    app.include_router(build_ops_router(state))
    operations = ImageOperations(settings)
    app.include_router(build_v1_router(settings, operations))
    app.include_router(build_v2_health_router(state))
    app.include_router(build_v2_router(settings))
    app.include_router(build_explorer_router())
    # Inside RequestMiddleware (request ids, drain, admission, body limits, metrics apply to both).
    front: ASGIApp = RequestMiddleware(FastPath(app.through_fastapi, state=state, operations=operations),
                                       state=state)
    if settings.cors_origins:
        # Outermost: preflights are answered before auth or draining checks.
        front = CORSMiddleware(front, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                               allow_headers=["Authorization", "Content-Type", "X-Request-ID",
                                              "X-Request-Timeout"],
                               expose_headers=["X-Request-ID", "Retry-After", "X-Seed"])
    app.front = front
    return app
