"""Deployment: docker-compose.yml and Dockerfile properties, the CLI, and graceful shutdown on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import uvicorn
import yaml
from fastapi import FastAPI
from svc_helpers import grey_arrays
from test_svc_concurrency import FaultyRuntime, until

from service.__main__ import main
from service.api.worker import DrainingServer

ROOT = Path(__file__).resolve().parents[2]


# -- container files -------------------------------------------------------------------------------------
def test_compose_reserves_a_gpu_mounts_models_read_only_and_checks_readiness() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    service = compose["services"]["vae"]
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    mounts = [v.split(":") if isinstance(v, str) else
              [v["source"], v["target"], "ro" if v.get("read_only") else "rw"] for v in service["volumes"]]
    assert ["./models", "/models", "ro"] in mounts
    assert service["environment"]["VAE_MODELS_DIR"] == "/models"
    assert "/readyz" in " ".join(service["healthcheck"]["test"])
    assert str(service["user"]).split(":")[0] not in ("0", "root")
    # in-flight requests must be able to finish before docker's SIGKILL
    grace = float(service["stop_grace_period"].rstrip("s"))
    assert float(service["environment"]["VAE_DRAIN_TIMEOUT_S"]) < grace


def test_dockerfile_runs_as_non_root_and_checks_readiness() -> None:
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert any(line.startswith("HEALTHCHECK") for line in lines)
    assert "/readyz" in (ROOT / "Dockerfile").read_text()
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    included = [line[1:] for line in ignore if line.startswith("!")]
    assert "service/" in included and not any(p.startswith(("training", "models")) for p in included)


# -- command line ----------------------------------------------------------------------------------------
def test_invalid_settings_stop_start_up_with_a_clear_message(monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("VAE_MAX_BATCH_SIZE", "0")
    assert main(["--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "invalid settings" in err and "max_batch_size" in err


def test_missing_models_stop_start_up_with_a_clear_message(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--models-dir", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["--models-dir", str(tmp_path)]) == 2
    assert "no models found" in capsys.readouterr().err


def test_cli_flags_are_validated() -> None:
    with pytest.raises(SystemExit) as info:
        main(["--runtime", "tensorflow"])
    assert info.value.code == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_drains_and_exits_zero(models_dir: Path, tmp_path: Path) -> None:
    """The real entry point in a subprocess: ready, then SIGTERM, then exit status 0."""
    port = _free_port()
    env = {**os.environ, "VAE_THREADS": "1", "VAE_MODELS": "tiny", "VAE_DRAIN_TIMEOUT_S": "5"}
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port),
                             "--models-dir", str(models_dir)], cwd=ROOT, env=env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.2)
        url = f"http://127.0.0.1:{port}/v1/models/tiny/encode"
        response = httpx.post(url, json={"inputs": grey_arrays(1)})
        assert response.status_code == 200 and response.headers["x-request-id"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    text = (tmp_path / "server.log").read_text()
    assert "draining" in text and "POST /v1/models/tiny/encode 200" in text


def test_shutdown_refuses_new_work_and_finishes_in_flight_requests(make_app: Callable[..., FastAPI]) -> None:
    """In-process uvicorn: a slow request is in flight when the exit signal arrives; it still gets 200."""
    app = make_app(drain_timeout_s=10)
    port = _free_port()
    server = DrainingServer(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None,
                                           timeout_graceful_shutdown=10), app.state.service)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.05)
    served = app.state.service.engine.registry.models[("tiny", "1")]
    served.runtime = FaultyRuntime(served.runtime, delay=1.0)

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=base, timeout=20) as client:
            body = {"inputs": grey_arrays(1)}
            in_flight = asyncio.ensure_future(client.post("/v1/models/tiny/encode", json=body))
            await until(lambda: served.runtime.calls > 0)  # the request is on the device
            server.handle_exit(signal.SIGTERM, None)
            assert app.state.service.draining and not app.state.service.ready  # readyz is 503 from now on
            response = await in_flight
            assert response.status_code == 200, response.text

    asyncio.run(scenario())
    thread.join(timeout=20)
    assert not thread.is_alive()
    assert app.state.service.engine.registry is None  # lifespan shutdown ran after the request finished
