"""Overload against a real `python -m service` process: a 10x burst, and clients that leave mid-request.

The model is made the bottleneck with simulated device time per batch (scripts/reliability/
faulty_service.py), so the test measures admission control, not this machine's CPU. Capacity is
measured first (closed loop), then 10x that rate is sent open-loop.
"""

from __future__ import annotations

import asyncio
import io
import json
import socket
import time
from pathlib import Path

import harness
import httpx
import numpy as np
import pytest
from PIL import Image

ACCEPTED_BOUND_S = 3.0  # queue of 16 rows / 4-row batches of 0.2 s: ~1 s; generous for a loaded machine
# "Tens of ms" on a quiet machine; generous because CI's 2 cores may be shared (a run with a training
# job beside it measured 357 ms); the figure is reported, the bound only catches a queueing 429.
REJECT_P99_BOUND_S = 0.6


def _burst(models_dir: Path, tmp_path: Path, burst_s: float) -> dict:
    with harness.start_server(models_dir, tmp_path / "server.log", env=harness.BURST_ENV,
                              batch_delay_s=harness.BURST_DELAY_S) as server:
        figures = harness.burst_scenario(server, capacity_s=3.0, burst_s=burst_s)
        assert httpx.get(f"{server.url}/readyz").status_code == 200  # still ready after the burst
        after = httpx.post(f"{server.url}{harness.ENCODE}", json=harness.tiny_image_body(1), timeout=30)
        assert after.status_code == 200
        metrics = harness.scrape(server.url)
        assert "unhandled error" not in server.log()
    print("\nburst figures:", json.dumps(figures))
    assert metrics['vae_queue_depth_rows{graph="encoder",model="tiny",version="1"}'] == 0
    return figures


def _check(f: dict) -> None:
    assert f["sent"] == f["answered"], f  # every request got an HTTP answer
    assert set(f["statuses"]) <= {"200", "429"}, f
    assert f["statuses"].get("429", 0) > f["sent"] / 2, f  # most of a 10x burst is refused ...
    assert f["statuses"].get("200", 0) >= 5, f  # ... while the accepted ones are served
    assert f["rejected_429_p99_ms"] < 1000 * REJECT_P99_BOUND_S, f
    assert f["accepted_p99_ms"] < 1000 * ACCEPTED_BOUND_S, f
    assert f["queue_peak_rows"] <= f["queue_limit_rows"] == 16, f
    assert f["rss_peak_mb"] - f["rss_baseline_mb"] < 100, f


def test_burst_of_10x_capacity_is_answered_with_fast_429s(models_dir: Path, tmp_path: Path) -> None:
    _check(_burst(models_dir, tmp_path, burst_s=1.5))


@pytest.mark.slow
def test_long_burst_of_10x_capacity(models_dir: Path, tmp_path: Path) -> None:
    _check(_burst(models_dir, tmp_path, burst_s=10.0))


def _send_partial(port: int, path: str, declared: int, sent: bytes) -> None:
    """Headers promising `declared` body bytes, then `sent` of them, then the connection drops."""
    with socket.create_connection((harness.HOST, port), timeout=5) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {declared}\r\n\r\n".encode() + sent)
        time.sleep(0.05)


async def _send_then_leave(port: int, path: str, body: bytes, stay_s: float) -> None:
    """The whole body, then the client leaves before the answer (cancelled request)."""
    _, writer = await asyncio.open_connection(harness.HOST, port)
    writer.write(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    await writer.drain()
    await asyncio.sleep(stay_s)
    writer.close()


def test_clients_leaving_mid_request_leak_no_queue_slots_or_work(models_dir: Path, tmp_path: Path) -> None:
    env = {**harness.BURST_ENV, "VAE_LOG_LEVEL": "INFO", "VAE_WARMUP": "false"}
    with harness.start_server(models_dir, tmp_path / "server.log", env=env, batch_delay_s=0.3) as server:
        path = harness.ENCODE
        body = json.dumps(harness.tiny_image_body(4)).encode()
        for _ in range(20):  # leave while sending the body
            _send_partial(server.port, path, len(body), body[: len(body) // 2])

        async def leave_while_queued() -> None:  # 20 x 4 rows, far more than the queue of 16 holds
            await asyncio.gather(*(_send_then_leave(server.port, path, body, 0.1) for _ in range(20)))

        asyncio.run(leave_while_queued())
        deadline = time.monotonic() + 15
        while True:  # every slot comes back: queue empty, nothing in flight
            m = harness.scrape(server.url)
            if (m['vae_queue_depth_rows{graph="encoder",model="tiny",version="1"}'] == 0
                    and m["vae_inflight_requests"] == 0):
                break
            assert time.monotonic() < deadline, m
            time.sleep(0.2)
        batches = m['vae_batch_size_rows_count{graph="encoder",model="tiny",version="1"}']
        # Work of departed clients is dropped: far fewer than the 20 x 4 / 4 batches they asked for
        # (at most what was already on the device or taken into a batch when they left).
        assert batches < 20 + 4, m
        ok = httpx.post(f"{server.url}{path}", json=harness.tiny_image_body(4), timeout=30)
        assert ok.status_code == 200  # the full queue capacity is available again
        log = server.log()
    assert "unhandled error" not in log and "Traceback" not in log, log[-3000:]
    assert log.count(f"POST {path} 499") >= 20, log[-3000:]


# -- admission by cost and memory, not by count -----------------------------------------------------------
def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (width, height), 90).save(buf, "PNG")
    return buf.getvalue()


def test_a_burst_of_cheap_requests_is_answered_not_refused_by_count(models_dir: Path, tmp_path: Path) -> None:
    """600 simultaneous 1-image encodes (each a new connection) are a fraction of a second of work: all
    answered 200. With the old count limit (256 per worker, 2 workers) 126 of them got 429 here."""
    env = {"VAE_MODELS": "tiny", "VAE_HTTP_WORKERS": "2", "VAE_LOG_LEVEL": "WARNING"}
    with harness.start_server(models_dir, tmp_path / "server.log", env=env) as server:
        request = harness.encode_request("POST", harness.ENCODE, server.port, harness.tiny_image_body(1))

        async def burst() -> list[harness.Outcome]:
            t0 = time.monotonic()
            return list(await asyncio.gather(*(harness._one(server.port, request, t0, 30)
                                               for _ in range(600))))

        outcomes = asyncio.run(burst())
        log = server.log()
    statuses = {str(o.status): sum(1 for p in outcomes if p.status == o.status) for o in outcomes}
    latencies = [o.latency_s for o in outcomes if o.status == 200]
    print(statuses, f"p99 {1000 * harness.percentile(latencies, 99):.0f} ms")
    assert statuses == {"200": 600}, (statuses, log[-2000:])
    assert harness.percentile(latencies, 99) < 5.0  # CI machines are shared; the benchmark figure is hey's


def test_bodies_and_pixels_in_flight_are_bounded_by_memory(models_dir: Path, tmp_path: Path) -> None:
    """With every request held on the device (1 s batches), a worker admits bodies and decoded pixels up to
    its budgets and answers the rest 429 at once, naming the setting; a lone large request still fits."""
    env = {"VAE_MODELS": "tiny", "VAE_HTTP_WORKERS": "1", "VAE_LOG_LEVEL": "WARNING",
           "VAE_MAX_BATCH_SIZE": "1", "VAE_WARMUP": "false",
           "VAE_MAX_UPLOAD_BYTES": str(64 * 1024), "VAE_MAX_INFLIGHT_BYTES": str(100 * 1024),
           "VAE_MAX_IMAGE_PIXELS": "250000", "VAE_MAX_REQUEST_PIXELS": "250000",
           "VAE_MAX_INFLIGHT_PIXELS": "300000"}
    noise = io.BytesIO()  # 200x200 random pixels: about 40 KB that PNG cannot compress
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 200), dtype=np.uint8)).save(noise, "PNG")
    big_pixels = _png(400, 400)  # 160,000 pixels in a few hundred bytes
    with harness.start_server(models_dir, tmp_path / "server.log", env=env, batch_delay_s=1.0) as server:
        port = server.port

        async def concurrently(requests: list[bytes]) -> list[tuple]:
            async def one(request: bytes, delay: float) -> tuple:
                await asyncio.sleep(delay)  # in order: the first ones are held when the later ones arrive
                return await harness.timed_request(port, request, 30)

            return list(await asyncio.gather(*(one(r, 0.15 * i) for i, r in enumerate(requests))))

        body, ctype = harness.multipart([noise.getvalue()])
        by_bytes = harness.post_bytes(harness.ENCODE, port, body, ctype)
        body, ctype = harness.multipart([big_pixels])
        by_pixels = harness.post_bytes(harness.ENCODE, port, body, ctype)
        bytes_answers = asyncio.run(concurrently([by_bytes] * 3))
        pixel_answers = asyncio.run(concurrently([by_pixels] * 3))
        alone = asyncio.run(concurrently([by_pixels]))
    expected = {"VAE_MAX_INFLIGHT_BYTES": [200, 200, 429],  # 40 KB bodies against 100 KB
                "VAE_MAX_INFLIGHT_PIXELS": [200, 429, 429]}  # 160k-pixel images against 300k
    for answers, setting in ((bytes_answers, "VAE_MAX_INFLIGHT_BYTES"),
                             (pixel_answers, "VAE_MAX_INFLIGHT_PIXELS")):
        statuses = [a[0] for a in answers]
        print(setting, statuses, [f"{1000 * a[3]:.0f} ms" for a in answers])
        assert statuses == expected[setting], statuses
        for status, headers, body_bytes, took in answers:
            if status == 429:
                assert setting in json.loads(body_bytes)["error"]["message"]
                assert headers.get("retry-after") == "1" and took < 0.5, (headers, took)
    assert alone[0][0] == 200  # everything was released: a lone request fits again
