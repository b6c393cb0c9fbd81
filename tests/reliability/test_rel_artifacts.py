"""Artifact problems at start-up: missing file, sha256 mismatch, corrupt ONNX, unknown format version.

Every problem refuses that model with one log line naming it; VAE_ON_BAD_MODEL=fail (default) stops
start-up, =skip serves the other models. A file changed after verification is never loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import harness
import httpx
import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.artifacts import ArtifactError, load_manifest
from service.config import Settings
from service.engine.runtime import load_runtime


def _missing(d: Path) -> None:
    (d / "decoder.onnx").unlink()


def _sha_mismatch(d: Path) -> None:
    with open(d / "encoder.onnx", "ab") as f:
        f.write(b"\0")


def _corrupt_onnx(d: Path) -> None:
    """Garbage with a matching checksum: only the ONNX loader can tell."""
    data = b"this is not an onnx model" * 10
    (d / "encoder.onnx").write_bytes(data)
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["files"]["encoder.onnx"] = hashlib.sha256(data).hexdigest()
    (d / "manifest.json").write_text(json.dumps(manifest))


def _future_format(d: Path) -> None:
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["format_version"] = 99
    (d / "manifest.json").write_text(json.dumps(manifest))


PROBLEMS: dict[str, tuple[Callable[[Path], None], str]] = {
    "missing file": (_missing, "is missing"),
    "sha256 mismatch": (_sha_mismatch, "sha256 of 'encoder.onnx'"),
    "corrupt onnx": (_corrupt_onnx, "ONNX Runtime cannot load it"),
    "unknown format version": (_future_format, "format_version 99 is not supported"),
}


@pytest.fixture
def repo(tmp_path: Path, models_dir: Path) -> Path:
    for name in ("tiny", "lin"):
        shutil.copytree(models_dir / name, tmp_path / "models" / name)
    return tmp_path / "models"


@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_bad_artifact_is_refused_with_a_clear_log_line(problem: str, repo: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    damage, fragment = PROBLEMS[problem]
    damage(repo / "tiny" / "1")
    caplog.set_level(logging.ERROR, logger="service.engine.registry")
    with pytest.raises(ArtifactError, match="refusing model tiny/1") as info, \
            TestClient(create_app(Settings(models_dir=repo, threads=1))):
        pass
    assert fragment in str(info.value)
    lines = [r.getMessage() for r in caplog.records if "refusing model tiny/1" in r.getMessage()]
    assert len(lines) == 1 and fragment in lines[0], caplog.text

    # on_bad_model=skip: the other model is served, the bad one is not (404), and readiness says so.
    settings = Settings(models_dir=repo, threads=1, on_bad_model="skip", warmup=False)
    with TestClient(create_app(settings)) as client:
        assert client.get("/readyz").json() == {"status": "ready", "models": ["lin"]}
        assert client.post("/v1/models/tiny/encode", json={"inputs": [[[[0.0] * 8] * 8]]}).status_code == 404
        assert client.post("/v1/models/lin/encode", json={"inputs": [[[[0.0] * 8] * 8]]}).status_code == 200
        assert 'vae_model_refused{model="tiny",version="1"} 1.0' in client.get("/metrics").text


def test_skip_with_every_model_bad_still_refuses_to_start(repo: Path) -> None:
    _sha_mismatch(repo / "tiny" / "1")
    _future_format(repo / "lin" / "1")
    with pytest.raises(ArtifactError, match="no model could be loaded"), \
            TestClient(create_app(Settings(models_dir=repo, threads=1, on_bad_model="skip"))):
        pass


@pytest.mark.parametrize("runtime", ["onnx", "torchscript"])
def test_file_swapped_after_verification_is_never_loaded(repo: Path, runtime: str) -> None:
    """The runtime loads the bytes it hashed: a file replaced between checks and load is refused."""
    manifest = load_manifest(repo / "tiny" / "1", runtime)
    target = manifest.graph_path("decoder", runtime)
    target.write_bytes(target.read_bytes() + b"tampered")
    with pytest.raises(ArtifactError, match="sha256 of 'decoder"):
        load_runtime(manifest, runtime, "cpu", 1)


def test_real_process_refuses_a_tampered_model_or_serves_the_others(repo: Path, tmp_path: Path) -> None:
    _sha_mismatch(repo / "tiny" / "1")
    with harness.start_server(repo, tmp_path / "fail.log", wait=False) as server:
        assert server.proc.wait(timeout=90) == 3  # start-up failed: never ready, never served
        log = server.log()
    assert "refusing model tiny/1: " in log and "sha256 of 'encoder.onnx'" in log
    with harness.start_server(repo, tmp_path / "skip.log", env={"VAE_ON_BAD_MODEL": "skip"}) as server:
        assert httpx.get(f"{server.url}/readyz").json()["models"] == ["lin"]
        assert httpx.get(f"{server.url}/v1/models/tiny").status_code == 404
        assert "refusing model tiny/1: " in server.log()
