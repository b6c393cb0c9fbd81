"""What the explorer page needs from the service, through the real app: its files (served from this origin
only, never refused while draining), reconstruct's `include_input`, the anomaly counters (every protocol)
and the latent ranking in the committed models' metadata. The page itself runs in a real browser in
tests/explorer."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from svc_helpers import digit_png, grey_arrays

from service.explorer import ASSETS, CSP

ROOT = Path(__file__).resolve().parents[2]
STATIC = ROOT / "service" / "explorer" / "static"


def test_the_page_and_its_files_come_from_this_origin_only(client: TestClient) -> None:
    page = client.get("/explore")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"] == CSP
    referenced = set(re.findall(r'(?:src|href)="(/explore/[^"]+)"', page.text))
    assert referenced == {f"/explore/{name}" for name in ASSETS}
    for path in referenced:
        asset = client.get(path)
        assert asset.status_code == 200 and asset.headers["content-security-policy"] == CSP
        assert asset.headers["content-type"] == ASSETS[path.rsplit("/", 1)[1]]
    for file in STATIC.iterdir():  # nothing is loaded from the internet
        assert not re.search(r"https?://", file.read_text()), file.name


def test_an_unknown_explorer_file_is_a_404_in_the_error_shape(client: TestClient) -> None:
    response = client.get("/explore/../service/config.py")
    assert response.status_code == 404
    response = client.get("/explore/secret.js")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
    assert "/explore" in response.json()["error"]["message"]


def test_the_page_is_served_while_draining_but_model_work_is_not(client: TestClient) -> None:
    state = client.app.state.service
    state.draining = True
    try:
        assert client.get("/explore").status_code == 200
        assert client.get("/explore/explorer.js").status_code == 200
        assert client.get("/v1/models").status_code == 503
    finally:
        state.draining = False


@pytest.mark.parametrize("path", ["/v1/models/tiny/reconstruct", "/v1/models/tiny/versions/1/reconstruct"])
def test_reconstruct_returns_the_input_the_errors_are_measured_against(client: TestClient, path: str) -> None:
    arrays = grey_arrays(2, seed=4)
    answer = client.post(path, params={"format": "array", "include_input": "true"}, json={"inputs": arrays})
    assert answer.status_code == 200, answer.text
    for sent, result in zip(arrays, answer.json()["results"], strict=True):
        seen = np.asarray(result["input"])
        np.testing.assert_allclose(seen, np.asarray(sent, dtype=np.float32), atol=1e-7)
        sse = ((seen - np.asarray(result["array"])) ** 2).sum()
        assert result["sse"] == pytest.approx(sse, rel=1e-5)
    # PNG format: the input is a base64 PNG too; without the option there is no input at all.
    one = [("images", ("d.png", digit_png(), "image/png"))]
    png = client.post(path, params={"include_input": "true"}, files=one)
    assert isinstance(png.json()["results"][0]["input"], str)
    plain = client.post(path, files=one)
    assert "input" not in plain.json()["results"][0]
    bad = client.post(path, params={"include_input": "yes"}, json={"inputs": arrays})
    assert bad.status_code == 422 and "include_input" in bad.json()["error"]["message"]


def _counter(text: str, name: str, method: str) -> float:
    pattern = rf'^{name}{{method="{method}",model="tiny",version="1"}} ([0-9.e+]+)$'
    values = [float(m.group(1)) for m in re.finditer(pattern, text, re.MULTILINE)]
    return values[0] if values else 0.0


def test_anomaly_decisions_are_counted_per_method_on_every_protocol(client: TestClient) -> None:
    before = client.get("/metrics").text
    scored0 = _counter(before, "vae_anomaly_scored_images_total", "nll")
    flagged0 = _counter(before, "vae_anomaly_flagged_images_total", "nll")
    files = [("images", (f"{i}.png", digit_png(seed=i), "image/png")) for i in range(3)]
    v1 = client.post("/v1/models/tiny/anomaly-score", params={"seed": 0, "alpha": 0.5}, files=files).json()
    x = np.asarray(grey_arrays(2, seed=9), dtype=np.float32)
    v2 = client.post("/v2/models/tiny.anomaly_score/infer", json={
        "inputs": [{"name": "images", "datatype": "FP32", "shape": list(x.shape),
                    "data": x.ravel().tolist()}],
        "parameters": {"seed": 0, "alpha": 0.5}}).json()
    flags = [r["is_anomaly"] for r in v1["results"]]
    flags += next(o["data"] for o in v2["outputs"] if o["name"] == "is_anomaly")
    after = client.get("/metrics").text
    assert _counter(after, "vae_anomaly_scored_images_total", "nll") - scored0 == 5
    assert _counter(after, "vae_anomaly_flagged_images_total", "nll") - flagged0 == sum(flags)


@pytest.mark.parametrize("version", ["1", "2"])
def test_committed_models_rank_their_latents_by_the_reports_kl(version: str) -> None:
    artifact = ROOT / "models" / "mnist-vae" / version
    manifest = json.loads((artifact / "manifest.json").read_text())
    report = json.loads((artifact / "report" / "report.json").read_text())
    assert manifest["metrics"]["kl_per_dim"] == report["kl_per_dim"]
    assert len(report["kl_per_dim"]) == manifest["model"]["latent_dim"]
