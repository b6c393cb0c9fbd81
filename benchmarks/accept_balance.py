"""How evenly new connections reach the HTTP workers: one listening socket per worker (SO_REUSEPORT, the
default) against one socket shared by the workers (VAE_REUSE_PORT=false).

Each round starts the service under each setting (one at a time, every other round in reverse order)
and runs `hey -z <s>s -c <c>` several times on 1-image encodes; every hey run opens its connections
afresh, all at once, as a client pool does when it starts. After each run it reads the CPU each HTTP
worker spent: a run where one worker did (nearly) all the work had its connections land on one worker.

    .venv/bin/python benchmarks/accept_balance.py --rounds 2 --trials 8

Prints every run and a summary per setting, and writes <output-dir>/accept_balance-<machine tag>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hey_runner import run_hey
from machine import machine_info, machine_tag
from payloads import real_digits
from serving_benchmark import write_bodies
from serving_servers import ROOT, RunningServer, add_service_options, service_server, tree

SETTINGS = {"per-worker sockets (default)": {}, "one shared socket": {"VAE_REUSE_PORT": "false"}}
LOPSIDED = 0.9  # a run where one worker spent more than this share of the workers' CPU


def worker_cpu(server: RunningServer) -> dict[int, float]:
    """CPU seconds of each HTTP worker (the supervisor's children)."""
    assert server.process is not None
    root = server.process.pid
    return {pid: row[2] for pid, row in tree(root).items() if row[0] == root}


def measure(name: str, args: argparse.Namespace, body: Path, log_dir: Path) -> list[dict[str, Any]]:
    server = service_server(args, {"VAE_HTTP_WORKERS": "2", **SETTINGS[name]}, log_dir / "server.log")
    server.start()
    runs = []
    try:
        server.wait_ready(240.0)
        url = f"{server.base_url}/v1/models/{args.model}/encode"
        run_hey(url, body, args.connections, 1.0)  # warm-up
        for _ in range(args.trials):
            before = worker_cpu(server)
            result = run_hey(url, body, args.connections, args.seconds)
            spent = {pid: cpu - before.get(pid, 0.0) for pid, cpu in worker_cpu(server).items()}
            share = max(spent.values()) / max(sum(spent.values()), 1e-9)
            runs.append({"setting": name, "ok_per_s": result["ok_per_s"],
                         "busiest_worker_share": round(share, 3), "non_2xx": result["non_2xx"],
                         "errors": result["errors"]})
            print(f"{name:30} {result['ok_per_s']:8.1f} req/s  busiest worker {100 * share:5.1f} % of the "
                  "workers' CPU", flush=True)
    finally:
        server.stop()
    return runs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--trials", type=int, default=8, help="hey runs per server start")
    add_service_options(parser, seconds=2.0, connections=8)
    args = parser.parse_args(argv)
    info = machine_info(ROOT)
    info["command"] = "python benchmarks/accept_balance.py " + " ".join(argv or sys.argv[1:])
    runs: list[dict[str, Any]] = []
    names = list(SETTINGS)
    with tempfile.TemporaryDirectory(prefix="accept-balance-") as tmp:
        body = write_bodies(real_digits(28, 28, "L"), Path(tmp))[(1, "json-base64")][0]
        for round_ in range(args.rounds):
            for name in names if round_ % 2 == 0 else names[::-1]:
                runs += measure(name, args, body, Path(tmp))
    summary = {}
    print()
    for name in names:
        mine = [r for r in runs if r["setting"] == name]
        lopsided = [r for r in mine if r["busiest_worker_share"] > LOPSIDED]
        summary[name] = {"runs": len(mine), "lopsided_runs": len(lopsided),
                         "median_ok_per_s": statistics.median(r["ok_per_s"] for r in mine),
                         "min_ok_per_s": min(r["ok_per_s"] for r in mine)}
        print(f"{name:30} {len(lopsided)} of {len(mine)} runs with one worker doing > {100 * LOPSIDED:.0f} % "
              f"of the work; median {summary[name]['median_ok_per_s']:.0f} req/s, lowest "
              f"{summary[name]['min_ok_per_s']:.0f}")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    out = args.output_dir / f"accept_balance-{machine_tag(info)}.json"
    out.write_text(json.dumps({"started_at": datetime.now(UTC).isoformat(timespec="seconds"), "machine": info,
                               "connections": args.connections, "seconds": args.seconds, "runs": runs,
                               "summary": summary}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
