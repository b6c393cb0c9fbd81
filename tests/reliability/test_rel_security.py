"""Security: API keys on every /v1 route, open (or, if configured, protected) ops endpoints, keys
never logged, limits enforced before expensive work, no pickle on the loading path."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from pathlib import Path

import harness
import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.config import Settings

KEY = "k" * 8 + "0123456789abcdef"
OTHER = "x" * 24
SERVICE = Path(__file__).resolve().parents[2] / "service"


def _v1_routes(client: TestClient) -> list[tuple[str, str]]:
    spec = client.get("/openapi.json").json()
    return [(method.upper(), path.replace("{model}", "tiny"))
            for path, ops in spec["paths"].items() if path.startswith("/v1") for method in ops]


@pytest.mark.parametrize("auth_ops", [False, True])
def test_every_v1_route_needs_a_valid_key(models_dir: Path, auth_ops: bool,
                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    settings = Settings(models_dir=models_dir, models="tiny", threads=1, warmup=False, api_keys=KEY,
                        auth_ops=auth_ops)
    with TestClient(create_app(settings)) as client:
        routes = _v1_routes(client)
        assert len(routes) >= 7
        for method, path in routes:
            for headers in ({}, {"Authorization": f"Bearer {OTHER}"}, {"Authorization": f"Basic {KEY}"},
                            {"Authorization": f"Bearer {KEY[:-1]}"}, {"Authorization": f"Bearer {KEY}x"}):
                response = client.request(method, path, headers=headers)
                assert response.status_code == 401, (method, path, headers, response.text)
                assert response.json()["error"]["code"] == "unauthorized"
                assert response.headers["www-authenticate"] == "Bearer"
            good = client.request(method, path, headers={"Authorization": f"Bearer {KEY}"})
            assert good.status_code != 401, (method, path)
        for path in ("/healthz", "/readyz", "/metrics"):
            assert client.get(path).status_code == (401 if auth_ops else 200), path
            assert client.get(path, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert KEY not in caplog.text and KEY[:-1] not in caplog.text  # keys are never logged


def test_keys_are_compared_in_constant_time() -> None:
    source = (SERVICE / "api" / "auth.py").read_text()
    assert "hmac.compare_digest" in source
    start, end = source.index("async def require_api_key"), source.index("return [Depends(require_api_key)]")
    check = source[start:end]
    assert "==" not in check and "given in" not in check  # no early-exit comparison of secrets


def test_no_pickle_on_the_loading_path() -> None:
    """Models load only through ONNX Runtime (protobuf) and torch.jit.load (TorchScript's reader)."""
    forbidden = re.compile(r"\bpickle\b|\bdill\b|\bjoblib\b|torch\.load\(|allow_pickle\s*=\s*True|"
                           r"\bmarshal\b|\bshelve\b|yaml\.load\(|(?<![.\w])eval\(|(?<![.\w])exec\(")
    for path in sorted(SERVICE.glob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            assert not forbidden.search(code), f"{path.name}:{number}: {line.strip()}"


def _raw(port: int, head: bytes, body_parts: list[bytes], pause: float) -> tuple[int, float, int]:
    """Send a head, then body parts with pauses; return (status, seconds to the answer, bytes sent)."""
    async def go() -> tuple[int, float, int]:
        reader, writer = await asyncio.open_connection(harness.HOST, port)
        started, sent = time.monotonic(), 0
        writer.write(head)
        read = asyncio.create_task(reader.read(4096))
        for part in body_parts:
            if read.done():
                break
            try:
                writer.write(part)
                await writer.drain()
            except ConnectionError:
                break
            sent += len(part)
            await asyncio.sleep(pause)
        data = await asyncio.wait_for(read, 10)
        writer.close()
        return int(data[9:12]), time.monotonic() - started, sent
    return asyncio.run(go())


def test_upload_limit_answers_413_before_the_body_is_read(models_dir: Path, tmp_path: Path) -> None:
    env = {"VAE_MODELS": "tiny", "VAE_MAX_UPLOAD_BYTES": str(64 * 1024), "VAE_LOG_LEVEL": "WARNING"}
    with harness.start_server(models_dir, tmp_path / "server.log", env=env) as server:
        path = harness.ENCODE
        # Declared 100 MB: refused on the headers alone, after sending 1 of the 100 MB.
        head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {100 * 2**20}\r\n\r\n").encode()
        status, _, sent = _raw(server.port, head, [b"{" * 65536] * 16, 0.05)
        assert status == 413 and sent <= 2 * 65536, (status, sent)
        # Chunked (no length): refused once the count passes the limit, not at the end of the stream.
        head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                "Transfer-Encoding: chunked\r\n\r\n").encode()
        chunk = b"%x\r\n%s\r\n" % (32768, b" " * 32768)
        status, _, sent = _raw(server.port, head, [chunk] * 64, 0.05)
        assert status == 413 and sent < 16 * len(chunk), (status, sent)
        assert harness.scrape(server.url)["vae_inflight_requests"] == 0
