"""Images in and out: what callers pass -> a request body; what the service returns -> numpy / PIL.

Two body forms, as the service accepts them: numpy arrays go as JSON `{"inputs": [C x H x W floats]}`
(exact values, no quantisation); image files (PIL images, PNG/JPEG bytes, paths) go as multipart
parts of the field `images`, which the service decodes and resizes as the model's manifest says.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
from PIL import Image

ImageLike: TypeAlias = "np.ndarray | Image.Image | bytes | bytearray | memoryview | str | os.PathLike[str]"
"""One image: a (C, H, W) float array in [0, 1], a PIL image, encoded file bytes, or a file path."""

Images: TypeAlias = "ImageLike | Sequence[ImageLike]"
"""One image, a (N, C, H, W) array, or a sequence of images (all arrays or all files, not mixed)."""

# Magic numbers of the formats the service decodes: only used to label the multipart parts.
_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "image/png", ".png"), (b"\xff\xd8\xff", "image/jpeg", ".jpg"),
               (b"GIF8", "image/gif", ".gif"), (b"BM", "image/bmp", ".bmp"))


@dataclass(frozen=True)
class ImagePayload:
    """The body for the image routes: exactly one of `json` or `files` is set."""

    count: int
    json: dict[str, Any] | None = None
    files: list[tuple[str, tuple[str, bytes, str]]] | None = None
    data: dict[str, list[str]] | None = None  # multipart text fields (labels)


def _is_file_like(item: Any) -> bool:
    return isinstance(item, Image.Image | bytes | bytearray | memoryview | str | os.PathLike)


def _as_items(images: Any) -> list[Any]:
    """Flatten the accepted shapes of `images` into a list of single images."""
    if isinstance(images, np.ndarray):
        if images.ndim == 4:
            return list(images)
        if images.ndim == 3:
            return [images]
        raise ValueError(f"an image array must be (C, H, W) or (N, C, H, W); got shape {images.shape}")
    if _is_file_like(images):
        return [images]
    if isinstance(images, Sequence):
        return list(images)
    raise TypeError(f"images must be numpy arrays, PIL images, bytes or paths; got {type(images).__name__}")


def _array_values(item: np.ndarray, index: int) -> list[Any]:
    if item.ndim != 3:
        raise ValueError(f"images[{index}] must be a (C, H, W) array; got shape {item.shape}")
    if item.dtype.kind not in "fb":
        raise ValueError(f"images[{index}] has dtype {item.dtype}; send floats in [0, 1] (e.g. x / 255)")
    # float64 holds every float32 exactly, and JSON floats round-trip: the service sees these values.
    return np.asarray(item, dtype=np.float64).tolist()


def _file_bytes(item: Any, index: int) -> tuple[str, bytes]:
    """(file name, encoded bytes) of a PIL image, raw bytes or a path."""
    if isinstance(item, Image.Image):
        buffer = io.BytesIO()
        item.save(buffer, format="PNG")  # lossless; the service converts mode and size itself
        return f"image{index}.png", buffer.getvalue()
    if isinstance(item, bytes | bytearray | memoryview):
        return f"image{index}", bytes(item)
    path = Path(item)
    return path.name, path.read_bytes()


def _content_type(name: str, data: bytes) -> tuple[str, str]:
    """(file name with an extension, content type) from the bytes' signature."""
    for magic, ctype, ext in _SIGNATURES:
        if data.startswith(magic):
            return (name if Path(name).suffix else name + ext), ctype
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return (name if Path(name).suffix else name + ".webp"), "image/webp"
    return name, "application/octet-stream"  # the service answers 422 if it cannot decode it


def image_payload(images: Any, labels: Sequence[str | int] | None = None) -> ImagePayload:
    """Build the request body for `images` (see `Images`), with optional per-image labels."""
    items = _as_items(images)
    if not items:
        raise ValueError("no images given")
    arrays = [isinstance(item, np.ndarray) for item in items]
    if all(arrays):
        body: dict[str, Any] = {"inputs": [_array_values(item, i) for i, item in enumerate(items)]}
        if labels is not None:
            body["labels"] = list(labels)
        return ImagePayload(len(items), json=body)
    if any(arrays):
        raise TypeError("give either arrays or image files (PIL, bytes, paths) in one call, not both")
    files = []
    for i, item in enumerate(items):
        if not _is_file_like(item):
            raise TypeError(f"images[{i}] is a {type(item).__name__}; expected an array, PIL image, bytes "
                            "or a path")
        raw_name, data = _file_bytes(item, i)
        name, content_type = _content_type(raw_name, data)
        files.append(("images", (name, data, content_type)))
    data = None if labels is None else {"labels": [str(label) for label in labels]}
    return ImagePayload(len(items), files=files, data=data)


# -- outputs --------------------------------------------------------------------------------------------
def array_from_png(data: bytes) -> np.ndarray:
    """A PNG (grey, RGB or RGBA) -> (C, H, W) float32 in [0, 1]."""
    with Image.open(io.BytesIO(data)) as image:
        pixels = np.asarray(image, dtype=np.float32) / 255.0
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def decode_base64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"invalid base64 image in the response: {exc}") from None


def to_pil(images: np.ndarray) -> list[Image.Image]:
    """(N, C, H, W) floats in [0, 1] -> PIL images (1 channel: L, 3: RGB, 4: RGBA), rounded to 8 bits."""
    if images.ndim != 4 or images.shape[1] not in (1, 3, 4):
        raise ValueError(f"expected (N, C, H, W) with C in 1, 3, 4; got shape {images.shape}")
    pixels = np.rint(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)
    # Pillow picks the mode from the uint8 array's shape: (H, W) -> L, (H, W, 3) -> RGB, (H, W, 4) -> RGBA.
    return [Image.fromarray(p[0] if p.shape[0] == 1 else p.transpose(1, 2, 0)) for p in pixels]
