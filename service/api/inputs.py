"""The one path from a request body to model inputs, for every endpoint that takes images or latents.

Three forms of images arrive on the same routes: multipart files (field `images`, repeatable),
JSON base64 files (`{"images": [...]}`) and JSON arrays (`{"inputs": [C x H x W floats]}`). All
end as one (N, C, H, W) float32 batch in [0, 1], with (N,) int64 labels for conditional models.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from PIL import Image
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException
from starlette.requests import Request

from service.api.errors import (
    BadRequest,
    DeadlineExceeded,
    InvalidInput,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from service.api.images import ImageError, ImageTooLarge, decode_base64, decode_image, open_image
from service.api.memory_budget import reserve_pixels
from service.api.schemas import RequestSchemas
from service.artifacts import Manifest
from service.config import Settings
from service.families import latent_space

_INDEX_RE = re.compile(r"[0-9]{1,7}")
INLINE_BODY_BYTES = 64 * 1024  # JSON bodies up to this size are parsed on the event loop (~1 ms at most)
INLINE_DECODE_PIXELS = 128 * 1024  # images up to this many pixels in all are decoded on the event loop


@dataclass(frozen=True)
class ImageBatch:
    x: np.ndarray  # (N, C, H, W) float32 in [0, 1]
    y: np.ndarray | None  # (N,) int64 class indices; conditional models only

    def __len__(self) -> int:
        return int(self.x.shape[0])


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _is_json(media_type: str) -> bool:
    return media_type == "application/json" or (media_type.startswith("application/") and
                                                media_type.endswith("+json"))


def bound_values(body: bytes, limit: int, what: str) -> None:
    """Refuse (422) a JSON body with far more values than any valid request has, before parsing it.

    Counting commas is a C-speed scan; it bounds the number of values, so a mis-shaped body of
    megabytes never reaches the JSON parser or the validator (which would build one error per value,
    gigabytes of them, for seconds). Base64 strings contain no commas, so image files are unaffected.
    """
    values = body.count(b",") + 1
    if values > limit + 64:
        raise InvalidInput(f"the JSON body holds about {values} values; a request takes at most {limit} "
                           f"({what}); send fewer or smaller inputs")


def _validate(body: bytes, model: type[BaseModel]) -> Any:
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        details = [{"loc": [str(p) for p in e["loc"]], "msg": e["msg"]} for e in errors]
        first = details[0]
        where = ".".join(first["loc"]) or "body"
        raise InvalidInput(f"invalid JSON body: {where}: {first['msg']}"
                           + (f" (and {len(details) - 1} more problems)" if len(details) > 1 else ""),
                           details=details[:20]) from None


async def read_images(request: Request, manifest: Manifest, label: str | None, settings: Settings,
                      schemas: RequestSchemas, deadline: float) -> ImageBatch:
    """Parse whichever input form the request uses into a checked (N, C, H, W) batch."""
    media_type = _media_type(request)
    if media_type == "multipart/form-data":
        arrays, labels = await _read_multipart(request, manifest, settings, deadline)
    elif _is_json(media_type):
        arrays, labels = await _read_json_images(request, manifest, settings, schemas, deadline)
    else:
        raise UnsupportedMediaType(
            f"Content-Type {media_type or '(none)'} is not supported: send multipart/form-data with files in "
            "the field 'images', or application/json with 'images' (base64 files) or 'inputs' (arrays)")
    x = np.stack(arrays).astype(np.float32, copy=False)  # (N, C, H, W)
    return ImageBatch(x, resolve_labels(manifest, len(arrays), label, labels))


async def _read_multipart(request: Request, manifest: Manifest, settings: Settings,
                          deadline: float) -> tuple[list[np.ndarray], list[str] | None]:
    try:
        form = await request.form(max_files=settings.max_images, max_fields=settings.max_images + 16)
    except MultiPartException as exc:  # Starlette raises it bare outside a FastAPI route (the fast path)
        raise BadRequest(exc.message) from None
    try:
        parts = form.getlist("images")
        if not parts:
            raise InvalidInput("no images: send one or more files in the multipart field 'images'")
        if len(parts) > settings.max_images:
            raise InvalidInput(f"{len(parts)} images in one request; the limit is {settings.max_images}")
        files = []
        for i, part in enumerate(parts):
            if not isinstance(part, UploadFile):
                raise InvalidInput(f"images[{i}] is a text field; send each image as a file part")
            files.append(await part.read())
        labels = [v for v in form.getlist("labels") if isinstance(v, str)] or None
    finally:
        await form.close()  # removes spooled temporary files at once
    return await decode_files(files, manifest, settings, deadline), labels


async def _read_json_images(request: Request, manifest: Manifest, settings: Settings, schemas: RequestSchemas,
                            deadline: float) -> tuple[list[np.ndarray], list[Any] | None]:
    body = await request.body()
    per_image = manifest.data_dims + 1  # the pixels of one image and its label
    bound_values(body, settings.max_images * per_image, f"{settings.max_images} images of "
                 f"{'x'.join(map(str, manifest.input_shape))} values")
    if len(body) <= INLINE_BODY_BYTES:
        parsed = _parse_json_images(body, manifest, schemas)
    else:  # parsing up to max_upload_bytes of JSON is CPU work: off the event loop
        parsed = await asyncio.to_thread(_parse_json_images, body, manifest, schemas)
    if isinstance(parsed, _Files):
        return await decode_files(parsed.files, manifest, settings, deadline), parsed.labels
    return parsed


@dataclass(frozen=True)
class _Files:
    """Encoded image files still to decode, with their labels."""

    files: list[bytes]
    labels: list[Any] | None


def _parse_json_images(body: bytes, manifest: Manifest,
                       schemas: RequestSchemas) -> _Files | tuple[list[np.ndarray], list[Any] | None]:
    files = _plain_base64_images(body, schemas.settings)
    if files is not None:
        return _Files([decode_or_422(s, i) for i, s in enumerate(files)], None)
    # Pick the form from the keys first, so a mistake gets the message of the form the caller meant.
    keys = _top_level_keys(body)
    if "images" in keys and "inputs" not in keys:
        req = _validate(body, schemas.images)
        return _Files([decode_or_422(s, i) for i, s in enumerate(req.images)], req.labels)
    if "inputs" in keys and "images" not in keys:
        req = _validate(body, schemas.arrays)
        return [_check_array(a, i, manifest) for i, a in enumerate(req.inputs)], req.labels
    raise InvalidInput("the JSON body needs exactly one of 'images' (base64 image files) or 'inputs' "
                       "(C x H x W arrays of floats in [0, 1])")


def _plain_base64_images(body: bytes, settings: Settings) -> list[str] | None:
    """The strings of `{"images": [...]}` when the body is exactly that and valid, else None.

    The hot path's common body, checked with one orjson parse; anything else (labels, another form, any
    mistake) goes through the pydantic models, which also word the errors. Accepts exactly what
    RequestSchemas.images accepts without labels.
    """
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(value, dict) or len(value) != 1:
        return None
    images = value.get("images")
    if not isinstance(images, list) or not 1 <= len(images) <= settings.max_images:
        return None
    limit = settings.max_upload_bytes
    if not all(type(item) is str and len(item) <= limit for item in images):
        return None
    return images


def _top_level_keys(body: bytes) -> set[str]:
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        raise InvalidInput("the body is not valid JSON") from None
    if not isinstance(value, dict):
        raise InvalidInput("the JSON body must be an object")
    return set(value)


def decode_or_422(text: str, index: int) -> bytes:
    try:
        return decode_base64(text)
    except ImageError as exc:
        raise InvalidInput(f"images[{index}]: {exc}") from None


async def decode_files(files: list[bytes], manifest: Manifest, settings: Settings,
                       deadline: float, field: str = "images") -> list[np.ndarray]:
    """Decode image files within the request's pixel budget, small ones inline, large ones in the pool.

    Every protocol's image files come here (/v1 multipart and base64, V2 `png` BYTES); `field` names
    them in errors (`images[3]`, `png[3]`).

    The pixel count comes from the headers before any pixel is decoded, so an expensive request (say
    eight 4000x4000 PNGs of a few KB each) is refused (413) or sent to the bounded decode pool, and
    never holds the event loop. A request whose decoding ran past its deadline is answered 504.
    """
    opened = [_open(f, i, field) for i, f in enumerate(files)]  # headers only: one open per file
    sizes = [im.size[0] * im.size[1] for im in opened]
    for i, (im, size) in enumerate(zip(opened, sizes, strict=True)):
        if size > settings.max_image_pixels:
            _decode(im, i, manifest, settings, field)  # refused with the per-image message, nothing decoded
    total = sum(sizes)
    if total > settings.max_request_pixels:
        raise PayloadTooLarge(f"the images of this request have {total} pixels in all, over the limit of "
                              f"{settings.max_request_pixels} per request (VAE_MAX_REQUEST_PIXELS); send "
                              "smaller images or fewer per request")
    reserve_pixels(total)  # 429 when this worker is decoding or holding too many pixels already
    if total <= INLINE_DECODE_PIXELS:  # a few small images: a thread hop would cost more than decoding
        return [_decode(im, i, manifest, settings, field) for i, im in enumerate(opened)]
    arrays = await asyncio.get_running_loop().run_in_executor(
        decode_pool(settings),
        lambda: [_decode(im, i, manifest, settings, field) for i, im in enumerate(opened)])
    if time.monotonic() > deadline:
        raise DeadlineExceeded("decoding the images took longer than the request deadline; send smaller "
                               "images")
    return arrays


_POOL: ThreadPoolExecutor | None = None


def decode_pool(settings: Settings) -> ThreadPoolExecutor:
    """This process's bounded pool for decoding large images (VAE_DECODE_THREADS threads)."""
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=settings.decode_threads, thread_name_prefix="vae-decode")
    return _POOL


def _open(data: bytes, index: int, field: str) -> Image.Image:
    try:
        return open_image(data)
    except ImageTooLarge as exc:
        raise PayloadTooLarge(f"{field}[{index}]: {exc}") from None
    except ImageError as exc:
        raise InvalidInput(f"{field}[{index}]: {exc}") from None


def _decode(im: Image.Image, index: int, manifest: Manifest, settings: Settings,
            field: str = "images") -> np.ndarray:
    try:
        return decode_image(im, manifest.preprocessing, settings.max_image_pixels)
    except ImageTooLarge as exc:
        raise PayloadTooLarge(f"{field}[{index}]: {exc}") from None
    except ImageError as exc:
        raise InvalidInput(f"{field}[{index}]: {exc}") from None


def _check_array(values: list[Any], index: int, manifest: Manifest) -> np.ndarray:
    """A nested list (already checked: finite floats in [0, 1]) -> (C, H, W) float32 of the model's shape."""
    try:
        arr = np.asarray(values, dtype=np.float32)
    except ValueError:
        raise InvalidInput(f"inputs[{index}] is ragged: every row must have the same length") from None
    if arr.shape != manifest.input_shape:
        raise InvalidInput(f"inputs[{index}] has shape {tuple(arr.shape)}; model {manifest.name} expects "
                           f"(channels, height, width) = {manifest.input_shape}")
    return arr


async def read_latents(request: Request, manifest: Manifest, label: str | None,
                       schemas: RequestSchemas) -> tuple[np.ndarray, np.ndarray | None]:
    """The model family's latents (families/base.py LatentSpace) from JSON, checked, and labels (N,) for
    conditional models: {"latents": [[...D floats], ...]} -> (N, D) float32 (Gaussian-latent models), or
    {"codes": [[[...w ints], ...h rows], ...]} -> (N, h, w) int64 in [0, K) (VQ-VAEs)."""
    space = latent_space(manifest)
    example = LATENT_EXAMPLES[space.input]
    media_type = _media_type(request)
    if not _is_json(media_type):
        raise UnsupportedMediaType(f"Content-Type {media_type or '(none)'} is not supported: send "
                                   f"application/json like {example}")
    body = await request.body()
    max_items = schemas.settings.max_images
    bound_values(body, max_items * (space.size + 1), f"{max_items} {space.input} of {space.size} numbers")
    model = schemas.latents if space.input == "latents" else schemas.codes
    if len(body) <= INLINE_BODY_BYTES:
        req = _validate(body, model)
    else:  # validation is CPU work: off the event loop
        req = await asyncio.to_thread(_validate, body, model)
    items = getattr(req, space.input)
    for i, item in enumerate(items):
        shape = _nested_shape(item, len(space.shape))
        if shape != space.shape:
            what = (f"latent_dim {space.shape[0]}" if space.input == "latents"
                    else f"{space.input} of shape {list(space.shape)}")
            raise InvalidInput(f"{space.input}[{i}] has shape {list(shape)}; model {manifest.name} takes "
                               f"{what}")
    with np.errstate(over="ignore"):  # values beyond float32 become inf and are refused just below
        z = np.asarray(items, dtype=np.float32 if space.dtype == "float32" else object)  # (N, *shape)
    return checked_latents(manifest, z), resolve_labels(manifest, len(z), label, req.labels)


def checked_latents(manifest: Manifest, z: np.ndarray) -> np.ndarray:
    """Latents of the model's family (shape already checked) as the graph takes them: finite float32
    vectors, or int64 codebook indices in [0, K); every protocol's decode passes here."""
    space = latent_space(manifest)
    if space.dtype == "float32":
        if not np.isfinite(z).all():
            raise InvalidInput(f"{space.input} overflow float32; use values of a sensible magnitude")
        return z.astype(np.float32, copy=False)
    low, high = (int(z.min()), int(z.max())) if z.size else (0, 0)  # Python ints: any JSON integer fits
    if space.upper is not None and (low < 0 or high >= space.upper):
        raise InvalidInput(f"{space.input} must be codebook indices in 0..{space.upper - 1}; got values "
                           f"{low}..{high}")
    return z.astype(np.int64)


LATENT_EXAMPLES = {"latents": '{"latents": [[0.1, -0.3, ...]]}', "codes": '{"codes": [[[3, 17, ...], ...]]}'}


def _nested_shape(item: Sequence, depth: int) -> tuple[int, ...]:
    """The shape of a nested list `depth` levels deep; a ragged list gets -1 where its rows differ."""
    if depth == 1 or not item:
        return (len(item), *(0,) * (depth - 1))
    inner = {_nested_shape(row, depth - 1) for row in item}
    return (len(item), *(inner.pop() if len(inner) == 1 else (-1,) * (depth - 1)))


def resolve_labels(manifest: Manifest, n: int, query_label: str | None,
                   body_labels: Sequence[int | str] | None) -> np.ndarray | None:
    """Class indices (N,) for a conditional model from `?label=` (all items) or a per-item list."""
    if manifest.labels is None:
        if query_label is not None or body_labels is not None:
            raise InvalidInput(f"model {manifest.name} is not conditional; remove label/labels")
        return None
    if query_label is not None and body_labels is not None:
        raise InvalidInput("give either the query parameter 'label' or a 'labels' list, not both")
    if query_label is None and body_labels is None:
        raise InvalidInput(f"model {manifest.name} is conditional: give ?label= (one of "
                           f"{list(manifest.labels)} or an index 0..{len(manifest.labels) - 1}) or a "
                           "'labels' list with one entry per item")
    values = [query_label] * n if body_labels is None else list(body_labels)
    if len(values) != n:
        raise InvalidInput(f"{len(values)} labels for {n} items; give one label per item")
    return np.asarray([label_index(manifest.labels, v) for v in values], dtype=np.int64)


def label_index(names: Sequence[str], value: int | str | None) -> int:
    """A class name, or an index given as int or decimal string -> index. Names win over indices."""
    if isinstance(value, str):
        if value in names:
            return names.index(value)
        if _INDEX_RE.fullmatch(value):
            value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(names):
        return value
    raise InvalidInput(f"unknown label {value!r}: use one of {list(names)} or an index 0..{len(names) - 1}")
