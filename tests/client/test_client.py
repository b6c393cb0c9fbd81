"""vae_client against the real service, and its retry rules against injected faults.

One real `python -m service` process (scripts/reliability/harness.py) serves the committed default
model `mnist-vae` with an API key; every client result is compared with a direct httpx call to the
same server (same numbers, exactly: both requests run alone through the same graphs). Retries are
tested with httpx.MockTransport, only where a fault must be injected (429, 503, dropped connections).
"""

from __future__ import annotations

import asyncio
import base64
import io
import random
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts" / "reliability"))

from harness import start_server  # noqa: E402

from vae_client import (  # noqa: E402
    AsyncVAEClient,
    ConnectionFailed,
    InvalidInput,
    ModelNotFound,
    Overloaded,
    RetryPolicy,
    Unauthorized,
    Unavailable,
    VAEClient,
)
from vae_client import _calls as calls  # noqa: E402
from vae_client._retry import RetryState  # noqa: E402
from vae_client.errors import retry_after_seconds  # noqa: E402

MODEL = "mnist-vae"
VQ_MODEL = "mnist-vqvae"
API_KEY = "client-test-key-0123456789"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


# -- fixtures: one real server for the module, a few hand-drawn digits ---------------------------------------
@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("client") / "service.log"
    env = {"VAE_API_KEYS": API_KEY, "VAE_LOG_LEVEL": "WARNING"}
    with start_server(ROOT / "models", log, env=env, ready_timeout=120) as server:
        yield server.url


@pytest.fixture(scope="module")
def direct(server_url: str) -> Iterator[httpx.Client]:
    """A plain httpx client: the reference the client's numbers are checked against."""
    with httpx.Client(base_url=server_url, headers=AUTH, timeout=60) as http:
        yield http


@pytest.fixture(scope="module")
def client(server_url: str) -> Iterator[VAEClient]:
    with VAEClient(server_url, model=MODEL, api_key=API_KEY, timeout=60) as c:
        yield c


def _digit(kind: int) -> Image.Image:
    """A 28x28 white-on-black stroke drawing (0, 1 or 7), MNIST-like enough for the model."""
    image = Image.new("L", (28, 28))
    draw = ImageDraw.Draw(image)
    if kind == 0:
        draw.ellipse((8, 5, 20, 23), outline=255, width=3)
    elif kind == 1:
        draw.line((14, 4, 14, 24), fill=255, width=3)
    else:
        draw.line([(7, 6), (21, 6), (12, 24)], fill=255, width=3)
    return image


@pytest.fixture(scope="module")
def digits() -> list[Image.Image]:
    return [_digit(k) for k in range(3)]


@pytest.fixture(scope="module")
def arrays(digits: list[Image.Image]) -> np.ndarray:
    """The digits as (N, 1, 28, 28) float32 in [0, 1]."""
    return np.stack([np.asarray(d, dtype=np.float32)[None] / 255.0 for d in digits])


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _post(direct: httpx.Client, op: str, body: Any = None, files: Any = None, **params: Any) -> dict:
    response = direct.post(f"/v1/models/{MODEL}/{op}", json=body, files=files, params=params)
    assert response.status_code == 200, response.text
    return response.json()


def _multipart(pngs: list[bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", (f"d{i}.png", data, "image/png")) for i, data in enumerate(pngs)]


# -- real service: same numbers as a direct call ------------------------------------------------------------
def test_models_health_ready(client: VAEClient, direct: httpx.Client) -> None:
    assert client.health().status == "ok"
    assert client.ready() is True
    assert client.wait_until_ready(timeout=5).models == (MODEL, VQ_MODEL)
    info, vq = client.models()
    assert (info.name, info.latent_dim, info.input_shape, info.labels) == (MODEL, 32, (1, 28, 28), None)
    assert (vq.family, vq.latent) == ("vqvae", {"input": "codes", "shape": [7, 7], "dtype": "int64",
                                                "codebook_size": 64})
    detail = client.model()
    reference = direct.get(f"/v1/models/{MODEL}").json()
    assert detail.version == reference["version"] and detail.limits == reference["limits"]
    assert detail.runtime == reference["runtime"] and detail.raw == reference


def test_encode_arrays_match_direct_json(client: VAEClient, direct: httpx.Client, arrays: np.ndarray) -> None:
    result = client.encode(arrays)
    reference = _post(direct, "encode", {"inputs": arrays.tolist()})["results"]
    assert result.mean.shape == result.variance.shape == result.log_variance.shape == (3, 32)
    np.testing.assert_array_equal(result.mean, [r["mean"] for r in reference])
    np.testing.assert_array_equal(result.variance, [r["variance"] for r in reference])
    np.testing.assert_array_equal(result.log_variance, [r["log_variance"] for r in reference])
    assert (result.model, result.version) == (MODEL, "2")  # the highest version is the default
    # A single (C, H, W) array is one image, and a list of them is a batch.
    np.testing.assert_array_equal(client.encode(arrays[1]).mean, result.mean[1:2])
    np.testing.assert_array_equal(client.encode(list(arrays)).mean, result.mean)


def test_encode_files_match_direct_multipart(client: VAEClient, direct: httpx.Client,
                                             digits: list[Image.Image], tmp_path: Path) -> None:
    pngs = [_png(d) for d in digits]
    path = tmp_path / "seven.png"
    path.write_bytes(pngs[2])
    result = client.encode([digits[0], pngs[1], path])  # PIL image, PNG bytes, file path
    reference = _post(direct, "encode", files=_multipart(pngs))["results"]
    np.testing.assert_array_equal(result.mean, [r["mean"] for r in reference])
    np.testing.assert_array_equal(result.variance, [r["variance"] for r in reference])
    # JPEG bytes go through the same way (the service decodes them; lossy, so compare with the same bytes).
    buffer = io.BytesIO()
    digits[0].save(buffer, format="JPEG", quality=90)
    jpeg = client.encode(buffer.getvalue())
    jpeg_ref = _post(direct, "encode", files=[("images", ("d.jpg", buffer.getvalue(), "image/jpeg"))])
    np.testing.assert_array_equal(jpeg.mean, [jpeg_ref["results"][0]["mean"]])


def test_decode_arrays_and_png(client: VAEClient, direct: httpx.Client) -> None:
    z = np.random.default_rng(0).standard_normal((2, 32)).astype(np.float32)
    result = client.decode(z)
    reference = _post(direct, "decode", {"latents": z.tolist()}, format="array")["results"]
    assert result.images.shape == (2, 1, 28, 28) and result.images.dtype == np.float32
    np.testing.assert_array_equal(result.images, np.asarray([r["array"] for r in reference], np.float32))
    assert result.png is None
    as_png = client.decode(z, format="png")
    reference_png = _post(direct, "decode", {"latents": z.tolist()}, format="png")["results"]
    assert as_png.png == tuple(base64.b64decode(r["image"]) for r in reference_png)
    assert np.abs(as_png.images - result.images).max() <= 0.5 / 255 + 1e-6  # 8-bit rounding only
    pil = result.to_pil()
    assert [p.size for p in pil] == [(28, 28)] * 2 and pil[0].mode == "L"
    np.testing.assert_array_equal(np.asarray(pil[0]), np.rint(result.images[0, 0] * 255).astype(np.uint8))


def test_sample_matches_direct(client: VAEClient, direct: httpx.Client) -> None:
    result = client.sample(3, seed=11, temperature=0.8)
    response = direct.get(f"/v1/models/{MODEL}/sample",
                          params={"n": 3, "seed": 11, "temperature": 0.8, "format": "array"})
    reference = response.json()
    assert (result.seed, result.temperature) == (11, 0.8)
    np.testing.assert_array_equal(result.images, np.asarray([r["array"] for r in reference["results"]],
                                                            np.float32))
    np.testing.assert_array_equal(result.latents, [r["latent"] for r in reference["results"]])
    assert result.labels == (None, None, None)
    # z = temperature * eps: the same seed at temperature 0.4 gives half the latents.
    np.testing.assert_allclose(client.sample(3, seed=11, temperature=0.4).latents, result.latents / 2,
                               rtol=1e-6)


def test_reconstruct_matches_direct(client: VAEClient, direct: httpx.Client, arrays: np.ndarray) -> None:
    result = client.reconstruct(arrays)
    reference = _post(direct, "reconstruct", {"inputs": arrays.tolist()}, format="array")["results"]
    np.testing.assert_array_equal(result.images, np.asarray([r["array"] for r in reference], np.float32))
    np.testing.assert_array_equal(result.mse, [r["mse"] for r in reference])
    np.testing.assert_array_equal(result.sse, [r["sse"] for r in reference])
    # The reported error is the error of the returned images against the inputs.
    np.testing.assert_allclose(result.sse, ((result.images - arrays) ** 2).reshape(3, -1).sum(1), rtol=1e-4)


def test_log_likelihood_and_anomaly_match_direct(client: VAEClient, direct: httpx.Client,
                                                 arrays: np.ndarray) -> None:
    ll = client.log_likelihood(arrays, k=32, seed=5)
    reference = _post(direct, "log-likelihood", {"inputs": arrays.tolist()}, k=32, seed=5)
    assert (ll.k, ll.seed, ll.binarized) == (32, 5, reference["binarized"])
    for field in ("log_likelihood", "elbo", "bits_per_dim", "standard_error"):
        np.testing.assert_array_equal(getattr(ll, field), [r[field] for r in reference["results"]])
    assert (ll.log_likelihood >= ll.elbo).all()  # the IW bound is at least the ELBO of the same samples

    # mnist-vae/1 with method nll: the score is -log p(x) of the same estimate
    scores = client.anomaly_score(arrays, k=32, seed=5, method="nll", version="1")
    reference = _post(direct, "versions/1/anomaly-score", {"inputs": arrays.tolist()}, k=32, seed=5,
                      method="nll")
    assert (scores.k, scores.seed, scores.method) == (32, 5, "nll")
    assert scores.calibration_k == reference["calibration_k"] and scores.alpha == reference["alpha"]
    rows = reference["results"]
    np.testing.assert_array_equal(scores.score, [r["score"] for r in rows])
    np.testing.assert_array_equal(scores.percentile, [r["percentile"] for r in rows])
    np.testing.assert_array_equal(scores.p_value, [r["p_value"] for r in rows])
    assert scores.threshold == rows[0]["threshold"]
    assert scores.is_anomaly.tolist() == [r["is_anomaly"] for r in rows]
    ll1 = client.log_likelihood(arrays, k=32, seed=5, version="1")
    np.testing.assert_array_equal(scores.score, -ll1.log_likelihood)  # same k and seed: same estimate


def test_conformal_anomaly_scores_of_the_default_model(client: VAEClient, direct: httpx.Client,
                                                       arrays: np.ndarray) -> None:
    """The default model (mnist-vae/2) has a calibration per method: method, alpha and p-values."""
    scores = client.anomaly_score(arrays, seed=5, method="fisher", alpha=0.05)
    reference = _post(direct, "anomaly-score", {"inputs": arrays.tolist()}, seed=5, method="fisher",
                      alpha=0.05)
    assert (scores.method, scores.alpha) == ("fisher", 0.05)
    rows = reference["results"]
    np.testing.assert_array_equal(scores.p_value, [r["p_value"] for r in rows])
    np.testing.assert_array_equal(scores.score, [r["score"] for r in rows])
    assert scores.is_anomaly is not None
    assert scores.is_anomaly.tolist() == [r["is_anomaly"] for r in rows] == (scores.p_value <= 0.05).tolist()
    default = client.anomaly_score(arrays, seed=5)  # the manifest's default method and level
    assert (default.method, default.alpha, default.version) == ("fisher", 0.01, "2")
    np.testing.assert_array_equal(default.score, scores.score)  # the same seed gives the same score


def test_async_client_matches_direct(server_url: str, direct: httpx.Client, arrays: np.ndarray,
                                     digits: list[Image.Image]) -> None:
    async def run() -> tuple[Any, ...]:
        async with AsyncVAEClient(server_url, model=MODEL, api_key=API_KEY, timeout=60) as c:
            assert await c.ready()
            encoded = await c.encode(arrays)
            files = await c.encode(digits)
            sample = await c.sample(2, seed=3)
            ll = await c.log_likelihood(arrays, k=16, seed=2)
            together = await asyncio.gather(*(c.encode(a) for a in arrays))  # one client, concurrent calls
            return encoded, files, sample, ll, together

    encoded, files, sample, ll, together = asyncio.run(run())
    ref = _post(direct, "encode", {"inputs": arrays.tolist()})["results"]
    np.testing.assert_array_equal(encoded.mean, [r["mean"] for r in ref])
    ref_files = _post(direct, "encode", files=_multipart([_png(d) for d in digits]))["results"]
    np.testing.assert_array_equal(files.mean, [r["mean"] for r in ref_files])
    ref_sample = direct.get(f"/v1/models/{MODEL}/sample", params={"n": 2, "seed": 3, "format": "array"})
    ref_images = np.asarray([r["array"] for r in ref_sample.json()["results"]], np.float32)
    np.testing.assert_array_equal(sample.images, ref_images)
    ref_ll = _post(direct, "log-likelihood", {"inputs": arrays.tolist()}, k=16, seed=2)["results"]
    np.testing.assert_array_equal(ll.log_likelihood, [r["log_likelihood"] for r in ref_ll])
    # Concurrent requests may share a batch, which can change float rounding, not the result.
    np.testing.assert_allclose(np.concatenate([t.mean for t in together]), encoded.mean, atol=1e-5)


def test_errors_from_the_real_service(client: VAEClient, server_url: str, arrays: np.ndarray) -> None:
    with pytest.raises(ModelNotFound) as not_found:
        client.model("nope", request_id="client-test-404")
    assert (not_found.value.status, not_found.value.code) == (404, "model_not_found")
    assert not_found.value.request_id == "client-test-404"  # X-Request-ID passthrough

    with pytest.raises(InvalidInput) as bad_shape:
        client.encode(np.zeros((1, 3, 28, 28), np.float32))  # a colour image for a grey model
    assert (bad_shape.value.status, bad_shape.value.code) == (422, "invalid_input")
    assert "shape" in bad_shape.value.message
    with pytest.raises(InvalidInput):
        client.encode(b"this is not an image")
    with pytest.raises(InvalidInput):
        client.log_likelihood(arrays, k=10**6)  # above the service's max_k

    for key in (None, "wrong-key-0123456789abcdef"):
        with VAEClient(server_url, model=MODEL, api_key=key) as other, pytest.raises(Unauthorized) as denied:
            other.encode(arrays)
        assert denied.value.status == 401
    result = client.encode(arrays[:1], request_id="client-test-ok")
    assert result.request_id == "client-test-ok"


def test_versioned_routes(client: VAEClient, arrays: np.ndarray) -> None:
    """version= selects /v1/models/{name}/versions/{v}/...: the same artifact gives the same numbers."""
    assert client.model(version="1").version == "1"
    np.testing.assert_array_equal(client.encode(arrays, version="2").mean, client.encode(arrays).mean)
    older = client.encode(arrays, version="1")
    assert older.version == "1" and not np.array_equal(older.mean, client.encode(arrays).mean)
    with pytest.raises(ModelNotFound):
        client.encode(arrays, version="999")


# -- the request the client builds ---------------------------------------------------------------------------
def test_paths_versions_and_query() -> None:
    opts = calls.Options()
    plain = calls.encode(("mnist-vae", None), np.zeros((1, 2, 2)), None, opts)
    assert (plain.method, plain.path, plain.params) == ("POST", "/v1/models/mnist-vae/encode", {})
    versioned = calls.log_likelihood(("mnist-vae", 2), np.zeros((1, 2, 2)), 10, None, "7", opts)
    assert versioned.path == "/v1/models/mnist-vae/versions/2/log-likelihood"
    assert versioned.params == {"k": "10", "label": "7"}  # unset options are not sent
    assert calls.model(("a/b", "1 x"), opts).path == "/v1/models/a%2Fb/versions/1%20x"  # one segment each
    per_item = calls.encode(("m", None), [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"], ["3", 4], opts)
    assert per_item.data == {"labels": ["3", "4"]} and "label" not in per_item.params
    assert [f[1][2] for f in per_item.files or []] == ["image/png", "image/jpeg"]
    sample = calls.sample(("m", "3"), 4, 1, 0.5, None, "array", opts)
    assert (sample.method, sample.path) == ("GET", "/v1/models/m/versions/3/sample")
    assert sample.params == {"n": "4", "seed": "1", "temperature": "0.5", "format": "array"}


def test_bad_inputs_are_refused_before_sending() -> None:
    with VAEClient("http://127.0.0.1:9", model=MODEL) as c:  # nothing listens: nothing may be sent
        with pytest.raises(ValueError, match="dtype"):
            c.encode(np.zeros((1, 1, 28, 28), np.uint8))
        with pytest.raises(ValueError, match="shape"):
            c.encode(np.zeros((28, 28)))
        with pytest.raises(TypeError, match="not both"):
            c.encode([np.zeros((1, 28, 28)), b"png"])
        with pytest.raises(ValueError, match="latent"):
            c.decode(np.zeros((1, 2, 3)))
    with VAEClient("http://127.0.0.1:9") as c, pytest.raises(ValueError, match="model"):
        c.encode(np.zeros((1, 1, 28, 28)))


# -- retries: injected faults --------------------------------------------------------------------------------
MODELS_BODY = {"models": [{"name": MODEL, "version": "1", "kind": "vae", "latent_dim": 32,
                           "input": {"channels": 1, "height": 28, "width": 28},
                           "likelihood": {"family": "bernoulli"}, "labels": None}]}


def _error(status: int, code: str, headers: dict[str, str] | None = None) -> httpx.Response:
    body = {"error": {"code": code, "message": f"injected {status}", "request_id": "inj"}}
    return httpx.Response(status, json=body, headers=headers)


class Script:
    """A MockTransport handler that answers from a list (responses, or exceptions to raise) and logs."""

    def __init__(self, *answers: httpx.Response | Exception) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []
        self.times: list[float] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        self.times.append(time.monotonic())
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def _mock_client(script: Script, **settings: Any) -> VAEClient:
    return VAEClient("http://vae.test", model=MODEL, transport=httpx.MockTransport(script), seed=0,
                     **settings)


def test_429_waits_for_retry_after_then_succeeds() -> None:
    script = Script(_error(429, "overloaded", {"Retry-After": "1"}), httpx.Response(200, json=MODELS_BODY))
    with _mock_client(script, backoff=0.01, api_key="k" * 20) as c:
        (info,) = c.models(request_id="rid-7")
    assert info.name == MODEL and len(script.requests) == 2
    waited = script.times[1] - script.times[0]
    assert 1.0 <= waited < 2.0, waited  # the server's Retry-After (+ at most 10%), not the 10 ms backoff
    for request in script.requests:  # the retry is the same request: key and request id kept
        assert request.headers["authorization"] == "Bearer " + "k" * 20
        assert request.headers["x-request-id"] == "rid-7"


def test_503_exhausts_the_retries_with_backoff() -> None:
    script = Script(*[_error(503, "unavailable") for _ in range(3)])
    arrays = np.zeros((1, 1, 28, 28), np.float32)
    with _mock_client(script, max_retries=2, backoff=0.05) as c, pytest.raises(Unavailable) as failed:
        c.encode(arrays)
    assert len(script.requests) == 3 and failed.value.status == 503 and failed.value.request_id == "inj"
    waits = np.diff(script.times)
    # [0.5, 1] x 0.05 s, then [0.5, 1] x 0.1 s (upper bounds loose: the machine may be busy)
    assert 0.025 <= waits[0] < 1.0 and 0.05 <= waits[1] < 1.0, waits
    assert all(r.content == script.requests[0].content for r in script.requests)  # the body is re-sent


def test_retry_after_beyond_the_budget_is_not_waited_for() -> None:
    script = Script(_error(429, "overloaded", {"Retry-After": "30"}))
    started = time.monotonic()
    with _mock_client(script, retry_budget=2.0) as c, pytest.raises(Overloaded) as failed:
        c.models()
    assert time.monotonic() - started < 1.0 and len(script.requests) == 1
    assert failed.value.retry_after == 30.0  # the caller can still schedule its own retry


@pytest.mark.parametrize(("status", "code", "error"), [(422, "invalid_input", InvalidInput),
                                                       (404, "model_not_found", ModelNotFound),
                                                       (401, "unauthorized", Unauthorized)])
def test_4xx_other_than_429_is_not_retried(status: int, code: str, error: type[Exception]) -> None:
    script = Script(_error(status, code), httpx.Response(200, json=MODELS_BODY))
    with _mock_client(script, backoff=0.01) as c, pytest.raises(error):
        c.encode(np.zeros((1, 1, 28, 28), np.float32))
    assert len(script.requests) == 1


def test_connection_errors_retry_gets_and_unsent_posts_only() -> None:
    dropped = httpx.RemoteProtocolError("server disconnected")
    script = Script(dropped, httpx.Response(200, json=MODELS_BODY))
    with _mock_client(script, backoff=0.01) as c:
        assert c.models()[0].name == MODEL  # GET: safe to repeat
    assert len(script.requests) == 2

    script = Script(dropped, httpx.Response(200, json={}))
    with _mock_client(script, backoff=0.01) as c, pytest.raises(ConnectionFailed) as failed:
        c.encode(np.zeros((1, 1, 28, 28), np.float32))  # POST that may have been processed: not repeated
    assert len(script.requests) == 1 and failed.value.status is None

    script = Script(httpx.ConnectError("refused"), _error(422, "invalid_input"))
    with _mock_client(script, backoff=0.01) as c, pytest.raises(InvalidInput):
        c.encode(np.zeros((1, 1, 28, 28), np.float32))  # never sent: safe to send again
    assert len(script.requests) == 2


def test_async_client_retries_429() -> None:
    script = Script(_error(429, "overloaded", {"Retry-After": "0"}), _error(503, "unavailable"),
                    httpx.Response(200, json=MODELS_BODY))

    async def run() -> list[Any]:
        async with AsyncVAEClient("http://vae.test", model=MODEL, transport=httpx.MockTransport(script),
                                  backoff=0.01) as c:
            return await c.models()

    assert asyncio.run(run())[0].name == MODEL and len(script.requests) == 3


def test_backoff_schedule_jitter_and_budget() -> None:
    now = [0.0]
    clock: Callable[[], float] = lambda: now[0]  # noqa: E731
    policy = RetryPolicy(max_retries=6, backoff=1.0, max_backoff=8.0, budget=100.0)
    state = RetryState(policy, enabled=True, idempotent=True, rng=random.Random(1), clock=clock)
    busy = httpx.Response(503)
    waits = [state.after_response(busy) for _ in range(6)]
    for i, wait in enumerate(waits):  # exponential, capped, jittered down by at most half
        assert wait is not None and 0.5 * min(8.0, 2.0**i) <= wait <= min(8.0, 2.0**i)
    assert state.after_response(busy) is None  # max_retries reached
    state = RetryState(policy, enabled=True, idempotent=True, rng=random.Random(1), clock=clock)
    wait = state.after_response(httpx.Response(429, headers={"Retry-After": "5"}))
    assert wait is not None and 5.0 <= wait <= 5.5  # never earlier than asked, a little later at most
    now[0] = 99.0
    assert state.after_response(httpx.Response(503)) is None  # would end past the budget
    assert state.after_response(httpx.Response(500)) is None  # 500 is never retried
    # Retry-After may also be an HTTP date (1 s resolution).
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=3), usegmt=True)
    assert 1.5 < (retry_after_seconds(httpx.Response(503, headers={"Retry-After": when})) or 0) <= 3.0
    assert retry_after_seconds(httpx.Response(503, headers={"Retry-After": "soon"})) is None


def test_vq_model_codes_round_trip(client: VAEClient, direct: httpx.Client, arrays: np.ndarray) -> None:
    """The committed VQ-VAE: encode gives code grids, decode takes them, samples carry theirs."""
    encoded = client.encode(arrays, model=VQ_MODEL, include="pre_quantization")
    reference = direct.post(f"/v1/models/{VQ_MODEL}/encode", params={"include": "pre_quantization"},
                            json={"inputs": arrays.tolist()}).json()["results"]
    assert encoded.mean is None and encoded.codes.dtype == np.int64
    assert encoded.codes.shape == (len(arrays), 7, 7)
    np.testing.assert_array_equal(encoded.codes, [r["codes"] for r in reference])
    np.testing.assert_array_equal(encoded.pre_quantization, [r["pre_quantization"] for r in reference])
    decoded = client.decode(encoded.codes, model=VQ_MODEL)
    expected = direct.post(f"/v1/models/{VQ_MODEL}/decode", params={"format": "array"},
                           json={"codes": encoded.codes.tolist()}).json()["results"]
    np.testing.assert_array_equal(decoded.images, np.asarray([r["array"] for r in expected], np.float32))
    sample = client.sample(2, seed=3, model=VQ_MODEL)
    assert sample.latents.dtype == np.int64 and sample.latents.shape == (2, 7, 7)
    np.testing.assert_array_equal(client.decode(sample.latents, model=VQ_MODEL).images, sample.images)
