"""Long hostile-caller variants of issue 10 ("Reliability, round two"): print a table, write JSON.

    .venv/bin/python scripts/reliability/hostile.py [--models-dir models] [--model mnist-vae]
        [--out scripts/reliability/results/hostile-<machine>.json]

A real `python -m service` (through faulty_service.py without simulated device time, i.e. exactly
`python -m service`) with default settings (HTTP workers one per core, runtime threads the runtime's
default) serving the committed model, on 127.0.0.1 only:
(a) two concurrent 9.5 MB mis-shaped JSON bodies (arrays missing a nesting level; latents of strings),
    three rounds: refusal time of each, /healthz latency meanwhile, HTTP workers' RSS rise and after;
(b) 300 stalled uploads (headers and a few bytes of a 100 kB body, then nothing) held open while
    normal encodes run: share answered 200 and their median; what the stalled ones get, and when;
(c) encode throughput (hey, 8 callers) alone, then while 8 callers flood k=5000 log-likelihood
    requests (target >= 50%): callers that honour Retry-After (the queue stays full), and callers that
    retry every 429 at once (a retry storm); the start-up warning about the largest request and what
    that request gets;
(d) SIGTERM with a caller that has sent half its body (VAE_DRAIN_TIMEOUT_S=5 so the drain deadline
    comes before the 10 s body deadline): its status and body, the exit status.
Every phase is bounded in time; the whole run takes about 3-4 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import harness
import httpx

sys.path.insert(0, str(harness.ROOT))
from benchmarks.machine import machine_info, machine_tag
from service.engine.interface import WORKER_READY

RESULTS = Path(__file__).resolve().parent / "results"
BODY_MB = 9.5
STALLED = 300


def ms(seconds: float) -> float:
    return round(1000.0 * seconds, 1)


def wait_connected(server: harness.Server, timeout: float = 60.0) -> None:
    for _ in range(int(timeout / 0.1)):
        log = server.log()
        if log.count(WORKER_READY) >= len(harness.worker_pids(log)) > 0:
            return
        time.sleep(0.1)
    raise RuntimeError(f"workers not connected:\n{server.log()[-3000:]}")


# -- (a) ------------------------------------------------------------------------------------------------
def misshaped(server: harness.Server, model: str, info: dict[str, Any], rounds: int = 3) -> dict[str, Any]:
    port = server.port
    bodies = harness.misshaped_bodies(tuple(info["input_shape"]), info["latent_dim"], int(BODY_MB * 2**20))
    requests = {"inputs": harness.post_bytes(f"/v1/models/{model}/encode", port, bodies["inputs"]),
                "latents": harness.post_bytes(f"/v1/models/{model}/decode", port, bodies["latents"])}
    pids = harness.worker_pids(server.log())

    def rss() -> float:
        return sum(harness.rss_mb(pid) for pid in pids)

    baseline = rss()
    samples: list[float] = []
    health: list[tuple[int | None, float]] = []

    async def run() -> list[dict[str, tuple]]:
        stop = asyncio.Event()

        async def poll() -> None:
            for _ in range(5000):  # bounded; stopped below
                if stop.is_set():
                    return
                health_request = harness.encode_request("GET", "/healthz", port)
                status, _, _, took = await harness.timed_request(port, health_request, 10)
                health.append((status, took))
                samples.append(rss())
                await asyncio.sleep(0.05)

        poller = asyncio.create_task(poll())
        await asyncio.sleep(0.3)
        out = []
        for _ in range(rounds):
            answers = await asyncio.gather(*(harness.timed_request(port, requests[n], 60) for n in requests))
            out.append(dict(zip(requests, answers, strict=True)))
            await asyncio.sleep(0.3)
        stop.set()
        await poller
        return out

    answers = asyncio.run(run())
    time.sleep(1.0)
    after_1s = rss()
    time.sleep(2.0)
    after_3s = rss()
    took = {n: [round(a[n][3], 3) for a in answers] for n in requests}
    statuses = {n: sorted({a[n][0] for a in answers}, key=str) for n in requests}
    codes = {n: sorted({json.loads(a[n][2])["error"]["code"] if a[n][2] else None for a in answers},
                       key=str) for n in requests}
    health_s = [t for _, t in health]
    return {
        "body_bytes": {n: len(b) for n, b in bodies.items()},
        "rounds": rounds,
        "statuses": statuses,
        "error_codes": codes,
        "refusal_s": took,
        "refusal_max_s": max(max(v) for v in took.values()),
        "healthz_polls": len(health),
        "healthz_statuses": sorted({str(s) for s, _ in health}),
        "healthz_p50_ms": ms(statistics.median(health_s)),
        "healthz_max_ms": ms(max(health_s)),
        "workers": len(pids),
        "rss_workers_baseline_mb": round(baseline, 1),
        "rss_workers_peak_mb": round(max(samples), 1),
        "rss_peak_rise_mb": round(max(samples) - baseline, 1),
        "rss_workers_after_1s_mb": round(after_1s, 1),
        "rss_workers_after_3s_mb": round(after_3s, 1),
    }


# -- (b) ------------------------------------------------------------------------------------------------
def stalled(server: harness.Server, model: str, encode_body: Any, declared: int = 100_000,
            hold_s: float = 6.0) -> dict[str, Any]:
    port = server.port
    path = f"/v1/models/{model}/encode"

    async def run() -> dict[str, Any]:
        opened = time.monotonic()
        conns = []
        for _ in range(STALLED):
            conns.append(await harness.stalled_upload(port, path, declared, b'{"inputs": ['))
        opened_s = time.monotonic() - opened
        await asyncio.sleep(0.5)
        ready = (await harness.timed_request(port, harness.encode_request("GET", "/readyz", port), 10))[0]
        metrics = await asyncio.to_thread(harness.scrape, server.url)
        normal = await harness.closed_loop(server.url, path, encode_body, concurrency=8, duration_s=hold_s,
                                           timeout=15)
        normal_done = time.monotonic() - opened
        answers = await asyncio.gather(*(harness.read_answer(r, w, 30) for r, w in conns))
        return {"opened_s": opened_s, "ready": ready, "inflight": metrics.get("vae_inflight_requests"),
                "normal": normal, "normal_done_s": normal_done, "answers": answers,
                "answered_s": time.monotonic() - opened}

    r = asyncio.run(run())
    normal: harness.RunResult = r["normal"]
    ok = normal.latencies(200)
    counts: dict[str, int] = {}
    for status, _, _ in r["answers"]:
        counts[str(status)] = counts.get(str(status), 0) + 1
    codes = sorted({json.loads(b)["error"]["code"] for s, _, b in r["answers"] if s is not None and b})
    return {
        "stalled": STALLED,
        "declared_bytes": declared,
        "open_s": round(r["opened_s"], 2),
        "readyz_while_held": r["ready"],
        "inflight_while_held": r["inflight"],
        "normal_sent": len(normal.outcomes),
        "normal_statuses": normal.statuses(),
        "normal_share_200": round(len(ok) / max(1, len(normal.outcomes)), 4),
        "normal_p50_ms": ms(harness.percentile(ok, 50)),
        "normal_p99_ms": ms(harness.percentile(ok, 99)),
        "normal_rps": round(len(ok) / normal.duration_s, 1),
        "normal_done_after_s": round(r["normal_done_s"], 2),
        "stalled_statuses": counts,
        "stalled_error_codes": codes,
        "stalled_all_answered_after_s": round(r["answered_s"], 2),
    }


# -- (c) ------------------------------------------------------------------------------------------------
def hey(url: str, body_file: Path, duration_s: float, concurrency: int, timeout_s: int = 60
        ) -> dict[str, Any]:
    """`hey` (Go, its own process: the client's CPU is not the Python client's) for `duration_s`."""
    out = subprocess.run(["hey", "-z", f"{duration_s:g}s", "-c", str(concurrency), "-t", str(timeout_s),
                          "-m", "POST", "-T", "application/json", "-D", str(body_file), url],
                         capture_output=True, text=True, timeout=duration_s + timeout_s + 30).stdout
    total = float(re.search(r"Total:\s+([0-9.]+) secs", out).group(1))
    statuses = {m.group(1): int(m.group(2)) for m in re.finditer(r"\[(\d+)\]\s+(\d+) responses", out)}
    p50 = re.search(r"50%+ in ([0-9.]+) secs", out)
    p99 = re.search(r"99%+ in ([0-9.]+) secs", out)
    return {"seconds": round(total, 2), "statuses": statuses,
            "ok_per_s": round(statuses.get("200", 0) / total, 1),
            "p50_ms": ms(float(p50.group(1))) if p50 else None,
            "p99_ms": ms(float(p99.group(1))) if p99 else None}


async def polite_flood(port: int, path: str, body: Any, concurrency: int, duration_s: float
                       ) -> dict[str, int]:
    """Closed-loop callers that honour Retry-After (at most 10 s): the queue stays full, no 429 storm."""
    request = harness.encode_request("POST", path, port, body)
    stop_at = time.monotonic() + duration_s
    statuses: dict[str, int] = {}

    async def caller() -> None:
        for _ in range(100_000):  # bounded; the time check ends it
            if time.monotonic() >= stop_at:
                return
            status, headers, _, _ = await harness.timed_request(port, request, 60)
            statuses[str(status)] = statuses.get(str(status), 0) + 1
            if status == 429:
                wait = min(10.0, float(headers.get("retry-after", "1")), stop_at - time.monotonic())
                await asyncio.sleep(max(0.0, wait))

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return dict(sorted(statuses.items()))


def flood(server: harness.Server, model: str, encode_body: Any, tmp: Path, k: int = 5000,
          concurrency: int = 8, measure_s: float = 10.0) -> dict[str, Any]:
    encode = f"{server.url}/v1/models/{model}/encode"
    ll = f"/v1/models/{model}/log-likelihood?k={k}&seed=0"
    encode_file, ll_file = tmp / "encode.json", tmp / "ll.json"
    encode_file.write_text(json.dumps(encode_body))
    ll_file.write_text(json.dumps(encode_body))  # one image per log-likelihood request
    hey(encode, encode_file, 2.0, 8)  # warm-up
    alone = hey(encode, encode_file, measure_s, 8)

    def with_polite_flood() -> tuple[dict[str, Any], dict[str, int]]:
        async def run() -> tuple[dict[str, Any], dict[str, int]]:
            flooding = asyncio.create_task(polite_flood(server.port, ll, encode_body, concurrency,
                                                        measure_s + 3.0))
            await asyncio.sleep(2.0)
            during = await asyncio.to_thread(hey, encode, encode_file, measure_s, 8)
            return during, await flooding

        return asyncio.run(run())

    polite, polite_flood_statuses = with_polite_flood()
    time.sleep(3.0)  # the admitted log-likelihood work drains (bounded by the 30 s deadline anyway)
    storm = subprocess.Popen(["hey", "-z", f"{measure_s + 3.0:g}s", "-c", str(concurrency), "-t", "60",
                              "-m", "POST", "-T", "application/json", "-D", str(ll_file), server.url + ll],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    time.sleep(2.0)
    during_storm = hey(encode, encode_file, measure_s, 8)
    storm_out = storm.communicate(timeout=120)[0]
    storm_statuses = {m.group(1): int(m.group(2)) for m in re.finditer(r"\[(\d+)\]\s+(\d+) responses",
                                                                       storm_out)}
    return {
        "k": k, "flood_concurrency": concurrency, "encode_concurrency": 8, "client": "hey (keep-alive)",
        "encode_alone": alone,
        "encode_during_polite_flood": polite, "polite_flood_statuses": polite_flood_statuses,
        "share": round(polite["ok_per_s"] / alone["ok_per_s"], 3) if alone["ok_per_s"] else None,
        "encode_during_retry_storm": during_storm, "retry_storm_statuses": storm_statuses,
        "share_retry_storm": (round(during_storm["ok_per_s"] / alone["ok_per_s"], 3) if alone["ok_per_s"]
                              else None),
    }


def largest_request(server: harness.Server, model: str, info: dict[str, Any], max_images: int = 64,
                    k: int = 5000) -> dict[str, Any]:
    """The start-up warning about the documented maximum request, and what that request gets."""
    c, h, w = info["input_shape"]
    body = {"inputs": [[[[0.5] * w] * h] * c] * max_images}
    started = time.monotonic()
    r = httpx.post(f"{server.url}/v1/models/{model}/log-likelihood?k={k}&seed=0", json=body, timeout=60)
    took = time.monotonic() - started
    warning = [line[-400:] for line in server.log().splitlines() if "largest log-likelihood" in line]
    code = r.json()["error"]["code"] if r.status_code != 200 else None
    return {"start_up_warning": warning, "status": r.status_code, "code": code, "seconds": round(took, 2),
            "message": r.json()["error"]["message"][:300] if code else None}


# -- (d) ------------------------------------------------------------------------------------------------
def sigterm_mid_upload(models_dir: Path, model: str, log_path: Path, encode_body: Any) -> dict[str, Any]:
    env = {"VAE_MODELS": model, "VAE_THREADS": "0", "VAE_DRAIN_TIMEOUT_S": "5"}
    body = json.dumps(encode_body).encode()
    with harness.start_server(models_dir, log_path, env=env, ready_timeout=180) as server:
        wait_connected(server)

        async def run() -> dict[str, Any]:
            upload = await harness.stalled_upload(server.port, f"/v1/models/{model}/encode", len(body),
                                                  body[:len(body) // 2], {"X-Request-ID": "hostile-upload"})
            await asyncio.sleep(0.5)
            signalled = server.sigterm()
            status, headers, answer = await harness.read_answer(*upload, 30)
            return {"status": status, "headers": headers, "body": answer.decode(errors="replace"),
                    "answer_after_s": round(time.monotonic() - signalled, 2), "signalled": signalled}

        r = asyncio.run(run())
        code = server.proc.wait(timeout=60)
        exited = time.monotonic() - r.pop("signalled")
        log = server.log()
    headers = r.pop("headers")
    return {**r, "content_type": headers.get("content-type"), "x_request_id": headers.get("x-request-id"),
            "exit_status": code, "exited_after_s": round(exited, 2), "drain_timeout_s": 5,
            "traceback_in_log": "Traceback" in log}


# -- table ----------------------------------------------------------------------------------------------
def table(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    a, b, c, d = (results[k] for k in ("a_misshaped", "b_stalled", "c_flood", "d_sigterm"))
    rows = [
        ("(a) refusal of 2 concurrent 9.5 MB bodies", f"{a['statuses']} max {a['refusal_max_s']:.2f} s",
         "422 (413 before a76a481), < 1 s each",
         a["refusal_max_s"] < 1.0 and all(s == [422] for s in a["statuses"].values())),
        ("(a) /healthz meanwhile", f"p50 {a['healthz_p50_ms']} ms, max {a['healthz_max_ms']} ms",
         "max < 500 ms", a["healthz_max_ms"] < 500 and a["healthz_statuses"] == ["200"]),
        ("(a) workers' RSS peak rise", f"{a['rss_peak_rise_mb']} MB (base {a['rss_workers_baseline_mb']})",
         "< 500 MB", a["rss_peak_rise_mb"] < 500),
        ("(a) workers' RSS 3 s after", f"{a['rss_workers_after_3s_mb']} MB", "< base + 100 MB",
         a["rss_workers_after_3s_mb"] < a["rss_workers_baseline_mb"] + 100),
        (f"(b) normal encodes, {b['stalled']} stalled held", f"{100 * b['normal_share_200']:.1f}% 200 of "
         f"{b['normal_sent']}, p50 {b['normal_p50_ms']} ms", ">= 99% 200", b["normal_share_200"] >= 0.99),
        ("(b) readyz while held; stalled end", f"{b['readyz_while_held']}; {b['stalled_statuses']} by "
         f"{b['stalled_all_answered_after_s']} s", "200; all 408 by ~10.4 s",
         b["readyz_while_held"] == 200 and b["stalled_statuses"] == {"408": b["stalled"]}),
        (f"(c) encode during k={c['k']} flood (Retry-After honoured)",
         f"{c['encode_during_polite_flood']['ok_per_s']}/s of {c['encode_alone']['ok_per_s']}/s "
         f"= {100 * (c['share'] or 0):.0f}%, p50 {c['encode_during_polite_flood']['p50_ms']} ms", ">= 50%",
         (c["share"] or 0) >= 0.5),
        (f"(c) encode during k={c['k']} flood (429s retried at once)",
         f"{c['encode_during_retry_storm']['ok_per_s']}/s of {c['encode_alone']['ok_per_s']}/s "
         f"= {100 * (c['share_retry_storm'] or 0):.0f}%", ">= 50%", (c["share_retry_storm"] or 0) >= 0.5),
        ("(c) largest request (64 images, k=5000)", f"{results['c_largest']['status']} "
         f"{results['c_largest']['code']} in {results['c_largest']['seconds']} s", "422 too_expensive if "
         "warned", (results["c_largest"]["status"] == 422) == bool(results["c_largest"]["start_up_warning"])),
        ("(d) SIGTERM, caller mid-upload",
         f"{d['status']} {d['content_type']} after {d['answer_after_s']} s, exit {d['exit_status']}",
         "503 JSON + id, exit 0",
         d["status"] == 503 and d["content_type"] == "application/json" and d["exit_status"] == 0
         and d["x_request_id"] == "hostile-upload" and '"hostile-upload"' in d["body"]),
    ]
    return [(name, value, target, "yes" if met else "NO") for name, value, target, met in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", type=Path, default=harness.ROOT / "models")
    parser.add_argument("--model", default="mnist-vae")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    started = time.monotonic()
    info_machine = machine_info(harness.ROOT)
    results: dict[str, Any] = {"machine": info_machine, "model": args.model}
    env = {"VAE_MODELS": args.model, "VAE_THREADS": "0"}  # otherwise every setting at its default
    with tempfile.TemporaryDirectory() as tmp:
        with harness.start_server(args.models_dir, Path(tmp) / "server.log", env=env,
                                  ready_timeout=180) as server:
            wait_connected(server)
            info = httpx.get(f"{server.url}/v1/models/{args.model}", timeout=10).json()
            shape = info["input"]
            info["input_shape"] = c, h, w = shape["channels"], shape["height"], shape["width"]
            encode_body = {"inputs": [[[[0.5] * w] * h] * c]}
            print(f"serving {args.model} {info['input_shape']} on {server.url}; workers "
                  f"{harness.worker_pids(server.log())}", flush=True)
            results["a_misshaped"] = misshaped(server, args.model, info)
            print("(a)", json.dumps(results["a_misshaped"]), flush=True)
            results["b_stalled"] = stalled(server, args.model, encode_body)
            print("(b)", json.dumps(results["b_stalled"]), flush=True)
            results["c_flood"] = flood(server, args.model, encode_body, Path(tmp))
            print("(c)", json.dumps(results["c_flood"]), flush=True)
            results["c_largest"] = largest_request(server, args.model, info)
            print("(c)", json.dumps(results["c_largest"]), flush=True)
            log = server.log()
            results["server_log_tracebacks"] = log.count("Traceback")
        results["d_sigterm"] = sigterm_mid_upload(args.models_dir, args.model, Path(tmp) / "server-d.log",
                                                  encode_body)
        print("(d)", json.dumps(results["d_sigterm"]), flush=True)
    rows = table(results)
    results["table"] = [dict(zip(("measure", "value", "target", "met"), row, strict=True)) for row in rows]
    results["seconds"] = round(time.monotonic() - started, 1)
    widths = [max(len(row[i]) for row in [*rows, ("measure", "value", "target", "met")]) for i in range(4)]
    print()
    for row in [("measure", "value", "target", "met"), *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    out = args.out or RESULTS / f"hostile-{machine_tag(info_machine)}.json"
    harness.write_json(out, results)
    print(f"\nwrote {out} ({results['seconds']} s)")


if __name__ == "__main__":
    main()
