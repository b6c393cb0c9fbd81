"""Liveness, readiness and metrics: open unless VAE_AUTH_OPS (with VAE_API_KEYS) is set."""

from __future__ import annotations

from fastapi import APIRouter, Response

from service.api.auth import auth_dependencies
from service.api.errors import Unavailable
from service.api.schemas import Liveness, Readiness, error_responses
from service.api.state import AppState

# Paths that are not model work: never refused while draining, never counted against admission.
# Every other path (every protocol's model routes) is subject to drain, admission and body limits.
OPS_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/docs", "/docs/oauth2-redirect", "/redoc",
                       "/openapi.json", "/v2/health/live", "/v2/health/ready", "/explore"})
OPS_PREFIXES = ("/explore/",)  # the explorer's static files (service/explorer)


def is_ops_path(path: str) -> bool:
    return path in OPS_PATHS or path.startswith(OPS_PREFIXES)


def not_ready_reason(state: AppState) -> str | None:
    """Why the service cannot take work now, or None when it can."""
    if state.draining:
        return "shutting down"
    if not state.engine.ready:
        return "models are still loading, or the inference process is restarting"
    if not state.ready:
        return "an HTTP worker is not connected to the inference process yet"
    if state.saturated():
        return "at capacity: every request slot is busy"
    return None


def build_ops_router(state: AppState) -> APIRouter:
    protect = state.settings.auth_ops and bool(state.settings.api_keys)
    router = APIRouter(tags=["operations"], dependencies=auth_dependencies(state.settings) if protect else [],
                       responses=error_responses(401) if protect else None)

    @router.get("/healthz", response_model=Liveness, summary="Liveness")
    async def get_health() -> Liveness:
        """200 while the process is alive (even while loading or draining); the models are in /readyz."""
        return Liveness(status="ok")

    @router.get("/readyz", response_model=Readiness, summary="Readiness", responses=error_responses(503))
    async def get_ready() -> Readiness:
        """200 when every model is loaded, warmed up and reachable; 503 before, during a restart of the
        inference process, and once shutdown begins."""
        reason = not_ready_reason(state)
        if reason is not None:
            raise Unavailable(reason)
        return Readiness(status="ready", models=sorted(state.engine.models))

    @router.get("/metrics", summary="Prometheus metrics", response_class=Response,
                responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                                 "description": "Prometheus text exposition format"}})
    async def get_metrics() -> Response:
        """Request counts and latencies, queue and compute time, batch sizes, queue depth (all processes)."""
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    return router
