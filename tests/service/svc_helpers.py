"""Helpers shared by the service tests: real image files made with Pillow."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image


def image_bytes(arr: np.ndarray, fmt: str = "PNG", mode: str | None = None, **save: object) -> bytes:
    """(H, W) or (H, W, C) uint8 -> encoded file bytes."""
    buf = io.BytesIO()
    image = Image.fromarray(arr) if mode is None else Image.fromarray(arr).convert(mode)
    image.save(buf, format=fmt, **save)
    return buf.getvalue()


def digit_png(seed: int = 0, size: int = 8) -> bytes:
    """A random grey PNG of the models' input size."""
    rng = np.random.default_rng(seed)
    return image_bytes((rng.random((size, size)) * 255).astype(np.uint8))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def grey_arrays(n: int, seed: int = 0) -> list[list[list[list[float]]]]:
    """n random (1, 8, 8) images as nested lists, values multiples of 1/255 so PNG round-trips exactly."""
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, size=(n, 1, 8, 8)) / 255.0).tolist()
