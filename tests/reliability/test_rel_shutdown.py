"""SIGTERM and SIGINT under load, with a real `python -m service` process tree and real HTTP.

In-flight requests are made slow with simulated device time (1 s per batch) so they are
certainly in flight when the signal arrives. Every way a shutdown signal can arrive (to the supervisor,
to the whole process group as systemd and Ctrl-C send it, to one HTTP worker, to the inference
process) must drain the same way: in-flight work answered 200, exit status 0 (service/signals.py).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

import harness
import pytest

ENV = {"VAE_MODELS": "tiny", "VAE_MAX_BATCH_SIZE": "4", "VAE_MAX_QUEUE_DELAY_MS": "2",
       "VAE_WARMUP": "false"}  # warm-up would pay the simulated device time too


def _to_supervisor(sig: int) -> Callable[[harness.Server], None]:
    return lambda server: os.kill(server.pid, sig)


def _to_group(sig: int) -> Callable[[harness.Server], None]:
    return lambda server: os.killpg(server.pid, sig)  # the supervisor leads its process group


def _to_a_worker(server: harness.Server) -> None:
    os.kill(harness.worker_pids(server.log())[0], signal.SIGTERM)


def _to_the_inference_process(server: harness.Server) -> None:
    os.kill(harness.engine_pids(server.log())[-1], signal.SIGTERM)


async def _in_flight_then_sigterm(server: harness.Server, n: int, probe: bool = True,
                                  deliver: Callable[[harness.Server], None] | None = None) -> dict:
    """n requests in flight, SIGTERM, then: how fast readyz turns 503, what new work and in-flight get.

    probe=False: no readyz and new-work probes (without VAE_DRAIN_DELAY_S the port closes at once, so
    a probe may find nobody listening).
    """
    port = server.port
    request = harness.encode_request("POST", harness.ENCODE, port, harness.tiny_image_body(1))
    t0 = time.monotonic()
    in_flight = [asyncio.create_task(harness._one(port, request, t0, 60)) for _ in range(n)]
    for _ in range(200):  # until all n are inside the service (bounded)
        if (await asyncio.to_thread(harness.scrape, server.url))["vae_inflight_requests"] >= n:
            break
        await asyncio.sleep(0.05)
    print(f"in flight after {time.monotonic() - t0:.2f}s")
    if deliver is None:
        signalled = server.sigterm()
    else:
        deliver(server)
        signalled = time.monotonic()
    if not probe:
        outcomes = await asyncio.gather(*in_flight)
        return {"in_flight": sorted(str(o.status) for o in outcomes), "signalled": signalled}
    # The signal reaches the HTTP workers through the supervisor, so a probe sent in the first
    # milliseconds may still meet a worker that has not seen it: poll as a load balancer would.
    readyz = (0, b"")
    while time.monotonic() - signalled < 5 and readyz[0] != 503:
        readyz = await harness.raw_request(port, harness.encode_request("GET", "/readyz", port), 10)
        await asyncio.sleep(0.01 if readyz[0] != 503 else 0)
    readyz_after_s = time.monotonic() - signalled
    await _all_workers_draining(server, deadline_s=5)  # then no worker may take new work
    new_work = await harness.raw_request(port, request, 10)
    outcomes = await asyncio.gather(*in_flight)
    return {"readyz": readyz[0], "readyz_after_s": readyz_after_s, "new_work": new_work[0],
            "new_work_raw": new_work[1], "in_flight": sorted(str(o.status) for o in outcomes),
            "signalled": signalled}


async def _all_workers_draining(server: harness.Server, deadline_s: float) -> None:
    """Wait (bounded) until every HTTP worker has logged that it is draining."""
    workers = int(re.search(r"(\d+) HTTP worker\(s\)", server.log()).group(1))
    t0 = time.monotonic()
    while server.log().count("draining (readyz 503") < workers and time.monotonic() - t0 < deadline_s:
        await asyncio.sleep(0.01)


def test_sigterm_under_load_drains_in_flight_and_exits_zero(models_dir: Path, tmp_path: Path) -> None:
    env = {**ENV, "VAE_DRAIN_TIMEOUT_S": "10", "VAE_DRAIN_DELAY_S": "1"}
    with harness.start_server(models_dir, tmp_path / "server.log", env=env, batch_delay_s=1.0) as server:
        r = asyncio.run(_in_flight_then_sigterm(server, 6))  # 2 batches: about 2 s of work
        code = server.proc.wait(timeout=30)
        exited_after = time.monotonic() - r["signalled"]
        log = server.log()
    print({k: v for k, v in r.items() if k != "new_work_raw"}, f"exited {exited_after:.2f}s after SIGTERM")
    assert r["readyz"] == 503 and r["readyz_after_s"] < 0.5, r
    assert r["new_work"] == 503 and b"retry-after" in r["new_work_raw"].lower(), r
    assert r["in_flight"] == ["200"] * 6, r
    assert code == 0, log[-3000:]
    assert exited_after < 1 + 10, exited_after  # drain delay + drain timeout
    assert "draining" in log and "Traceback" not in log


def test_drain_timeout_answers_the_rest_503_and_exits_zero(models_dir: Path, tmp_path: Path) -> None:
    """Work that cannot finish within VAE_DRAIN_TIMEOUT_S is answered 503 (not cut off), then exit 0."""
    env = {**ENV, "VAE_DRAIN_TIMEOUT_S": "1", "VAE_REQUEST_TIMEOUT_S": "60"}
    with harness.start_server(models_dir, tmp_path / "server.log", env=env, batch_delay_s=4.0) as server:
        # 2 batches: 8 s of work, 1 s allowed
        r = asyncio.run(_in_flight_then_sigterm(server, 8, probe=False))
        code = server.proc.wait(timeout=30)
        exited_after = time.monotonic() - r["signalled"]
        log = server.log()
    print(r["in_flight"], f"exited {exited_after:.2f}s after SIGTERM")
    assert set(r["in_flight"]) <= {"200", "503"} and "503" in r["in_flight"], r  # every one answered
    assert code == 0, log[-3000:]
    # the drain deadline, then at most the one batch already on the device (4 s) before exit
    assert exited_after < 1 + 4 + 3, exited_after
    assert "drain timeout" in log



# (how the signal is delivered, whether the drain delay applies: SIGINT closes the port at once)
DELIVERIES = {
    "SIGTERM to the supervisor": (_to_supervisor(signal.SIGTERM), True),
    "SIGTERM to the process group": (_to_group(signal.SIGTERM), True),
    "SIGINT to the process group": (_to_group(signal.SIGINT), False),
    "SIGINT to the supervisor": (_to_supervisor(signal.SIGINT), False),
    "SIGTERM to one HTTP worker": (_to_a_worker, True),
    "SIGTERM to the inference process": (_to_the_inference_process, True),
}


# Engines per worker (the default without a GPU) have no inference process; a shared engine is stopped
# only after its workers drained, which the group signal and the signal to the engine itself test.
CASES = [(d, "per-worker") for d in DELIVERIES if d != "SIGTERM to the inference process"] + [
    (d, "shared") for d in ("SIGTERM to the supervisor", "SIGTERM to the process group",
                            "SIGTERM to the inference process")]


@pytest.mark.parametrize(("delivery", "placement"), CASES)
def test_every_signal_delivery_drains_in_flight_work_and_exits_zero(models_dir: Path, tmp_path: Path,
                                                                      delivery: str, placement: str) -> None:
    deliver, delayed = DELIVERIES[delivery]
    env = {**ENV, "VAE_HTTP_WORKERS": "2", "VAE_DRAIN_TIMEOUT_S": "10", "VAE_DRAIN_DELAY_S": "1",
           "VAE_ENGINE_PLACEMENT": placement}
    with harness.start_server(models_dir, tmp_path / "server.log", env=env, batch_delay_s=1.0) as server:
        children = harness.engine_pids(server.log()) + harness.worker_pids(server.log())
        r = asyncio.run(_in_flight_then_sigterm(server, 8, probe=delayed, deliver=deliver))  # 2 s of work
        code = server.proc.wait(timeout=30)
        exited_after = time.monotonic() - r["signalled"]
        log = server.log()
    print(delivery, {k: v for k, v in r.items() if k != "new_work_raw"}, f"exited {exited_after:.2f}s later")
    assert r["in_flight"] == ["200"] * 8, (r, log[-3000:])
    if delayed:  # the port stayed open answering 503 for the drain delay
        assert r["readyz"] == 503 and r["readyz_after_s"] < 0.5, r
        assert r["new_work"] == 503, r
    assert code == 0, log[-3000:]
    assert exited_after < 1 + 10, exited_after
    assert "Traceback" not in log and "died" not in log, log[-3000:]  # no child lost or restarted
    for pid in children:
        assert not os.path.exists(f"/proc/{pid}"), f"child {pid} outlived the supervisor"
