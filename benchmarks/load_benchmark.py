"""Load benchmark of the VAE service over HTTP, with its baselines measured in the same run.

Run from the repository root (`make bench` runs the first line; the full sweep takes about 15 minutes
on 2 CPU cores, `--quick` about 2):

    .venv/bin/python benchmarks/load_benchmark.py
    .venv/bin/python benchmarks/load_benchmark.py --quick
    .venv/bin/python benchmarks/load_benchmark.py --models-dir /tmp/bench-models --scenarios encode-1 \
        --concurrency 1,64 --seconds-per-level 5 --repeats 3

What it does:
1. measures the raw in-process runtime throughput (raw_baselines.py) with the service's thread and
   chunking settings (read through service.config.Settings, so VAE_* variables apply);
2. starts, as subprocesses on 127.0.0.1 and free ports, the service with default settings
   (`batching-on`), the service with VAE_MAX_BATCH_SIZE=1 (`batching-off`, encode scenarios only:
   max_batch_size does not apply to the log_weights graph) and a plain FastAPI endpoint running the
   same encoder.onnx per request (`plain`, plain_server.py, encode scenarios only); waits for /readyz;
3. for each scenario and concurrency level, drives each server in turn (so the servers compare under
   the same machine load; `--repeats` alternates them several times) with closed-loop httpx clients
   (loadgen.py), sending real MNIST digits as PNG files in multipart `images` fields (or
   `--input-form json-array|json-base64`); right before the levels of encode-64 and log-likelihood
   it measures their raw runtime baseline again, so each ratio compares figures from the same minute;
4. stops the servers with SIGTERM, measures the raw throughput again, and reports per level
   throughput, p50/p90/p99 latency, errors, CPU used and CPU waited for by server and client, and the
   batches the service formed (from its /metrics); then the issue's targets as same-run ratios.

Scenarios: encode-1 (one image per request), encode-64 (64 images per request), loglik-k256 and
loglik-k1000 (one image per request, /log-likelihood?k=...&seed=1).
Output: tables on stdout, <output-dir>/load_benchmark-<machine tag>[-quick].json (everything) and .md
(the tables), and for full runs without --tag <output-dir>/load_benchmark.md (the README's copy).
Extra service settings for both service servers: `--service-env VAE_MAX_QUEUE_DELAY_MS=0`.
The load generator shares the machine with the servers; its CPU use is reported per level.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from unittest import mock

import httpx
import raw_baselines
import report
from loadgen import CLIENT_MODES, Clients, LevelRun, check_response, open_connections, run_level, summarize
from machine import load_average, machine_info, machine_tag
from payloads import INPUT_FORMS, Body, as_model_input, build_bodies, real_digits
from servers import (
    MetricValues,
    Server,
    batch_activity,
    metric_deltas,
    plain_server,
    sched_seconds,
    scrape_batch_metrics,
    service_server,
)

ROOT = Path(__file__).resolve().parent.parent
BODY_POOL = 16  # distinct request bodies per scenario, cycled


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str  # "encode" or "log-likelihood"
    images: int  # per request
    k: int | None = None

    def path(self, model: str, plain: bool, form: str) -> str:
        if self.kind == "encode":
            suffix = "encode-json" if plain and form != "multipart" else "encode"
            return f"/v1/models/{model}/{suffix}"
        return f"/v1/models/{model}/log-likelihood?k={self.k}&seed=1"


SCENARIOS = {s.name: s for s in (
    Scenario("encode-1", "encode", 1),
    Scenario("encode-64", "encode", 64),
    Scenario("loglik-k256", "log-likelihood", 1, 256),
    Scenario("loglik-k1000", "log-likelihood", 1, 1000),
)}
SERVERS = ("batching-on", "batching-off", "plain")
SERVICE_ENV = {"batching-on": {}, "batching-off": {"VAE_MAX_BATCH_SIZE": "1"}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models-dir", type=Path, default=Path("models"))
    p.add_argument("--model", default="mnist-vae")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated of {list(SCENARIOS)}")
    p.add_argument("--servers", default=",".join(SERVERS), help=f"comma-separated of {list(SERVERS)}")
    p.add_argument("--concurrency", default="1,8,32,64,128", help="comma-separated levels")
    p.add_argument("--requests-per-level", type=int, default=5000, help="stop issuing after this many")
    p.add_argument("--seconds-per-level", type=float, default=10.0, help="stop issuing after this long")
    p.add_argument("--client-timeout", type=float, default=60.0, help="seconds per request")
    p.add_argument("--raw-seconds", type=float, default=5.0, help="time budget per raw measurement")
    p.add_argument("--repeats", type=int, default=1,
                   help="runs per level, interleaved across servers and pooled (steadier on a busy machine)")
    p.add_argument("--input-form", choices=INPUT_FORMS, default="multipart")
    p.add_argument("--client-mode", choices=CLIENT_MODES, default="per-worker",
                   help="one httpx client (one connection) per worker, or one client with a shared pool")
    p.add_argument("--calibration-seconds", type=float, default=2.0,
                   help="per level, GET /healthz to measure the load generator's own ceiling (0: skip)")
    p.add_argument("--service-env", action="append", default=[], metavar="VAE_NAME=VALUE",
                   help="extra service setting for both service servers (repeatable)")
    p.add_argument("--ready-timeout", type=float, default=300.0)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: concurrency 1,64; 2 s or 200 requests per level; 1 s raw budgets")
    p.add_argument("--note", default="", help="free text recorded with the results (what else ran, ...)")
    p.add_argument("--tag", help="file-name tag of the results (default: from the machine)")
    p.add_argument("--output-dir", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--markdown", type=Path,
                   help="also write the Markdown tables here (default for full runs without --tag: "
                        "<output-dir>/load_benchmark.md, the README's copy; otherwise not written)")
    args = p.parse_args(argv)
    if args.quick:
        args.concurrency, args.requests_per_level = "1,64", 200
        args.seconds_per_level, args.raw_seconds, args.calibration_seconds = 2.0, 1.0, 1.0
    args.levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    names = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    args.server_list = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = (set(names) - set(SCENARIOS)) | (set(args.server_list) - set(SERVERS))
    if unknown or not names or not args.server_list or not args.levels or min(args.levels) < 1:
        p.error(f"unknown names {sorted(unknown)}, or empty --scenarios/--servers/--concurrency")
    if args.repeats < 1 or any("=" not in item for item in args.service_env):
        p.error("--repeats must be >= 1 and --service-env items look like VAE_NAME=VALUE")
    args.scenario_list = [SCENARIOS[name] for name in names]
    args.extra_env = dict(item.split("=", 1) for item in args.service_env)
    return args


def serves(server: str, scenario: Scenario) -> bool:
    return server == "batching-on" or scenario.kind == "encode"


# -- model and settings -----------------------------------------------------------------------------------
def version_dir(models_dir: Path, model: str) -> Path:
    folder = models_dir / model
    versions = sorted((p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()),
                      key=lambda p: int(p.name))
    if not versions:
        raise SystemExit(f"no numeric versions of {model} in {models_dir}")
    return versions[-1]


@contextlib.contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    with mock.patch.dict(os.environ, env):
        yield


def service_settings(env: dict[str, str]) -> Any:
    """The service's own Settings under `env`: the thread and chunk settings the raw baselines copy."""
    from service.config import Settings

    with environment(env):
        return Settings()


def settings_summary(settings: Any) -> dict[str, Any]:
    """Every service setting in effect (API keys left out), plus the derived log_weights batch rows."""
    summary = settings.model_dump(mode="json", exclude={"api_keys"})
    return summary | {"log_weights_batch_rows": settings.log_weights_batch_rows}


# -- raw baselines -----------------------------------------------------------------------------------------
def raw_runner(manifest: dict[str, Any], vdir: Path, x: Any, settings: Any) -> raw_baselines.RawRunner:
    graphs = manifest["graphs"]
    return raw_baselines.RawRunner(vdir / graphs["encoder"]["onnx"], vdir / graphs["log_weights"]["onnx"], x,
                                   threads=settings.threads, chunk=settings.iw_chunk_size,
                                   latent_dim=manifest["model"]["latent_dim"], device=settings.device)


def raw_adjacent(runner: raw_baselines.RawRunner, scenario: Scenario, service_rows: int,
                 seconds: float) -> dict[str, Any] | None:
    """The raw figure a scenario's target compares with, measured right before its levels (servers idle)."""
    if scenario.kind == "encode" and scenario.images > 1:
        return runner.encoder_throughput(scenario.images, seconds)
    if scenario.kind == "log-likelihood":
        return runner.log_weights_throughput(service_rows, seconds)
    return None


# -- HTTP levels --------------------------------------------------------------------------------------------
def build_servers(args: argparse.Namespace, models_dir: Path, threads: int, device: str,
                  log_dir: Path) -> list[Server]:
    servers = []
    for name in args.server_list:
        if name == "plain":
            servers.append(plain_server(name, models_dir, args.model, threads, device, log_dir))
        else:
            env = {"VAE_MODELS_DIR": str(models_dir), "VAE_MODELS": args.model, **args.extra_env,
                   **SERVICE_ENV[name]}
            servers.append(service_server(name, env, log_dir))
    return servers


@dataclass
class LevelTotals:
    """One (scenario, server, concurrency), pooled over its repeats."""

    runs: list[LevelRun] = field(default_factory=list)
    server_cpu: float = 0.0
    server_wait: float = 0.0
    client_cpu: float = 0.0
    client_wait: float = 0.0
    metrics: MetricValues = field(default_factory=dict)
    loads: list[list[float]] = field(default_factory=list)
    raw: list[dict[str, Any]] = field(default_factory=list)


async def settle(client: httpx.AsyncClient, server: Server, url: str, body: Body) -> None:
    """One untimed request: it queues behind any batch still running from the previous level."""
    with contextlib.suppress(httpx.HTTPError):
        await client.post(f"{server.base_url}{url}", content=body.content, headers=body.headers)


async def measure_once(args: argparse.Namespace, clients: list[httpx.AsyncClient], server: Server, url: str,
                       bodies: list[Body], settle_body: Body, totals: LevelTotals) -> None:
    """One closed-loop run of a level (one worker per client), its CPU and batch figures added to `totals`."""
    plain = server.name == "plain"
    await settle(clients[0], server, SCENARIOS["encode-1"].path(args.model, plain, args.input_form),
                 settle_body)
    await open_connections(clients, server.base_url)
    metrics_before = {} if plain else scrape_batch_metrics(server.base_url)
    cpu = (server.cpu_seconds(), server.cpu_wait_seconds(), time.process_time(),
           sched_seconds(os.getpid())[1])
    totals.loads.append(load_average())
    run = await run_level(clients, f"{server.base_url}{url}", bodies, args.requests_per_level,
                          args.seconds_per_level, args.client_timeout)
    totals.server_cpu += server.cpu_seconds() - cpu[0]
    totals.server_wait += server.cpu_wait_seconds() - cpu[1]
    totals.client_cpu += time.process_time() - cpu[2]
    totals.client_wait += sched_seconds(os.getpid())[1] - cpu[3]
    totals.loads.append(load_average())
    if not plain:
        metric_deltas(metrics_before, scrape_batch_metrics(server.base_url), totals.metrics)
    totals.runs.append(run)


def level_result(scenario: Scenario, server: Server, url: str, totals: LevelTotals) -> dict[str, Any]:
    runs = totals.runs
    pooled = LevelRun(runs[0].concurrency, sum(r.wall_s for r in runs), [s for r in runs for s in r.samples],
                      next((r.first_ok_body for r in runs if r.first_ok_body), None))
    wall = pooled.wall_s
    level = {"scenario": scenario.name, "server": server.name, "url": url, "repeats": len(runs),
             **summarize(pooled, scenario.images, scenario.k),
             "repeat_requests_per_s": [round(sum(s.outcome == "200" for s in r.samples) / r.wall_s, 2)
                                       for r in runs],
             "server_cpu_cores": round(totals.server_cpu / wall, 2),
             "server_cpu_wait_cores": round(totals.server_wait / wall, 2),
             "client_cpu_cores": round(totals.client_cpu / wall, 2),
             "client_cpu_wait_cores": round(totals.client_wait / wall, 2),
             "batching": batch_activity(totals.metrics, wall),
             "load_average_before": totals.loads[0], "load_average_after": totals.loads[-1],
             "response_check": check_response(pooled.first_ok_body, scenario.images, scenario.kind)}
    if totals.raw:
        key = "images_per_s" if "images_per_s" in totals.raw[0] else "samples_per_s"
        mean = statistics.mean(r[key] for r in totals.raw)
        level["raw_adjacent"] = {"runs": totals.raw, key: round(mean, 1)}
        level["ratio_to_raw"] = round(level[key] / mean, 3) if mean else None
    return level


async def sweep(args: argparse.Namespace, servers: list[Server], pixels: Any, runner: raw_baselines.RawRunner,
                service_rows: int) -> list[dict[str, Any]]:
    """Every scenario x concurrency x server; within a level the servers (and repeats) are interleaved."""
    settle_body = build_bodies(pixels, 1, args.input_form, 1)[0]
    levels = []
    clients = {s.name: Clients(max(args.levels), args.client_timeout, args.client_mode) for s in servers}
    try:
        print(report.fixed_row(report.LEVEL_COLUMNS), flush=True)
        for scenario in args.scenario_list:
            bodies = build_bodies(pixels, scenario.images, args.input_form, BODY_POOL)
            active = [s for s in servers if serves(s.name, scenario)]
            for concurrency in args.levels:
                totals = {s.name: LevelTotals() for s in active}
                for _ in range(args.repeats):
                    raw = raw_adjacent(runner, scenario, service_rows, args.raw_seconds)
                    for server in active:
                        if raw is not None and server.name == "batching-on":
                            totals[server.name].raw.append(raw)
                        url = scenario.path(args.model, server.name == "plain", args.input_form)
                        await measure_once(args, clients[server.name].for_level(concurrency), server, url,
                                           bodies, settle_body, totals[server.name])
                for server in active:
                    url = scenario.path(args.model, server.name == "plain", args.input_form)
                    levels.append(level_result(scenario, server, url, totals[server.name]))
                    print(report.fixed_row(report.level_row(levels[-1])), flush=True)
    finally:
        await asyncio.gather(*(c.aclose() for c in clients.values()))
    return levels


async def calibrate(args: argparse.Namespace, server: Server) -> list[dict[str, Any]]:
    """The load generator's ceiling: GET /healthz (no model work) at each concurrency, same client setup."""
    clients = Clients(max(args.levels), args.client_timeout, args.client_mode)
    ceiling = []
    try:
        for concurrency in args.levels:
            level_clients = clients.for_level(concurrency)
            await open_connections(level_clients, server.base_url)
            cpu = time.process_time()
            run = await run_level(level_clients, f"{server.base_url}/healthz", None, 100_000,
                                  args.calibration_seconds, args.client_timeout)
            stats = summarize(run, 0, None)
            cpu_ms = 1000 * (time.process_time() - cpu) / max(1, len(run.samples))
            ceiling.append({"concurrency": concurrency, "requests_per_s": stats["requests_per_s"],
                            "p50_ms": stats["p50_ms"], "errors": stats["errors"],
                            "client_cpu_ms_per_request": round(cpu_ms, 2)})
    finally:
        await clients.aclose()
    return ceiling


async def run_http(args: argparse.Namespace, servers: list[Server], pixels: Any,
                   runner: raw_baselines.RawRunner, service_rows: int
                   ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    ceiling = await calibrate(args, servers[0]) if args.calibration_seconds > 0 else []
    if ceiling:
        levels = ", ".join(f"c={c['concurrency']}: {c['requests_per_s']:.0f} req/s" for c in ceiling)
        print(f"load generator ceiling (GET /healthz on {servers[0].name}, {args.client_mode} clients): "
              f"{levels}", flush=True)
    return await sweep(args, servers, pixels, runner, service_rows), ceiling


# -- output -------------------------------------------------------------------------------------------------
def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_results(result: dict[str, Any], args: argparse.Namespace, tag: str) -> list[Path]:
    """<output-dir>/load_benchmark-<tag>[-quick].json and .md, plus the --markdown copy."""
    stem = f"load_benchmark-{tag}" + ("-quick" if args.quick else "")
    markdown = report.markdown_report(result)
    paths = [args.output_dir / f"{stem}.json", args.output_dir / f"{stem}.md"]
    write_atomically(paths[0], json.dumps(result, indent=2) + "\n")
    write_atomically(paths[1], markdown)
    extra = args.markdown or (None if args.quick or args.tag else args.output_dir / "load_benchmark.md")
    if extra is not None:
        write_atomically(extra, markdown)
        paths.append(extra)
    return paths


def print_summary(result: dict[str, Any]) -> None:
    print("\nPer scenario and concurrency:")
    print(report.text_table(report.LEVEL_COLUMNS, [report.level_row(lv) for lv in result["levels"]]))
    print("\nLoad generator ceiling (GET /healthz):")
    print(report.text_table(report.CEILING_COLUMNS, report.ceiling_rows(result["load_generator_ceiling"])))
    print("\nRaw in-process runtime:")
    print(report.text_table(report.RAW_COLUMNS, report.raw_rows(result["raw"])))
    print("\nTargets (same-run ratios):")
    print(report.text_table(report.TARGET_COLUMNS, [report.target_row(t) for t in result["targets"]]))
    problems = [(lv["scenario"], lv["server"], lv["concurrency"], lv["response_check"])
                for lv in result["levels"] if lv["response_check"]]
    for problem in problems:
        print(f"response check failed: {problem}")
    for name, info in result["servers"].items():
        if name != "plain" and info["exit_code"] != 0:
            print(f"server {name} exited with {info['exit_code']} after SIGTERM (expected 0)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    models_dir = args.models_dir.resolve()
    vdir = version_dir(models_dir, args.model)
    manifest = json.loads((vdir / "manifest.json").read_text())
    if manifest.get("labels"):
        raise SystemExit("conditional models need labels per request; this benchmark sends none")
    info = machine_info(ROOT)
    tag = args.tag or machine_tag(info)
    print(f"{info['cpu_model']}, {info['cores']} cores, load average {info['load_average_1_5_15']}; "
          f"model {vdir}", flush=True)

    inp = manifest["input"] if "input" in manifest else manifest["preprocessing"]
    prep = manifest["preprocessing"]
    pixels = real_digits(inp["height"], inp["width"], prep["color_mode"])
    x = as_model_input(pixels)
    env_on = {"VAE_MODELS_DIR": str(models_dir), **args.extra_env}
    settings = {name: service_settings({**env_on, **SERVICE_ENV[name]}) for name in SERVICE_ENV}
    base = settings["batching-on"]

    print(f"raw in-process runtime ({args.raw_seconds:g} s per figure)...", flush=True)
    runner = raw_runner(manifest, vdir, x, base)
    rows = base.log_weights_batch_rows
    raw_before = runner.full_pass(64, rows, args.raw_seconds)

    log_dir = Path(tempfile.mkdtemp(prefix="load-benchmark-"))
    servers = build_servers(args, models_dir, base.threads, base.device, log_dir)
    load_start = load_average()
    try:
        for server in servers:
            server.start(ROOT)
        for server in servers:
            server.wait_ready(args.ready_timeout)
        levels, ceiling = asyncio.run(run_http(args, servers, pixels, runner, rows))
    finally:
        for server in servers:
            server.stop()
    load_end = load_average()
    raw = {"before": raw_before, "after": runner.full_pass(64, rows, args.raw_seconds),
           "log_weights_service_batch_rows": rows, "providers": runner.providers}

    result = {
        "benchmark": "load_benchmark", "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": args.quick, "note": args.note, "machine": info,
        "load_average_start": load_start, "load_average_end": load_end,
        "model": {"dir": str(vdir), "name": manifest["name"], "version": manifest["version"],
                  "architecture": manifest["model"].get("architecture"),
                  "latent_dim": manifest["model"]["latent_dim"],
                  "created_at": manifest.get("created_at")},
        "settings": {"scenarios": [s.name for s in args.scenario_list], "servers": args.server_list,
                     "concurrency": args.levels, "requests_per_level": args.requests_per_level,
                     "seconds_per_level": args.seconds_per_level, "client_timeout_s": args.client_timeout,
                     "raw_seconds": args.raw_seconds, "repeats": args.repeats, "input_form": args.input_form,
                     "client_mode": args.client_mode,
                     "service_env": {s.name: s.env for s in servers},
                     "service_settings": {n: settings_summary(s) for n, s in settings.items()}},
        "servers": {s.name: {"command": s.command, "exit_code": s.exit_code, "stop_seconds": s.stop_seconds,
                             "log": str(s.log_path)} for s in servers},
        "raw": raw, "load_generator_ceiling": ceiling, "levels": levels, "targets": report.targets(levels),
    }
    paths = write_results(result, args, tag)
    print_summary(result)
    print("\nwrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
