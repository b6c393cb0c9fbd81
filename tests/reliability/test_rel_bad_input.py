"""Bad input, end to end: every case gets a clear 4xx JSON error (or a documented conversion), the
service stays ready, and memory stays bounded. Limits are small (conftest.LIMITS)."""

from __future__ import annotations

import base64
import io
import json
import resource
import struct
import zlib
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

ENC = "/v1/models/tiny/encode"


def _img(arr: np.ndarray, fmt: str = "PNG", mode: str | None = None, **save: Any) -> bytes:
    buf = io.BytesIO()
    im = Image.fromarray(arr)
    (im.convert(mode) if mode else im).save(buf, format=fmt, **save)
    return buf.getvalue()


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height but holds one tiny IDAT (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


GREY = (np.arange(64, dtype=np.uint8).reshape(8, 8) * 4)
PNG = _img(GREY)
JPEG = _img(GREY, "JPEG")
_gif = io.BytesIO()
Image.fromarray(GREY).save(_gif, "GIF", save_all=True, append_images=[Image.fromarray(255 - GREY)])
_exif = Image.Exif()
_exif[0x0112] = 6  # rotate 90
_exif_jpeg = io.BytesIO()
Image.fromarray(np.zeros((8, 16, 3), np.uint8)).save(_exif_jpeg, "JPEG", exif=_exif)

# name -> image bytes that are converted and served (200): the decisions of service/images.py.
ACCEPTED = {
    "1x1": _img(np.zeros((1, 1), np.uint8)),
    "16-bit grey": _img((np.arange(64).reshape(8, 8) * 1000).astype(np.uint16)),
    "palette": _img(np.stack([GREY] * 3, axis=2), mode="P"),
    "RGBA (composited over black)": _img(np.zeros((8, 8, 4), np.uint8)),
    "RGB to a grey model (luma)": _img(np.zeros((8, 8, 3), np.uint8)),
    "animated GIF (first frame)": _gif.getvalue(),
    "EXIF-rotated JPEG (upright)": _exif_jpeg.getvalue(),
    "large but within the pixel limit": _img(np.zeros((900, 900), np.uint8)),
}

# name -> (image bytes, status, error code): refused.
REFUSED = {
    "zero bytes": (b"", 422, "invalid_input"),
    "truncated PNG": (PNG[: len(PNG) // 2], 422, "invalid_input"),
    "truncated JPEG": (JPEG[: len(JPEG) // 2], 422, "invalid_input"),
    "text file": (b"hello, I am not an image\n" * 10, 422, "invalid_input"),
    "decompression bomb (declared 100000x100000)": (_png_header(100_000, 100_000), 413, "payload_too_large"),
    "declared just past the pixel limit": (_png_header(1001, 1000), 413, "payload_too_large"),
    "TIFF (unsupported format)": (_img(GREY, "TIFF"), 422, "invalid_input"),
}


def assert_error(response: Any, status: int, code: str | None = None) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["message"] and error["request_id"] == response.headers["x-request-id"]
    if code:
        assert error["code"] == code, error


@pytest.fixture(autouse=True)
def stays_ready(rel_client: TestClient) -> Any:
    yield
    assert rel_client.get("/readyz").status_code == 200


@pytest.mark.parametrize("name", list(ACCEPTED))
def test_converted_images_are_served(rel_client: TestClient, name: str) -> None:
    data = ACCEPTED[name]
    multipart = rel_client.post(ENC, files={"images": ("x", data, "image/png")})
    assert multipart.status_code == 200, multipart.text
    as_json = rel_client.post(ENC, json={"images": [base64.b64encode(data).decode()]})
    assert as_json.json() == multipart.json()


@pytest.mark.parametrize("name", list(REFUSED))
def test_refused_images_get_a_clear_4xx(rel_client: TestClient, name: str) -> None:
    data, status, code = REFUSED[name]
    # a text file (or any bytes) with an image content type is judged by its bytes, not its label
    assert_error(rel_client.post(ENC, files={"images": ("x.png", data, "image/png")}), status, code)
    if data:
        assert_error(rel_client.post(ENC, json={"images": [base64.b64encode(data).decode()]}), status, code)


BODIES: dict[str, tuple[str, bytes | str, str, int]] = {  # name -> (path, body, content type, status)
    "malformed JSON": (ENC, b'{"inputs": [', "application/json", 422),
    "JSON array, not object": (ENC, b"[1, 2]", "application/json", 422),
    "wrong type": (ENC, json.dumps({"inputs": "abc"}), "application/json", 422),
    "both fields": (ENC, json.dumps({"inputs": [], "images": []}), "application/json", 422),
    "missing fields": (ENC, b"{}", "application/json", 422),
    "extra field": (ENC, json.dumps({"images": ["AAAA"], "surprise": 1}), "application/json", 422),
    "not base64": (ENC, json.dumps({"images": ["%%%not base64%%%"]}), "application/json", 422),
    "wrong channel count (array)": (ENC, json.dumps({"inputs": [[[[0.5] * 8] * 8] * 3]}), "application/json",
                                    422),
    "NaN pixel": (ENC, json.dumps({"inputs": [[[[0.5] * 8] * 8]]}).replace("0.5", "NaN", 1),
                  "application/json",
                  422),
    "pixel out of range": (ENC, json.dumps({"inputs": [[[[2.0] * 8] * 8]]}), "application/json", 422),
    "deeply nested JSON": (ENC, b"[" * 100_000 + b"]" * 100_000, "application/json", 422),
    "latents of the wrong length": ("/v1/models/tiny/decode", json.dumps({"latents": [[0.0] * 5]}),
                                    "application/json", 422),
    "latent inf": ("/v1/models/tiny/decode", b'{"latents": [[Infinity, 0, 0, 0]]}', "application/json", 422),
    "latent overflowing float32": ("/v1/models/tiny/decode", json.dumps({"latents": [[1e39, 0, 0, 0]]}),
                                   "application/json", 422),
    "10,000 images": (ENC, json.dumps({"images": ["AAAA"] * 10_000}), "application/json", 422),
    "image content type on the body": (ENC, PNG, "image/png", 415),
    "no content type": (ENC, b"{}", "", 415),
}


@pytest.mark.parametrize("name", list(BODIES))
def test_bad_bodies_get_a_clear_4xx(rel_client: TestClient, name: str) -> None:
    path, body, content_type, status = BODIES[name]
    headers = {"content-type": content_type} if content_type else {}
    assert_error(rel_client.post(path, content=body, headers=headers), status)


def test_10000_multipart_files_are_refused_before_decoding(rel_client: TestClient) -> None:
    files = [("images", (f"{i}.png", b"x", "image/png")) for i in range(10_000)]
    response = rel_client.post(ENC, files=files)
    assert 400 <= response.status_code < 500
    assert response.json()["error"]["message"]


@pytest.mark.parametrize("query", [
    "/v1/models/tiny/sample?n=0", "/v1/models/tiny/sample?n=17", "/v1/models/tiny/sample?n=abc",
    "/v1/models/tiny/sample?temperature=nan", "/v1/models/tiny/sample?temperature=inf",
    "/v1/models/tiny/sample?temperature=-1", "/v1/models/tiny/sample?seed=-1",
    f"/v1/models/tiny/sample?seed={2**63}", "/v1/models/tiny/sample?format=gif",
])
def test_out_of_range_query_parameters_are_422(rel_client: TestClient, query: str) -> None:
    assert_error(rel_client.get(query), 422, "invalid_input")


@pytest.mark.parametrize("k", ["0", "301", "-5", "1e3", "NaN"])
def test_k_out_of_range_is_422(rel_client: TestClient, k: str) -> None:
    body = {"inputs": [[[[0.5] * 8] * 8]]}
    assert_error(rel_client.post(f"/v1/models/tiny/log-likelihood?k={k}", json=body), 422, "invalid_input")


@pytest.mark.parametrize("name", ["unknown", "../tiny", "..%2ftiny", "%2e%2e", "%2e%2e%2f%2e%2e%2fetc",
                                  "%2Fetc%2Fpasswd", "tiny%00", "TINY", "a" * 300, "tiny/../tiny"])
def test_unknown_and_path_like_model_names_are_404(rel_client: TestClient, name: str) -> None:
    for response in (rel_client.get(f"/v1/models/{name}"),
                     rel_client.post(f"/v1/models/{name}/encode", json={"inputs": [[[[0.5] * 8] * 8]]})):
        if name == "tiny/../tiny":  # normalised by the client to /v1/models/tiny: a real route
            continue
        assert response.status_code == 404, (name, response.text)
        assert response.json()["error"]["code"] in ("model_not_found", "not_found")


def test_memory_stays_bounded_over_repeated_bad_input(rel_client: TestClient) -> None:
    """Send every refused case many times; the process's peak RSS must not keep growing."""
    def round_() -> None:
        for data, _, _ in REFUSED.values():
            rel_client.post(ENC, files={"images": ("x.png", data, "image/png")})
        rel_client.post(ENC, content=b'{"inputs": [', headers={"content-type": "application/json"})

    round_()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(15):
        round_()
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 50, grown_mb
