"""Several versions of one model served side by side: routing, defaults, metadata, both protocols."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from svc_helpers import grey_arrays

from service.api.app import create_app
from service.config import Settings


@pytest.fixture
def two_versions(tmp_path: Path, models_dir: Path) -> Path:
    """tiny as version 1, and tinyc's graphs renamed as tiny version 10 (a different model)."""
    shutil.copytree(models_dir / "tiny" / "1", tmp_path / "tiny" / "1")
    shutil.copytree(models_dir / "lin" / "1", tmp_path / "tiny" / "10")
    manifest = tmp_path / "tiny" / "10" / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "name": "tiny", "version": "10"}))
    return tmp_path


def test_every_version_is_served_and_the_highest_is_the_default(two_versions: Path) -> None:
    app = create_app(Settings(models_dir=two_versions, threads=1, device_instances=1))
    body = {"inputs": grey_arrays(2)}
    with TestClient(app) as c:
        listed = c.get("/v1/models").json()["models"]
        assert [(m["name"], m["version"], m["versions"]) for m in listed] == [("tiny", "10", ["1", "10"])]
        assert c.get("/v1/models/tiny").json()["version"] == "10"  # numeric order: 10 > 1
        assert c.get("/v1/models/tiny/versions/1").json()["kind"] != c.get("/v1/models/tiny").json()["kind"]
        latest = c.post("/v1/models/tiny/encode", json=body).json()
        v10 = c.post("/v1/models/tiny/versions/10/encode", json=body).json()
        v1 = c.post("/v1/models/tiny/versions/1/encode", json=body).json()
        assert latest["version"] == v10["version"] == "10" and v1["version"] == "1"
        assert latest["results"] == v10["results"]
        assert not np.allclose(v1["results"][0]["mean"], v10["results"][0]["mean"])  # two models answered
        missing = c.post("/v1/models/tiny/versions/7/encode", json=body)
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
        assert "'1', '10'" in missing.json()["error"]["message"]  # says which versions exist
        meta = c.get("/v2/models/tiny.encode").json()
        assert meta["versions"] == ["1", "10"]
        v2_body = {"inputs": [{"name": "images", "datatype": "FP32", "shape": [2, 1, 8, 8],
                               "data": np.asarray(grey_arrays(2)).reshape(-1).tolist()}]}
        old = c.post("/v2/models/tiny.encode/versions/1/infer", json=v2_body).json()
        assert old["model_version"] == "1"
        np.testing.assert_allclose(old["outputs"][0]["data"], np.ravel([r["mean"] for r in v1["results"]]),
                                   rtol=1e-6, atol=1e-6)


def test_only_the_highest_version_when_asked(two_versions: Path) -> None:
    settings = Settings(models_dir=two_versions, threads=1, device_instances=1, serve_all_versions=False)
    app = create_app(settings)
    with TestClient(app) as c:
        assert c.get("/v1/models").json()["models"][0]["versions"] == ["10"]
        assert c.post("/v1/models/tiny/versions/1/encode", json={"inputs": grey_arrays(1)}).status_code == 404
