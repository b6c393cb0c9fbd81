"""Soak of mixed traffic on the committed default model with default settings: every operation on /v1
and V2 at a steady rate for `--minutes`, with the RSS and the open files of every process of the tree
sampled each `--sample-s`. After the warm-up (`--warmup-minutes`), RSS must grow less than 5 % and open
files must not grow; no answer may be a 5xx.

    python scripts/reliability/mixed_soak.py [--minutes 30] [--rate 20] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import harness

RESULTS = Path(__file__).resolve().parent / "results"


def requests(port: int, model: str) -> list[tuple[str, bytes]]:
    """One request of every kind, round-robin: (name, raw HTTP request)."""
    digit = (harness.ROOT / "docs" / "examples" / "digit.png").read_bytes()
    images = {"images": [base64.b64encode(digit).decode()]}
    base = f"/v1/models/{model}"
    grey = [[[0.5] * 28] * 28]
    v2 = {"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 1, 28, 28],
                      "data": [0.5] * 784}], "parameters": {"seed": 1}}
    kinds = {
        "encode": ("POST", f"{base}/encode", images),
        "reconstruct": ("POST", f"{base}/reconstruct", images),
        "log-likelihood k=100": ("POST", f"{base}/log-likelihood?k=100&seed=1", images),
        "anomaly-score": ("POST", f"{base}/anomaly-score?seed=1", images),
        "sample n=4": ("GET", f"{base}/sample?n=4&seed=1", None),
        "decode": ("POST", f"{base}/decode", {"latents": [[0.0] * 32]}),
        "encode arrays": ("POST", f"{base}/encode", {"inputs": [grey]}),
        "V2 log_likelihood": ("POST", f"/v2/models/{model}.log_likelihood/infer", v2),
        "bad input (422)": ("POST", f"{base}/encode", {"images": ["not an image"]}),
        "unknown model (404)": ("POST", "/v1/models/nope/encode", images),
    }
    return [(name, harness.encode_request(method, path, port, body)) for name, (method, path, body)
            in kinds.items()]


def tree(pid: int) -> list[int]:
    """The supervisor and its children (the HTTP workers and the inference process)."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        return [pid, *map(int, children.read_text().split())]
    except OSError:
        return [pid]


def open_files(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


async def run(server: harness.Server, model: str, minutes: float, rate: float, sample_s: float
              ) -> dict[str, Any]:
    kinds = requests(server.port, model)
    statuses: dict[str, dict[str, int]] = {name: {} for name, _ in kinds}
    samples: list[dict[str, Any]] = []
    pending: set[asyncio.Task[None]] = set()
    t0 = time.monotonic()
    next_sample = t0

    async def one(name: str, request: bytes) -> None:
        outcome = await harness._one(server.port, request, t0, 60)
        key = str(outcome.status)
        statuses[name][key] = statuses[name].get(key, 0) + 1

    for i in range(int(rate * 60 * minutes) + 1):  # bounded by count and time
        now = time.monotonic()
        if now - t0 >= 60 * minutes:
            break
        if now >= next_sample:
            pids = tree(server.pid)
            samples.append({"minute": round((now - t0) / 60, 2),
                            "rss_mb": round(sum(harness.rss_mb(p) for p in pids), 1),
                            "open_files": sum(open_files(p) for p in pids), "processes": len(pids)})
            print(samples[-1], flush=True)
            next_sample += sample_s
        delay = t0 + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        name, request = kinds[i % len(kinds)]
        task = asyncio.create_task(one(name, request))
        pending.add(task)
        task.add_done_callback(pending.discard)
    if pending:
        await asyncio.wait(pending, timeout=60)
    return {"statuses": statuses, "samples": samples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--warmup-minutes", type=float, default=3.0)
    parser.add_argument("--rate", type=float, default=20.0, help="requests per second, all kinds together")
    parser.add_argument("--sample-s", type=float, default=30.0)
    parser.add_argument("--model", default="mnist-vae")
    parser.add_argument("--out", type=Path, default=RESULTS / "mixed_soak.json")
    args = parser.parse_args()
    env = {**harness.SERVICE_DEFAULTS, "VAE_LOG_LEVEL": "WARNING"}  # otherwise every setting at its default
    with tempfile.TemporaryDirectory() as tmp, \
            harness.start_server(harness.ROOT / "models", Path(tmp) / "server.log", env=env,
                                 ready_timeout=180) as server:
        result = asyncio.run(run(server, args.model, args.minutes, args.rate, args.sample_s))
        log = server.log()
    after = [s for s in result["samples"] if s["minute"] >= args.warmup_minutes]
    first, last = after[0], after[-1]
    growth = (last["rss_mb"] - first["rss_mb"]) / first["rss_mb"]
    fives = {name: {k: v for k, v in counts.items() if k.startswith("5") or k == "None"}
             for name, counts in result["statuses"].items()}
    result.update({
        "command": " ".join(["python scripts/reliability/mixed_soak.py", *sys.argv[1:]]),
        "minutes": args.minutes, "rate": args.rate,
        "settings": env,
        "requests": sum(sum(c.values()) for c in result["statuses"].values()),
        "rss_after_warmup_mb": [first["rss_mb"], last["rss_mb"]], "rss_growth": round(growth, 4),
        "open_files_after_warmup": [first["open_files"], last["open_files"]],
        "max_open_files_after_warmup": max(s["open_files"] for s in after),
        "server_errors": {n: c for n, c in fives.items() if c}, "tracebacks": log.count("Traceback"),
    })
    result["met"] = (growth < 0.05 and last["open_files"] <= first["open_files"]
                     and not result["server_errors"] and result["tracebacks"] == 0)
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))
    harness.write_json(args.out, result)


if __name__ == "__main__":
    main()
