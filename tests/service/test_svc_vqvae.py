"""The VQ-VAE family served through the real app: every /v1 route and the V2 models, against the
trained torch model, with the same validation as the Gaussian family (tests/conftest.py: tinyvq)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.artifacts import load_manifest
from service.config import Settings
from service.families.noise import prior_uniforms, sample_uniforms
from training import losses

BASE = "/v1/models/tinyvq"
DEFAULT_VQ = Path(__file__).resolve().parents[2] / "models" / "mnist-vqvae" / "1"


def _settings(models_dir, **overrides) -> Settings:
    values = dict(models_dir=models_dir, threads=1, device_instances=1, max_batch_size=16,
                  max_batch_samples=2048, max_queue_delay_ms=2.0)
    return Settings(**{**values, **overrides})


@pytest.fixture(scope="module")
def vq_client(vq_artifact) -> Iterator[TestClient]:
    with TestClient(create_app(_settings(vq_artifact.models_dir))) as client:
        yield client


def _arrays(images: torch.Tensor) -> list:
    return images.numpy().astype(float).tolist()


def test_metadata_names_the_family_grid_and_codebook(vq_client: TestClient) -> None:
    body = vq_client.get(BASE).json()
    assert body["family"] == "vqvae" and body["kind"] == "vqvae"
    assert body["latent"] == {"input": "codes", "shape": [2, 2], "dtype": "int64", "codebook_size": 8}
    assert body["latent_dim"] == 4 * 2 * 2  # the flattened pre-quantization vectors


def test_encode_gives_the_models_codes_and_optionally_its_vectors(vq_client: TestClient, vq_artifact) -> None:
    x = vq_artifact.test_images[:5]
    with torch.no_grad():
        codes, z_e = vq_artifact.model.codes(x), vq_artifact.model.encode(x)
    plain = vq_client.post(f"{BASE}/encode", json={"inputs": _arrays(x)})
    assert plain.status_code == 200, plain.text
    assert [r["codes"] for r in plain.json()["results"]] == codes.tolist()
    assert "pre_quantization" not in plain.json()["results"][0]
    full = vq_client.post(f"{BASE}/encode?include=pre_quantization", json={"inputs": _arrays(x)}).json()
    got = np.array([r["pre_quantization"] for r in full["results"]])
    np.testing.assert_allclose(got, z_e.numpy(), atol=1e-4)


def test_decode_takes_code_grids_and_refuses_bad_ones(vq_client: TestClient, vq_artifact) -> None:
    codes = torch.tensor([[[0, 1], [2, 3]], [[7, 7], [4, 5]]])
    with torch.no_grad():
        expected = vq_artifact.model.decode_mean(codes).numpy()
    r = vq_client.post(f"{BASE}/decode?format=array", json={"codes": codes.tolist()})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(np.array([i["array"] for i in r.json()["results"]]), expected, atol=1e-4)
    cases = {
        "out of range": ({"codes": [[[0, 1], [2, 8]]]}, 422, "0..7"),
        "negative": ({"codes": [[[0, -1], [2, 3]]]}, 422, "0..7"),
        "huge": ({"codes": [[[0, 1], [2, 2**70]]]}, 422, "0..7"),
        "wrong grid": ({"codes": [[[0, 1, 2], [2, 3, 4]]]}, 422, "shape [2, 2]"),
        "ragged": ({"codes": [[[0, 1], [2]]]}, 422, "shape"),
        "floats": ({"codes": [[[0.5, 1], [2, 3]]]}, 422, "integer"),
        "latents of the other family": ({"latents": [[0.1, 0.2, 0.3, 0.4]]}, 422, "codes"),
    }
    for name, (body, status, words) in cases.items():
        r = vq_client.post(f"{BASE}/decode", json=body)
        assert r.status_code == status, (name, r.text)
        assert words in r.text and "error" in r.json(), (name, r.text)


def test_samples_are_seeded_per_sample_and_decode_to_their_codes(vq_client: TestClient) -> None:
    five = vq_client.get(f"{BASE}/sample?n=5&seed=11&format=array").json()["results"]
    three = vq_client.get(f"{BASE}/sample?n=3&seed=11&format=array").json()["results"]
    other = vq_client.get(f"{BASE}/sample?n=5&seed=12&format=array").json()["results"]
    assert [r["latent"] for r in five[:3]] == [r["latent"] for r in three]  # sample i depends on (seed, i)
    assert [r["latent"] for r in five] != [r["latent"] for r in other]
    grids = np.array([r["latent"] for r in five])
    assert grids.shape == (5, 2, 2) and grids.min() >= 0 and grids.max() < 8
    decoded = vq_client.post(f"{BASE}/decode?format=array", json={"codes": grids.tolist()}).json()["results"]
    np.testing.assert_allclose([d["array"] for d in decoded], [r["array"] for r in five], atol=1e-6)
    cold = vq_client.get(f"{BASE}/sample?n=64&seed=3&temperature=0.05").json()["results"]
    hot = vq_client.get(f"{BASE}/sample?n=64&seed=3&temperature=5").json()["results"]
    distinct = lambda rs: len({str(r["latent"]) for r in rs})  # noqa: E731
    assert distinct(cold) < distinct(hot)  # a cold prior concentrates on its modes


def full_pass_samples(prior_onnx, n: int, seed: int, temperature: float, grid: tuple[int, int],
                      codebook_size: int) -> np.ndarray:
    """Ancestral sampling the slow way: one teacher-forced pass of the prior graph per position, the same
    uniforms and inverse CDF as the service. (n, h, w) int64."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(prior_onnx), providers=["CPUExecutionProvider"])
    positions = grid[0] * grid[1]
    u = prior_uniforms(seed, n, positions).astype(np.float64)
    codes = np.zeros((n, *grid), np.int64)
    for p in range(positions):
        i, j = divmod(p, grid[1])
        logits = session.run(None, {"codes": codes})[0][:, :, i, j].astype(np.float64) / temperature
        probs = np.exp(logits - logits.max(1, keepdims=True))
        cdf = np.cumsum(probs, 1) / probs.sum(1, keepdims=True)
        codes[:, i, j] = np.minimum((cdf < u[:, p:p + 1]).sum(1), codebook_size - 1)
    return codes


def test_served_samples_are_the_full_pass_samples(vq_client: TestClient, vq_artifact) -> None:
    """The served loop (prior_row/prior_step with caches, rows of a batch at different positions) draws
    exactly what one full prior pass per position draws from the same uniforms."""
    expected = full_pass_samples(vq_artifact.models_dir / "tinyvq" / "1" / "prior.onnx", 24, 8, 0.7,
                                 (2, 2), 8)
    body = vq_client.get(f"{BASE}/sample?n=24&seed=8&temperature=0.7&format=array").json()
    assert [r["latent"] for r in body["results"]] == expected.tolist()


def test_samples_joining_the_sampler_mid_walk_get_the_full_pass_samples() -> None:
    """The committed 7x7 model, its device loop driven directly: a second request's samples join a batch
    whose samples are two grid rows in (other rows, other cached activations), and every sample still
    gets exactly the full-pass samples of its own seed."""
    from service.engine.runtime import OnnxRuntime
    from service.families import family_for
    from service.families.vqvae import SAMPLER

    manifest = load_manifest(DEFAULT_VQ, "onnx")
    family, runtime = family_for(manifest), OnnxRuntime(manifest, "cpu", 1)
    first = family.sampler_state(3, prior_uniforms(5, 3, family.positions), 1.0)
    for _ in range(2):
        first.update(family.device_loop(SAMPLER, runtime.run, first))
    second = family.sampler_state(2, prior_uniforms(6, 2, family.positions), 1.0)
    state = {key: np.concatenate([first[key], second[key]]) for key in first}
    calls = 0
    while state["row"].min() < 7:
        state.update(family.device_loop(SAMPLER, runtime.run, state))
        calls += 1
    assert calls == 7 and state["row"].tolist() == [7] * 5  # finished rows stay put
    prior = DEFAULT_VQ / "prior.onnx"
    np.testing.assert_array_equal(state["codes"][:3], full_pass_samples(prior, 3, 5, 1.0, (7, 7), 64))
    np.testing.assert_array_equal(state["codes"][3:], full_pass_samples(prior, 2, 6, 1.0, (7, 7), 64))


def test_reconstruct_decodes_the_codes(vq_client: TestClient, vq_artifact) -> None:
    x = vq_artifact.test_images[:4]
    with torch.no_grad():
        rec = vq_artifact.model.decode_mean(vq_artifact.model.codes(x)).numpy()
    body = vq_client.post(f"{BASE}/reconstruct?format=array", json={"inputs": _arrays(x)}).json()
    np.testing.assert_allclose(np.array([r["array"] for r in body["results"]]), rec, atol=1e-4)
    sse = ((rec - x.numpy()) ** 2).reshape(4, -1).sum(1)
    np.testing.assert_allclose([r["sse"] for r in body["results"]], sse, rtol=1e-4)


def test_log_likelihood_is_the_iw_bound_of_the_seeded_uniforms(vq_client: TestClient, vq_artifact) -> None:
    x = (vq_artifact.test_images[:3] >= 0.5).float()  # the service's likelihood view
    k, seed = 40, 5
    body = vq_client.post(f"{BASE}/log-likelihood?k={k}&seed={seed}", json={"inputs": _arrays(x)}).json()
    u = torch.from_numpy(np.stack([sample_uniforms(seed, i, 0, k, 4) for i in range(3)]))
    with torch.no_grad():
        log_w = vq_artifact.model.log_weights(x, u).double()
    np.testing.assert_allclose([r["log_likelihood"] for r in body["results"]],
                               losses.iwae_bound(log_w).numpy(), atol=2e-3)
    np.testing.assert_allclose([r["elbo"] for r in body["results"]], log_w.mean(-1).numpy(), atol=2e-3)


def test_results_do_not_depend_on_chunk_or_batching(vq_artifact) -> None:
    x = _arrays(vq_artifact.test_images[:6])
    answers = []
    for chunk, batch in ((128, 16), (7, 2)):
        with TestClient(create_app(_settings(vq_artifact.models_dir, iw_chunk_size=chunk,
                                             max_batch_size=batch))) as client:
            ll = client.post(f"{BASE}/log-likelihood?k=50&seed=9", json={"inputs": x}).json()
            sample = client.get(f"{BASE}/sample?n=6&seed=4").json()
            answers.append(([r["log_likelihood"] for r in ll["results"]],
                            [r["latent"] for r in sample["results"]]))
    np.testing.assert_allclose(answers[0][0], answers[1][0], rtol=1e-6)
    assert answers[0][1] == answers[1][1]


def test_anomaly_score_is_calibrated(vq_client: TestClient, vq_artifact) -> None:
    images = _arrays(vq_artifact.test_images[:4])
    body = vq_client.post(f"{BASE}/anomaly-score?seed=1", json={"inputs": images})
    assert body.status_code == 200, body.text
    for r in body.json()["results"]:
        assert 0 < r["p_value"] <= 1 and r["method"] == "nll"


def test_v2_models_use_int64_codes(vq_client: TestClient, vq_artifact) -> None:
    meta = vq_client.get("/v2/models/tinyvq.encode").json()
    assert {o["name"]: (o["datatype"], o["shape"]) for o in meta["outputs"]} == {
        "codes": ("INT64", [-1, 2, 2]), "pre_quantization": ("FP32", [-1, 4, 2, 2])}
    x = vq_artifact.test_images[:2].numpy()
    enc = vq_client.post("/v2/models/tinyvq.encode/infer", json={
        "inputs": [{"name": "images", "datatype": "FP32", "shape": list(x.shape),
                    "data": x.ravel().tolist()}],
        "outputs": [{"name": "codes"}]}).json()
    assert [o["name"] for o in enc["outputs"]] == ["codes"] and enc["outputs"][0]["datatype"] == "INT64"
    codes = enc["outputs"][0]["data"]
    dec = vq_client.post("/v2/models/tinyvq.decode/infer", json={
        "inputs": [{"name": "codes", "datatype": "INT64", "shape": [2, 2, 2], "data": codes}]})
    assert dec.status_code == 200, dec.text
    with torch.no_grad():
        expected = vq_artifact.model.decode_mean(torch.tensor(codes).reshape(2, 2, 2)).numpy()
    np.testing.assert_allclose(np.array(dec.json()["outputs"][0]["data"]).reshape(expected.shape), expected,
                               atol=1e-4)
    bad = vq_client.post("/v2/models/tinyvq.decode/infer", json={
        "inputs": [{"name": "codes", "datatype": "INT64", "shape": [1, 2, 2], "data": [0, 1, 2, 99]}]})
    assert bad.status_code == 400 and "0..7" in bad.text  # V2 answers every invalid input with 400


def test_include_is_refused_for_a_family_without_that_output(client: TestClient) -> None:
    r = client.post("/v1/models/tiny/encode?include=pre_quantization", json={"inputs": [[[[0.0] * 8] * 8]]})
    assert r.status_code == 422 and "no optional encode output" in r.json()["error"]["message"]


def test_concurrent_samples_need_queue_space_for_one_step_not_the_whole_walk(vq_artifact) -> None:
    """Sampling submits n prior rows per position: 4 requests of 60 samples (240 prior rows per request
    in all) fit a 256-row queue together, since at most 4 x 60 rows are ever queued at once."""
    from concurrent.futures import ThreadPoolExecutor

    settings = _settings(vq_artifact.models_dir, max_queue_size=256, max_n=256, max_images=64)
    with TestClient(create_app(settings)) as client, ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda s: client.get(f"{BASE}/sample?n=60&seed={s}"), range(4)))
    assert [a.status_code for a in answers] == [200] * 4, [a.text[:200] for a in answers]
