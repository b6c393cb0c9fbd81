"""Every endpoint and input form through the real app (ONNX Runtime sessions, lifespan, middleware)."""

from __future__ import annotations

import io
import json
import math
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from svc_helpers import b64, digit_png, grey_arrays, image_bytes

from service.anomaly import METHODS, STANDARD_ERROR_METHODS


def assert_error(response: Any, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["message"] and error["code"]
    assert error["request_id"] == response.headers["x-request-id"]
    if code is not None:
        assert error["code"] == code, error
    return error


# -- health, metadata, metrics ---------------------------------------------------------------------------
def test_health_ready_and_model_list(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}  # liveness lists no models (readyz does)
    assert client.get("/readyz").json() == {"status": "ready", "models": ["lin", "tiny", "tinyc"]}
    models = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    assert set(models) == {"lin", "tiny", "tinyc"}
    assert models["tiny"]["input"] == {"channels": 1, "height": 8, "width": 8}
    assert models["tiny"]["labels"] is None and models["tinyc"]["labels"] == [str(i) for i in range(10)]


def test_model_detail_has_manifest_and_runtime_settings(client: TestClient) -> None:
    detail = client.get("/v1/models/tiny").json()
    assert detail["latent_dim"] == 4 and detail["likelihood"] == {"family": "bernoulli"}
    assert detail["runtime"] == "onnx" and detail["device"] == "cpu"
    assert detail["batching"]["max_batch_size"] == 16
    assert detail["limits"]["anomaly_default_k"] == 16  # the calibration k of the fixture
    assert detail["anomaly"]["k"] == 16 and "metrics" in detail
    assert detail["anomaly"]["methods"]["nll"]["n"] > 0


def test_request_id_is_echoed_or_generated(client: TestClient) -> None:
    assert client.get("/healthz", headers={"X-Request-ID": "abc-123"}).headers["x-request-id"] == "abc-123"
    generated = client.get("/healthz", headers={"X-Request-ID": "bad id;" * 50}).headers["x-request-id"]
    assert generated != "bad id" and len(generated) == 32


def test_metrics_are_prometheus_text(client: TestClient) -> None:
    client.post("/v1/models/tiny/encode", json={"inputs": grey_arrays(2)})
    text = client.get("/metrics").text
    assert 'vae_requests_total{endpoint="/v1/models/{model}/encode",method="POST",status="200"}' in text
    for name in ("vae_request_duration_seconds_bucket", "vae_queue_duration_seconds_bucket",
                 "vae_compute_duration_seconds_bucket", "vae_batch_size_rows_bucket", "vae_queue_depth_rows"):
        assert f'{name}{{' in text, name
    assert 'graph="encoder",model="tiny",version="1"' in text


def test_openapi_documents_every_route_with_examples(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    encode = paths["/v1/models/{model}/encode"]["post"]
    content = encode["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(content)
    assert content["application/json"]["examples"]
    assert {"404", "413", "415", "422", "429", "504"} <= set(encode["responses"])
    assert paths["/v1/models/{model}/sample"]["get"]["parameters"]
    n = next(p for p in paths["/v1/models/{model}/sample"]["get"]["parameters"] if p["name"] == "n")
    assert n["schema"]["maximum"] == 256
    assert client.get("/docs").status_code == 200


def test_openapi_texts_list_every_anomaly_method_from_the_one_definition(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    listed = ", ".join(METHODS)  # service/anomaly.py: the methods the service can score
    for path in ("/v1/models/{model}/anomaly-score", "/v1/models/{model}/versions/{version}/anomaly-score"):
        method = next(p for p in spec["paths"][path]["post"]["parameters"] if p["name"] == "method")
        assert f"one of {listed}, as the model's calibration offers" in method["description"]
        assert "default: the model's own (anomaly.default_method)" in method["description"]
    result = spec["components"]["schemas"]["AnomalyResult"]["properties"]["method"]
    assert result["description"].endswith(f"one of {listed}")
    overview = spec["info"]["description"]
    assert all(f"`{m}`" in overview for m in METHODS) and "anomaly.default_method" in overview
    assert "with its percentile" not in json.dumps(spec)  # the old text that named -log p(x) only


# -- encode: the three input forms give the same result --------------------------------------------------
def test_encode_input_forms_agree(client: TestClient) -> None:
    arrays = grey_arrays(3, seed=1)
    pngs = [image_bytes((np.asarray(a[0]) * 255).round().astype(np.uint8)) for a in arrays]
    by_array = client.post("/v1/models/tiny/encode", json={"inputs": arrays}).json()
    by_b64 = client.post("/v1/models/tiny/encode", json={"images": [b64(p) for p in pngs]}).json()
    files = [("images", (f"{i}.png", p, "image/png")) for i, p in enumerate(pngs)]
    by_multipart = client.post("/v1/models/tiny/encode", files=files).json()
    assert by_array["model"] == "tiny" and by_array["version"] == "1" and len(by_array["results"]) == 3
    for other in (by_b64, by_multipart):
        for a, b in zip(by_array["results"], other["results"], strict=True):
            np.testing.assert_allclose(a["mean"], b["mean"], atol=1e-6)
    first = by_array["results"][0]
    assert len(first["mean"]) == 4
    np.testing.assert_allclose(first["variance"], np.exp(first["log_variance"]), rtol=1e-12)


def test_encode_preserves_order(client: TestClient) -> None:
    arrays = grey_arrays(5, seed=2)
    together = client.post("/v1/models/tiny/encode", json={"inputs": arrays}).json()["results"]
    for i in (0, 4):
        alone = client.post("/v1/models/tiny/encode", json={"inputs": [arrays[i]]}).json()["results"][0]
        np.testing.assert_allclose(alone["mean"], together[i]["mean"], atol=1e-5)


def test_encode_accepts_other_image_modes(client: TestClient) -> None:
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = 255  # white, but fully transparent: composited over black = an empty image
    jpeg = image_bytes(np.full((16, 12, 3), 200, np.uint8), fmt="JPEG")  # RGB, other size: resized
    files = [("images", ("a.png", image_bytes(rgba), "image/png")), ("images", ("b.jpg", jpeg, "image/jpeg"))]
    response = client.post("/v1/models/tiny/encode", files=files)
    assert response.status_code == 200, response.text
    empty = client.post("/v1/models/tiny/encode", json={"inputs": [np.zeros((1, 8, 8)).tolist()]}).json()
    np.testing.assert_allclose(response.json()["results"][0]["mean"], empty["results"][0]["mean"], atol=1e-6)


def test_conditional_labels_by_query_name_index_and_list(client: TestClient) -> None:
    arrays = grey_arrays(2, seed=3)
    url = "/v1/models/tinyc/encode"
    by_name = client.post(url + "?label=7", json={"inputs": arrays}).json()["results"]
    by_list = client.post(url, json={"inputs": arrays, "labels": [7, "7"]}).json()["results"]
    other = client.post(url, json={"inputs": arrays, "labels": [1, 1]}).json()["results"]
    np.testing.assert_allclose(by_name[0]["mean"], by_list[0]["mean"])
    np.testing.assert_allclose(by_name[1]["mean"], by_list[1]["mean"])
    assert not np.allclose(by_name[0]["mean"], other[0]["mean"])
    files = [("images", ("a.png", digit_png(), "image/png"))]
    assert client.post(url, files=files, data={"labels": "3"}).status_code == 200


@pytest.mark.parametrize("query, body, fragment", [
    ("", {}, "is conditional"),
    ("?label=ten", {}, "unknown label"),
    ("?label=10", {}, "unknown label"),
    ("", {"labels": [1]}, "2 items"),
    ("?label=1", {"labels": [1, 2]}, "not both"),
])
def test_conditional_label_errors(client: TestClient, query: str, body: dict, fragment: str) -> None:
    response = client.post(f"/v1/models/tinyc/encode{query}", json={"inputs": grey_arrays(2), **body})
    assert fragment in assert_error(response, 422, "invalid_input")["message"]


def test_label_for_unconditional_model_is_refused(client: TestClient) -> None:
    assert_error(client.post("/v1/models/tiny/encode?label=1", json={"inputs": grey_arrays(1)}), 422)


# -- decode, sample, reconstruct -------------------------------------------------------------------------
def test_decode_png_and_array(client: TestClient) -> None:
    latents = [[0.0, 0.0, 0.0, 0.0], [1.0, -1.0, 0.5, 2.0]]
    pngs = client.post("/v1/models/tiny/decode", json={"latents": latents}).json()["results"]
    arrays = client.post("/v1/models/tiny/decode?format=array", json={"latents": latents}).json()["results"]
    image = np.asarray(Image.open(io.BytesIO(__import__("base64").b64decode(pngs[1]["image"]))), np.float64)
    arr = np.asarray(arrays[1]["array"])
    assert arr.shape == (1, 8, 8) and arr.min() >= 0.0 and arr.max() <= 1.0
    np.testing.assert_allclose(image / 255.0, arr[0], atol=0.5 / 255 + 1e-6)
    assert "array" not in pngs[0] and "image" not in arrays[0]


def test_sample_is_seeded_and_temperature_zero_decodes_the_origin(client: TestClient) -> None:
    url = "/v1/models/tiny/sample"
    a = client.get(url, params={"n": 3, "seed": 5, "format": "array"}).json()
    b = client.get(url, params={"n": 3, "seed": 5, "format": "array"}).json()
    assert a == b and a["seed"] == 5 and len(a["results"]) == 3
    assert np.asarray(a["results"][0]["latent"]).shape == (4,)
    unseeded = client.get(url, params={"n": 1}).json()
    assert isinstance(unseeded["seed"], int) and unseeded["results"][0]["image"]
    cold = client.get(url, params={"n": 2, "temperature": 0, "format": "array"}).json()["results"]
    origin = client.post("/v1/models/tiny/decode?format=array", json={"latents": [[0.0] * 4]}).json()
    np.testing.assert_allclose(cold[1]["array"], origin["results"][0]["array"], atol=1e-6)


def test_sample_grid_is_a_png(client: TestClient) -> None:
    response = client.get("/v1/models/tiny/sample", params={"n": 5, "seed": 1, "format": "grid"})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert response.headers["x-seed"] == "1"
    assert Image.open(io.BytesIO(response.content)).size[0] > 16


def test_conditional_sample_cycles_labels_or_uses_one(client: TestClient) -> None:
    cycled = client.get("/v1/models/tinyc/sample", params={"n": 3, "seed": 0}).json()["results"]
    assert [r["label"] for r in cycled] == ["0", "1", "2"]
    fixed = client.get("/v1/models/tinyc/sample", params={"n": 2, "seed": 0, "label": "4"}).json()["results"]
    assert [r["label"] for r in fixed] == ["4", "4"]


def test_reconstruct_reports_errors(client: TestClient) -> None:
    arrays = grey_arrays(2, seed=4)
    out = client.post("/v1/models/tiny/reconstruct?format=array", json={"inputs": arrays}).json()["results"]
    x_hat = np.asarray(out[0]["array"])
    sse = float(((x_hat - np.asarray(arrays[0])) ** 2).sum())
    assert out[0]["sse"] == pytest.approx(sse, rel=1e-5)
    assert out[0]["mse"] == pytest.approx(sse / 64, rel=1e-5)
    png = client.post("/v1/models/tiny/reconstruct", json={"inputs": arrays}).json()["results"][0]
    assert png["image"] and png["sse"] == pytest.approx(out[0]["sse"])


# -- likelihoods -----------------------------------------------------------------------------------------
def test_log_likelihood_fields_and_seeding(client: TestClient) -> None:
    body = {"inputs": grey_arrays(2, seed=5)}
    url = "/v1/models/tiny/log-likelihood"
    a = client.post(url, params={"k": 200, "seed": 11}, json=body).json()
    b = client.post(url, params={"k": 200, "seed": 11}, json=body).json()
    assert a == b and a["k"] == 200 and a["seed"] == 11 and a["binarized"] is True
    r = a["results"][0]
    assert r["k"] == 200 and r["log_likelihood"] >= r["elbo"]  # the IW bound is at least the ELBO
    assert r["bits_per_dim"] == pytest.approx(-r["log_likelihood"] / (64 * math.log(2)))
    assert 0 < r["standard_error"] < 5
    other = client.post(url, params={"k": 200, "seed": 12}, json=body).json()
    assert other["results"][0]["log_likelihood"] != r["log_likelihood"]
    assert isinstance(client.post(url, json=body).json()["seed"], int)


def test_log_likelihood_binarizes_like_the_manifest(client: TestClient) -> None:
    grey = np.asarray(grey_arrays(1, seed=6))
    binary = (grey >= 0.5).astype(float)
    url = "/v1/models/tiny/log-likelihood?k=32&seed=1"
    assert (client.post(url, json={"inputs": grey.tolist()}).json()["results"]
            == client.post(url, json={"inputs": binary.tolist()}).json()["results"])


def test_smaller_k_is_a_prefix_of_the_same_samples(client: TestClient) -> None:
    """k=1 uses the first sample of every larger k: the ELBO at k=1 equals the IW bound at k=1."""
    body = {"inputs": grey_arrays(1, seed=7)}
    one = client.post("/v1/models/tiny/log-likelihood?k=1&seed=3", json=body).json()["results"][0]
    assert one["log_likelihood"] == pytest.approx(one["elbo"]) and one["standard_error"] is None


def test_conditional_anomaly_score_is_calibrated_with_labels(client: TestClient) -> None:
    """tinyc (conditional) is calibrated on its calibration images with their labels: conformal p-values of
    -log p(x | y), the same estimate /log-likelihood gives for that label."""
    body = {"inputs": grey_arrays(3, seed=8)}
    out = client.post("/v1/models/tinyc/anomaly-score?seed=2&label=3&method=nll", json=body).json()
    assert out["k"] == out["calibration_k"] == 16 and out["method"] == "nll" and out["alpha"] == 0.01
    ll = client.post("/v1/models/tinyc/log-likelihood?seed=2&k=16&label=3", json=body).json()["results"]
    for r, estimate in zip(out["results"], ll, strict=True):
        assert r["score"] == pytest.approx(-estimate["log_likelihood"])
        assert 0.0 <= r["percentile"] <= 100.0 and 0.0 < r["p_value"] <= 1.0
        assert r["is_anomaly"] == (r["p_value"] <= 0.01)
    other = client.post("/v1/models/tinyc/anomaly-score?seed=2&label=3&method=regret", json=body)
    message = other.json()["error"]["message"]
    assert other.status_code == 422 and "no calibration for method 'regret'" in message


def test_anomaly_methods_give_conformal_p_values(client: TestClient) -> None:
    """tiny carries a calibration per method (held-out split): p-values, thresholds and the decision agree."""
    body = {"inputs": grey_arrays(4, seed=8)}
    out = client.post("/v1/models/tiny/anomaly-score?seed=2", json=body).json()
    assert out["method"] == "nll" and out["alpha"] == 0.01 and out["k"] == out["calibration_k"] == 16
    ll = client.post("/v1/models/tiny/log-likelihood?seed=2&k=16", json=body).json()["results"]
    n = 144  # calibration digits of the tiny model (the exporter's calibration split of digits8)
    for r, estimate in zip(out["results"], ll, strict=True):
        assert r["score"] == pytest.approx(-estimate["log_likelihood"]) and r["method"] == "nll"
        assert 1 / (n + 1) <= r["p_value"] <= 1.0
        assert r["is_anomaly"] == (r["p_value"] <= 0.01) == (r["score"] > r["threshold"])
    for method in ("typicality", "complexity", "combined", "latent_knn", "fisher"):
        scored = client.post(f"/v1/models/tiny/anomaly-score?seed=2&method={method}&alpha=0.5", json=body)
        assert scored.status_code == 200, scored.text
        results = scored.json()["results"]
        assert {r["method"] for r in results} == {method} and scored.json()["alpha"] == 0.5
        assert all(r["is_anomaly"] == (r["p_value"] <= 0.5) for r in results)
    unknown = client.post("/v1/models/tiny/anomaly-score?method=likelihood_ratio", json=body)
    assert unknown.status_code == 422 and "offers" in unknown.json()["error"]["message"]
    assert client.post("/v1/models/tiny/anomaly-score?alpha=1.5", json=body).status_code == 422


def test_an_alpha_the_calibration_cannot_reach_is_refused_on_every_protocol(client: TestClient) -> None:
    """tiny's 144 calibration scores give p-values >= 1/145: alpha 0.005 could never flag anything, so it is
    a 422 saying the smallest level, on /v1 and V2 alike; the metadata shows that level."""
    detail = client.get("/v1/models/tiny").json()["anomaly"]
    assert detail["min_alpha"] == pytest.approx(1 / 145)
    assert all(m["min_alpha"] == pytest.approx(1 / (m["n"] + 1)) for m in detail["methods"].values())
    body = {"inputs": grey_arrays(2, seed=3)}
    refused = client.post("/v1/models/tiny/anomaly-score?alpha=0.005", json=body)
    assert refused.status_code == 422
    assert "alpha 0.005 is below 0.006897 = 1/(n+1)" in refused.json()["error"]["message"]
    assert client.post(f"/v1/models/tiny/anomaly-score?alpha={1 / 145}", json=body).status_code == 200
    x = np.asarray(body["inputs"], dtype=np.float32)
    tensor = {"name": "images", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}
    v2 = client.post("/v2/models/tiny.anomaly_score/infer",
                     json={"inputs": [tensor], "parameters": {"alpha": 0.005}})
    assert v2.status_code in (400, 422) and "0.006897 = 1/(n+1)" in v2.text


def test_anomaly_standard_error_only_where_it_is_the_scores(client: TestClient) -> None:
    """The -log p(x) estimate's standard error is the score's for STANDARD_ERROR_METHODS (nll, complexity:
    -log p(x) plus a term the samples do not change) and null for every other method."""
    body = {"inputs": grey_arrays(3, seed=4)}
    ll = client.post("/v1/models/tiny/log-likelihood?seed=6&k=16", json=body).json()["results"]
    offered = client.get("/v1/models/tiny").json()["anomaly"]["methods"]
    assert set(offered) >= STANDARD_ERROR_METHODS and set(offered) - STANDARD_ERROR_METHODS
    for method in offered:
        results = client.post(f"/v1/models/tiny/anomaly-score?seed=6&k=16&method={method}", json=body).json()
        errors = [r["standard_error"] for r in results["results"]]
        if method in STANDARD_ERROR_METHODS:
            assert errors == pytest.approx([r["standard_error"] for r in ll], rel=1e-12), method
        else:
            assert errors == [None] * 3, method


def test_served_latent_scores_equal_the_exporters_scorer(client: TestClient, artifacts: Any) -> None:
    """latent_knn and fisher as served (encoder means and reconstructions through the engine) are what
    ood-eval and the calibration compute (training/scoring.py over the same ONNX graphs, same seed)."""
    from service.artifacts import load_manifest
    from training.scoring import GraphScorer, ScoreReferences

    x = artifacts.test_images[:6].numpy()
    directory = artifacts.models_dir / "tiny" / "1"
    m = load_manifest(directory, "onnx")
    expected = GraphScorer.from_artifact(directory).all_scores(
        x, 16, 5, ("latent_knn", "fisher"), ScoreReferences.from_calibration(m.anomaly))
    for method in ("latent_knn", "fisher"):
        out = client.post(f"/v1/models/tiny/anomaly-score?seed=5&method={method}",
                          json={"inputs": x.tolist()})
        assert out.status_code == 200, out.text
        np.testing.assert_allclose([r["score"] for r in out.json()["results"]], expected[method], rtol=1e-5)


def test_fisher_fits_a_queue_of_max_images(make_app: Any, artifacts: Any) -> None:
    """fisher encodes and decodes each image 1 + T = 6 times; with a queue of only max_images rows a full
    request (4 images: 24 encoder and 24 decoder rows) still runs, in engine calls the queue admits, and
    scores as usual."""
    from service import anomaly
    from service.artifacts import load_manifest
    from training.scoring import GraphScorer, ScoreReferences

    x = artifacts.test_images[:4].numpy()
    directory = artifacts.models_dir / "tiny" / "1"
    m = load_manifest(directory, "onnx")
    assert (1 + len(anomaly.GEOMETRIC_TRANSFORMS)) * len(x) > 4  # more rows than the queue holds
    expected = GraphScorer.from_artifact(directory).all_scores(
        x, 16, 5, ("fisher",), ScoreReferences.from_calibration(m.anomaly))["fisher"]
    with TestClient(make_app(max_queue_size=4, max_images=4, max_n=4, max_batch_size=2)) as c:
        out = c.post("/v1/models/tiny/anomaly-score?seed=5&method=fisher", json={"inputs": x.tolist()})
    assert out.status_code == 200, out.text
    np.testing.assert_allclose([r["score"] for r in out.json()["results"]], expected, rtol=1e-5)


@pytest.mark.parametrize("method", ["typicality", "fisher"])
def test_conformal_false_alarms_stay_near_alpha_on_unseen_digits(client: TestClient, artifacts: Any,
                                                                 method: str) -> None:
    """Held-out test digits (never used for training, selection or calibration) at alpha = 0.2."""
    x = artifacts.test_images[:120].numpy()
    out = []
    for part in (x[:60], x[60:]):  # max_images per request is 64
        answer = client.post(f"/v1/models/tiny/anomaly-score?seed=0&alpha=0.2&method={method}",
                             json={"inputs": part.tolist()})
        assert answer.status_code == 200, answer.text
        out += answer.json()["results"]
    rate = float(np.mean([r["is_anomaly"] for r in out]))
    # Conformal guarantee: E[rate] <= alpha; 120 images give a binomial standard error of ~0.037.
    assert rate <= 0.2 + 3 * 0.037, rate


def test_anomaly_score_of_normal_digits_is_mostly_normal(client: TestClient, artifacts: Any) -> None:
    x = artifacts.test_images[:20].numpy()
    out = client.post("/v1/models/tiny/anomaly-score?seed=0", json={"inputs": x.tolist()}).json()["results"]
    noise = client.post("/v1/models/tiny/anomaly-score?seed=0",
                        json={"inputs": grey_arrays(5, seed=9)}).json()["results"]
    assert np.median([r["percentile"] for r in out]) < 90
    assert all(r["is_anomaly"] for r in noise)


# -- errors ----------------------------------------------------------------------------------------------
def test_unknown_model_route_and_method(client: TestClient) -> None:
    assert "tiny" in assert_error(client.get("/v1/models/nope"), 404, "model_not_found")["message"]
    assert_error(client.post("/v1/models/../etc/encode", json={"inputs": []}), 404)
    assert_error(client.post("/v1/models/NOT_VALID!/encode", json={"inputs": grey_arrays(1)}), 404)
    assert_error(client.get("/nowhere"), 404, "not_found")
    assert_error(client.delete("/v1/models"), 405, "method_not_allowed")


@pytest.mark.parametrize("body, fragment", [
    ({"images": ["not base64!"]}, "base64"),
    ({"images": [b64(b"definitely not an image")]}, "not a supported image"),
    ({"images": [b64(digit_png()[:40])]}, "images[0]"),  # truncated PNG
    ({"inputs": [np.zeros((1, 8, 7)).tolist()]}, "shape"),
    ({"inputs": [np.zeros((3, 8, 8)).tolist()]}, "shape"),
    ({"inputs": [[[[0.5, 2.0]]]]}, "less than or equal to 1"),
    ({"inputs": [[[[0.5], [0.5, 0.5]]]]}, "ragged"),
    ({"inputs": []}, "at least 1"),
    ({"inputs": grey_arrays(1), "images": []}, "exactly one"),
    ({"other": 1}, "exactly one"),
    ({"inputs": grey_arrays(1), "extra": 1}, "extra"),
])
def test_bad_inputs_are_422(client: TestClient, body: dict, fragment: str) -> None:
    error = assert_error(client.post("/v1/models/tiny/encode", json=body), 422, "invalid_input")
    assert fragment in error["message"], error


@pytest.mark.parametrize("raw", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_values_are_422(client: TestClient, raw: str) -> None:
    row = ", ".join(["0.5"] * 7 + [raw])
    body = '{"inputs": [[[' + ", ".join([f"[{row}]"] * 8) + "]]]}"
    headers = {"content-type": "application/json"}
    error = assert_error(client.post("/v1/models/tiny/encode", content=body, headers=headers), 422)
    assert "finite" in error["message"]
    latents = '{"latents": [[0, 0, 0, ' + raw + "]]}"
    assert "finite" in assert_error(client.post("/v1/models/tiny/decode", content=latents, headers=headers),
                                    422)["message"]


def test_malformed_json_and_wrong_latent_length(client: TestClient) -> None:
    headers = {"content-type": "application/json"}
    assert_error(client.post("/v1/models/tiny/encode", content=b"{not json", headers=headers), 422)
    assert_error(client.post("/v1/models/tiny/encode", content=b"[1, 2]", headers=headers), 422)
    error = assert_error(client.post("/v1/models/tiny/decode", json={"latents": [[0.0, 1.0]]}), 422)
    assert "latent_dim 4" in error["message"]
    assert_error(client.post("/v1/models/tiny/decode", json={"latents": [[1e39] * 4]}), 422)


def test_multipart_errors(client: TestClient) -> None:
    url = "/v1/models/tiny/encode"
    wrong_field = [("other", ("a.png", digit_png(), "image/png"))]
    assert "'images'" in assert_error(client.post(url, files=wrong_field), 422)["message"]
    assert_error(client.post(url, data={"images": "text"}, files=[("x", ("a", b"", "text/plain"))]), 422)
    assert_error(client.post(url, files=[("images", ("a.png", b"", "image/png"))]), 422)


@pytest.mark.parametrize("query", ["n=0", "n=257", "temperature=-1", "temperature=inf", "seed=-1",
                                   "temperature=nan", "format=gif"])
def test_sample_query_limits(client: TestClient, query: str) -> None:
    assert_error(client.get(f"/v1/models/tiny/sample?{query}"), 422, "invalid_input")


@pytest.mark.parametrize("query", ["k=0", "k=5001", "k=abc", "seed=-3", "alpha=1.5"])
def test_k_and_seed_limits(client: TestClient, query: str) -> None:
    body = {"inputs": grey_arrays(1)}
    path = "anomaly-score" if "alpha" in query else "log-likelihood"
    assert_error(client.post(f"/v1/models/tiny/{path}?{query}", json=body), 422, "invalid_input")


def test_too_many_images_is_422(client: TestClient) -> None:
    error = assert_error(client.post("/v1/models/tiny/encode", json={"inputs": grey_arrays(65)}), 422)
    assert "64" in error["message"]


def test_unsupported_content_type_is_415(client: TestClient) -> None:
    for headers in ({"content-type": "text/plain"}, {}):
        assert_error(client.post("/v1/models/tiny/encode", content=b"abc", headers=headers), 415)
    assert_error(client.post("/v1/models/tiny/decode", files=[("latents", ("a", b"1", "text/plain"))]), 415)


def test_image_pixel_limit_is_413(make_app: Any) -> None:
    with TestClient(make_app(max_image_pixels=100)) as c:
        big = image_bytes(np.zeros((20, 20), np.uint8))
        error = assert_error(c.post("/v1/models/tiny/encode", json={"images": [b64(big)]}), 413)
        assert "400" in error["message"] or "20x20" in error["message"]


def test_upload_limit_by_content_length_and_by_stream(make_app: Any) -> None:
    with TestClient(make_app(max_upload_bytes=2048)) as c:
        big = {"inputs": grey_arrays(8)}  # ~8 KB of JSON
        assert_error(c.post("/v1/models/tiny/encode", json=big), 413, "payload_too_large")

        def chunks() -> Any:  # no Content-Length: chunked transfer, counted while streaming
            data = json.dumps(big).encode()
            for i in range(0, len(data), 1000):
                yield data[i:i + 1000]

        headers = {"content-type": "application/json"}
        response = c.post("/v1/models/tiny/encode", content=chunks(), headers=headers)
        assert_error(response, 413, "payload_too_large")
        files = [("images", ("a.png", digit_png(), "image/png"))] * 20
        assert_error(c.post("/v1/models/tiny/encode", files=files), 413)
        assert c.post("/v1/models/tiny/encode", json={"inputs": grey_arrays(1)}).status_code == 200


def test_api_keys(make_app: Any) -> None:
    key = "k" * 20
    with TestClient(make_app(api_keys=f"{'x' * 16},{key}")) as c:
        body = {"inputs": grey_arrays(1)}
        error = assert_error(c.post("/v1/models/tiny/encode", json=body), 401, "unauthorized")
        assert "Bearer" in error["message"]
        wrong = {"Authorization": "Bearer wrong"}
        assert_error(c.post("/v1/models/tiny/encode", json=body, headers=wrong), 401)
        assert_error(c.get("/v1/models", headers={"Authorization": f"Basic {key}"}), 401)
        right = {"Authorization": f"Bearer {key}"}
        assert c.post("/v1/models/tiny/encode", json=body, headers=right).status_code == 200
        assert c.get("/healthz").status_code == 200 and c.get("/metrics").status_code == 200
        assert "securitySchemes" in c.get("/openapi.json").json()["components"]


@pytest.mark.parametrize("header, message", [
    (None, "missing header 'Authorization: Bearer <api key>'"),
    ("KEY", "Authorization must be 'Bearer <api key>'"),  # the bare key, without the scheme
    ("Basic KEY", "Authorization must be 'Bearer <api key>'"),
    ("Bearer", "Authorization must be 'Bearer <api key>'"),
    ("Bearer not-the-key-0123456789", "invalid API key"),
])
def test_every_protocol_says_exactly_what_is_wrong_with_the_key(make_app: Any, header: str | None,
                                                                 message: str) -> None:
    key = "k" * 20
    headers = {} if header is None else {"Authorization": header.replace("KEY", key)}
    v2_body = {"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": [0.5] * 64}]}
    body = {"inputs": grey_arrays(1)}
    with TestClient(make_app(api_keys=key, auth_ops=True, warmup=False)) as c:
        v1 = [c.post("/v1/models/tiny/encode", json=body, headers=headers),  # the fast path
              c.post("/v1/models/tiny/log-likelihood?k=300", json=body, headers=headers),
              c.get("/v1/models", headers=headers), c.get("/readyz", headers=headers)]
        for response in v1:
            assert assert_error(response, 401, "unauthorized")["message"] == message
            assert response.headers["www-authenticate"] == "Bearer"
        for response in (c.post("/v2/models/tiny.encode/infer", json=v2_body, headers=headers),
                         c.get("/v2/models/tiny.encode", headers=headers)):
            assert response.status_code == 401 and response.json() == {"error": message}
        right = {"Authorization": f"bearer {key}"}  # the scheme is case-insensitive
        assert c.post("/v1/models/tiny/encode", json=body, headers=right).status_code == 200
        assert c.post("/v2/models/tiny.encode/infer", json=v2_body, headers=right).status_code == 200


def test_liveness_answers_the_same_while_loading_serving_and_draining(make_app: Any) -> None:
    """/healthz never pretends to know the models: its schema has `status` only, and it answers the same
    before the models are loaded (no lifespan yet), while serving and while draining."""
    app = make_app(warmup=False)
    loading = TestClient(app)  # not entered: the lifespan (model loading) has not run
    assert loading.get("/readyz").status_code == 503
    assert loading.get("/healthz").json() == {"status": "ok"}
    with TestClient(app) as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        assert c.get("/readyz").json()["models"] == ["lin", "tiny", "tinyc"]
        app.state.service.draining = True
        assert c.get("/healthz").json() == {"status": "ok"}
        schemas = c.get("/openapi.json").json()["components"]["schemas"]
    assert set(schemas["Liveness"]["properties"]) == {"status"}
    assert set(schemas["Readiness"]["required"]) == {"status", "models"}


def test_draining_refuses_v1_and_readyz(make_app: Any) -> None:
    app = make_app()
    with TestClient(app) as c:
        assert c.get("/readyz").status_code == 200
        app.state.service.draining = True
        assert_error(c.get("/readyz"), 503, "unavailable")
        response = c.post("/v1/models/tiny/encode", json={"inputs": grey_arrays(1)})
        assert_error(response, 503) and response.headers["retry-after"]
        assert c.get("/healthz").status_code == 200


def test_cors_preflight(make_app: Any) -> None:
    with TestClient(make_app(cors_origins="https://example.org")) as c:
        response = c.options("/v1/models", headers={"Origin": "https://example.org",
                                                     "Access-Control-Request-Method": "GET"})
        assert response.headers["access-control-allow-origin"] == "https://example.org"
