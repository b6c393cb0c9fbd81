"""Open Inference Protocol (KServe V2) REST routes, with Triton's binary tensor data extension.

Each served VAE appears as four V2 models (the operation after the last dot):

    {model}.encode          images FP32 [N, C, H, W] in [0, 1] (or png BYTES [N]: image files as
                            binary tensor data, or base64 text with the input parameter
                            "content_type": "base64")
                            -> mean, variance, log_variance FP32 [N, D] (Gaussian-latent models), or
                            codes INT64 [N, h, w] and pre_quantization FP32 [N, D, h, w] (VQ-VAEs)
    {model}.decode          latents FP32 [N, D] (or codes INT64 [N, h, w]) -> images FP32 [N, C, H, W]
    {model}.log_likelihood  images (or png)      -> log_likelihood, elbo, standard_error FP64 [N]
                            parameters: k, seed
    {model}.anomaly_score   images (or png)      -> score, percentile, p_value FP64 [N],
                            is_anomaly BOOL [N]; parameters: k, seed, method, alpha. Responses carry
                            k, seed, method and alpha as parameters.
Conditional models take `labels` INT64 [N] as well. The routes parse with service/api/v2_codec.py and
call the same engine, scoring and limits as /v1, so a seeded log-likelihood is the same number on
both. Errors answer {"error": "<message>"} (errors.py picks the shape by path).
"""

import asyncio
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
import orjson
from fastapi import APIRouter, Depends, Path, Request, Response

from service.api import v2_codec as codec
from service.api.auth import auth_dependencies
from service.api.errors import InvalidInput, ModelNotFound, Unavailable
from service.api.images import ImageError, decode_base64
from service.api.inputs import checked_latents, decode_files, resolve_labels
from service.api.model_ref import ModelRef, resolve_model
from service.api.options import anomaly_options
from service.api.params import Param, Params
from service.api.schemas import v2_error_responses
from service.api.state import AppState, app_state
from service.config import Settings
from service.engine.interface import ModelInfo
from service.families import Operation, Options, family_class, latent_space

OPERATIONS = ("encode", "decode", "log_likelihood", "anomaly_score")
V2_NUMPY = {"FP32": np.float32, "INT64": np.int64}  # the datatypes of the families' encode outputs
ENGINE_OPERATION: dict[str, Operation] = {"encode": "encode", "decode": "decode",
                                          "log_likelihood": "log_likelihood",
                                          "anomaly_score": "anomaly_score"}
SERVER_NAME = "vae-serve"
SERVER_VERSION = "1"
EXTENSIONS = ("binary_tensor_data", "model_configuration")
OFF_LOOP_BYTES = 64 * 1024  # bodies larger than this are decoded in a worker thread, not on the event loop
PNG_AS_JSON_TEXT = (
    "input 'png' came as JSON strings, which carry text, not image files: base64-encode each file and "
    'give the input the parameters {"content_type": "base64"}, or send the files\' bytes with the binary '
    "tensor data extension (binary_data_size; tritonclient's default)")



State = Annotated[AppState, Depends(app_state)]
NamePath = Annotated[str, Path(description="'{model}.{operation}', operation one of " + ", ".join(OPERATIONS),
                               examples=["mnist-vae.encode"])]
VersionPath = Annotated[str, Path(description="model version", examples=["1"])]


@dataclass(frozen=True)
class V2Model:
    """A V2 model name resolved to a served version and one of the four operations."""

    ref: ModelRef
    operation: str

    @property
    def name(self) -> str:
        return f"{self.ref.name}.{self.operation}"


def _split(name: str) -> tuple[str, str]:
    model, dot, operation = name.rpartition(".")
    if not dot or operation not in OPERATIONS:
        raise ModelNotFound(f"no V2 model {name!r}: V2 model names are '<model>.<operation>' with operation "
                            f"one of {list(OPERATIONS)}")
    return model, operation


async def latest(request: Request, name: NamePath, state: State) -> V2Model:
    model, operation = _split(name)
    return V2Model(resolve_model(state, request, model, None), operation)


async def given(request: Request, name: NamePath, version: VersionPath, state: State) -> V2Model:
    model, operation = _split(name)
    return V2Model(resolve_model(state, request, model, version), operation)


# -- tensor specs ------------------------------------------------------------------------------------------
def _specs(info: ModelInfo, operation: str) -> tuple[list[codec.TensorSpec], list[codec.TensorSpec]]:
    """(inputs, outputs) of one V2 model; -1 is the batch dimension. `png` is an optional alternative."""
    m = info.manifest
    images = codec.TensorSpec("images", "FP32", (-1, *m.input_shape))
    labels = [codec.TensorSpec("labels", "INT64", (-1,))] if m.conditional else []
    space = latent_space(m)  # the family's latents: what encode gives and decode takes
    if operation == "encode":
        outputs = [codec.TensorSpec(n, datatype, (-1, *shape)) for n, datatype, shape in space.encode_outputs]
        return [images, *labels], outputs
    if operation == "decode":
        datatype = "FP32" if space.dtype == "float32" else "INT64"
        return [codec.TensorSpec(space.input, datatype, (-1, *space.shape)), *labels], [images]
    if operation == "log_likelihood":
        return [images, *labels], [codec.TensorSpec(n, "FP64", (-1,))
                                   for n in ("log_likelihood", "elbo", "standard_error")]
    return [images, *labels], [codec.TensorSpec("score", "FP64", (-1,)),
                               codec.TensorSpec("percentile", "FP64", (-1,)),
                               codec.TensorSpec("is_anomaly", "BOOL", (-1,)),
                               codec.TensorSpec("p_value", "FP64", (-1,))]


def _metadata(v2: V2Model) -> dict[str, Any]:
    inputs, outputs = _specs(v2.ref.info, v2.operation)
    versions = sorted(v2.ref.state.engine.models[v2.ref.name])
    return codec.model_metadata(v2.name, versions, "vae-serve_" + v2.ref.info.runtime, inputs, outputs)


def _config(v2: V2Model, settings: Settings) -> dict[str, Any]:
    inputs, outputs = _specs(v2.ref.info, v2.operation)
    return codec.triton_model_config(
        v2.name, settings.max_images, inputs, outputs,
        {"max_queue_delay_microseconds": int(settings.max_queue_delay_ms * 1000),
         "preferred_batch_size": [settings.max_batch_size],
         "default_queue_policy": {"timeout_action": "REJECT",
                                  "default_timeout_microseconds": int(settings.request_timeout_s * 1e6),
                                  "allow_timeout_override": True,
                                  "max_queue_size": settings.max_queue_size}},
        platform="vae-serve_" + v2.ref.info.runtime, backend="vae-serve")


# -- request tensors -> engine inputs ----------------------------------------------------------------------
def _parameter(request: codec.InferRequest, param: Param, default: Any = None) -> Any:
    """A V2 request parameter, checked by its one definition (api/params.py, shared with /v1)."""
    value = request.parameters.get(param.name)
    return default if value is None else param.check(value)


async def _images(request: codec.InferRequest, v2: V2Model, settings: Settings) -> tuple[np.ndarray, int]:
    """The `images` tensor (checked: finite, in [0, 1]) or the `png` BYTES tensor decoded: (N, C, H, W).

    PNG files go through the same decoding step as /v1 uploads (api/inputs.decode_files): the per-image
    and per-request pixel budgets checked from the headers before any pixel is decoded, the bounded
    decode pool for large images, and the same errors.
    """
    m = v2.ref.manifest
    given = {i.name for i in request.inputs} - {"labels"}
    if given == {"png"}:
        png = request.input("png")
        assert png is not None
        if png.datatype != "BYTES" or png.array.ndim != 1:
            raise InvalidInput("input 'png' must be BYTES of shape [N]: one encoded image file per item")
        _check_count(len(png.array), settings)  # before decoding anything
        if sum(len(data) for data in png.array) > OFF_LOOP_BYTES:  # base64 of megabytes: CPU work
            files = await asyncio.to_thread(_png_files, png)
        else:
            files = _png_files(png)
        arrays = await decode_files(files, m, settings, v2.ref.deadline, field="png")
        x = np.stack(arrays) if arrays else np.zeros((0, *m.input_shape), np.float32)
    else:
        inputs, _ = _specs(v2.ref.info, v2.operation)
        x = codec.match_inputs(request, inputs)["images"]
        if x.size and (x.min() < 0.0 or x.max() > 1.0):
            raise InvalidInput("input 'images' must hold pixel values in [0, 1]")
    return x.astype(np.float32, copy=False), len(x)


def _png_files(png: codec.InferInput) -> list[bytes]:
    """The image files of the `png` input: its elements as they are, or base64-decoded when the input's
    parameters say {"content_type": "base64"}.

    The protocol carries BYTES in JSON as strings, which hold text, not the bytes of an image file; it
    leaves other representations to servers. Base64 text marked by the input parameter `content_type`
    is MLServer's convention (its `base64` content type) and what KServe's clients can send; raw file
    bytes need the binary tensor data extension (tritonclient's default).
    """
    content_type = png.parameters.get("content_type")
    if content_type is None:
        if "binary_data_size" not in png.parameters:
            raise InvalidInput(PNG_AS_JSON_TEXT)
        return [bytes(data) for data in png.array]
    if content_type != "base64":
        raise InvalidInput(f"input 'png': content_type {content_type!r} is not supported; use \"base64\" "
                           "(each element the base64 text of an image file), or leave it out and send "
                           "the files' bytes with the binary tensor data extension")
    files = []
    for i, data in enumerate(png.array):
        try:
            files.append(decode_base64(bytes(data).decode("ascii")))
        except (UnicodeDecodeError, ImageError) as exc:
            reason = exc if isinstance(exc, ImageError) else "not valid base64 (non-ASCII characters)"
            raise InvalidInput(f"png[{i}]: {reason}; with content_type \"base64\" each element must be "
                               "the base64 text of one image file") from None
    return files


def _labels(request: codec.InferRequest, v2: V2Model, n: int) -> np.ndarray | None:
    m = v2.ref.manifest
    labels = request.input("labels")
    if labels is not None and labels.datatype != "INT64":
        raise InvalidInput("input 'labels' must be INT64 of shape [N]")
    values = None if labels is None else [int(v) for v in labels.array.reshape(-1)]
    return resolve_labels(m, n, None, values)


def _check_count(n: int, settings: Settings) -> None:
    if n < 1:
        raise InvalidInput("the request holds no items; send a batch of at least one")
    if n > settings.max_images:
        raise InvalidInput(f"{n} items in one request; the limit is {settings.max_images}")


Outputs = list[tuple[str, np.ndarray]]


async def _run(v2: V2Model, request: codec.InferRequest, settings: Settings,
               params: Params) -> tuple[Outputs, dict[str, Any]]:
    """One V2 inference: the named outputs of the operation, in spec order, and response parameters
    (log_likelihood: k and seed; anomaly_score: also the method that produced the score and alpha)."""
    ref = v2.ref
    if v2.operation == "decode":
        inputs, _ = _specs(ref.info, "decode")
        z = checked_latents(ref.manifest, codec.match_inputs(request, inputs)[inputs[0].name])
        _check_count(len(z), settings)
        y = _labels(request, v2, len(z))
        out = await ref.run("decode", {"z": z} if y is None else {"z": z, "y": y})
        return [("images", out["x_mean"])], {}
    x, n = await _images(request, v2, settings)
    _check_count(n, settings)
    y = _labels(request, v2, n)
    if v2.operation == "encode":
        out = await ref.run("encode", {"x": x} if y is None else {"x": x, "y": y})
        space = latent_space(ref.manifest)
        wanted = space.optional_outputs if request.outputs is None else (
            space.optional_outputs & {o.name for o in request.outputs})
        encoded = family_class(ref.manifest).encodings(out, frozenset(wanted))
        datatypes = {name: V2_NUMPY[datatype] for name, datatype, _ in space.encode_outputs}
        return [(name, values.astype(datatypes[name])) for name, values in encoded.items()], {}
    seed = _parameter(request, params.seed, secrets.randbits(63))
    inputs = {"x": x} if y is None else {"x": x, "y": y}
    if v2.operation == "log_likelihood":
        options = Options(k=_parameter(request, params.k, settings.default_k), seed=seed)
        out = await ref.run("log_likelihood", inputs, options)
        return [(name, out[name]) for name in ("log_likelihood", "elbo", "standard_error")
                ], {"k": options.k, "seed": seed}
    options = anomaly_options(ref.manifest, settings, _parameter(request, params.method),
                              _parameter(request, params.alpha), _parameter(request, params.k), seed)
    out = await ref.run("anomaly_score", inputs, options)
    return [(name, out[name]) for name in ("score", "percentile", "is_anomaly", "p_value")
            ], {"k": options.k, "seed": seed, "method": options.method, "alpha": options.alpha}


def _decode_body(body: bytes, header_length: int | None, v2: V2Model, settings: Settings
                 ) -> codec.InferRequest:
    m = v2.ref.manifest
    per_item = max(m.data_dims, latent_space(m).size) + 1  # one image or latent, plus a label
    return codec.decode_infer_request(body, header_length, max_elements=settings.max_images * per_item)


# -- router ------------------------------------------------------------------------------------------------
def build_v2_router(settings: Settings) -> APIRouter:
    router = APIRouter(prefix="/v2", tags=["open inference protocol (v2)"],
                       dependencies=auth_dependencies(settings), responses=v2_error_responses(400, 401, 503))

    @router.get("", summary="Server metadata")
    async def get_server_metadata() -> Response:
        """Name, version and the protocol extensions this server supports."""
        return _json(codec.server_metadata(SERVER_NAME, SERVER_VERSION, EXTENSIONS))

    _add_model_routes(router, "/models/{name}", latest, settings)
    _add_model_routes(router, "/models/{name}/versions/{version}", given, settings)
    return router


def build_v2_health_router(state: AppState) -> APIRouter:
    """/v2/health/live and /v2/health/ready: operations paths (no auth unless VAE_AUTH_OPS)."""
    protect = state.settings.auth_ops and bool(state.settings.api_keys)
    router = APIRouter(prefix="/v2/health", tags=["open inference protocol (v2)"],
                       dependencies=auth_dependencies(state.settings) if protect else [],
                       responses=v2_error_responses(401, 503) if protect else v2_error_responses(503))

    @router.get("/live", summary="Server liveness (V2)")
    async def get_v2_live() -> Response:
        """200 while the process is alive."""
        return _json({"live": True})

    @router.get("/ready", summary="Server readiness (V2)")
    async def get_v2_ready() -> Response:
        """200 when the models are loaded and reachable; 503 otherwise (as /readyz)."""
        if not state.ready:
            raise Unavailable("not ready: loading, restarting or shutting down")
        return _json({"ready": True})

    return router


def _add_model_routes(router: APIRouter, base: str, resolve: Callable[..., V2Model],
                      settings: Settings) -> None:
    Model = Annotated[V2Model, Depends(resolve)]
    params = Params.from_settings(settings)  # the bounds /v1 is built from

    found = v2_error_responses(404)
    work = v2_error_responses(404, 413, 429, 500, 504)

    @router.get(base, summary="Model metadata (V2)", responses=found)
    async def get_v2_model(v2: Model) -> Response:
        """Name, versions, platform, and the input and output tensors with their datatypes and shapes."""
        return _json(_metadata(v2))

    @router.get(f"{base}/ready", summary="Model readiness (V2)", responses=found)
    async def get_v2_model_ready(v2: Model) -> Response:
        """200 when this model version is loaded and reachable."""
        return _json({"name": v2.name, "ready": True})

    @router.get(f"{base}/config", summary="Model configuration (Triton)", responses=found)
    async def get_v2_model_config(v2: Model) -> Response:
        """Triton's model configuration (JSON): max_batch_size, inputs, outputs, dynamic batching."""
        return _json(_config(v2, settings))

    @router.post(f"{base}/infer", summary="Inference (V2)", responses=work,
                 openapi_extra={"requestBody": {"required": True, "content": {
                     "application/json": {"schema": {"type": "object"}},
                     "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}})
    async def post_v2_infer(request: Request, v2: Model) -> Response:
        """Run the model on JSON tensors or the binary tensor data extension (both directions)."""
        ref = v2.ref
        # Before the body is read, admit as the cheapest request of this operation (k arrives in the
        # body); the engine checks the real cost again when the work is submitted.
        ref.admit(ENGINE_OPERATION[v2.operation], options=Options(k=1))
        header_length = codec.parse_header_length(request.headers.get(codec.HEADER_LENGTH_HEADER))
        body = await request.body()
        if len(body) > OFF_LOOP_BYTES:
            parsed = await asyncio.to_thread(_decode_body, body, header_length, v2, settings)
        else:
            parsed = _decode_body(body, header_length, v2, settings)
        outputs, parameters = await _run(v2, parsed, settings, params)
        names = parsed.output_names([name for name, _ in outputs])
        selected = [(name, array) for name, array in outputs if name in names]
        selected.sort(key=lambda item: names.index(item[0]))
        payload, json_length = codec.encode_infer_response(
            v2.name, ref.version, parsed.id, selected, binary=parsed.binary_outputs(names),
            parameters=parameters)
        if json_length is None:
            return Response(payload, media_type=codec.JSON_CONTENT_TYPE)
        return Response(payload, media_type=codec.BINARY_CONTENT_TYPE,
                        headers={codec.HEADER_LENGTH_HEADER: str(json_length)})


def _json(payload: Any) -> Response:
    return Response(orjson.dumps(payload), media_type="application/json")

