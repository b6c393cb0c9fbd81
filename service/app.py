"""create_app(): wires settings, model registry, middleware, error handlers and routers together.

Heavy work (verifying and loading models, warming up, starting batchers) happens in the lifespan,
never at import, so tests can build many apps and `with TestClient(app)` runs the real start-up.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from service.config import Settings
from service.errors import install_error_handlers
from service.metrics import Metrics
from service.middleware import RequestMiddleware
from service.registry import ModelRegistry
from service.routes import build_ops_router, build_v1_router
from service.schemas import ErrorResponse
from service.state import AppState

log = logging.getLogger(__name__)

DESCRIPTION = """
Serves exported VAE artifacts (`models/<name>/<version>/`, see docs/artifact-format.md).

* **encode** an image to its posterior mean and variance, **decode** latents, **sample** from the prior,
  **reconstruct** images;
* **log-likelihood**: importance-weighted estimate of log p(x) with k samples (seeded, batch-invariant);
* **anomaly-score**: -log p(x) with its percentile among normal data.

Images go in as multipart files (field `images`), JSON base64 (`{"images": [...]}`) or JSON arrays
(`{"inputs": [C x H x W floats]}`); options are query parameters. Every error answers
`{"error": {"code", "message", "request_id"}}`. All model work is dynamically batched.
"""


def _document_loaded_models(app: FastAPI, state: AppState) -> None:
    """List the loaded model names as the enum of every `{model}` path parameter once they are known.

    The schema then tells callers (and fuzzers) exactly which names exist; any other name is a 404.
    """
    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        schema = default_openapi()  # built once and cached by FastAPI; patched in place
        if state.registry is not None:
            names = sorted(state.registry.models)
            for operations in schema["paths"].values():
                for operation in operations.values():
                    for param in operation.get("parameters", []):
                        if param["in"] == "path" and param["name"] == "model":
                            param["schema"] = {**param["schema"], "enum": names, "examples": names[:1]}
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(settings: Settings | None = None) -> FastAPI:
    """A new app with its own metrics registry; models load when its lifespan starts."""
    settings = settings or Settings()
    state = AppState(settings=settings, metrics=Metrics())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.draining = False
        state.registry = await ModelRegistry.open(settings, state.metrics)
        log.info("ready: %s", ", ".join(sorted(state.registry.models)))
        try:
            yield
        finally:
            # Uvicorn gets here after in-flight requests finished (or the drain timeout passed).
            state.draining = True
            registry, state.registry = state.registry, None
            await registry.close()
            log.info("stopped")

    app = FastAPI(
        title="VAE service",
        version="1",
        description=DESCRIPTION,
        lifespan=lifespan,
        responses={500: {"model": ErrorResponse, "description": "Internal error"}},
    )
    app.state.service = state
    _document_loaded_models(app, state)
    install_error_handlers(app)
    app.include_router(build_ops_router(state))
    app.include_router(build_v1_router(settings))
    app.add_middleware(RequestMiddleware, state=state)
    if settings.cors_origins:
        # Added last, so it is outermost: preflights are answered before auth or draining checks.
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
                           expose_headers=["X-Request-ID", "Retry-After", "X-Seed"])
    return app
