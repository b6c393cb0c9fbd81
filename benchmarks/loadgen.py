"""Closed-loop HTTP load: `concurrency` tasks, each sending its next request when the last one answers.

A level ends when `max_requests` have been issued or `seconds` have passed (whichever is first);
requests in flight then finish (each bounded by the client timeout), and the wall time runs until the
last answer, so slow tails and the drain count against throughput. Every answer that is not a 200
is counted by status (transport failures by exception name) and never enters the latency figures.

Clients: by default each worker has its own httpx.AsyncClient holding one keep-alive connection (a
virtual user). One AsyncClient whose pool is shared by all workers (`--client-mode shared`) costs the
load generator far more CPU per request as concurrency grows (httpcore's pool bookkeeping), which on
a 2-core machine caps the load it can offer: measured on the benchmark machine against GET /healthz,
a shared pool gave 99 req/s at 64 connections and 62 req/s at 128 (9-15 ms of client CPU per
request), one client per worker about 600 req/s (1 ms per request) at both. `calibrate` measures
that ceiling in every run.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
from payloads import Body


@dataclass
class Sample:
    latency_s: float
    outcome: str  # "200", another status code, or an exception class name


@dataclass
class LevelRun:
    concurrency: int
    wall_s: float
    samples: list[Sample] = field(default_factory=list)
    first_ok_body: bytes | None = None


CLIENT_MODES = ("per-worker", "shared")


class Clients:
    """The httpx clients of one server: one per worker (one connection each) or one shared pool."""

    def __init__(self, max_concurrency: int, timeout_s: float, mode: str) -> None:
        def client(connections: int) -> httpx.AsyncClient:
            limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
            return httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(timeout_s), trust_env=False)

        if mode == "shared":
            self._clients = [client(max_concurrency)] * max_concurrency
        else:
            self._clients = [client(1) for _ in range(max_concurrency)]

    def for_level(self, concurrency: int) -> list[httpx.AsyncClient]:
        return self._clients[:concurrency]

    async def aclose(self) -> None:
        await asyncio.gather(*(c.aclose() for c in set(self._clients)))


async def open_connections(clients: list[httpx.AsyncClient], base_url: str) -> None:
    """Open one keep-alive connection per worker with cheap GETs, so the level does not pay TCP setup."""
    await asyncio.gather(*(c.get(f"{base_url}/healthz") for c in clients), return_exceptions=True)


async def run_level(clients: list[httpx.AsyncClient], url: str, bodies: list[Body] | None,
                    max_requests: int, seconds: float, timeout_s: float) -> LevelRun:
    """Drive `url` with one closed-loop worker per client; bounded by count, time and per-request timeout.

    bodies: POST these (cycled); None: GET.
    """
    concurrency = len(clients)
    issued = 0
    samples: list[Sample] = []
    first_ok: list[bytes] = []
    started = time.perf_counter()
    stop_issuing = started + seconds

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal issued
        while issued < max_requests and time.perf_counter() < stop_issuing:
            body = None if bodies is None else bodies[issued % len(bodies)]
            issued += 1
            t0 = time.perf_counter()
            try:
                if body is None:
                    response = await client.get(url)
                else:
                    response = await client.post(url, content=body.content, headers=body.headers)
                outcome = str(response.status_code)
                if response.status_code == 200 and not first_ok:
                    first_ok.append(response.content)
            except httpx.HTTPError as exc:
                outcome = type(exc).__name__
            samples.append(Sample(time.perf_counter() - t0, outcome))

    # Belt and braces: every request has its own timeout; the whole level has one too.
    hard_limit = seconds + timeout_s + 30.0
    tasks = [asyncio.create_task(worker(client)) for client in clients]
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), hard_limit)
    except TimeoutError:
        samples.append(Sample(hard_limit, "LevelTimeout"))
    wall = time.perf_counter() - started
    return LevelRun(concurrency, wall, samples, first_ok[0] if first_ok else None)


def percentile_ms(latencies: np.ndarray, q: float) -> float | None:
    return None if latencies.size == 0 else round(float(np.percentile(latencies, q)) * 1000.0, 2)


def summarize(run: LevelRun, images_per_request: int, k: int | None) -> dict[str, Any]:
    """Throughput (successful requests only) and latency percentiles of one level."""
    ok = np.array([s.latency_s for s in run.samples if s.outcome == "200"])
    errors = Counter(s.outcome for s in run.samples if s.outcome != "200")
    req_s = len(ok) / run.wall_s if run.wall_s > 0 else 0.0
    stats: dict[str, Any] = {
        "concurrency": run.concurrency,
        "requests": len(run.samples),
        "ok": len(ok),
        "errors": dict(errors),
        "wall_s": round(run.wall_s, 3),
        "requests_per_s": round(req_s, 2),
        "images_per_s": round(req_s * images_per_request, 2),
        "p50_ms": percentile_ms(ok, 50),
        "p90_ms": percentile_ms(ok, 90),
        "p99_ms": percentile_ms(ok, 99),
        "mean_ms": None if ok.size == 0 else round(float(ok.mean()) * 1000.0, 2),
        "max_ms": None if ok.size == 0 else round(float(ok.max()) * 1000.0, 2),
    }
    if k is not None:
        stats["samples_per_s"] = round(req_s * images_per_request * k, 1)
    return stats


def check_response(body: bytes | None, images: int, scenario_kind: str) -> str | None:
    """A problem with one successful answer (wrong count, non-finite values), or None if it looks right."""
    if body is None:
        return "no successful response"
    try:
        results = json.loads(body)["results"]
    except (ValueError, KeyError, TypeError) as exc:
        return f"unparsable response: {exc}"
    if len(results) != images:
        return f"{len(results)} results for {images} images"
    key = "mean" if scenario_kind == "encode" else "log_likelihood"
    values = [r.get(key) for r in results]
    flat = [v for item in values for v in (item if isinstance(item, list) else [item])]
    if not flat or not all(isinstance(v, float | int) and math.isfinite(v) for v in flat):
        return f"missing or non-finite {key!r} in the results"
    return None
