"""Server CPU per request of the service under settings A, B, ...: an A/B that noisy machines cannot fool.

Throughput on a shared 2-core VM moves by 10-20 % between two runs of the same server; the CPU the
server's process tree spends per 2xx answer moves far less, so small changes to the request path are
judged by it. Each round starts one server per setting (one at a time, every other round in reverse
order), warms it, runs `hey -z <s>s -c <c>` on one route and reads the tree's CPU seconds around it.

    .venv/bin/python benchmarks/cpu_ab.py "VAE_LOG_LEVEL=INFO" "VAE_LOG_LEVEL=WARNING" --rounds 6
    .venv/bin/python benchmarks/cpu_ab.py "" --route reconstruct --rounds 2
    .venv/bin/python benchmarks/cpu_ab.py "route=anomaly-score?k=256" "route=anomaly-score?k=256&method=nll" \
        --connections 8 --seconds 10

A setting is space-separated VAE_X=value pairs on top of the serving benchmark's vae-serve server
(its defaults + VAE_THREADS=1), optionally route=<path and query under /v1/models/<model>/> in
place of --route, and optionally tree=<another checkout of this repository> to serve that checkout's
code (this venv, the models of --models-dir): what a set of commits changed; "" is the defaults.

    git worktree add /tmp/before <commit>
    .venv/bin/python benchmarks/cpu_ab.py "tree=/tmp/before" "" --rounds 4

Prints every run and the medians, and writes <output-dir>/cpu_ab-<machine tag>[-<tag>].json.
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
from serving_servers import ROOT, add_service_options, service_server


def parse_setting(text: str) -> dict[str, str]:
    """'VAE_A=1 route=encode tree=/tmp/before' -> {'VAE_A': '1', 'route': 'encode', 'tree': '/tmp/before'}."""
    pairs = [kv.split("=", 1) for kv in text.split()]
    if any(len(p) != 2 or not (p[0].startswith("VAE_") or p[0] in ("route", "tree")) for p in pairs):
        raise SystemExit(f"setting {text!r}: use space-separated VAE_NAME=value pairs (and route=..., "
                         "tree=...)")
    return dict(pairs)  # type: ignore[arg-type]


def measure(setting: str, args: argparse.Namespace, body: Path, log_dir: Path) -> dict[str, Any]:
    env = parse_setting(setting)
    route = env.pop("route", args.route)
    tree = Path(env.pop("tree", ROOT)).resolve()
    server = service_server(args, env, log_dir / "server.log", cwd=tree)
    server.start()
    try:
        server.wait_ready(240.0)
        url = f"{server.base_url}/v1/models/{args.model}/{route}"
        run_hey(url, body, args.connections, 2.0)  # warm-up
        cpu0 = server.cpu_seconds()
        result = run_hey(url, body, args.connections, args.seconds)
        cpu = server.cpu_seconds() - cpu0
    finally:
        server.stop()
    if not result["ok"] or result["non_2xx"] or result["errors"]:
        raise RuntimeError(f"{setting!r}: {result['non_2xx']} non-2xx, {result['errors']} errors")
    return {"setting": setting, "cpu_us_per_ok": round(cpu * 1e6 / result["ok"], 1),
            "ok_per_s": result["ok_per_s"], "p99_ms": result["p99_ms"],
            "hey_cpu_cores": result["hey_cpu_cores"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("settings", nargs="+", help='e.g. "VAE_LOG_LEVEL=WARNING" ("" = defaults)')
    parser.add_argument("--route", default="encode", help="an image route of /v1/models/<model>/ (encode)")
    parser.add_argument("--rounds", type=int, default=3)
    add_service_options(parser, seconds=8.0, connections=64)
    parser.add_argument("--tag", help="appended to the file name")
    args = parser.parse_args(argv)
    info = machine_info(ROOT)
    info["command"] = "python benchmarks/cpu_ab.py " + " ".join(f"'{a}'" if " " in a or not a else a
                                                              for a in (argv or sys.argv[1:]))
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cpu-ab-") as tmp:
        body = write_bodies(real_digits(28, 28, "L"), Path(tmp))[(1, "json-base64")][0]
        for round_ in range(args.rounds):
            # Every other round in reverse order (A B, B A, ...): on this VM the first server of a round
            # measured ~5 % more CPU per request than the second, whichever it was.
            order = args.settings if round_ % 2 == 0 else args.settings[::-1]
            for setting in order:
                run = {"round": round_, **measure(setting, args, body, Path(tmp))}
                runs.append(run)
                print(f"{setting or '(defaults)':40} {run['cpu_us_per_ok']:8.1f} us CPU per 2xx  "
                      f"{run['ok_per_s']:8.1f} req/s  p99 {run['p99_ms']} ms", flush=True)
    medians = {s: {"cpu_us_per_ok": statistics.median(r["cpu_us_per_ok"] for r in runs if r["setting"] == s),
                   "ok_per_s": statistics.median(r["ok_per_s"] for r in runs if r["setting"] == s)}
               for s in args.settings}
    print()
    for setting, m in medians.items():
        print(f"median {setting or '(defaults)':33} {m['cpu_us_per_ok']:8.1f} us CPU per 2xx  "
              f"{m['ok_per_s']:8.1f} req/s")
    tag = machine_tag(info) + (f"-{args.tag}" if args.tag else "")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    out = args.output_dir / f"cpu_ab-{tag}.json"
    out.write_text(json.dumps({"started_at": datetime.now(UTC).isoformat(timespec="seconds"), "machine": info,
                               "route": args.route, "connections": args.connections, "seconds": args.seconds,
                               "runs": runs, "medians": medians}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
