"""Open Inference Protocol (V2) routes, driven by the stock clients against a real server process.

tritonclient.http with its defaults (binary inputs and outputs) and KServe's REST client must get the
same numbers as /v1 for the same inputs and seeds.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from fastapi.testclient import TestClient
from svc_helpers import b64, digit_png, grey_arrays, image_bytes
from tritonclient.utils import InferenceServerException

from service.api.app import create_app
from service.api.v2 import PNG_AS_JSON_TEXT
from service.config import Settings

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts" / "reliability"))
import harness

ENV = {"VAE_HTTP_WORKERS": "2", "VAE_LOG_LEVEL": "WARNING", "VAE_MAX_BATCH_SIZE": "16",
       "VAE_MAX_BATCH_SAMPLES": "2048"}


@pytest.fixture(scope="module")
def server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[harness.Server]:
    with harness.start_server(models_dir, tmp_path_factory.mktemp("v2") / "server.log", env=ENV) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: harness.Server) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(f"127.0.0.1:{server.port}", network_timeout=60.0)
    yield c
    c.close()


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.asarray(grey_arrays(n, seed), dtype=np.float32)  # (n, 1, 8, 8) in [0, 1]


def infer(client: triton.InferenceServerClient, model: str, inputs: dict[str, np.ndarray],
          binary: bool = True, **parameters: Any) -> triton.InferResult:
    tensors = []
    for name, array in inputs.items():
        t = triton.InferInput(name, list(array.shape), "INT64" if array.dtype == np.int64 else "FP32")
        t.set_data_from_numpy(array, binary_data=binary)
        tensors.append(t)
    return client.infer(model, tensors, parameters=parameters or None)


def v1(server: harness.Server, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = httpx.post(f"{server.url}/v1/models/{path}", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def test_server_and_model_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    meta = client.get_model_metadata("tiny.encode")
    assert meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "images", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert [o["name"] for o in meta["outputs"]] == ["mean", "variance", "log_variance"]
    assert client.is_model_ready("tiny.log_likelihood") and client.is_model_ready("tiny.decode", "1")
    cond = client.get_model_metadata("tinyc.decode")
    assert {"name": "labels", "datatype": "INT64", "shape": [-1]} in cond["inputs"]


def test_model_config_is_tritons_json_form(client: triton.InferenceServerClient) -> None:
    config = client.get_model_config("tiny.encode")
    assert config["name"] == "tiny.encode" and config["max_batch_size"] >= 1
    assert config["input"][0]["dims"] == [1, 8, 8] and config["input"][0]["data_type"] == "TYPE_FP32"
    assert [o["name"] for o in config["output"]] == ["mean", "variance", "log_variance"]
    assert config["dynamic_batching"]["default_queue_policy"]["timeout_action"] == "REJECT"


@pytest.mark.parametrize("binary", [True, False])
def test_encode_matches_v1(server: harness.Server, client: triton.InferenceServerClient,
                           binary: bool) -> None:
    x = images(3)
    result = infer(client, "tiny.encode", {"images": x}, binary=binary)
    expected = v1(server, "tiny/encode", {"inputs": x.tolist()})["results"]
    for name, key in (("mean", "mean"), ("variance", "variance"), ("log_variance", "log_variance")):
        got = result.as_numpy(name)
        assert got.dtype == np.float32 and got.shape == (3, 4)
        np.testing.assert_allclose(got, [r[key] for r in expected], rtol=1e-5, atol=1e-6)


def test_decode_matches_v1_including_labels(server: harness.Server,
                                            client: triton.InferenceServerClient) -> None:
    z = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
    got = infer(client, "tiny.decode", {"latents": z}).as_numpy("images")
    expected = v1(server, "tiny/decode?format=array", {"latents": z.tolist()})["results"]
    assert got.shape == (2, 1, 8, 8)
    np.testing.assert_allclose(got, [r["array"] for r in expected], rtol=1e-5, atol=1e-6)
    labels = np.array([3, 7], dtype=np.int64)
    got_c = infer(client, "tinyc.decode", {"latents": z, "labels": labels}).as_numpy("images")
    expected_c = v1(server, "tinyc/decode?format=array", {"latents": z.tolist(), "labels": [3, 7]})["results"]
    np.testing.assert_allclose(got_c, [r["array"] for r in expected_c], rtol=1e-5, atol=1e-6)


def test_seeded_log_likelihood_matches_v1(server: harness.Server,
                                          client: triton.InferenceServerClient) -> None:
    x = images(2, seed=4)
    result = infer(client, "tiny.log_likelihood", {"images": x}, k=300, seed=11)
    expected = v1(server, "tiny/log-likelihood?k=300&seed=11", {"inputs": x.tolist()})["results"]
    for name in ("log_likelihood", "elbo", "standard_error"):
        got = result.as_numpy(name)
        assert got.dtype == np.float64 and got.shape == (2,)
        np.testing.assert_allclose(got, [r[name] for r in expected], rtol=1e-6)


def test_anomaly_score_matches_v1(server: harness.Server, client: triton.InferenceServerClient) -> None:
    x = images(2, seed=5)
    result = infer(client, "tiny.anomaly_score", {"images": x}, seed=2, alpha=0.5)
    expected = v1(server, "tiny/anomaly-score?seed=2&alpha=0.5", {"inputs": x.tolist()})
    np.testing.assert_allclose(result.as_numpy("score"), [r["score"] for r in expected["results"]], rtol=1e-6)
    np.testing.assert_allclose(result.as_numpy("percentile"), [r["percentile"] for r in expected["results"]],
                               rtol=1e-6)
    assert result.as_numpy("is_anomaly").tolist() == [r["is_anomaly"] for r in expected["results"]]


def test_anomaly_methods_match_v1_and_the_response_names_the_method(
        server: harness.Server, client: triton.InferenceServerClient) -> None:
    x = images(3, seed=7)
    for method in ("fisher", "latent_knn"):
        result = infer(client, "tiny.anomaly_score", {"images": x}, seed=3, method=method, alpha=0.3)
        expected = v1(server, f"tiny/anomaly-score?seed=3&method={method}&alpha=0.3", {"inputs": x.tolist()})
        rows = expected["results"]
        np.testing.assert_allclose(result.as_numpy("score"), [r["score"] for r in rows], rtol=1e-6)
        np.testing.assert_allclose(result.as_numpy("p_value"), [r["p_value"] for r in rows], rtol=1e-12)
        assert result.as_numpy("is_anomaly").tolist() == [r["is_anomaly"] for r in rows]
        assert result.get_response()["parameters"] == {"k": 16, "seed": 3, "method": method, "alpha": 0.3}


def test_png_bytes_input_is_decoded_like_v1_uploads(server: harness.Server,
                                                    client: triton.InferenceServerClient) -> None:
    files = [digit_png(seed) for seed in (1, 2)]
    png = triton.InferInput("png", [2], "BYTES")
    png.set_data_from_numpy(np.array(files, dtype=np.object_))
    got = client.infer("tiny.encode", [png]).as_numpy("mean")
    response = httpx.post(f"{server.url}/v1/models/tiny/encode", timeout=60,
                          files=[("images", (f"{i}.png", f, "image/png")) for i, f in enumerate(files)])
    np.testing.assert_allclose(got, [r["mean"] for r in response.json()["results"]], rtol=1e-5, atol=1e-6)


def test_base64_png_in_json_from_the_kserve_client_is_decoded_like_v1_uploads(server: harness.Server) -> None:
    """KServe's REST client sends JSON BYTES (binary_data=False) with the input parameter content_type
    "base64" (MLServer's convention): decoded to the same images as /v1 multipart uploads."""
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

    files = [digit_png(seed) for seed in (3, 4)]

    async def run() -> np.ndarray:
        kclient = InferenceRESTClient(RESTConfig(protocol="v2", timeout=60))
        try:
            png = InferInput("png", [2], "BYTES", parameters={"content_type": "base64"})
            png.set_data_from_numpy(np.array([b64(f) for f in files], dtype=np.object_), binary_data=False)
            response = await kclient.infer(server.url, InferRequest("tiny.encode", [png]),
                                           model_name="tiny.encode")
            return response.outputs[0].as_numpy()
        finally:
            await kclient.close()

    got = asyncio.run(run())
    response = httpx.post(f"{server.url}/v1/models/tiny/encode", timeout=60,
                          files=[("images", (f"{i}.png", f, "image/png")) for i, f in enumerate(files)])
    np.testing.assert_allclose(got, [r["mean"] for r in response.json()["results"]], rtol=1e-5, atol=1e-6)


def _png_json(items: list[str], **parameters: str) -> dict[str, Any]:
    tensor: dict[str, Any] = {"name": "png", "datatype": "BYTES", "shape": [len(items)], "data": items}
    if parameters:
        tensor["parameters"] = parameters
    return {"inputs": [tensor]}


def test_json_png_bytes_need_the_base64_content_type_and_the_pixel_budget_applies(models_dir: Path) -> None:
    settings = Settings(models_dir=models_dir, models="tiny", threads=1, warmup=False, max_image_pixels=4096)
    small, large = digit_png(5), image_bytes(np.zeros((100, 100), np.uint8))  # 8x8 and 100x100 pixels
    with TestClient(create_app(settings)) as c:
        def infer(body: dict[str, Any]) -> httpx.Response:
            return c.post("/v2/models/tiny.encode/infer", json=body)

        ok = infer(_png_json([b64(small), "data:image/png;base64," + b64(small)], content_type="base64"))
        assert ok.status_code == 200, ok.text
        means = ok.json()["outputs"][0]["data"]
        assert means[:4] == means[4:]  # the plain and the data-URL form of the same file
        plain = infer(_png_json([b64(small)]))  # base64 text without the parameter: told what to do
        assert plain.status_code == 400 and plain.json() == {"error": PNG_AS_JSON_TEXT}
        other = infer(_png_json([b64(small)], content_type="str"))
        assert other.status_code == 400 and "content_type 'str' is not supported" in other.json()["error"]
        broken = infer(_png_json([b64(small), "not base64!"], content_type="base64"))
        assert broken.status_code == 400 and broken.json()["error"].startswith("png[1]: not valid base64")
        text = infer(_png_json([b64(b"hello")], content_type="base64"))  # decodes, but is no image file
        assert text.status_code == 400 and text.json()["error"].startswith("png[0]: ")
        too_big = infer(_png_json([b64(large)], content_type="base64"))  # checked before decoding pixels
        assert too_big.status_code == 413 and too_big.json()["error"].startswith("png[0]: ")


def test_kserve_rest_client_gets_the_same_numbers(server: harness.Server) -> None:
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

    x = images(2, seed=6)

    async def run() -> dict[str, np.ndarray]:
        kclient = InferenceRESTClient(RESTConfig(protocol="v2", timeout=60))
        try:
            ready = await kclient.is_server_ready(server.url)
            tensor = InferInput("images", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x, binary_data=True)
            response = await kclient.infer(server.url, InferRequest("tiny.log_likelihood", [tensor],
                                                                    parameters={"k": 100, "seed": 5}),
                                           model_name="tiny.log_likelihood")
            return {"ready": np.array(ready), "ll": response.outputs[0].as_numpy()}
        finally:
            await kclient.close()

    out = asyncio.run(run())
    expected = v1(server, "tiny/log-likelihood?k=100&seed=5", {"inputs": x.tolist()})["results"]
    assert bool(out["ready"])
    np.testing.assert_allclose(out["ll"], [r["log_likelihood"] for r in expected], rtol=1e-6)


def test_errors_have_the_v2_shape_and_status(server: harness.Server,
                                             client: triton.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as unknown:
        infer(client, "tiny.nope", {"images": images(1)})
    assert unknown.value.status() == "404" and "operation one of" in unknown.value.message()
    with pytest.raises(InferenceServerException) as shape:
        infer(client, "tiny.encode", {"images": np.zeros((1, 1, 4, 4), np.float32)})
    assert shape.value.status() == "400" and "expects [-1, 1, 8, 8]" in shape.value.message()
    with pytest.raises(InferenceServerException) as pixels:
        infer(client, "tiny.encode", {"images": np.full((1, 1, 8, 8), 2.0, np.float32)})
    assert pixels.value.status() == "400" and "[0, 1]" in pixels.value.message()
    with pytest.raises(InferenceServerException) as k:
        infer(client, "tiny.log_likelihood", {"images": images(1)}, k=10**9)
    assert k.value.status() == "400" and "'k'" in k.value.message()
    response = httpx.post(f"{server.url}/v2/models/tiny.encode/infer", content=b"{not json", timeout=30,
                          headers={"content-type": "application/json"})
    assert response.status_code == 400 and set(response.json()) == {"error"}
    assert response.headers["x-request-id"]
    missing = httpx.get(f"{server.url}/v2/models/nope.encode", timeout=30)
    assert missing.status_code == 404 and "nope" in missing.json()["error"]


def test_versioned_routes(server: harness.Server, client: triton.InferenceServerClient) -> None:
    x = images(1)
    a = client.infer("tiny.encode", [_tensor(x)], model_version="1").as_numpy("mean")
    b = client.infer("tiny.encode", [_tensor(x)]).as_numpy("mean")
    np.testing.assert_array_equal(a, b)
    with pytest.raises(InferenceServerException) as missing:
        client.infer("tiny.encode", [_tensor(x)], model_version="7")
    assert missing.value.status() == "404"


def _tensor(x: np.ndarray) -> triton.InferInput:
    t = triton.InferInput("images", list(x.shape), "FP32")
    t.set_data_from_numpy(x)
    return t


def test_auth_and_drain_apply_to_v2(models_dir: Path) -> None:
    key = "k" * 20
    app = create_app(Settings(models_dir=models_dir, threads=1, api_keys=key))
    body = {"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": [0.5] * 64}]}
    with TestClient(app) as c:
        denied = c.post("/v2/models/tiny.encode/infer", json=body)
        assert denied.status_code == 401 and set(denied.json()) == {"error"}
        ok = c.post("/v2/models/tiny.encode/infer", json=body, headers={"Authorization": f"Bearer {key}"})
        assert ok.status_code == 200 and ok.json()["outputs"][0]["name"] == "mean"
        assert c.get("/v2/health/ready").status_code == 200  # ops paths stay open
        app.state.service.draining = True
        auth = {"Authorization": f"Bearer {key}"}
        drained = c.post("/v2/models/tiny.encode/infer", json=body, headers=auth)
        assert drained.status_code == 503 and "shutting down" in drained.json()["error"]
        assert c.get("/v2/health/ready").status_code == 503
