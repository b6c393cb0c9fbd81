"""Concurrent requests through the real app: batch invariance, overload, deadlines, failures, disconnects.

Requests run concurrently on one event loop through httpx's ASGI transport, with the app's lifespan
(model loading, batchers) running around them. Faults are injected by wrapping the runtime.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import numpy as np
from fastapi import FastAPI
from svc_helpers import grey_arrays

from service.engine.batching import Arrays


class FaultyRuntime:
    """Wraps a real runtime: optional delay per batch, a gate to hold batches, one-shot failures."""

    def __init__(self, inner: Any, delay: float = 0.0) -> None:
        self.inner = inner
        self.name, self.device, self.details = inner.name, inner.device, inner.details
        self.delay = delay
        self.fail_next: set[str] = set()
        self.gate: threading.Event | None = None
        self.calls = 0

    def run(self, graph: str, inputs: Arrays) -> Arrays:
        self.calls += 1
        if self.gate is not None:
            self.gate.wait(5)
        time.sleep(self.delay)
        if graph in self.fail_next:
            self.fail_next.discard(graph)
            raise RuntimeError("injected fault")
        return self.inner.run(graph, inputs)


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait for a condition instead of sleeping a fixed time: the machine may be busy."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


Scenario = Callable[[httpx.AsyncClient, FastAPI], Awaitable[None]]


def serve(app: FastAPI, scenario: Scenario) -> None:
    """Run the app's lifespan and `scenario` with an async client on one event loop."""

    async def main() -> None:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client:
                await scenario(client, app)

    asyncio.run(main())


def wrap_runtime(app: FastAPI, model: str = "tiny", delay: float = 0.0) -> FaultyRuntime:
    served = app.state.service.engine.registry.models[(model, "1")]
    served.runtime = FaultyRuntime(served.runtime, delay)
    return served.runtime


def batch_histogram(text: str, model: str, graph: str) -> tuple[float, float]:
    """(number of batches, total rows) from the Prometheus text."""
    labels = f'graph="{graph}",model="{model}",version="1"'
    count = float(re.search(rf"vae_batch_size_rows_count{{{labels}}} (\S+)", text).group(1))
    total = float(re.search(rf"vae_batch_size_rows_sum{{{labels}}} (\S+)", text).group(1))
    return count, total


def test_encode_is_batch_invariant_under_concurrency(make_app: Callable[..., FastAPI]) -> None:
    images = grey_arrays(12, seed=20)

    async def scenario(client: httpx.AsyncClient, app: FastAPI) -> None:
        alone = [(await client.post("/v1/models/tiny/encode", json={"inputs": [x]})).json()["results"][0]
                 for x in images]
        before = batch_histogram((await client.get("/metrics")).text, "tiny", "encoder")
        # Requests of 1, 2 and 3 images at once: rows from different requests share batches.
        groups = [images[0:1], images[1:3], images[3:6], images[6:7], images[7:9], images[9:12]]
        responses = await asyncio.gather(*(client.post("/v1/models/tiny/encode", json={"inputs": g})
                                           for g in groups))
        together = [r for resp in responses for r in resp.json()["results"]]
        for a, b in zip(alone, together, strict=True):
            np.testing.assert_allclose(a["mean"], b["mean"], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(a["log_variance"], b["log_variance"], rtol=1e-5, atol=1e-6)
        after = batch_histogram((await client.get("/metrics")).text, "tiny", "encoder")
        batches, rows = after[0] - before[0], after[1] - before[1]
        assert rows == 12 and batches < 6, "concurrent requests should have been batched together"

    serve(make_app(max_queue_delay_ms=50.0), scenario)


def test_seeded_log_likelihood_is_batch_invariant(make_app: Callable[..., FastAPI]) -> None:
    images = grey_arrays(3, seed=21)
    url = "/v1/models/tiny/log-likelihood?k=300&seed=9"

    async def scenario(client: httpx.AsyncClient, app: FastAPI) -> None:
        alone = (await client.post(url, json={"inputs": images})).json()["results"]
        before = batch_histogram((await client.get("/metrics")).text, "tiny", "log_weights")
        # The same request again, now among unrelated requests of other sizes, k and seeds.
        others = [client.post(f"/v1/models/tiny/log-likelihood?k={k}&seed={k}",
                              json={"inputs": grey_arrays(2, seed=k)}) for k in (77, 128, 500)]
        *_, batched = await asyncio.gather(*others, client.post(url, json={"inputs": images}))
        for a, b in zip(alone, batched.json()["results"], strict=True):
            assert abs(a["log_likelihood"] - b["log_likelihood"]) < 1e-4
            assert abs(a["elbo"] - b["elbo"]) < 1e-4
            assert abs(a["standard_error"] - b["standard_error"]) < 1e-6
        # eps depend on (seed, image index, chunk) only: image 0 alone is image 0 of the batch.
        first = (await client.post(url, json={"inputs": images[:1]})).json()["results"][0]
        assert abs(first["log_likelihood"] - alone[0]["log_likelihood"]) < 1e-4
        after = batch_histogram((await client.get("/metrics")).text, "tiny", "log_weights")
        batches, rows = after[0] - before[0], after[1] - before[1]
        assert rows / batches > 3.0, "chunks of several requests should have run together"

    serve(make_app(max_queue_delay_ms=30.0), scenario)


def test_overload_answers_429_with_retry_after(make_app: Callable[..., FastAPI]) -> None:
    async def scenario(client: httpx.AsyncClient, app: FastAPI) -> None:
        runtime = wrap_runtime(app)
        runtime.gate = threading.Event()  # the device is busy until released
        body = {"inputs": grey_arrays(2)}
        calls = [asyncio.ensure_future(client.post("/v1/models/tiny/encode", json=body))]
        await until(lambda: runtime.calls == 1)  # its 2 rows are on the (held) device
        calls += [asyncio.ensure_future(client.post("/v1/models/tiny/encode", json=body)) for _ in range(7)]
        # Two more fill the queue of 4 rows, five are refused.
        await until(lambda: sum(c.done() for c in calls) == 5)
        runtime.gate.set()
        responses = await asyncio.gather(*calls)
        statuses = sorted(r.status_code for r in responses)
        assert statuses == [200] * 3 + [429] * 5, statuses
        rejected = next(r for r in responses if r.status_code == 429)
        assert int(rejected.headers["retry-after"]) >= 1
        assert rejected.json()["error"]["code"] == "overloaded"
        assert (await client.post("/v1/models/tiny/encode", json=body)).status_code == 200
        assert 'reason="queue_full"' in (await client.get("/metrics")).text

    app = make_app(max_queue_size=4, max_images=4, max_n=4, max_batch_size=2, max_queue_delay_ms=0.0)
    serve(app, scenario)


def test_deadline_answers_504_and_the_service_recovers(make_app: Callable[..., FastAPI]) -> None:
    async def scenario(client: httpx.AsyncClient, app: FastAPI) -> None:
        runtime = wrap_runtime(app, delay=0.4)
        response = await client.post("/v1/models/tiny/encode", json={"inputs": grey_arrays(1)})
        assert response.status_code == 504 and response.json()["error"]["code"] == "deadline_exceeded"
        runtime.delay = 0.0
        await asyncio.sleep(0.4)  # let the abandoned batch finish
        after = await client.post("/v1/models/tiny/encode", json={"inputs": grey_arrays(1)})
        assert after.status_code == 200

    serve(make_app(request_timeout_s=0.15), scenario)


def test_failed_batch_fails_only_its_requests(make_app: Callable[..., FastAPI]) -> None:
    async def scenario(client: httpx.AsyncClient, app: FastAPI) -> None:
        runtime = wrap_runtime(app)
        runtime.fail_next.add("encoder")
        first = await asyncio.gather(*(client.post("/v1/models/tiny/encode", json={"inputs": grey_arrays(1)})
                                       for _ in range(3)))
        failed = [r for r in first if r.status_code == 500]
        assert failed and all(r.json()["error"]["code"] == "inference_failed" for r in failed)
        assert all(r.status_code in (200, 500) for r in first)
        after = await client.post("/v1/models/tiny/encode", json={"inputs": grey_arrays(2)})
        assert after.status_code == 200 and len(after.json()["results"]) == 2
        other_model = await client.post("/v1/models/lin/encode", json={"inputs": grey_arrays(1)})
        assert other_model.status_code == 200
        metrics = (await client.get("/metrics")).text
        assert 'vae_batch_failures_total{graph="encoder",model="tiny",version="1"} 1.0' in metrics

    serve(make_app(max_queue_delay_ms=30.0), scenario)


def test_client_disconnect_cancels_queued_work(make_app: Callable[..., FastAPI]) -> None:
    """Speak ASGI directly: the body arrives, then the connection drops while the work is queued."""

    async def scenario(client: httpx.AsyncClient, app: FastAPI) -> None:
        runtime = wrap_runtime(app)
        runtime.gate = threading.Event()  # hold the device so later work stays queued
        blocker = asyncio.ensure_future(client.post("/v1/models/tiny/encode",
                                                    json={"inputs": grey_arrays(1)}))
        await until(lambda: runtime.calls > 0)  # the blocker's batch is on the device
        body = json.dumps({"inputs": grey_arrays(5)}).encode()
        disconnected = asyncio.Event()
        sent: list[dict] = []

        async def receive() -> dict:
            if not sent:
                sent.append({})
                return {"type": "http.request", "body": body, "more_body": False}
            await disconnected.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/v1/models/tiny/encode", "raw_path": b"/v1/models/tiny/encode",
                 "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1), "server": ("test", 80),
                 "headers": [(b"content-type", b"application/json"),
                             (b"content-length", str(len(body)).encode())]}
        call = asyncio.ensure_future(app(scope, receive, send))
        encoder = app.state.service.engine.registry.models[("tiny", "1")].batchers["encoder"]
        await until(lambda: encoder.queued_rows == 5)
        disconnected.set()
        await asyncio.wait_for(call, 2)
        assert encoder.queued_rows == 0  # the departed client's rows were dropped
        assert not any(m.get("type") == "http.response.start" for m in sent[1:])
        runtime.gate.set()
        assert (await blocker).status_code == 200
        assert 'status="499"' in (await client.get("/metrics")).text

    serve(make_app(), scenario)


def test_fisher_failure_in_its_encoder_half_cancels_its_log_weights(make_app: Callable[..., FastAPI]) -> None:
    """fisher runs its encode/decode beside the log-weights; when that half fails, the request answers
    500 at once and its log-weights rows still queued are dropped, not computed for nobody."""

    class SlowLogWeights(FaultyRuntime):
        def __init__(self, inner: Any) -> None:
            super().__init__(inner)
            self.graph_calls: dict[str, int] = {}

        def run(self, graph: str, inputs: Arrays) -> Arrays:
            self.graph_calls[graph] = self.graph_calls.get(graph, 0) + 1
            if graph == "log_weights":
                time.sleep(0.2)  # one image's chunk per batch: 4 batches take 0.8 s
            return super().run(graph, inputs)

    async def scenario(client: httpx.AsyncClient, app: FastAPI) -> None:
        served = app.state.service.engine.registry.models[("tiny", "1")]
        runtime = served.runtime = SlowLogWeights(served.runtime)
        runtime.fail_next.add("encoder")
        failed = await client.post("/v1/models/tiny/anomaly-score?method=fisher&k=16",
                                   json={"inputs": grey_arrays(4)})
        assert failed.status_code == 500 and failed.json()["error"]["code"] == "inference_failed"
        await until(lambda: served.batchers["log_weights"].queued_rows == 0 and not
                    served.batchers["log_weights"].busy)
        assert runtime.graph_calls["log_weights"] < 4  # the rest of the 4 rows were cancelled
        ok = await client.post("/v1/models/tiny/anomaly-score?method=fisher&k=16",
                               json={"inputs": grey_arrays(2)})
        assert ok.status_code == 200 and len(ok.json()["results"]) == 2

    serve(make_app(max_batch_samples=128, iw_chunk_size=128), scenario)
