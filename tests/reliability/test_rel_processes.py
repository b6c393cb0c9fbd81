"""The process tree of `python -m service` under failure: real processes, real HTTP, 127.0.0.1 only.

A supervisor, two HTTP workers and one inference process (service/supervisor.py). The tests kill
children with SIGKILL (pids parsed from the supervisor's log), corrupt a model so start-up fails,
count requests in /metrics across processes, and overload a queue whose device time is simulated
(RELIABILITY_BATCH_DELAY_S, inherited by the forked inference process) to check deadline-aware
admission. Every loop is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import harness
import httpx
import pytest

from service.engine.interface import WORKER_READY
from service.supervisor import RUNTIME_OWNER, RUNTIME_PREFIX, remove_stale_runtime_dirs

ENCODE = harness.ENCODE
ENCODE_LABELS = '{endpoint="/v1/models/{model}/encode",method="POST",status="%s"}'
BATCH_COUNT = 'vae_batch_size_rows_count{graph="encoder",model="tiny",version="1"}'
BASE_ENV = {"VAE_MODELS": "tiny", "VAE_HTTP_WORKERS": "2", "VAE_LOG_LEVEL": "INFO"}
WORKER_STARTED = re.compile(r"HTTP worker (\d+) started \(pid (\d+)\)")
READY = WORKER_READY  # logged by each HTTP worker whenever it becomes ready (either engine placement)
# The inference process is what the engine tests kill; the default on a machine without a GPU is
# engines per worker (VAE_ENGINE_PLACEMENT=auto).
SHARED = {"VAE_ENGINE_PLACEMENT": "shared"}
PLACEMENTS = pytest.mark.parametrize("placement", ["shared", "per-worker"])


# -- helpers ------------------------------------------------------------------------------------------------
def worker_pids(log: str) -> dict[int, list[int]]:
    """Worker index -> pids of every process started for it, in order."""
    out: dict[int, list[int]] = {}
    for m in WORKER_STARTED.finditer(log):
        out.setdefault(int(m.group(1)), []).append(int(m.group(2)))
    return out


def all_child_pids(log: str) -> list[int]:
    return harness.engine_pids(log) + [pid for pids in worker_pids(log).values() for pid in pids]


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) from /proc/<pid>/stat, or None when there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[1])


def alive(pid: int) -> bool:
    stat = proc_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def wait_until(check: Callable[[], Any], timeout: float, what: str, server: harness.Server | None = None,
               interval: float = 0.05) -> Any:
    """Poll `check` until it returns something truthy (bounded in time); fail with the log tail."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / interval) + 2):
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            break
        time.sleep(interval)
    tail = server.log()[-3000:] if server is not None else ""
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{tail}")


def readyz(server: harness.Server) -> int | None:
    try:
        return httpx.get(f"{server.url}/readyz", timeout=2).status_code
    except httpx.TransportError:
        return None


def encode_request(port: int, n: int = 1, headers: dict[str, str] | None = None) -> bytes:
    return harness.encode_request("POST", ENCODE, port, harness.tiny_image_body(n), headers)


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((harness.HOST, port))
        except OSError:
            return False
        return True


def sigterm_and_check_clean_exit(server: harness.Server, timeout: float = 30.0) -> None:
    """SIGTERM: exit status 0, and every process the supervisor ever started is gone."""
    server.sigterm()
    code = server.proc.wait(timeout=timeout)
    log = server.log()
    assert code == 0, log[-3000:]
    children = all_child_pids(log)
    wait_until(lambda: not any(alive(pid) for pid in children), 5.0, f"children {children} to exit")
    assert "stopped" in log and "Traceback" not in log, log[-3000:]
    assert port_is_free(server.port)


# -- 1. a killed HTTP worker --------------------------------------------------------------------------------
@PLACEMENTS
def test_killed_http_worker_is_restarted_and_the_other_keeps_serving(models_dir: Path, tmp_path: Path,
                                                                     placement: str) -> None:
    concurrency = 4
    env = {**BASE_ENV, "VAE_ENGINE_PLACEMENT": placement}
    with harness.start_server(models_dir, tmp_path / "server.log", env=env) as server:
        wait_until(lambda: server.log().count(READY) >= 2, 30, "both workers ready", server)
        old = worker_pids(server.log())
        assert sorted(old) == [0, 1] and all(len(p) == 1 for p in old.values()), old
        victim = old[0][0]

        async def load_and_kill() -> tuple[harness.RunResult, float]:
            t0 = time.monotonic()
            run = asyncio.create_task(harness.closed_loop(server.url, ENCODE, harness.tiny_image_body(1),
                                                          concurrency=concurrency, duration_s=4.0,
                                                          timeout=10))
            await asyncio.sleep(1.0)
            os.kill(victim, signal.SIGKILL)
            killed_at = time.monotonic() - t0
            return await run, killed_at

        result, killed_at = asyncio.run(load_and_kill())
        statuses = result.statuses()
        after = [o for o in result.outcomes if o.sent_at > killed_at + 0.05]
        errors = sorted({o.error for o in result.outcomes if o.error})
        print(f"\nkilled worker 0 (pid {victim}) at {killed_at:.2f}s: {statuses}; "
              f"{sum(o.status == 200 for o in after)} answered 200 after the kill; errors {errors}")
        # Only connections the dead worker held are lost (at most one per client in the closed loop);
        # everything else is answered 200, before, during and after the restart.
        assert set(statuses) <= {"200", "no_answer"}, statuses
        assert statuses.get("no_answer", 0) <= concurrency, (statuses, errors)
        assert sum(o.status == 200 for o in after) >= 20, statuses

        log = wait_until(lambda: (lg := server.log()) and len(worker_pids(lg).get(0, [])) >= 2 and lg,
                         15, "worker 0 restarted", server)
        assert f"HTTP worker 0 (pid {victim}) died (killed by signal 9); restarting it" in log, log[-3000:]
        new = worker_pids(log)[0][-1]
        assert new != victim and alive(new) and not alive(victim)
        assert proc_stat(new)[1] == server.pid  # a child of the supervisor
        assert worker_pids(log)[1] == old[1] and alive(old[1][0])  # the other worker was left alone
        wait_until(lambda: server.log().count(READY) >= 3, 30, "the new worker ready", server)
        wait_until(lambda: readyz(server) == 200, 30, "readyz 200", server)
        for _ in range(10):
            r = httpx.post(f"{server.url}{ENCODE}", json=harness.tiny_image_body(1), timeout=10)
            assert r.status_code == 200, r.text
        assert "unhandled error" not in server.log()


# -- 2. a killed inference process ------------------------------------------------------------------------
def test_killed_inference_process_fails_in_flight_503_and_recovers(models_dir: Path, tmp_path: Path) -> None:
    env = {**BASE_ENV, **SHARED, "VAE_MAX_BATCH_SIZE": "4", "VAE_MAX_QUEUE_DELAY_MS": "2",
           "VAE_WARMUP": "false"}  # warm-up would pay the simulated device time, twice
    n = 6  # two batches of 1 s each: certainly in flight when the kill comes
    with harness.start_server(models_dir, tmp_path / "server.log", env=env, batch_delay_s=1.0) as server:
        wait_until(lambda: server.log().count(READY) >= 2, 30, "both workers ready", server)
        victim = harness.engine_pids(server.log())[-1]

        async def in_flight_then_kill() -> tuple[list, list[int | None], float]:
            request = encode_request(server.port)
            tasks = [asyncio.create_task(harness.timed_request(server.port, request)) for _ in range(n)]
            for _ in range(200):  # until all n are inside the service (bounded)
                if (await asyncio.to_thread(harness.scrape, server.url))["vae_inflight_requests"] >= n:
                    break
                await asyncio.sleep(0.05)
            os.kill(victim, signal.SIGKILL)
            killed = time.monotonic()
            ready_codes = []
            for _ in range(40):  # readyz right after the kill (bounded: 2 s)
                status, *_ = await harness.timed_request(server.port, harness.encode_request(
                    "GET", "/readyz", server.port), 5)
                ready_codes.append(status)
                if status == 503:
                    break
                await asyncio.sleep(0.05)
            answers = []
            for task in tasks:
                status, headers, body, _ = await task
                answers.append((status, headers, body, time.monotonic() - killed))
            return answers, ready_codes, killed

        answers, ready_codes, killed = asyncio.run(in_flight_then_kill())
        print(f"\nin flight after the kill: {[(a[0], round(a[3], 2)) for a in answers]}; "
              f"readyz after the kill: {ready_codes}")
        for status, headers, body, after_kill_s in answers:
            assert status == 503, (status, body)
            error = json.loads(body)["error"]
            assert error["code"] == "unavailable" and error["message"] and error["request_id"], body
            assert "retry-after" in headers
            assert after_kill_s < 5.0, after_kill_s  # never a hang
        assert 503 in ready_codes, ready_codes

        log = wait_until(lambda: (lg := server.log()) and len(harness.engine_pids(lg)) >= 2 and lg, 15,
                         "a new inference process", server)
        assert f"inference process (pid {victim}) died (killed by signal 9); restarting it" in log
        new = harness.engine_pids(log)[-1]
        assert new != victim and alive(new) and not alive(victim) and proc_stat(new)[1] == server.pid
        wait_until(lambda: server.log().count(READY) >= 4, 30, "both workers ready again", server)
        wait_until(lambda: readyz(server) == 200, 30, "readyz 200 again", server)
        back_s = time.monotonic() - killed
        print(f"ready again {back_s:.2f}s after the kill")

        async def four() -> list:
            return await asyncio.gather(*(harness.timed_request(server.port, encode_request(server.port))
                                          for _ in range(4)))

        assert [a[0] for a in asyncio.run(four())] == [200] * 4
        metrics = harness.scrape(server.url)  # renders across the dead and the new process
        assert metrics["vae_requests_total" + ENCODE_LABELS % 503] >= n, metrics
        assert metrics["vae_requests_total" + ENCODE_LABELS % 200] >= 4, metrics
        assert metrics[BATCH_COUNT] >= 1, metrics
        assert "unhandled error" not in server.log()


# -- 3. start-up failure ------------------------------------------------------------------------------------
@PLACEMENTS
def test_corrupt_model_stops_start_up_with_status_3_and_no_children_left(models_dir: Path, tmp_path: Path,
                                                                         placement: str) -> None:
    broken = tmp_path / "models"
    shutil.copytree(models_dir, broken)
    graph = broken / "tiny" / "1" / "encoder.onnx"
    with open(graph, "ab") as f:
        f.write(b"\0")
    env = {**BASE_ENV, "VAE_ON_BAD_MODEL": "fail", "VAE_ENGINE_PLACEMENT": placement}
    with harness.start_server(broken, tmp_path / "server.log", env=env, wait=False) as server:
        code = server.proc.wait(timeout=60)
        log = server.log()
    print(f"\nexit status {code}; log tail:\n{log[-1500:]}")
    assert code == 3, log[-3000:]
    assert "refusing model tiny/1" in log and "encoder.onnx" in log, log[-3000:]
    assert "could not start" in log
    children = all_child_pids(log)
    # Both workers had been started, and with a shared engine the inference process.
    assert len(children) == (3 if placement == "shared" else 2), children
    wait_until(lambda: not any(alive(pid) for pid in children), 5.0, f"children {children} to exit")
    assert port_is_free(server.port)


@PLACEMENTS
def test_children_do_not_outlive_a_killed_supervisor(models_dir: Path, tmp_path: Path,
                                                     placement: str) -> None:
    """SIGKILL (or the OOM killer) on the supervisor: its workers and inference process exit too, so no
    orphan keeps the port or the models (the next start can bind)."""
    env = {**BASE_ENV, "VAE_ENGINE_PLACEMENT": placement}
    with harness.start_server(models_dir, tmp_path / "server.log", env=env) as server:
        wait_until(lambda: server.log().count(READY) >= 2, 30, "both workers ready", server)
        children = all_child_pids(server.log())
        assert len(children) == (3 if placement == "shared" else 2), children
        assert all(alive(pid) for pid in children), children
        os.kill(server.pid, signal.SIGKILL)
        server.proc.wait(timeout=10)
        killed = time.monotonic()
        wait_until(lambda: not any(alive(pid) for pid in children), 5.0, f"children {children} to exit",
                   server)
        print(f"\nchildren gone {time.monotonic() - killed:.2f}s after the supervisor was killed")
        wait_until(lambda: port_is_free(server.port), 5.0, "the port to be free", server)
    # It could not remove its runtime directory; the next supervisor to start does.
    left = runtime_dirs_of(server.pid)
    assert len(left) == 1, left
    with harness.start_server(models_dir, tmp_path / "next.log", env=BASE_ENV) as following:
        assert not left[0].exists()
        removal = re.search(r"removed \d+ runtime director(?:y|ies) of supervisors that were killed: (.*)",
                            following.log())
        assert removal is not None and str(left[0]) in removal.group(1).split(", "), following.log()[-2000:]
        assert len(runtime_dirs_of(following.pid)) == 1


def runtime_dirs_of(supervisor_pid: int) -> list[Path]:
    """The runtime directories labelled with this supervisor's pid (service/supervisor.py)."""
    labels = [d / RUNTIME_OWNER for d in Path(tempfile.gettempdir()).glob(RUNTIME_PREFIX + "*")]
    return [f.parent for f in labels if f.is_file() and f.read_text().split()[1] == str(supervisor_pid)]


def test_only_runtime_directories_of_gone_supervisors_of_this_host_are_removed(tmp_path: Path) -> None:
    gone_pid = subprocess.Popen([sys.executable, "-c", "pass"])
    gone_pid.wait()  # reaped: no process has its pid now
    host = socket.gethostname()
    labels = {"gone": f"{host} {gone_pid.pid}", "alive": f"{host} {os.getpid()}",
              "other-host": f"not-{host} {gone_pid.pid}", "unlabelled": None, "garbled": "no pid here"}
    for name, label in labels.items():
        path = tmp_path / f"{RUNTIME_PREFIX}{name}"
        (path / "metrics").mkdir(parents=True)
        if label is not None:
            (path / RUNTIME_OWNER).write_text(label + "\n")
    (tmp_path / "unrelated-dir").mkdir()
    assert remove_stale_runtime_dirs(tmp_path) == [tmp_path / f"{RUNTIME_PREFIX}gone"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"{RUNTIME_PREFIX}{n}" for n in labels if n != "gone"] + ["unrelated-dir"])


# -- 4. metrics across processes (and a clean drain of the whole tree) ---------------------------------------
def _per_worker_counts(pids: list[int], since: float) -> dict[int, float]:
    """Successful encodes counted in each worker's own multiprocess file (where the tree keeps them).

    Only files written since the server started: a server killed by an earlier test leaves its runtime
    directory behind, and its workers' pids may have come round again."""
    from prometheus_client.multiprocess import MultiProcessCollector

    out = {}
    for pid in pids:
        files = glob.glob(os.path.join(tempfile.gettempdir(), "vae-serve-*", "metrics", f"counter_{pid}.db"))
        files = [f for f in files if os.path.getmtime(f) >= since]
        total = 0.0
        for metric in MultiProcessCollector.merge(files, accumulate=True):
            for s in metric.samples:
                if (s.name == "vae_requests_total" and s.labels.get("status") == "200"
                        and s.labels.get("endpoint") == "/v1/models/{model}/encode"):
                    total += s.value
        out[pid] = total
    return out


def test_metrics_sum_over_workers_and_the_tree_drains_to_exit_0(models_dir: Path, tmp_path: Path) -> None:
    round_size, concurrency = 20, 8
    started = time.time() - 1.0  # file times may be a little coarse
    with harness.start_server(models_dir, tmp_path / "server.log", env=BASE_ENV) as server:
        wait_until(lambda: server.log().count(READY) >= 2, 30, "both workers ready", server)
        workers = [pids[0] for pids in worker_pids(server.log()).values()]

        async def encodes() -> list:
            gate = asyncio.Semaphore(concurrency)

            async def one(i: int) -> int | None:
                async with gate:
                    request = encode_request(server.port, 1 + i % 3)
                    status, *_ = await harness.timed_request(server.port, request)
                    return status

            return await asyncio.gather(*(one(i) for i in range(round_size)))

        n = 0
        for _ in range(5):  # rounds until both workers have taken a share (the kernel picks; bounded)
            statuses = asyncio.run(encodes())
            assert statuses == [200] * round_size, statuses
            n += round_size
            per_worker = _per_worker_counts(workers, started)
            if all(v > 0 for v in per_worker.values()):
                break
        metrics = harness.scrape(server.url)
        print(f"\nencodes counted: {metrics['vae_requests_total' + ENCODE_LABELS % 200]} of {n}; "
              f"per worker {per_worker}; encoder batches {metrics[BATCH_COUNT]}, rows "
              f"{metrics[BATCH_COUNT.replace('_count', '_sum')]}")
        assert metrics["vae_requests_total" + ENCODE_LABELS % 200] == n, metrics
        assert sum(per_worker.values()) == n and all(v > 0 for v in per_worker.values()), per_worker
        assert metrics[BATCH_COUNT] > 0  # written by whoever ran the batches, rendered by a worker
        assert metrics[BATCH_COUNT.replace("_count", "_sum")] == n // round_size * sum(
            1 + i % 3 for i in range(round_size))
        sigterm_and_check_clean_exit(server)
        # Each worker writes its access-log lines once per event-loop turn (service/logs.py): after the
        # drain every answered encode has its line, whichever worker served it.
        access_lines = server.log().count(f"POST {ENCODE} 200 ")
        assert access_lines == n, (access_lines, n)


# -- 5. how connections reach the workers ----------------------------------------------------------------
def tcp_sockets(port: int) -> dict[int, str]:
    """inode -> TCP state ("0A" listening, "01" established) of the IPv4 sockets on local port `port`."""
    out = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].rsplit(":", 1)[1], 16) == port:
            out[int(fields[9])] = fields[3]
    return out


def socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in glob.glob(f"/proc/{pid}/fd/*"):
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    return inodes


@pytest.mark.parametrize("reuse_port", [True, False])
def test_each_worker_listens_on_its_own_socket_and_gets_connections(models_dir: Path, tmp_path: Path,
                                                                    reuse_port: bool) -> None:
    """VAE_REUSE_PORT (the default): every HTTP worker listens on a socket of its own and the kernel
    spreads new connections over them, so 32 connections opened at once never all land on one worker
    (by address hash: a chance of 2^-31); the supervisor only holds the port. false: one listening
    socket, the supervisor's, shared by the workers."""
    env = {**BASE_ENV, "VAE_REUSE_PORT": str(reuse_port).lower()}
    with harness.start_server(models_dir, tmp_path / "server.log", env=env) as server:
        wait_until(lambda: server.log().count(READY) >= 2, 30, "both workers ready", server)
        workers = [pids[0] for pids in worker_pids(server.log()).values()]
        listening = {i for i, state in tcp_sockets(server.port).items() if state == "0A"}
        by_process = {pid: socket_inodes(pid) & listening for pid in [server.pid, *workers]}
        if reuse_port:
            assert not by_process[server.pid], by_process  # bound to hold the port, never listening
            assert len(listening) == len(workers), by_process
            assert all(len(by_process[w]) == 1 for w in workers), by_process
        else:
            assert len(listening) == 1 and all(by_process[p] == listening for p in by_process), by_process

        async def hold_connections(n: int) -> dict[int, int]:
            streams = [await asyncio.open_connection(harness.HOST, server.port) for _ in range(n)]
            try:
                request = encode_request(server.port).replace(b"Connection: close", b"Connection: keep-alive")
                for _, writer in streams:  # one request on each, so each connection has been accepted
                    writer.write(request)
                await asyncio.gather(*(reader.readuntil(b"\r\n\r\n") for reader, _ in streams))
                established = {i for i, state in tcp_sockets(server.port).items() if state == "01"}
                return {w: len(socket_inodes(w) & established) for w in workers}
            finally:
                for _, writer in streams:
                    writer.close()

        per_worker = asyncio.run(hold_connections(32))
        print(f"\nreuse_port={reuse_port}: connections per worker {per_worker}")
        assert sum(per_worker.values()) == 32, per_worker
        if reuse_port:
            assert all(n > 0 for n in per_worker.values()), per_worker
        sigterm_and_check_clean_exit(server)


# -- 6. deadline-aware admission ----------------------------------------------------------------------------
# 0.2 s of simulated device time per batch of at most 2 rows: 10 rows/s. A deadline of 2.5 s (80% of it
# for the estimate) admits about 20 requests of one image; a burst of 60 must refuse the rest at once.
DEADLINE_ENV = {**BASE_ENV, **SHARED, "VAE_MAX_BATCH_SIZE": "2", "VAE_REQUEST_TIMEOUT_S": "2.5",
                "VAE_MAX_QUEUE_DELAY_MS": "2", "VAE_LOG_LEVEL": "WARNING"}
DEADLINE_DELAY_S = 0.2
BURST = 60


def test_deadline_aware_admission_refuses_fast_and_never_times_out_admitted_work(models_dir: Path,
                                                                                tmp_path: Path) -> None:
    with harness.start_server(models_dir, tmp_path / "server.log", env=DEADLINE_ENV,
                              batch_delay_s=DEADLINE_DELAY_S) as server:  # warm-up calibrates the cost
        wait_until(lambda: readyz(server) == 200, 30, "ready", server)
        port = server.port

        async def warm(n: int) -> list:
            request = encode_request(port)
            return await asyncio.gather(*(harness.timed_request(port, request) for _ in range(n)))

        # The first 200 and the first 429 of each worker pay one-off costs (measured: ~0.2 s on this
        # machine); a first, unmeasured burst takes them, so the figures below are the steady state.
        warm_up = asyncio.run(warm(BURST // 2))
        # All answered. (The estimate covers device time only: on a CPU starved by other jobs, the first
        # burst's HTTP work can push an admitted request past its deadline, so 504 is tolerated here
        # and only here; the measured burst below allows none.)
        assert {a[0] for a in warm_up} <= {200, 429, 504}, warm_up
        print("\nwarm-up burst:", sorted((a[0], round(1000 * a[3])) for a in warm_up))

        async def burst() -> tuple[list, list]:
            request = encode_request(port)
            tasks = [asyncio.create_task(harness.timed_request(port, request)) for _ in range(BURST)]
            await asyncio.sleep(0.6)  # the queue is busy now, and both workers have had load reports
            short = []
            for _ in range(4):
                short.append(await harness.timed_request(port, encode_request(port, headers={
                    "X-Request-Timeout": "0.05"})))
            return list(await asyncio.gather(*tasks)), short

        answers, short = asyncio.run(burst())
        ok = [a[3] for a in answers if a[0] == 200]
        rejected = [a for a in answers if a[0] == 429]
        rejected_s = [a[3] for a in rejected]
        counts = {str(s): sum(a[0] == s for a in answers) for s in sorted({a[0] for a in answers}, key=str)}
        figures = {
            "statuses": counts,
            "rejected_429_median_ms": round(1000 * statistics.median(rejected_s), 1) if rejected_s else None,
            "rejected_429_max_ms": round(1000 * max(rejected_s), 1) if rejected_s else None,
            "admitted_200_max_ms": round(1000 * max(ok), 1) if ok else None,
            "short_deadline": [(a[0], round(1000 * a[3], 1)) for a in short],
        }
        print("\ndeadline figures:", json.dumps(figures))
        assert all(a[0] is not None for a in answers), counts  # every request answered
        assert set(counts) <= {"200", "429"}, counts  # no 504: what was admitted finished in time
        assert len(ok) >= 5 and len(rejected) >= BURST / 3, counts
        assert max(ok) < 2.5 + 0.5, figures  # the deadline (plus HTTP overhead)
        assert statistics.median(rejected_s) < 0.5, figures
        for _, headers, body, _ in rejected:
            assert int(headers["retry-after"]) >= 1 and json.loads(body)["error"]["code"] == "overloaded"
        for status, headers, body, seconds in short:  # a short deadline on a busy queue: refused at once
            assert status == 429 and "retry-after" in headers and seconds < 0.5, (status, body, seconds)
        # Every 429 is counted once in vae_rejections_total, whether a worker refused it before reading
        # the body (from load reports) or the inference process refused it.
        refusals = {k: v for k, v in harness.scrape(server.url).items()
                    if k.startswith("vae_rejections_total") and 'graph="encoder"' in k}
        answered_429 = sum(a[0] == 429 for a in [*warm_up, *answers, *short])
        assert sum(refusals.values()) == answered_429, (refusals, answered_429)
        assert any('reason="queue_estimate_before_body"' in k for k in refusals), refusals

        # Invalid deadlines are the caller's error.
        for bad in ("abc", "0", "-1", "inf", "nan", ""):
            r = httpx.post(f"{server.url}{ENCODE}", json=harness.tiny_image_body(1), timeout=10,
                           headers={"X-Request-Timeout": bad})
            assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_input", (bad, r.text)

        # A log-likelihood request that alone needs more device time than its deadline: 422 at once.
        started = time.monotonic()
        r = httpx.post(f"{server.url}/v1/models/tiny/log-likelihood?k=2000&seed=0", timeout=10,
                       json=harness.tiny_image_body(1), headers={"X-Request-Timeout": "1"})
        took = time.monotonic() - started
        print(f"too expensive: {r.status_code} in {1000 * took:.0f} ms: {r.json()['error']['message']}")
        assert r.status_code == 422 and r.json()["error"]["code"] == "too_expensive", r.text
        assert took < 0.5
        # ... while the same request with the default deadline is served
        r = httpx.post(f"{server.url}/v1/models/tiny/log-likelihood?k=16&seed=0", timeout=10,
                       json=harness.tiny_image_body(1))
        assert r.status_code == 200, r.text
        assert httpx.post(f"{server.url}{ENCODE}", json=harness.tiny_image_body(1), timeout=10
                          ).status_code == 200
        assert "unhandled error" not in server.log() and "Traceback" not in server.log()
