"""Request and response models: what the OpenAPI document at /docs shows, with examples.

Request bodies are parsed by service.inputs (they come as JSON or multipart on the same route), so
their models are built per app from the settings: the limits in the schema are the limits enforced.
"""


from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from service.anomaly import METHODS, STANDARD_ERROR_METHODS
from service.config import Settings

# A 1x1 black PNG: the smallest valid example image (it is resized to the model's input size).
EXAMPLE_PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAAAAAA6fptVAAAACklEQVR4nGNgAAAAAgABSK+kcQAAAABJRU5ErkJggg=="

Finite = Annotated[float, Field(allow_inf_nan=False)]
Pixel = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
Label = Annotated[int, Field(ge=0, le=1_000_000)] | Annotated[str, Field(min_length=1, max_length=64)]


# -- errors ------------------------------------------------------------------------------------------
class ErrorInfo(BaseModel):
    code: str = Field(description="stable machine-readable code", examples=["invalid_input"])
    message: str = Field(description="what went wrong and what to change", examples=["no images in request"])
    request_id: str | None = Field(None, description="the X-Request-ID of this request, for the logs")
    details: list[dict[str, Any]] | None = Field(None, description="per-field problems of validation errors")


class ErrorResponse(BaseModel):
    error: ErrorInfo


class V2ErrorResponse(BaseModel):
    """The Open Inference Protocol's error object."""

    error: str = Field(description="what went wrong and what to change", examples=["unknown input 'x'"])


V2_ERROR_TEXT = {400: "Malformed request, tensor or parameter", 401: "Missing or invalid API key",
                 404: "Unknown model, operation or version", 413: "Request body or image too large",
                 429: "Overloaded; see Retry-After", 500: "Inference failed",
                 503: "Not ready or shutting down", 504: "Request deadline exceeded"}


def v2_error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries of a /v2 route: the V2 error body for each status."""
    return {s: {"model": V2ErrorResponse, "description": V2_ERROR_TEXT[s]} for s in statuses}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for the error statuses a route can answer."""
    text = {400: "Malformed request body", 401: "Missing or invalid API key", 404: "Unknown model",
            413: "Request body or image too large", 415: "Unsupported Content-Type",
            422: "Invalid input (image, shape, values, labels, limits)", 429: "Queue full; see Retry-After",
            500: "Inference failed", 503: "Not ready or shutting down", 504: "Request deadline exceeded"}
    return {s: {"model": ErrorResponse, "description": text[s]} for s in statuses}


# -- health and models ---------------------------------------------------------------------------------
class Liveness(BaseModel):
    """/healthz: the process answers. No model list: liveness must stay cheap and 200 while models load
    and while draining, when any list would be empty or stale; /readyz and /v1/models have it."""

    status: Literal["ok"] = Field(examples=["ok"])


class Readiness(BaseModel):
    status: Literal["ready"] = Field(examples=["ready"])
    models: list[str] = Field(description="the served model names, sorted", examples=[["mnist-vae"]])


class InputShape(BaseModel):
    channels: int
    height: int
    width: int


class BatchingInfo(BaseModel):
    max_batch_size: int = Field(description="rows per encoder/decoder batch")
    max_queue_delay_ms: float
    max_queue_size: int = Field(description="queued rows per encoder/decoder before 429")
    iw_chunk_size: int = Field(description="importance samples per log_weights row")
    max_batch_samples: int
    max_queue_samples: int
    request_timeout_s: float


class LimitsInfo(BaseModel):
    default_k: int
    max_k: int
    anomaly_default_k: int | None = Field(description="k of the anomaly calibration (null: none)")
    max_n: int
    max_images: int
    max_upload_bytes: int
    max_image_pixels: int


class ModelSummary(BaseModel):
    name: str = Field(examples=["mnist-vae"])
    version: str = Field(examples=["1"])
    versions: list[str] = Field(description="every served version; `version` is the highest (the default)",
                                examples=[["1", "2"]])
    kind: str = Field(description="vae, cvae, linear or vqvae", examples=["vae"])
    family: str = Field(description="model family: gaussian (latent vectors) or vqvae (code grids)",
                        examples=["gaussian"])
    latent_dim: int = Field(examples=[32], description="gaussian: D; vqvae: D x h x w of its z_e vectors")
    latent: dict[str, Any] = Field(description="what decode takes and sample returns: input (the body key), "
                                   "shape, dtype and, for code grids, codebook_size",
                                   examples=[{"input": "latents", "shape": [32], "dtype": "float32"}])
    input: InputShape
    likelihood: dict[str, Any] = Field(description="manifest likelihood: family and, for gaussian, variance")
    labels: list[str] | None = Field(description="class names of a conditional model, else null")


class ModelDetail(ModelSummary):
    created_at: str | None
    architecture: str | None
    preprocessing: dict[str, Any]
    anomaly: dict[str, Any] | None = Field(description="anomaly calibration summary: k, alpha, "
                                           "default_method, min_alpha (the smallest alpha its p-values "
                                           "can reach, 1/(n+1); smaller levels are refused with 422), "
                                           "methods with their calibration size n and min_alpha")
    metrics: dict[str, Any] = Field(description="test-set metrics recorded at export")
    training: dict[str, Any]
    runtime: str = Field(examples=["onnx"])
    device: str = Field(examples=["cpu"])
    runtime_details: dict[str, Any]
    batching: BatchingInfo
    limits: LimitsInfo


class ModelList(BaseModel):
    models: list[ModelSummary]


# -- results ------------------------------------------------------------------------------------------------
def _example(value: dict[str, Any]) -> ConfigDict:
    """A response example shown in /docs (values from a real MNIST model, shortened)."""
    return ConfigDict(json_schema_extra={"examples": [{"model": "mnist-vae", "version": "1", **value}]})


class _Response(BaseModel):
    model: str = Field(examples=["mnist-vae"])
    version: str = Field(examples=["1"])


class EncodeResult(BaseModel):
    """Gaussian-latent models: mean, variance, log_variance. VQ-VAEs: codes (and pre_quantization)."""

    mean: list[float] | None = Field(None, description="mean of q(z|x), length latent_dim")
    variance: list[float] | None = Field(None, description="diagonal variance of q(z|x)")
    log_variance: list[float] | None = None
    codes: list[list[int]] | None = Field(None, description="VQ-VAE: h x w codebook indices")
    pre_quantization: list[list[list[float]]] | None = Field(
        None, description="VQ-VAE with include=pre_quantization: the encoder's D x h x w vectors")


class EncodeResponse(_Response):
    model_config = _example({"results": [{"mean": [0.41, -1.2], "variance": [0.02, 0.05],
                                          "log_variance": [-3.9, -3.0]}]})
    results: list[EncodeResult]


class ImageResult(BaseModel):
    image: str | None = Field(None, description="base64 PNG (format=png)")
    array: list[list[list[float]]] | None = Field(None, description="C x H x W floats (format=array)")


class DecodeResponse(_Response):
    model_config = _example({"results": [{"image": "iVBORw0KGgoAAAANSUhEUgAAABwAAAAcCAAAAABXZoBIAAAA..."}]})
    results: list[ImageResult]


class SampleResult(ImageResult):
    latent: list[float] | list[list[int]] = Field(
        description="the latent that was decoded: z = temperature * eps (Gaussian), or the code grid drawn "
                    "from the PixelCNN prior (VQ-VAE)")
    label: str | None = Field(None, description="class of a conditional model")


class SampleResponse(_Response):
    model_config = _example({"seed": 42, "temperature": 1.0,
                             "results": [{"image": "iVBORw0KGgoAAAANSUhEUgAAABwAAAAcCAAAAABXZoBIAAAA...",
                                          "latent": [0.3, -1.1]}]})
    seed: int
    temperature: float
    results: list[SampleResult]


class ReconstructResult(ImageResult):
    mse: float = Field(description="mean squared error between input and reconstruction, per pixel")
    sse: float = Field(description="sum of squared errors over all pixels")
    input: str | list[list[list[float]]] | None = Field(
        None, description="with include_input=true: the input as the model sees it (converted, resized, in "
                          "[0, 1]), in the response's format")


class ReconstructResponse(_Response):
    model_config = _example({"results": [{"image": "iVBORw0KGgoAAAANSUhEUgAAABwAAAAcCAAAAABXZoBIAAAA...",
                                          "mse": 0.012, "sse": 9.4}]})
    results: list[ReconstructResult]


class LogLikelihoodResult(BaseModel):
    log_likelihood: float = Field(description="importance-weighted estimate of log p(x), nats (lower bound)")
    elbo: float = Field(description="evidence lower bound, mean of the k log weights, nats")
    k: int
    bits_per_dim: float = Field(description="-log_likelihood / (C*H*W ln 2)")
    standard_error: float | None = Field(description="delta-method standard error of log_likelihood; "
                                                     "null at k=1")


class LogLikelihoodResponse(_Response):
    model_config = _example({"k": 256, "seed": 7, "binarized": True, "results": [
        {"log_likelihood": -86.3, "elbo": -90.1, "k": 256, "bits_per_dim": 0.159, "standard_error": 0.21}]})
    k: int
    seed: int = Field(description="pass it back to get the same numbers")
    binarized: bool = Field(description="inputs were binarized at the manifest threshold")
    results: list[LogLikelihoodResult]


class AnomalyResult(BaseModel):
    method: str = Field(description=f"the scoring method that produced `score`: one of {', '.join(METHODS)}",
                        examples=["complexity"])
    score: float = Field(description="the method's score (higher = more anomalous); nll: -log p(x) in nats")
    p_value: float = Field(description="conformal p-value (1 + #{calibration scores >= score}) / (n + 1)")
    alpha: float = Field(description="the level: is_anomaly = p_value <= alpha")
    percentile: float = Field(description="0-100: the share of calibration scores below this score")
    threshold: float | None = Field(description="is_anomaly <=> score > threshold (null: cannot flag at "
                                    "this alpha)")
    is_anomaly: bool = Field(description="p_value <= alpha, i.e. score > threshold")
    standard_error: float | None = Field(description=(
        "standard error of the score, for the methods whose score is the -log p(x) estimate plus a term "
        f"the importance samples do not change ({', '.join(sorted(STANDARD_ERROR_METHODS))}): the "
        "delta-method standard error of -log p(x); null for every other method, and at k=1"))


class AnomalyResponse(_Response):
    model_config = _example({"k": 256, "seed": 7, "method": "fisher", "alpha": 0.01, "calibration_k": 256,
                             "results": [{"method": "fisher", "score": 9.1, "p_value": 0.002, "alpha": 0.01,
                                          "percentile": 99.9, "threshold": 6.2, "is_anomaly": True,
                                          "standard_error": None}]})
    k: int
    seed: int
    method: str
    alpha: float = Field(description="level of is_anomaly")
    calibration_k: int = Field(description="k of the calibration; scores compare best at equal k")
    results: list[AnomalyResult]


# -- request bodies (built per app: limits come from the settings) -----------------------------------------
class RequestSchemas:
    """JSON request models whose size limits are the configured ones."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        n = settings.max_images
        labels_field = Field(None, min_length=1, max_length=n,
                             description="one label per item: class name or index (conditional models)")

        class ImagesRequest(BaseModel):
            model_config = ConfigDict(extra="forbid", json_schema_extra={
                "examples": [{"images": [EXAMPLE_PNG]}]})
            images: list[Annotated[str, Field(max_length=settings.max_upload_bytes)]] = Field(
                min_length=1, max_length=n, description="base64-encoded PNG/JPEG/GIF/BMP/WebP files")
            labels: list[Label] | None = labels_field

        class ArraysRequest(BaseModel):
            model_config = ConfigDict(extra="forbid", json_schema_extra={
                "examples": [{"inputs": [[[[0.0, 0.5], [1.0, 0.25]]]]}]})
            inputs: list[list[list[list[Pixel]]]] = Field(
                min_length=1, max_length=n, description="images as nested C x H x W floats in [0, 1]")
            labels: list[Label] | None = labels_field

        class LatentsRequest(BaseModel):
            model_config = ConfigDict(extra="forbid", json_schema_extra={
                "examples": [{"latents": [[0.0, 0.5, -1.0, 0.25]]}]})
            latents: list[list[Finite]] = Field(min_length=1, max_length=n,
                                                description="latent vectors, each of length latent_dim")
            labels: list[Label] | None = labels_field

        class CodesRequest(BaseModel):
            model_config = ConfigDict(extra="forbid", json_schema_extra={
                "examples": [{"codes": [[[3, 17], [40, 5]]]}]})
            codes: list[list[list[StrictInt]]] = Field(
                min_length=1, max_length=n, description="VQ-VAE code grids: h x w codebook indices each")
            labels: list[Label] | None = labels_field

        self.images = ImagesRequest
        self.arrays = ArraysRequest
        self.latents = LatentsRequest
        self.codes = CodesRequest

    def inputs_openapi(self, max_images: int) -> dict[str, Any]:
        """openapi_extra for the routes taking images: JSON (two forms) or multipart files."""
        multipart = {
            "type": "object",
            "required": ["images"],
            "properties": {
                "images": {"type": "array", "minItems": 1, "maxItems": max_images,
                           "items": {"type": "string", "format": "binary"},
                           "description": "image files (repeat the field for several)"},
                "labels": {"type": "array", "items": {"type": "string", "maxLength": 64},
                           "maxItems": max_images, "description": "one label per image (conditional models)"},
            },
        }
        return {"requestBody": {"required": True, "content": {
            "application/json": {
                "schema": {"oneOf": [_inline(self.images), _inline(self.arrays)]},
                "examples": {
                    "base64": {"summary": "base64 image files", "value": {"images": [EXAMPLE_PNG]}},
                    "arrays": {"summary": "C x H x W arrays in [0, 1] (shape must match the model)",
                               "value": {"inputs": [[[[0.0, 0.5], [1.0, 0.25]]]]}},
                },
            },
            "multipart/form-data": {"schema": multipart,
                                    "encoding": {"images": {"contentType": "image/*"}}},
        }}}

    def latents_openapi(self) -> dict[str, Any]:
        """Gaussian-latent models take latent vectors, VQ-VAEs code grids (the model's `latent.input`)."""
        return {"requestBody": {"required": True, "content": {
            "application/json": {"schema": {"oneOf": [_inline(self.latents), _inline(self.codes)]}}}}}


def _inline(model: type[BaseModel]) -> dict[str, Any]:
    """A model's JSON schema without $defs (these request models have no nested models)."""
    schema = model.model_json_schema()
    assert "$defs" not in schema, f"{model.__name__} must stay flat to be inlined"
    return schema
