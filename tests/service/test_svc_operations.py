"""The engine's unit is an operation: one engine call per request on every protocol, results that do not
depend on how the work is cut, and the same validation on /v1 and V2 (one definition of each limit)."""

from __future__ import annotations

import json
import struct
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from svc_helpers import b64, digit_png, grey_arrays, image_bytes

from service.engine.local import LocalEngine


def _count_engine_calls(client: TestClient) -> Counter[str]:
    """Wrap the app's engine so every infer() is counted by operation."""
    engine: LocalEngine = client.app.state.service.engine  # type: ignore[attr-defined]
    calls: Counter[str] = Counter()
    infer = engine.infer

    async def counted(model: str, version: str, operation: Any, inputs: Any, **kw: Any) -> Any:
        calls[operation] += 1
        return await infer(model, version, operation, inputs, **kw)

    engine.infer = counted  # type: ignore[method-assign]
    return calls


V1_CALLS = [
    ("post", "encode", {"inputs": grey_arrays(3)}, "encode"),
    ("post", "decode", {"latents": [[0.1, 0.2, 0.3, 0.4]] * 3}, "decode"),
    ("get", "sample?n=5&seed=1", None, "sample"),
    ("post", "reconstruct", {"inputs": grey_arrays(3)}, "reconstruct"),
    ("post", "log-likelihood?k=300&seed=1", {"inputs": grey_arrays(3)}, "log_likelihood"),
    ("post", "anomaly-score?seed=1&method=fisher", {"inputs": grey_arrays(3)}, "anomaly_score"),
    ("post", "anomaly-score?seed=1&method=latent_knn", {"inputs": grey_arrays(3)}, "anomaly_score"),
    ("post", "anomaly-score?seed=1&method=combined", {"inputs": grey_arrays(3)}, "anomaly_score"),
]


@pytest.mark.parametrize("method, path, body, operation", V1_CALLS)
def test_every_operation_is_one_engine_call(make_app: Callable[..., FastAPI], method: str, path: str,
                                            body: dict | None, operation: str) -> None:
    """Multi-graph operations (reconstruct: encode + decode; fisher: 1 + T views encoded and decoded,
    beside the log-weights) run whole behind the engine: the HTTP side calls it once."""
    with TestClient(make_app()) as client:
        calls = _count_engine_calls(client)
        kwargs = {} if body is None else {"json": body}
        response = getattr(client, method)(f"/v1/models/tiny/{path}", **kwargs)
        assert response.status_code == 200, response.text
        assert calls == Counter({operation: 1})


def test_v2_operations_are_one_engine_call_each(make_app: Callable[..., FastAPI]) -> None:
    x = np.asarray(grey_arrays(2), dtype=np.float32)
    tensor = {"name": "images", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}
    with TestClient(make_app()) as client:
        calls = _count_engine_calls(client)
        for op, params in (("encode", {}), ("log_likelihood", {"k": 40}),
                           ("anomaly_score", {"method": "fisher"})):
            r = client.post(f"/v2/models/tiny.{op}/infer", json={"inputs": [tensor], "parameters": params})
            assert r.status_code == 200, r.text
        assert calls == Counter({"encode": 1, "log_likelihood": 1, "anomaly_score": 1})


def test_results_do_not_depend_on_chunk_or_batch_size(make_app: Callable[..., FastAPI]) -> None:
    """Noise is drawn per (seed, image, sample): the log-weights row size (VAE_IW_CHUNK_SIZE) and the batch
    sizes are execution details that change no number, for log-likelihoods and anomaly scores alike."""
    body = {"inputs": grey_arrays(3, seed=4)}
    answers = []
    for overrides in ({}, {"iw_chunk_size": 7, "max_batch_samples": 70}, {"iw_chunk_size": 1000}):
        with TestClient(make_app(**overrides)) as client:
            ll = client.post("/v1/models/tiny/log-likelihood?k=300&seed=9", json=body).json()
            an = client.post("/v1/models/tiny/anomaly-score?k=50&seed=9&method=fisher", json=body).json()
            answers.append(([r["log_likelihood"] for r in ll["results"]], [r["elbo"] for r in ll["results"]],
                            [r["score"] for r in an["results"]]))
    assert answers[0] == answers[1] == answers[2]  # exactly equal, not close


# -- one definition of every limit: /v1 (FastAPI and the fast path) and V2 refuse the same values ----------
BAD_PARAMETERS = [
    ("log_likelihood", "k", 0), ("log_likelihood", "k", 5001), ("log_likelihood", "seed", -1),
    ("log_likelihood", "seed", 2**63), ("anomaly_score", "alpha", 1.5), ("anomaly_score", "alpha", 0.0),
    ("anomaly_score", "k", 0), ("anomaly_score", "method", "x" * 33), ("anomaly_score", "method", "regret"),
]


@pytest.mark.parametrize("operation, name, value", BAD_PARAMETERS)
def test_v1_and_v2_refuse_the_same_parameters(client: TestClient, operation: str, name: str,
                                              value: Any) -> None:
    x = np.asarray(grey_arrays(1), dtype=np.float32)
    path = f"/v1/models/tiny/{operation.replace('_', '-')}?{name}={value}"
    v1 = client.post(path, json={"inputs": x.tolist()})
    assert v1.status_code == 422 and v1.json()["error"]["code"] == "invalid_input", v1.text
    tensor = {"name": "images", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}
    v2 = client.post(f"/v2/models/tiny.{operation}/infer",
                     json={"inputs": [tensor], "parameters": {name: value}})
    assert v2.status_code == 400, v2.text
    assert f"'{name}'" in v2.json()["error"] or "no calibration for method 'regret'" in v2.json()["error"]


def _v2_png_request(files: list[bytes]) -> tuple[bytes, dict[str, str]]:
    """A V2 infer body with `png` as a BYTES tensor in Triton's binary tensor data extension."""
    payload = b"".join(struct.pack("<I", len(f)) + f for f in files)  # BYTES: 4-byte length + bytes each
    header = json.dumps({"inputs": [{"name": "png", "datatype": "BYTES", "shape": [len(files)],
                                     "parameters": {"binary_data_size": len(payload)}}]}).encode()
    return header + payload, {"Inference-Header-Content-Length": str(len(header)),
                              "Content-Type": "application/octet-stream"}


def test_v2_png_has_the_pixel_budget_of_v1_uploads(make_app: Callable[..., FastAPI]) -> None:
    """PNG files sent as a V2 BYTES tensor pass the same decoding step as /v1 uploads: the per-request
    pixel budget is checked from the headers before any pixel is decoded (413 on both protocols), and a
    digit decodes to the same latent on both."""
    big = image_bytes(np.zeros((600, 600), np.uint8))  # a few hundred bytes, 360k pixels
    with TestClient(make_app(max_request_pixels=500_000)) as client:
        v1 = client.post("/v1/models/tiny/encode", json={"images": [b64(big), b64(big)]})
        assert v1.status_code == 413 and "pixels in all" in v1.json()["error"]["message"]
        body, headers = _v2_png_request([big, big])
        v2 = client.post("/v2/models/tiny.encode/infer", content=body, headers=headers)
        assert v2.status_code == 413 and "pixels in all" in v2.json()["error"], v2.text
        body, headers = _v2_png_request([digit_png()])
        ok = client.post("/v2/models/tiny.encode/infer", content=body, headers=headers)
        assert ok.status_code == 200, ok.text
        mean = np.asarray(ok.json()["outputs"][0]["data"], dtype=np.float32)
        expected = client.post("/v1/models/tiny/encode", json={"images": [b64(digit_png())]}).json()
        np.testing.assert_allclose(mean, expected["results"][0]["mean"], rtol=1e-6)


def test_device_instances_default_to_the_cores_at_one_thread_each(make_settings: Callable[..., Any]) -> None:
    import os

    cores = len(os.sched_getaffinity(0))
    assert make_settings(device_instances=0, threads=1).instances_on("cpu") == cores
    assert make_settings(device_instances=0, threads=1).instances_on("cuda:0") == 1
    assert make_settings(device_instances=0, threads=2).instances_on("cpu") == max(1, cores // 2)
    assert make_settings(device_instances=0, threads=0, http_workers=0).instances_on("cpu") == 1  # ORT: all
    assert make_settings(device_instances=3).instances_on("cpu") == 3


def test_engines_run_in_the_workers_on_the_cpu_and_in_one_process_with_a_gpu(
        make_settings: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    from service.engine import runtime

    monkeypatch.setattr(runtime, "gpu_present", lambda: False)
    assert make_settings(http_workers=2).engine_per_worker  # auto, no GPU: per worker
    assert make_settings(http_workers=2, device="cpu").engine_per_worker
    assert not make_settings(http_workers=2, engine_placement="shared").engine_per_worker
    assert not make_settings(http_workers=0).engine_per_worker  # one process: nothing to place
    monkeypatch.setattr(runtime, "gpu_present", lambda: True)
    assert not make_settings(http_workers=2).engine_per_worker  # auto with a GPU: one process shares it
    assert not make_settings(http_workers=2, device="cuda").engine_per_worker
    assert make_settings(http_workers=2, device="cpu").engine_per_worker  # the GPU is not used
    assert make_settings(http_workers=2, engine_placement="per-worker").engine_per_worker
    from service.__main__ import parse_args

    assert parse_args(["--engine-placement", "shared"]) == {"engine_placement": "shared"}


def test_time_sliced_work_leaves_an_instance_to_cheap_requests(make_app: Callable[..., FastAPI]) -> None:
    """With several execution threads, log-weights batches hold all but one of them after a request with
    no log-weights work (a reconstruct), and every one while there was none (test_svc_batching)."""
    with TestClient(make_app(device_instances=2)) as client:
        served = client.app.state.service.engine.registry.models[("tiny", "1")]  # type: ignore[attr-defined]
        assert served.batchers["log_weights"].max_running == 1
        assert served.batchers["encoder"].max_running == served.batchers["decoder"].max_running == 2
        # Only requests with no log-weights work hold that instance (after warm-up, none has run yet).
        x = np.zeros((1, *served.manifest.input_shape)).tolist()
        assert not served.worker.cheap_work_recent()
        for sliced in ("anomaly-score?k=50&method=fisher", "log-likelihood?k=50"):
            assert client.post(f"/v1/models/tiny/{sliced}", json={"inputs": x}).status_code == 200
        assert not served.worker.cheap_work_recent() and served.batchers["log_weights"].parallelism() == 2
        assert client.post("/v1/models/tiny/reconstruct", json={"inputs": x}).status_code == 200
        assert served.worker.cheap_work_recent() and served.batchers["log_weights"].parallelism() == 1


def test_http_workers_get_model_infos_without_the_latent_bank() -> None:
    """The latent bank (training codes) stays in the inference process, which computes the scores."""
    from service.artifacts import load_manifest
    from service.engine.interface import ModelInfo
    from service.engine.server import _for_http_workers

    repo_root = Path(__file__).resolve().parents[2]
    manifest = load_manifest(repo_root / "models" / "mnist-vae" / "2", "onnx")
    assert manifest.anomaly is not None and manifest.anomaly.methods["fisher"].latent_bank is not None
    slim = _for_http_workers(ModelInfo(manifest, "onnx", "cpu")).manifest
    assert slim.anomaly is not None and all(c.latent_bank is None for c in slim.anomaly.methods.values())
    assert slim.anomaly.methods["fisher"].scores == manifest.anomaly.methods["fisher"].scores
