"""Settings validation and artifact loading: discovery, checksums, format version, refusals at start-up."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from service.__main__ import main
from service.anomaly import METHODS
from service.api.app import create_app
from service.artifacts import ArtifactError, discover, load_manifest
from service.config import Settings


# -- settings --------------------------------------------------------------------------------------------
def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VAE_MODELS", "a, b:2")
    monkeypatch.setenv("VAE_API_KEYS", "0123456789abcdef,fedcba9876543210")
    monkeypatch.setenv("VAE_MAX_BATCH_SIZE", "32")
    monkeypatch.setenv("VAE_RUNTIME", "torchscript")
    monkeypatch.setenv("VAE_LOG_LEVEL", "debug")
    s = Settings()
    assert s.models == ["a", "b:2"] and s.max_batch_size == 32 and s.runtime == "torchscript"
    assert [k.get_secret_value() for k in s.api_keys] == ["0123456789abcdef", "fedcba9876543210"]
    assert "0123456789abcdef" not in repr(s)  # secrets never show up in logs or reprs
    assert s.log_level == "DEBUG" and s.models_dir == Path("models")


@pytest.mark.parametrize("overrides, fragment", [
    ({"runtime": "tensorflow"}, "runtime"),
    ({"max_batch_size": 0}, "max_batch_size"),
    ({"default_k": 10, "max_k": 5}, "default_k"),
    ({"max_images": 100, "max_queue_size": 10}, "max_images"),
    ({"max_queue_samples": 1000}, "max_queue_samples"),
    ({"api_keys": "short"}, "16 characters"),
    ({"models": "../etc"}, "model reference"),
    ({"anomaly_alpha": 1.5}, "anomaly_alpha"),
])
def test_invalid_settings_are_refused(overrides: dict, fragment: str) -> None:
    with pytest.raises(ValidationError) as info:
        Settings(**overrides)
    assert fragment in str(info.value)


def test_an_unknown_anomaly_method_stops_start_up_naming_the_valid_ones(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("VAE_ANOMALY_METHOD", "bogus")
    assert main(["--port", "0"]) == 2  # refused before any model is looked for
    err = capsys.readouterr().err
    assert "anomaly_method" in err and "unknown anomaly method 'bogus'" in err
    assert f"valid methods: {', '.join(METHODS)}" in err
    for method in METHODS:  # every known method is accepted
        assert Settings(anomaly_method=method).anomaly_method == method


def test_a_default_method_a_model_lacks_falls_back_to_its_own_and_says_so(
        models_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    # tiny has no background model, hence no likelihood_ratio calibration.
    settings = Settings(models_dir=models_dir, models="tiny", threads=1, anomaly_method="likelihood_ratio")
    logs = caplog.at_level(logging.WARNING, logger="service.engine.registry")
    with logs, TestClient(create_app(settings)) as c:
        detail = c.get("/v1/models/tiny").json()["anomaly"]
        assert "likelihood_ratio" not in detail["methods"]
        scored = c.post("/v1/models/tiny/anomaly-score?seed=1", json={"inputs": [[[[0.5] * 8] * 8]]})
    assert scored.status_code == 200 and scored.json()["method"] == detail["default_method"]
    notes = [r.getMessage() for r in caplog.records if "VAE_ANOMALY_METHOD" in r.getMessage()]
    assert notes == [f"tiny:1 has no calibration for VAE_ANOMALY_METHOD=likelihood_ratio; its anomaly scores "
                     f"default to its own method {detail['default_method']!r} (it offers "
                     f"{', '.join(sorted(detail['methods']))})"]


# -- discovery and verification --------------------------------------------------------------------------
@pytest.fixture
def repo(tmp_path: Path, models_dir: Path) -> Path:
    """A private copy of the tiny model as versions 1, 2 and 10 (to corrupt freely)."""
    for version in ("1", "2", "10"):
        shutil.copytree(models_dir / "tiny" / "1", tmp_path / "tiny" / version)
        manifest = tmp_path / "tiny" / version / "manifest.json"  # not in its own checksum list
        manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "version": version}))
    (tmp_path / "tiny" / ".11.partial").mkdir()  # an export in progress is never picked up
    (tmp_path / "Not A Model").mkdir()
    return tmp_path


def test_discover_picks_latest_numeric_version_or_the_one_asked_for(repo: Path) -> None:
    assert discover(repo, []) == [repo / "tiny" / "10"]
    assert discover(repo, ["tiny:2"]) == [repo / "tiny" / "2"]
    with pytest.raises(ArtifactError, match="not found"):
        discover(repo, ["other"])
    with pytest.raises(ArtifactError, match="no version"):
        discover(repo, ["tiny:3"])
    with pytest.raises(ArtifactError, match="no models found"):
        discover(repo / "tiny" / "1", [])
    with pytest.raises(ArtifactError, match="does not exist"):
        discover(repo / "missing", [])


def test_manifest_is_read_and_verified(repo: Path) -> None:
    m = load_manifest(repo / "tiny" / "1", "onnx")
    assert m.name == "tiny" and m.input_shape == (1, 8, 8) and m.latent_dim == 4
    assert m.preprocessing.binarize_threshold == 0.5 and m.anomaly is not None and m.anomaly.k == 16


def test_modified_file_is_refused(repo: Path) -> None:
    with open(repo / "tiny" / "1" / "decoder.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ArtifactError, match=r"sha256 of 'decoder\.onnx'"):
        load_manifest(repo / "tiny" / "1", "onnx")


def test_missing_file_is_refused(repo: Path) -> None:
    (repo / "tiny" / "1" / "encoder.pt").unlink()
    with pytest.raises(ArtifactError, match="missing"):
        load_manifest(repo / "tiny" / "1", "onnx")


def _edit_manifest(path: Path, **changes: object) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    manifest.update(changes)
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_artifact_without_a_graph_of_its_family_is_refused_with_what_to_do(repo: Path) -> None:
    manifest = json.loads((repo / "tiny" / "1" / "manifest.json").read_text())
    del manifest["graphs"]["log_weights"]
    _edit_manifest(repo / "tiny" / "1", graphs=manifest["graphs"])
    with pytest.raises(ArtifactError, match=r"lacks \['log_weights'\].*re-export it"):
        load_manifest(repo / "tiny" / "1", "onnx")


def test_unknown_format_version_is_refused(repo: Path) -> None:
    _edit_manifest(repo / "tiny" / "1", format_version=2)
    with pytest.raises(ArtifactError, match="format_version 2 is not supported"):
        load_manifest(repo / "tiny" / "1", "onnx")


def test_paths_outside_the_artifact_are_refused(repo: Path) -> None:
    manifest = json.loads((repo / "tiny" / "1" / "manifest.json").read_text())
    manifest["files"]["../../secret"] = "0" * 64
    (repo / "tiny" / "1" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="outside the artifact"):
        load_manifest(repo / "tiny" / "1", "onnx")


def test_unlisted_graph_file_is_refused(repo: Path) -> None:
    manifest = json.loads((repo / "tiny" / "1" / "manifest.json").read_text())
    del manifest["files"]["log_weights.onnx"]
    (repo / "tiny" / "1" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="no checksum"):
        load_manifest(repo / "tiny" / "1", "onnx")


def test_malformed_manifest_is_refused(repo: Path) -> None:
    _edit_manifest(repo / "tiny" / "1", input="nonsense")
    with pytest.raises(ArtifactError, match="malformed"):
        load_manifest(repo / "tiny" / "1", "onnx")
    (repo / "tiny" / "2" / "manifest.json").write_text("{")
    with pytest.raises(ArtifactError, match="cannot read"):
        load_manifest(repo / "tiny" / "2", "onnx")


def test_app_refuses_to_start_with_a_corrupt_model(repo: Path) -> None:
    with open(repo / "tiny" / "10" / "encoder.onnx", "ab") as f:
        f.write(b"\0")
    app = create_app(Settings(models_dir=repo, threads=1))
    with pytest.raises(ArtifactError, match="sha256"), TestClient(app):
        pass


def test_app_serves_the_selected_version(repo: Path) -> None:
    _edit_manifest(repo / "tiny" / "2", version="2")
    # the manifest changed, so its checksum list no longer covers it: fine, manifest.json is not listed
    with TestClient(create_app(Settings(models_dir=repo, models="tiny:2", threads=1, warmup=False))) as c:
        assert c.get("/v1/models").json()["models"][0]["version"] == "2"
