"""HTTP routes: parse the request, call the model, shape the response. No tensor math here.

Routers are built per app from its settings, so the limits in the OpenAPI schema (k, n, number of
images) are exactly the limits enforced.
"""


import hmac
import secrets
import time
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.artifacts import MODEL_NAME_RE
from service.config import Settings
from service.errors import InferenceFailed, ModelNotFound, Unauthorized, Unavailable
from service.estimators import IWEstimate, bits_per_dim, iw_estimate, percentile_of, prior_latents, value_at
from service.images import encode_png_base64, grid_png
from service.inputs import ImageBatch, read_images, read_latents, resolve_labels
from service.registry import ServedModel
from service.schemas import (
    AnomalyResponse,
    AnomalyResult,
    DecodeResponse,
    EncodeResponse,
    EncodeResult,
    Health,
    ImageResult,
    LogLikelihoodResponse,
    LogLikelihoodResult,
    ModelDetail,
    ModelList,
    ModelSummary,
    ReconstructResponse,
    ReconstructResult,
    RequestModels,
    SampleResponse,
    SampleResult,
    error_responses,
)
from service.state import AppState

MAX_SEED = 2**63 - 1


def app_state(request: Request) -> AppState:
    return request.app.state.service


State = Annotated[AppState, Depends(app_state)]


def served_model(model: Annotated[str, Path(description="model name, as listed by GET /v1/models",
                                            examples=["mnist-vae"])], state: State) -> ServedModel:
    """Look the model up among the loaded ones; names are never used to build paths."""
    if state.registry is None:
        raise Unavailable("models are not loaded yet")
    if not MODEL_NAME_RE.fullmatch(model):
        raise ModelNotFound(f"no such model; names match {MODEL_NAME_RE.pattern} "
                            f"(loaded: {sorted(state.registry.models)})")
    served = state.registry.models.get(model)
    if served is None:
        raise ModelNotFound(f"model {model!r} is not loaded (loaded: {sorted(state.registry.models)})")
    return served


Model = Annotated[ServedModel, Depends(served_model)]


def _finite(arr: np.ndarray, what: str) -> np.ndarray:
    if not np.isfinite(arr).all():
        raise InferenceFailed(f"the model produced non-finite {what}")
    return arr


def _images(x: np.ndarray, fmt: str) -> list[dict[str, Any]]:
    """(N, C, H, W) -> one {"image": base64 PNG} or {"array": nested lists} per image."""
    _finite(x, "pixels")
    if fmt == "array":
        return [{"array": a.astype(np.float64).tolist()} for a in x]
    return [{"image": encode_png_base64(a)} for a in x]


def build_ops_router(state: AppState) -> APIRouter:
    """Liveness, readiness and metrics, outside /v1: open unless VAE_AUTH_OPS (with VAE_API_KEYS) is set."""
    protect = state.settings.auth_ops and bool(state.settings.api_keys)
    router = APIRouter(tags=["operations"], dependencies=_auth_dependency(state.settings) if protect else [],
                       responses=error_responses(401) if protect else None)

    @router.get("/healthz", response_model=Health, summary="Liveness")
    async def get_health() -> Health:
        """200 while the process is alive (even while loading or draining)."""
        return Health(status="ok")

    @router.get("/readyz", response_model=Health, summary="Readiness", responses=error_responses(503))
    async def get_ready() -> Health:
        """200 when every configured model is loaded and warmed up; 503 before and once shutdown begins."""
        if state.draining:
            raise Unavailable("shutting down")
        if state.registry is None:
            raise Unavailable("models are still loading")
        return Health(status="ready", models=sorted(state.registry.models))

    @router.get("/metrics", summary="Prometheus metrics", response_class=Response,
                responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                                 "description": "Prometheus text exposition format"}})
    async def get_metrics() -> Response:
        """Request counts and latencies, queue and compute time, batch sizes, queue depth."""
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    return router


def _auth_dependency(settings: Settings) -> list[Any]:
    """Bearer-key check for /v1 when keys are configured; keys are compared in constant time."""
    if not settings.api_keys:
        return []
    keys = [k.get_secret_value().encode() for k in settings.api_keys]
    bearer = HTTPBearer(auto_error=False, description="one of the keys in VAE_API_KEYS")

    async def require_api_key(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> None:
        if credentials is None:
            raise Unauthorized("missing header 'Authorization: Bearer <api key>'")
        given = credentials.credentials.encode()
        # Compare against every key (no early exit), so timing does not reveal which key nearly matched.
        matches = [hmac.compare_digest(given, key) for key in keys]
        if not any(matches):
            raise Unauthorized("invalid API key")

    return [Depends(require_api_key)]


def build_v1_router(settings: Settings) -> APIRouter:
    """The model API. Options are query parameters, so they work with JSON and multipart bodies alike."""
    models = RequestModels(settings)
    common = (401, 404, 429, 500, 503, 504)
    image_errors = error_responses(*common, 400, 413, 415, 422)
    inputs_body = models.inputs_openapi(settings.max_images)
    router = APIRouter(prefix="/v1", tags=["models"], dependencies=_auth_dependency(settings))

    def deadline() -> float:
        return time.monotonic() + settings.request_timeout_s

    Deadline = Annotated[float, Depends(deadline)]
    LabelQ = Annotated[str | None, Query(max_length=64, description="class name or index for every item "
                                                                    "(conditional models)")]
    SeedQ = Annotated[int | None, Query(ge=0, le=MAX_SEED, description="random if omitted; echoed back")]
    KQ = Annotated[int, Query(ge=1, le=settings.max_k, description="importance samples per image")]
    FormatQ = Annotated[Literal["png", "array"],
                        Query(description="png: base64 PNG; array: C x H x W floats")]

    async def iw(served: ServedModel, batch: ImageBatch, k: int, seed: int,
                 deadline: float) -> list[IWEstimate]:
        """IW estimates per image on the likelihood view of x (binarized when the manifest says so)."""
        threshold = served.manifest.preprocessing.binarize_threshold
        x = batch.x if threshold is None else (batch.x >= threshold).astype(np.float32)
        log_w = await served.log_weights(x, batch.y, k, seed, deadline)  # (N, k) float64
        estimates = [iw_estimate(row) for row in log_w]
        _finite(np.array([e.log_likelihood for e in estimates]), "log-likelihoods")
        return estimates

    @router.get("/models", response_model=ModelList, responses=error_responses(401, 503))
    async def list_models(state: State) -> ModelList:
        """Every loaded model with its input shape and latent size."""
        if state.registry is None:
            raise Unavailable("models are not loaded yet")
        return ModelList(models=[ModelSummary(**_summary(m)) for m in state.registry.models.values()])

    @router.get("/models/{model}", response_model=ModelDetail, responses=error_responses(401, 404, 503))
    async def get_model(served: Model) -> ModelDetail:
        """Manifest metadata, training metrics, and the runtime, device and batching settings in use."""
        return _detail(served, settings)

    @router.post("/models/{model}/encode", response_model=EncodeResponse, responses=image_errors,
                 openapi_extra=inputs_body)
    async def encode_images(request: Request, served: Model, deadline: Deadline, label: LabelQ = None
                            ) -> EncodeResponse:
        """Posterior q(z|x) = N(mean, diag variance) of each image, in order."""
        served.check_capacity("encoder")
        batch = await read_images(request, served.manifest, label, settings, models)
        mean, log_var = await served.encode(batch.x, batch.y, deadline)
        mean = _finite(mean.astype(np.float64), "means")
        log_var = log_var.astype(np.float64)
        variance = _finite(np.exp(log_var), "variances")  # exp overflows only for absurd log-variances
        results = [EncodeResult(mean=m.tolist(), variance=v.tolist(), log_variance=lv.tolist())
                   for m, v, lv in zip(mean, variance, log_var, strict=True)]
        return EncodeResponse(model=served.manifest.name, version=served.manifest.version, results=results)

    @router.post("/models/{model}/decode", response_model=DecodeResponse, response_model_exclude_none=True,
                 responses=error_responses(*common, 400, 413, 415, 422),
                 openapi_extra=models.latents_openapi())
    async def decode_latents(request: Request, served: Model, deadline: Deadline, label: LabelQ = None,
                             format: FormatQ = "png") -> DecodeResponse:
        """E[x|z] for each latent vector, as base64 PNG or arrays."""
        served.check_capacity("decoder")
        z, y = await read_latents(request, served.manifest, label, models)
        x = await served.decode(z, y, deadline)
        results = [ImageResult(**r) for r in _images(x, format)]
        return DecodeResponse(model=served.manifest.name, version=served.manifest.version, results=results)

    @router.get("/models/{model}/sample", response_model=SampleResponse, response_model_exclude_none=True,
                responses={**error_responses(*common, 422),
                           200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
                                 "description": "JSON samples, or one PNG grid with format=grid"}})
    async def sample_images(
        served: Model, deadline: Deadline,
        n: Annotated[int, Query(ge=1, le=settings.max_n, description="number of samples")] = 16,
        seed: SeedQ = None,
        temperature: Annotated[float, Query(ge=0.0, le=100.0, allow_inf_nan=False,
                                            description="z = temperature * eps")] = 1.0,
        format: Annotated[Literal["png", "array", "grid"], Query(
            description="png/array: JSON; grid: one image/png of all samples for a browser")] = "png",
        label: LabelQ = None,
    ) -> Any:
        """Samples from the prior, decoded to E[x|z]; without label a conditional model cycles the classes."""
        m = served.manifest
        seed = secrets.randbits(63) if seed is None else seed
        z = prior_latents(seed, n, m.latent_dim, temperature)  # (n, D)
        if m.labels is not None and label is None:
            y: np.ndarray | None = np.arange(n, dtype=np.int64) % len(m.labels)
        else:
            y = resolve_labels(m, n, label, None)
        x = await served.decode(z, y, deadline)
        if format == "grid":
            png = grid_png(_finite(x, "pixels"))
            return Response(png, media_type="image/png", headers={"X-Seed": str(seed)})
        names = [None] * n if y is None or m.labels is None else [m.labels[int(i)] for i in y]
        results = [SampleResult(**r, latent=zi.astype(np.float64).tolist(), label=name)
                   for r, zi, name in zip(_images(x, format), z, names, strict=True)]
        return SampleResponse(model=m.name, version=m.version, seed=seed, temperature=temperature,
                              results=results)

    @router.post("/models/{model}/reconstruct", response_model=ReconstructResponse, responses=image_errors,
                 openapi_extra=inputs_body, response_model_exclude_none=True)
    async def reconstruct_images(request: Request, served: Model, deadline: Deadline, label: LabelQ = None,
                                 format: FormatQ = "png") -> ReconstructResponse:
        """Decode the posterior mean of each image; report squared errors against the (grey) input."""
        served.check_capacity("encoder")
        batch = await read_images(request, served.manifest, label, settings, models)
        mean, _ = await served.encode(batch.x, batch.y, deadline)
        x_hat = await served.decode(mean, batch.y, deadline)
        sq = (x_hat.astype(np.float64) - batch.x.astype(np.float64)) ** 2  # (N, C, H, W)
        sse = _finite(sq.reshape(len(batch), -1).sum(axis=1), "errors")
        results = [ReconstructResult(**r, mse=float(s / served.manifest.data_dims), sse=float(s))
                   for r, s in zip(_images(x_hat, format), sse, strict=True)]
        m = served.manifest
        return ReconstructResponse(model=m.name, version=m.version, results=results)

    @router.post("/models/{model}/log-likelihood", response_model=LogLikelihoodResponse,
                 responses=image_errors, openapi_extra=inputs_body)
    async def estimate_log_likelihood(request: Request, served: Model, deadline: Deadline,
                                      k: KQ = settings.default_k, seed: SeedQ = None, label: LabelQ = None
                                      ) -> LogLikelihoodResponse:
        """Importance-weighted log p(x) in nats with k samples from q(z|x), the ELBO and a standard error."""
        m = served.manifest
        served.check_capacity("log_weights", k)
        batch = await read_images(request, m, label, settings, models)
        seed = secrets.randbits(63) if seed is None else seed
        estimates = await iw(served, batch, k, seed, deadline)
        results = [LogLikelihoodResult(log_likelihood=e.log_likelihood, elbo=e.elbo, k=e.k,
                                       bits_per_dim=bits_per_dim(e.log_likelihood, m.data_dims),
                                       standard_error=e.standard_error) for e in estimates]
        binarized = m.preprocessing.binarize_threshold is not None
        return LogLikelihoodResponse(model=m.name, version=m.version, k=k, seed=seed, binarized=binarized,
                                     results=results)

    @router.post("/models/{model}/anomaly-score", response_model=AnomalyResponse, responses=image_errors,
                 openapi_extra=inputs_body)
    async def score_anomalies(
        request: Request, served: Model, deadline: Deadline,
        k: Annotated[int | None, Query(ge=1, le=settings.max_k,
                                       description="default: the manifest's calibration k")] = None,
        seed: SeedQ = None, label: LabelQ = None,
        threshold_percentile: Annotated[float | None, Query(
            ge=0.0, le=100.0, allow_inf_nan=False,
            description=f"calibration percentile of the threshold (default {settings.anomaly_percentile})",
        )] = None,
    ) -> AnomalyResponse:
        """-log p(x) per image, its percentile among normal data, and whether it passes the threshold."""
        m = served.manifest
        served.check_capacity("log_weights", k or 1)
        batch = await read_images(request, m, label, settings, models)
        if k is None:  # the calibration's k, so scores compare with the calibration percentiles
            k = min(m.calibration.k if m.calibration else settings.default_k, settings.max_k)
        seed = secrets.randbits(63) if seed is None else seed
        pct = settings.anomaly_percentile if threshold_percentile is None else threshold_percentile
        cal = m.calibration
        threshold = value_at(pct, cal.percentiles, cal.values) if cal else None
        results = []
        for e in await iw(served, batch, k, seed, deadline):
            score = -e.log_likelihood
            results.append(AnomalyResult(
                score=score, standard_error=e.standard_error,
                percentile=percentile_of(score, cal.percentiles, cal.values) if cal else None,
                threshold=threshold, is_anomaly=None if threshold is None else bool(score > threshold)))
        return AnomalyResponse(model=m.name, version=m.version, k=k, seed=seed, threshold_percentile=pct,
                               calibration_k=cal.k if cal else None, results=results)

    return router


def _summary(served: ServedModel) -> dict[str, Any]:
    m = served.manifest
    return {"name": m.name, "version": m.version, "kind": m.kind, "latent_dim": m.latent_dim,
            "input": {"channels": m.channels, "height": m.height, "width": m.width},
            "likelihood": m.raw.get("likelihood", {"family": m.likelihood}),
            "labels": list(m.labels) if m.labels is not None else None}


def _detail(served: ServedModel, settings: Settings) -> ModelDetail:
    m, raw = served.manifest, served.manifest.raw
    cal = raw.get("calibration") or None
    return ModelDetail(
        **_summary(served),
        created_at=raw.get("created_at"),
        architecture=(raw.get("model") or {}).get("architecture"),
        preprocessing=raw.get("preprocessing", {}),
        calibration={k: cal.get(k) for k in ("k", "n", "mean", "std", "source")} if cal else None,
        metrics=raw.get("metrics") or {},
        training=raw.get("training") or {},
        runtime=served.runtime.name,
        device=served.runtime.device,
        runtime_details=served.runtime.details,
        batching={
            "max_batch_size": settings.max_batch_size, "max_queue_delay_ms": settings.max_queue_delay_ms,
            "max_queue_size": settings.max_queue_size, "iw_chunk_size": settings.iw_chunk_size,
            "max_batch_samples": settings.max_batch_samples, "max_queue_samples": settings.max_queue_samples,
            "request_timeout_s": settings.request_timeout_s,
        },
        limits={
            "default_k": settings.default_k, "max_k": settings.max_k,
            "anomaly_default_k": m.calibration.k if m.calibration else settings.default_k,
            "max_n": settings.max_n, "max_images": settings.max_images,
            "max_upload_bytes": settings.max_upload_bytes, "max_image_pixels": settings.max_image_pixels,
            "anomaly_threshold_percentile": settings.anomaly_percentile,
        },
    )
