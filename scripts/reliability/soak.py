"""Soak test: minutes at about half the measured capacity; RSS and latency sampled over time.

    .venv/bin/python scripts/reliability/soak.py [--minutes 5] [--models-dir DIR] [--out ...json]

Prints a table (one row per sample window) and the least-squares slopes of RSS (MiB/min) and p99
latency (ms/min); writes everything as JSON. A healthy service shows slopes near zero.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import harness


async def soak(server: harness.Server, rate: float, minutes: float, window_s: float) -> list[dict]:
    port = server.port
    request = harness.encode_request("POST", harness.ENCODE, port, harness.tiny_image_body(1))
    t0 = time.monotonic()
    end = t0 + 60 * minutes
    windows: list[dict] = []
    pending: set[asyncio.Task] = set()
    window: list[harness.Outcome] = []
    next_sample = t0 + window_s
    for i in range(int(rate * 60 * minutes) + 1):  # bounded by count and time
        now = time.monotonic()
        if now >= end:
            break
        delay = t0 + i / rate - now
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(harness._one(port, request, t0, 30))
        pending.add(task)
        task.add_done_callback(lambda t: (pending.discard(t), window.append(t.result())))
        if time.monotonic() >= next_sample:
            ok = [o.latency_s for o in window if o.status == 200]
            windows.append({"t_s": round(time.monotonic() - t0, 1), "rss_mb": round(server.rss_mb(), 2),
                            "requests": len(window), "ok": len(ok),
                            "not_ok": len(window) - len(ok),
                            "p50_ms": round(1000 * harness.percentile(ok, 50), 1),
                            "p99_ms": round(1000 * harness.percentile(ok, 99), 1)})
            print("{t_s:>7} {rss_mb:>8} {requests:>6} {ok:>6} {not_ok:>6} {p50_ms:>8} {p99_ms:>8}".format(
                **windows[-1]), flush=True)
            window.clear()
            next_sample += window_s
    await asyncio.gather(*pending)
    return windows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", type=Path, help="must hold a model named tiny (8x8 grey)")
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--window-s", type=float, default=5.0)
    parser.add_argument("--fraction", type=float, default=0.5, help="of the measured capacity")
    parser.add_argument("--delay", type=float, default=0.1, help="simulated device seconds per batch")
    parser.add_argument("--out", type=Path, default=Path("reliability-results/soak.json"))
    args = parser.parse_args()
    env = {**harness.BURST_ENV, "VAE_MAX_BATCH_SIZE": "8", "VAE_MAX_QUEUE_SIZE": "64"}
    with tempfile.TemporaryDirectory() as tmp:
        models_dir = args.models_dir or harness.build_test_models(Path(tmp))
        log = Path(tmp) / "server.log"
        with harness.start_server(models_dir, log, env=env, batch_delay_s=args.delay) as server:
            body = harness.tiny_image_body(1)
            cap = asyncio.run(harness.closed_loop(server.url, harness.ENCODE, body, 16, 5.0))
            capacity = len(cap.latencies(200)) / cap.duration_s
            rate = args.fraction * capacity
            print(f"capacity {capacity:.1f} req/s; soaking at {rate:.1f} req/s for {args.minutes} min")
            print(f"{'t_s':>7} {'rss_mb':>8} {'reqs':>6} {'ok':>6} {'not_ok':>6} {'p50_ms':>8} {'p99_ms':>8}")
            windows = asyncio.run(soak(server, rate, args.minutes, args.window_s))
    minutes = [w["t_s"] / 60 for w in windows]
    # the first window includes warm-up allocations; trends are fitted on the rest
    fit = slice(1, None) if len(windows) > 3 else slice(None)
    summary = {
        "capacity_rps": round(capacity, 1), "rate_rps": round(rate, 1), "minutes": args.minutes,
        "requests": sum(w["requests"] for w in windows), "not_ok": sum(w["not_ok"] for w in windows),
        "rss_first_mb": windows[0]["rss_mb"] if windows else None,
        "rss_last_mb": windows[-1]["rss_mb"] if windows else None,
        "rss_slope_mb_per_min": round(harness.slope(minutes[fit], [w["rss_mb"] for w in windows][fit]), 3),
        "p99_slope_ms_per_min": round(harness.slope(minutes[fit], [w["p99_ms"] for w in windows][fit]), 3),
        "p50_ms_median": harness.percentile([w["p50_ms"] for w in windows], 50),
        "p99_ms_median": harness.percentile([w["p99_ms"] for w in windows], 50),
        "batch_delay_s": args.delay,
    }
    print(json.dumps(summary, indent=2))
    harness.write_json(args.out, {"summary": summary, "windows": windows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
