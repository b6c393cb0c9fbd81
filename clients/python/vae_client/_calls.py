"""The /v1 protocol without I/O: each operation is a `Call` (what to send, how to read the answer).

The sync and async clients only send a `Call` and hand the response to `Call.parse`, so paths, query
parameters, bodies and result parsing exist once, here.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar
from urllib.parse import quote

import httpx
import numpy as np

from vae_client._images import array_from_png, decode_base64, image_payload
from vae_client.errors import UnexpectedResponse, error_from_response
from vae_client.types import (
    AnomalyResult,
    DecodeResult,
    EncodeResult,
    Health,
    LogLikelihoodResult,
    ModelDetail,
    ModelInfo,
    ReconstructResult,
    SampleResult,
)

T = TypeVar("T")
Label = str | int
Labels = Label | Sequence[Label] | None  # one class for every item, or one per item (conditional models)
Version = str | int | None
Target = tuple[str, Version]  # (model name, version or None for the default version)
ImageFormat = Literal["array", "png"]
Timeout = float | httpx.Timeout | None


class _Unset:
    """Marker for "no per-call timeout": None already means "no timeout" in httpx."""


UNSET: Any = _Unset()


@dataclass(frozen=True)
class Call(Generic[T]):
    """One API call: the request to send (again on retries) and the parser of its answer."""

    method: str
    path: str
    read: Callable[[Any, str | None], T]  # (decoded JSON body, X-Request-ID) -> result
    params: dict[str, str] = field(default_factory=dict)
    json: Any = None
    files: list[Any] | None = None
    data: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    timeout: Any = UNSET
    retry: bool = True  # False: one attempt only (a readiness probe wants the answer of now)

    @property
    def idempotent(self) -> bool:
        """GETs may be re-sent after any transport error; the service's GETs change nothing."""
        return self.method == "GET"

    def request_args(self) -> dict[str, Any]:
        """Keyword arguments of httpx's `build_request`; a fresh request per attempt."""
        args: dict[str, Any] = {"method": self.method, "url": self.path, "params": self.params,
                                "headers": self.headers}
        if self.json is not None:
            args["json"] = self.json
        if self.files is not None:
            args["files"] = self.files
        if self.data is not None:
            args["data"] = self.data
        if self.timeout is not UNSET:
            args["timeout"] = self.timeout
        return args

    def parse(self, response: httpx.Response) -> T:
        """The result of a 2xx answer; the matching `VAEError` for any other."""
        if not response.is_success:
            raise error_from_response(response)
        request_id = response.headers.get("x-request-id")
        try:
            body = json.loads(response.content)
        except ValueError:
            raise UnexpectedResponse(response.status_code, "bad_response",
                                     f"expected JSON, got {response.headers.get('content-type')!r}: "
                                     f"{response.text[:200]!r}", request_id) from None
        try:
            return self.read(body, request_id)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise UnexpectedResponse(response.status_code, "bad_response",
                                     f"the answer does not have the documented shape: {exc!r}",
                                     request_id) from None


# -- request pieces --------------------------------------------------------------------------------------
def model_path(name: str, version: Version = None, operation: str | None = None) -> str:
    """/v1/models/{name}[/versions/{version}][/{operation}]; names are quoted as one path segment."""
    path = f"/v1/models/{quote(name, safe='')}"
    if version is not None:
        path += f"/versions/{quote(str(version), safe='')}"
    return path if operation is None else f"{path}/{operation}"


def query(**values: Any) -> dict[str, str]:
    """Query parameters without the unset ones; booleans as the service spells them."""
    out = {}
    for key, value in values.items():
        if value is None:
            continue
        out[key] = ("true" if value else "false") if isinstance(value, bool) else str(value)
    return out


def headers(request_id: str | None) -> dict[str, str]:
    return {} if request_id is None else {"X-Request-ID": request_id}


def split_label(label: Labels) -> tuple[Label | None, list[Label] | None]:
    """One label for every item (query `label`) or one per item (body `labels`)."""
    if label is None or isinstance(label, str | int):
        return label, None
    return None, list(label)


@dataclass(frozen=True)
class Options:
    """Per-call options shared by every operation."""

    request_id: str | None = None
    timeout: Any = UNSET


# -- response pieces -------------------------------------------------------------------------------------
def _floats(values: Sequence[Any]) -> np.ndarray:
    """A list of numbers or nulls -> float64 array with nan for null."""
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def _images(results: list[dict[str, Any]]) -> tuple[np.ndarray, tuple[bytes, ...] | None]:
    """(N, C, H, W) float32 from `array` fields, or from the base64 PNGs of `image` fields."""
    if results and "array" in results[0]:
        return np.asarray([r["array"] for r in results], dtype=np.float32), None
    png = tuple(decode_base64(r["image"]) for r in results)
    return np.stack([array_from_png(p) for p in png]), png


def _model_info(item: dict[str, Any]) -> dict[str, Any]:
    shape = item["input"]
    labels = item.get("labels")
    return {"name": item["name"], "version": str(item["version"]), "kind": item["kind"],
            "latent_dim": int(item["latent_dim"]),
            "input_shape": (int(shape["channels"]), int(shape["height"]), int(shape["width"])),
            "likelihood": item.get("likelihood") or {}, "labels": None if labels is None else tuple(labels),
            "family": item.get("family", "gaussian"), "latent": item.get("latent") or {}}


def _read_health(body: Any, _: str | None) -> Health:
    return Health(status=body["status"], models=tuple(body.get("models") or ()))


def _read_models(body: Any, _: str | None) -> list[ModelInfo]:
    return [ModelInfo(**_model_info(item)) for item in body["models"]]


def _read_detail(body: Any, _: str | None) -> ModelDetail:
    return ModelDetail(**_model_info(body), created_at=body.get("created_at"),
                       architecture=body.get("architecture"), runtime=body.get("runtime", ""),
                       device=body.get("device", ""), limits=body.get("limits") or {},
                       batching=body.get("batching") or {}, calibration=body.get("calibration"),
                       metrics=body.get("metrics") or {}, raw=body)


def _read_encode(body: Any, request_id: str | None) -> EncodeResult:
    rows = body["results"]
    names = [n for n in ("mean", "variance", "log_variance", "codes", "pre_quantization") if n in rows[0]]
    arrays = {n: np.asarray([r[n] for r in rows], dtype=np.int64 if n == "codes" else np.float64)
              for n in names}
    return EncodeResult(body["model"], str(body["version"]), request_id, **arrays)


def _read_decode(body: Any, request_id: str | None) -> DecodeResult:
    images, png = _images(body["results"])
    return DecodeResult(body["model"], str(body["version"]), request_id, images, png)


def _latents(values: list[Any]) -> np.ndarray:
    """Sampled latents: float vectors (N, D) as float64, or a VQ-VAE's code grids (N, h, w) as int64."""
    array = np.asarray(values)
    return array.astype(np.int64 if array.dtype.kind in "iu" else np.float64)


def _read_sample(body: Any, request_id: str | None) -> SampleResult:
    rows = body["results"]
    images, png = _images(rows)
    return SampleResult(body["model"], str(body["version"]), request_id, images, png, seed=int(body["seed"]),
                        temperature=float(body["temperature"]),
                        latents=_latents([r["latent"] for r in rows]),
                        labels=tuple(r.get("label") for r in rows))


def _read_reconstruct(body: Any, request_id: str | None) -> ReconstructResult:
    rows = body["results"]
    images, png = _images(rows)
    return ReconstructResult(body["model"], str(body["version"]), request_id, images, png,
                             mse=_floats([r["mse"] for r in rows]), sse=_floats([r["sse"] for r in rows]))


def _read_log_likelihood(body: Any, request_id: str | None) -> LogLikelihoodResult:
    rows = body["results"]
    return LogLikelihoodResult(
        body["model"], str(body["version"]), request_id, k=int(body["k"]), seed=int(body["seed"]),
        binarized=bool(body["binarized"]), log_likelihood=_floats([r["log_likelihood"] for r in rows]),
        elbo=_floats([r["elbo"] for r in rows]), bits_per_dim=_floats([r["bits_per_dim"] for r in rows]),
        standard_error=_floats([r.get("standard_error") for r in rows]))


def _read_anomaly(body: Any, request_id: str | None) -> AnomalyResult:
    rows = body["results"]
    threshold = rows[0].get("threshold") if rows else None  # one threshold for the whole request
    return AnomalyResult(
        body["model"], str(body["version"]), request_id, k=int(body["k"]), seed=int(body["seed"]),
        calibration_k=int(body["calibration_k"]), method=str(body["method"]), alpha=float(body["alpha"]),
        threshold=None if threshold is None else float(threshold), score=_floats([r["score"] for r in rows]),
        p_value=_floats([r["p_value"] for r in rows]), percentile=_floats([r["percentile"] for r in rows]),
        is_anomaly=np.array([bool(r["is_anomaly"]) for r in rows], dtype=bool),
        standard_error=_floats([r.get("standard_error") for r in rows]))


# -- the operations --------------------------------------------------------------------------------------
def health(opts: Options) -> Call[Health]:
    return Call("GET", "/healthz", _read_health, headers=headers(opts.request_id), timeout=opts.timeout)


def ready(opts: Options) -> Call[Health]:
    """/readyz once, without retries: the caller wants to know whether it is ready now."""
    return Call("GET", "/readyz", _read_health, headers=headers(opts.request_id), timeout=opts.timeout,
                retry=False)


def models(opts: Options) -> Call[list[ModelInfo]]:
    return Call("GET", "/v1/models", _read_models, headers=headers(opts.request_id), timeout=opts.timeout)


def model(target: Target, opts: Options) -> Call[ModelDetail]:
    return Call("GET", model_path(*target), _read_detail, headers=headers(opts.request_id),
                timeout=opts.timeout)


def _image_call(operation: str, read: Callable[[Any, str | None], T], target: Target, images: Any,
                label: Labels, params: Mapping[str, Any], opts: Options) -> Call[T]:
    """POST an image batch (JSON arrays or multipart files) to /v1/models/{name}/{operation}."""
    one_label, labels = split_label(label)
    payload = image_payload(images, labels)
    return Call("POST", model_path(*target, operation), read,
                params=query(**params, label=one_label), json=payload.json, files=payload.files,
                data=payload.data, headers=headers(opts.request_id), timeout=opts.timeout)


def encode(target: Target, images: Any, label: Labels, opts: Options,
           include: str | None = None) -> Call[EncodeResult]:
    return _image_call("encode", _read_encode, target, images, label, {"include": include}, opts)


def reconstruct(target: Target, images: Any, label: Labels, fmt: ImageFormat,
                opts: Options) -> Call[ReconstructResult]:
    return _image_call("reconstruct", _read_reconstruct, target, images, label, {"format": fmt}, opts)


def log_likelihood(target: Target, images: Any, k: int | None, seed: int | None, label: Labels,
                   opts: Options) -> Call[LogLikelihoodResult]:
    return _image_call("log-likelihood", _read_log_likelihood, target, images, label,
                       {"k": k, "seed": seed}, opts)


def anomaly_score(target: Target, images: Any, k: int | None, seed: int | None, label: Labels,
                  extra: Mapping[str, Any], opts: Options) -> Call[AnomalyResult]:
    return _image_call("anomaly-score", _read_anomaly, target, images, label,
                       {**extra, "k": k, "seed": seed}, opts)


def decode(target: Target, latents: Any, label: Labels, fmt: ImageFormat,
           opts: Options) -> Call[DecodeResult]:
    """Float latents (D,) or (N, D) -> JSON {"latents": [[...], ...]} (float64 holds float32 values
    exactly); integer arrays are a VQ-VAE's code grids, (h, w) or (N, h, w) -> {"codes": [...]}."""
    given = np.asarray(latents)
    if given.dtype.kind in "iu":
        codes = given[None] if given.ndim == 2 else given
        if codes.ndim != 3 or len(codes) == 0:
            raise ValueError(f"code grids must be (h, w) or (N, h, w) integers; got shape {given.shape}")
        body: dict[str, Any] = {"codes": codes.astype(np.int64).tolist()}
    else:
        z = given.astype(np.float64)
        if z.ndim == 1:
            z = z[None]
        if z.ndim != 2 or len(z) == 0:
            raise ValueError(f"latents must be (latent_dim,) or (N, latent_dim); got shape {z.shape}")
        body = {"latents": z.tolist()}
    one_label, labels = split_label(label)
    if labels is not None:
        body["labels"] = labels
    return Call("POST", model_path(*target, "decode"), _read_decode,
                params=query(format=fmt, label=one_label), json=body, headers=headers(opts.request_id),
                timeout=opts.timeout)


def sample(target: Target, n: int, seed: int | None, temperature: float | None, label: Label | None,
           fmt: ImageFormat, opts: Options) -> Call[SampleResult]:
    return Call("GET", model_path(*target, "sample"), _read_sample,
                params=query(n=n, seed=seed, temperature=temperature, label=label, format=fmt),
                headers=headers(opts.request_id), timeout=opts.timeout)
