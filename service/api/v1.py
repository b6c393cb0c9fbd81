"""The /v1 model API: parse the request, call the engine, shape the response. No tensor math here.

Every model route exists twice: `/v1/models/{model}/...` (the model's highest version) and
`/v1/models/{model}/versions/{version}/...`. Routers are built per app from its settings, so the
limits in the OpenAPI schema (k, n, number of images) are exactly the limits enforced. Responses are
serialised with orjson straight from numpy arrays (the response models only document the shape).
"""


import math
import secrets
from collections.abc import Callable
from typing import Annotated, Any, Literal

import numpy as np
import orjson
from fastapi import APIRouter, Depends, Path, Query, Request, Response

from service.api.auth import auth_dependencies
from service.api.errors import InferenceFailed, InvalidInput, Unavailable
from service.api.images import encode_png_base64, grid_png
from service.api.inputs import read_images, read_latents, resolve_labels
from service.api.model_ref import ModelRef, resolve_model
from service.api.options import anomaly_options
from service.api.params import Params
from service.api.schemas import (
    AnomalyResponse,
    DecodeResponse,
    EncodeResponse,
    LogLikelihoodResponse,
    ModelDetail,
    ModelList,
    ReconstructResponse,
    RequestSchemas,
    SampleResponse,
    error_responses,
)
from service.api.state import AppState, app_state
from service.artifacts import Manifest
from service.config import Settings
from service.engine.interface import ModelInfo, default_version
from service.estimators import bits_per_dim
from service.families import Options, family_class, latent_space

State = Annotated[AppState, Depends(app_state)]


ModelPath = Annotated[str, Path(description="model name, as listed by GET /v1/models",
                                examples=["mnist-vae"])]
VersionPath = Annotated[str, Path(description="model version, as listed by GET /v1/models/{model}",
                                  examples=["1"])]


async def latest_version(request: Request, model: ModelPath, state: State) -> ModelRef:
    return resolve_model(state, request, model, None)


async def given_version(request: Request, model: ModelPath, version: VersionPath, state: State) -> ModelRef:
    return resolve_model(state, request, model, version)



def json_response(payload: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json",
                    headers=headers)


def _finite(arr: np.ndarray, what: str) -> np.ndarray:
    # A finite sum means every value is finite (an inf or NaN makes the sum inf or NaN); only a
    # non-finite sum needs the element-wise check, as a float32/64 sum can overflow on huge values.
    if not math.isfinite(arr.sum()) and not np.isfinite(arr).all():
        raise InferenceFailed(f"the model produced non-finite {what}")
    return arr


def _images(x: np.ndarray, fmt: str) -> list[dict[str, Any]]:
    """(N, C, H, W) -> one {"image": base64 PNG} or {"array": nested lists} per image."""
    _finite(x, "pixels")
    if fmt == "array":
        return [{"array": a} for a in x.astype(np.float64)]
    return [{"image": encode_png_base64(a)} for a in x]


def _summary(name: str, info: ModelInfo, versions: list[str]) -> dict[str, Any]:
    m = info.manifest
    space = latent_space(m)
    latent: dict[str, Any] = {"input": space.input, "shape": list(space.shape), "dtype": space.dtype}
    if space.upper is not None:
        latent["codebook_size"] = space.upper
    return {"name": name, "version": m.version, "versions": versions, "kind": m.kind, "family": m.family,
            "latent_dim": m.latent_dim, "latent": latent,
            "input": {"channels": m.channels, "height": m.height, "width": m.width},
            "likelihood": m.raw.get("likelihood", {"family": m.likelihood}),
            "labels": list(m.labels) if m.labels is not None else None}


def _detail(ref: ModelRef, settings: Settings) -> dict[str, Any]:
    m, raw = ref.manifest, ref.manifest.raw
    versions = sorted(ref.state.engine.models[ref.name])
    return {
        **_summary(ref.name, ref.info, versions),
        "created_at": raw.get("created_at"),
        "architecture": (raw.get("model") or {}).get("architecture"),
        "preprocessing": raw.get("preprocessing", {}),
        "anomaly": None if m.anomaly is None else {
            "k": m.anomaly.k, "alpha": m.anomaly.alpha, "default_method": m.anomaly.default_method,
            "min_alpha": m.anomaly.methods[m.anomaly.default_method].min_alpha,
            "methods": {name: {"n": c.n, "min_alpha": c.min_alpha} for name, c in m.anomaly.methods.items()}},
        "metrics": raw.get("metrics") or {},
        "training": raw.get("training") or {},
        "runtime": ref.info.runtime,
        "device": ref.info.device,
        "runtime_details": ref.info.runtime_details,
        "batching": {
            "max_batch_size": settings.max_batch_size, "max_queue_delay_ms": settings.max_queue_delay_ms,
            "max_queue_size": settings.max_queue_size, "iw_chunk_size": settings.iw_chunk_size,
            "max_batch_samples": settings.max_batch_samples, "max_queue_samples": settings.max_queue_samples,
            "request_timeout_s": settings.request_timeout_s,
        },
        "limits": {
            "default_k": settings.default_k, "max_k": settings.max_k,
            "anomaly_default_k": m.anomaly.k if m.anomaly else None,
            "max_n": settings.max_n, "max_images": settings.max_images,
            "max_upload_bytes": settings.max_upload_bytes, "max_image_pixels": settings.max_image_pixels,
        },
    }


def checked_include(manifest: Manifest, include: str | None) -> frozenset[str]:
    """The optional encode outputs asked for, refused (422) when the model's family has none of that name."""
    if include is None:
        return frozenset()
    space = latent_space(manifest)
    if include not in space.optional_outputs:
        have = ", ".join(sorted(space.optional_outputs)) or "none"
        raise InvalidInput(f"model {manifest.name} ({manifest.family} family) has no optional encode output "
                           f"{include!r} (it has: {have})")
    return frozenset({include})


def _with_labels(inputs: dict[str, np.ndarray], y: np.ndarray | None) -> dict[str, np.ndarray]:
    if y is not None:
        inputs["y"] = y
    return inputs


class ImageOperations:
    """The bodies of the hot image routes: called by FastAPI's routes and by the fast path alike
    (api/fastpath.py), so both give the same answers and errors."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.schemas = RequestSchemas(settings)

    async def encode(self, request: Request, ref: ModelRef, label: str | None,
                     include: str | None = None) -> Response:
        extras = checked_include(ref.manifest, include)
        ref.admit("encode")
        batch = await read_images(request, ref.manifest, label, self.settings, self.schemas, ref.deadline)
        out = await ref.run("encode", _with_labels({"x": batch.x}, batch.y))
        encoded = family_class(ref.manifest).encodings(out, extras)  # name -> (N, ...), the family's outputs
        for name, values in encoded.items():
            _finite(values, name)  # e.g. exp(log-variance) overflows only for absurd log-variances
        results = [dict(zip(encoded, item, strict=True)) for item in zip(*encoded.values(), strict=True)]
        return json_response({"model": ref.name, "version": ref.version, "results": results})

    async def reconstruct(self, request: Request, ref: ModelRef, label: str | None, format: str,
                          include_input: bool = False) -> Response:
        ref.admit("reconstruct")
        batch = await read_images(request, ref.manifest, label, self.settings, self.schemas, ref.deadline)
        out = await ref.run("reconstruct", _with_labels({"x": batch.x}, batch.y))
        x_hat, sse = out["x_mean"], _finite(out["sse"], "errors")  # (N, C, H, W), (N,)
        dims = ref.manifest.data_dims
        results = [{**r, "mse": float(s / dims), "sse": float(s)}
                   for r, s in zip(_images(x_hat, format), sse, strict=True)]
        if include_input:  # the (N, C, H, W) input the errors were measured against
            for r, seen in zip(results, _images(batch.x, format), strict=True):
                r["input"] = seen["image" if format == "png" else "array"]
        return json_response({"model": ref.name, "version": ref.version, "results": results})

    async def log_likelihood(self, request: Request, ref: ModelRef, k: int, seed: int | None,
                             label: str | None) -> Response:
        m = ref.manifest
        options = Options(k=k, seed=secrets.randbits(63) if seed is None else seed)
        ref.admit("log_likelihood", options=options)
        batch = await read_images(request, m, label, self.settings, self.schemas, ref.deadline)
        out = await ref.run("log_likelihood", _with_labels({"x": batch.x}, batch.y), options)
        se = out["standard_error"]
        results = [{"log_likelihood": ll, "elbo": elbo, "k": k, "bits_per_dim": bits_per_dim(ll, m.data_dims),
                    "standard_error": None if np.isnan(s) else s}
                   for ll, elbo, s in zip(out["log_likelihood"].tolist(), out["elbo"].tolist(), se.tolist(),
                                          strict=True)]
        binarized = m.preprocessing.binarize_threshold is not None
        return json_response({"model": ref.name, "version": ref.version, "k": k, "seed": options.seed,
                              "binarized": binarized, "results": results})

    async def anomaly_score(self, request: Request, ref: ModelRef, k: int | None, seed: int | None,
                            label: str | None, method: str | None = None,
                            alpha: float | None = None) -> Response:
        m = ref.manifest
        options = anomaly_options(m, self.settings, method, alpha, k,
                                  secrets.randbits(63) if seed is None else seed)
        ref.admit("anomaly_score", options=options)
        batch = await read_images(request, m, label, self.settings, self.schemas, ref.deadline)
        out = await ref.run("anomaly_score", _with_labels({"x": batch.x}, batch.y), options)
        results = [{"method": options.method, "score": score, "p_value": p, "alpha": options.alpha,
                    "percentile": pct, "threshold": t if math.isfinite(t) else None, "is_anomaly": flag,
                    "standard_error": None if math.isnan(se) else se}
                   for score, p, pct, t, flag, se in zip(
                       *(out[name].tolist() for name in ("score", "p_value", "percentile", "threshold",
                                                         "is_anomaly", "standard_error")), strict=True)]
        assert m.anomaly is not None
        return json_response({"model": ref.name, "version": ref.version, "k": options.k, "seed": options.seed,
                              "method": options.method, "alpha": options.alpha, "calibration_k": m.anomaly.k,
                              "results": results})


def build_v1_router(settings: Settings, operations: ImageOperations | None = None) -> APIRouter:
    """The model API. Options are query parameters, so they work with JSON and multipart bodies alike."""
    router = APIRouter(prefix="/v1", tags=["models"], dependencies=auth_dependencies(settings))

    @router.get("/models", response_model=ModelList, responses=error_responses(401, 503))
    async def list_models(state: State) -> Response:
        """Every served model (its highest version) with its input shape, latent size and versions."""
        engine = state.engine
        if not engine.ready:
            raise Unavailable("models are not loaded yet")
        models = []
        for name in sorted(engine.models):
            versions = engine.models[name]
            latest = default_version(engine.models, name)
            assert latest is not None
            models.append(_summary(name, versions[latest], sorted(versions)))
        return json_response({"models": models})

    operations = operations or ImageOperations(settings)
    _add_model_routes(router, "/models/{model}", latest_version, settings, operations)
    _add_model_routes(router, "/models/{model}/versions/{version}", given_version, settings, operations)
    return router


def _add_model_routes(router: APIRouter, base: str, resolve: Callable[..., ModelRef], settings: Settings,
                      operations: ImageOperations) -> None:
    """The routes of one model version under `base` (the path parameters are `resolve`'s)."""
    Model = Annotated[ModelRef, Depends(resolve)]
    schemas = RequestSchemas(settings)
    common = (401, 404, 429, 500, 503, 504)
    image_errors = error_responses(*common, 400, 413, 415, 422)
    inputs_body = schemas.inputs_openapi(settings.max_images)
    params = Params.from_settings(settings)  # bounds shared with the fast path and V2
    LabelQ = params.label.query()
    SeedQ = params.seed.query()
    KQ = params.k.query(optional=False)
    FormatQ = params.format.query(optional=False)

    @router.get(base, response_model=ModelDetail, responses=error_responses(401, 404, 503))
    async def get_model(ref: Model) -> Response:
        """Manifest metadata, training metrics, versions, and the runtime, device and batching in use."""
        return json_response(_detail(ref, settings))

    @router.post(f"{base}/encode", response_model=EncodeResponse, responses=image_errors,
                 openapi_extra=inputs_body)
    async def encode_images(request: Request, ref: Model, label: LabelQ = None,
                            include: params.include.query() = None) -> Response:
        """The posterior of each image, in order: Gaussian-latent models give q(z|x) = N(mean, diag
        variance); VQ-VAEs the grid of codebook indices (and with include=pre_quantization the encoder's
        vectors before quantization)."""
        return await operations.encode(request, ref, label, include)

    @router.post(f"{base}/decode", response_model=DecodeResponse, response_model_exclude_none=True,
                 responses=error_responses(*common, 400, 413, 415, 422),
                 openapi_extra=schemas.latents_openapi())
    async def decode_latents(request: Request, ref: Model, label: LabelQ = None,
                             format: FormatQ = "png") -> Response:
        """E[x|z] for each latent (Gaussian: {"latents": [[...D floats]]}; VQ-VAE: {"codes": [h x w grids of
        codebook indices]}), as base64 PNG or arrays."""
        ref.admit("decode")
        z, y = await read_latents(request, ref.manifest, label, schemas)
        x = (await ref.run("decode", _with_labels({"z": z}, y)))["x_mean"]
        return json_response({"model": ref.name, "version": ref.version, "results": _images(x, format)})

    @router.get(f"{base}/sample", response_model=SampleResponse, response_model_exclude_none=True,
                responses={**error_responses(*common, 422),
                           200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
                                 "description": "JSON samples, or one PNG grid with format=grid"}})
    async def sample_images(
        ref: Model,
        n: params.n.query(optional=False) = 16,
        seed: SeedQ = None,
        temperature: params.temperature.query(optional=False) = 1.0,
        format: Annotated[Literal["png", "array", "grid"], Query(
            description="png/array: JSON; grid: one image/png of all samples for a browser")] = "png",
        label: LabelQ = None,
    ) -> Response:
        """Samples from the prior, decoded to E[x|z]; without label a conditional model cycles the classes."""
        m = ref.manifest
        options = Options(n=n, seed=secrets.randbits(63) if seed is None else seed, temperature=temperature)
        ref.admit("sample", items=n, options=options)
        if m.labels is not None and label is None:
            y: np.ndarray | None = np.arange(n, dtype=np.int64) % len(m.labels)
        else:
            y = resolve_labels(m, n, label, None)
        out = await ref.run("sample", _with_labels({}, y), options)
        x, z, seed = out["x_mean"], out["z"], options.seed
        if format == "grid":
            png = grid_png(_finite(x, "pixels"))
            return Response(png, media_type="image/png", headers={"X-Seed": str(seed)})
        names = [None] * n if y is None or m.labels is None else [m.labels[int(i)] for i in y]
        results = []
        latents = z.astype(np.float64) if z.dtype.kind == "f" else z  # VQ-VAE: int64 code grids
        for r, zi, name in zip(_images(x, format), latents, names, strict=True):
            r["latent"] = zi
            if name is not None:
                r["label"] = name
            results.append(r)
        return json_response({"model": ref.name, "version": ref.version, "seed": seed,
                              "temperature": temperature, "results": results})

    @router.post(f"{base}/reconstruct", response_model=ReconstructResponse, responses=image_errors,
                 openapi_extra=inputs_body, response_model_exclude_none=True)
    async def reconstruct_images(request: Request, ref: Model, label: LabelQ = None,
                                 format: FormatQ = "png",
                                 include_input: params.include_input.query(optional=False) = "false",
                                 ) -> Response:
        """Decode the posterior mean of each image; report squared errors against the (grey) input."""
        return await operations.reconstruct(request, ref, label, format, include_input == "true")

    @router.post(f"{base}/log-likelihood", response_model=LogLikelihoodResponse, responses=image_errors,
                 openapi_extra=inputs_body)
    async def estimate_log_likelihood(request: Request, ref: Model, k: KQ = settings.default_k,
                                      seed: SeedQ = None, label: LabelQ = None) -> Response:
        """Importance-weighted log p(x) in nats with k samples from q(z|x), the ELBO and a standard error."""
        return await operations.log_likelihood(request, ref, k, seed, label)

    @router.post(f"{base}/anomaly-score", response_model=AnomalyResponse, responses=image_errors,
                 openapi_extra=inputs_body)
    async def score_anomalies(
        request: Request, ref: Model,
        k: params.k.query() = None,  # default: the calibration's k
        seed: SeedQ = None, label: LabelQ = None,
        method: params.method.query() = None,
        alpha: params.alpha.query() = None,
    ) -> Response:
        """An anomaly score per image (the method is in the answer), its conformal p-value against held-out
        normal data, the threshold at level alpha and the decision."""
        return await operations.anomaly_score(request, ref, k, seed, label, method, alpha)
