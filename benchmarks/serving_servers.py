"""The servers of the serving benchmark: how each is started, where it answers, and how it is stopped.

Every server is a real process tree started in its own session on 127.0.0.1 and a free port, logging
to its own file; it is stopped with SIGTERM to its leader, and whatever is left of its tree (found by
parent pid before the stop) gets SIGTERM, then SIGKILL (BentoML and LitServe fork workers of their own).
The service runs from the project's .venv (this interpreter); the peers from .bench-peers-venv.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts" / "reliability"))
import harness  # noqa: E402 - the one process harness (free port, spawn, wait for ready, kill the tree)

HOST = harness.HOST
PEERS_VENV = ROOT / ".bench-peers-venv"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ServerSpec:
    name: str
    family: str  # vae-serve | plain | bentoml | litserve
    command: list[str]  # without --host/--port (appended)
    env: dict[str, str]  # what differs from the inherited environment
    ready_path: str
    encode_path: str
    loglik_path: str | None = None  # service only
    note: str = ""

    @property
    def is_peer(self) -> bool:
        return self.family != "vae-serve"


def server_specs(
    model: str,
    version: str,
    version_dir: Path,
    device: str,
    service_env: dict[str, str],
    extra_peer_env: dict[str, str] | None = None,
) -> dict[str, ServerSpec]:
    """Every configuration the benchmark knows, by name, in the default order."""
    base = {"VAE_THREADS": "1", "VAE_MODELS": f"{model}:{version}", "VAE_DEVICE": device, **service_env}
    service = [sys.executable, "-m", "service"]
    encode = f"/v1/models/{model}/encode"
    loglik = f"/v1/models/{model}/log-likelihood?k=1000&seed=1"
    peers_python = str(PEERS_VENV / "bin" / "python")
    peer_env = {
        "BENCH_MODEL_DIR": str(version_dir),
        "BENCH_THREADS": "1",
        "BENCH_DEVICE": device,
        "BENTOML_DO_NOT_TRACK": "True",
        "PYTHONUNBUFFERED": "1",
        **(extra_peer_env or {}),
    }
    plain = [
        sys.executable,
        str(ROOT / "benchmarks" / "plain_server.py"),
        "--models-dir",
        str(version_dir.parent.parent),
        "--model",
        model,
        "--version",
        version,
        "--threads",
        "1",
        "--device",
        device,
    ]
    bentoml = [str(PEERS_VENV / "bin" / "bentoml"), "serve", "benchmarks/peers/bentoml_service.py:VaeEncoder"]
    litserve = [peers_python, "benchmarks/peers/litserve_server.py"]
    specs = [
        ServerSpec(
            "vae-serve",
            "vae-serve",
            service,
            base,
            "/readyz",
            encode,
            loglik,
            "defaults (VAE_HTTP_WORKERS: one per core, on the CPU each running the models) + VAE_THREADS=1",
        ),
        ServerSpec(
            "vae-serve-shared",
            "vae-serve",
            service,
            {**base, "VAE_ENGINE_PLACEMENT": "shared"},
            "/readyz",
            encode,
            loglik,
            "VAE_ENGINE_PLACEMENT=shared (one inference process behind the HTTP workers)",
        ),
        ServerSpec(
            "vae-serve-nobatch",
            "vae-serve",
            service,
            {**base, "VAE_MAX_BATCH_SIZE": "1"},
            "/readyz",
            encode,
            None,
            "VAE_MAX_BATCH_SIZE=1 (batching off)",
        ),
        ServerSpec(
            "vae-serve-split-writes",
            "vae-serve",
            service,
            {**base, "VAE_COALESCE_WRITES": "false"},
            "/readyz",
            encode,
            None,
            "VAE_COALESCE_WRITES=false (a response's head and body in two send() calls, as uvicorn does)",
        ),
        ServerSpec(
            "vae-serve-1proc",
            "vae-serve",
            service,
            {**base, "VAE_HTTP_WORKERS": "0"},
            "/readyz",
            encode,
            None,
            "VAE_HTTP_WORKERS=0 (one process)",
        ),
        ServerSpec(
            "plain-w1",
            "plain",
            plain,
            {},
            "/readyz",
            f"{encode}-json",
            None,
            "FastAPI def endpoint, session.run per request, 1 uvicorn process",
        ),
        ServerSpec(
            "plain-w2",
            "plain",
            [*plain, "--workers", "2"],
            {},
            "/readyz",
            f"{encode}-json",
            None,
            "same, uvicorn --workers 2",
        ),
        ServerSpec(
            "bentoml-w1",
            "bentoml",
            bentoml,
            {**peer_env, "BENCH_WORKERS": "1"},
            "/readyz",
            "/encode",
            None,
            "@bentoml.service(workers=1), batchable API max_batch_size=64",
        ),
        ServerSpec(
            "bentoml-w2",
            "bentoml",
            bentoml,
            {**peer_env, "BENCH_WORKERS": "2"},
            "/readyz",
            "/encode",
            None,
            "@bentoml.service(workers=2), batchable API max_batch_size=64",
        ),
        ServerSpec(
            "litserve-w1",
            "litserve",
            [*litserve, "--workers", "1"],
            peer_env,
            "/health",
            "/encode",
            None,
            "workers_per_device=1 (1 API server), max_batch_size=64, batch_timeout=0.002",
        ),
        ServerSpec(
            "litserve-w2",
            "litserve",
            [*litserve, "--workers", "2"],
            peer_env,
            "/health",
            "/encode",
            None,
            "workers_per_device=2 (2 API servers), max_batch_size=64, batch_timeout=0.002",
        ),
    ]
    return {s.name: s for s in specs}


def _proc_table() -> dict[int, tuple[int, int, float]]:
    """pid -> (parent pid, start time in ticks, user + system CPU seconds incl. reaped children)."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        cpu = sum(int(f) for f in fields[11:15]) / CLOCK_TICKS  # utime stime cutime cstime
        table[int(stat.parent.name)] = (int(fields[1]), int(fields[19]), cpu)
    return table


def tree(root: int) -> dict[int, tuple[int, int, float]]:
    """The live process tree under `root` (root included), by parent pid: BentoML's workers call setsid,
    so a process group would miss them."""
    table = _proc_table()
    found = {root: table[root]} if root in table else {}
    grew = True
    while grew:
        grew = False
        for pid, row in table.items():
            if pid not in found and row[0] in found:
                found[pid] = row
                grew = True
    return found


def still_alive(procs: dict[int, tuple[int, int, float]]) -> list[int]:
    """Which of these processes still run (same pid and start time: not a reused pid)."""
    table = _proc_table()
    return [pid for pid, row in procs.items() if pid in table and table[pid][1] == row[1]]


_BATCH_RE = re.compile(
    r"^(?:vae_batch_size_rows|bentoml_service_adaptive_batch_size)_(?P<kind>sum|count)"
    r"\{(?P<labels>[^}]*)\} (?P<value>\S+)$"
)


@dataclass
class RunningServer:
    spec: ServerSpec
    log_path: Path
    port: int = field(default_factory=harness.free_port)
    process: subprocess.Popen[bytes] | None = None
    exit_code: int | None = None
    stop_seconds: float | None = None
    ready_seconds: float | None = None
    leftover_signalled: list[str] = field(default_factory=list)
    cwd: Path = ROOT  # another checkout serves its own code (cpu_ab.py's tree=)

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> None:
        command = [*self.spec.command, "--host", HOST, "--port", str(self.port)]
        self.process = harness.spawn(command, self.log_path, {**os.environ, **self.spec.env}, self.cwd)

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        request = urllib.request.Request(self.base_url + path)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def post(self, path: str, body: bytes, timeout: float = 60.0) -> tuple[int, bytes]:
        request = urllib.request.Request(
            self.base_url + path, data=body, method="POST", headers={"content-type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def wait_ready(self, timeout_s: float) -> None:
        assert self.process is not None
        try:
            url = self.base_url + self.spec.ready_path
            seconds = harness.wait_until_ready(self.process, url, self.log_path, timeout_s)
        except RuntimeError as exc:
            raise RuntimeError(f"{self.spec.name}: {exc}") from None
        self.ready_seconds = round(seconds, 1)

    def cpu_seconds(self) -> float:
        """CPU seconds of the live process tree (a process that exits between two readings is lost)."""
        assert self.process is not None
        return sum(row[2] for row in tree(self.process.pid).values())

    def processes(self) -> int:
        assert self.process is not None
        return len(tree(self.process.pid))

    def providers(self, model: str) -> list[str] | None:
        """The ONNX Runtime providers in use: the service's model detail, or the peers' log line."""
        if self.spec.family == "vae-serve":
            try:
                status, body = self.get(f"/v1/models/{model}")
                return json.loads(body)["runtime_details"]["providers"] if status == 200 else None
            except (OSError, ValueError, KeyError):
                return None
        found = re.findall(r"BENCH_PROVIDERS=(\S+)", self.log_path.read_text(errors="replace"))
        return sorted(set(found[-1].split(","))) if found else None

    def batch_counters(self) -> dict[str, float] | None:
        """{graph: (rows, batches)} so far from the server's Prometheus metrics: the service's batcher
        (vae_batch_size_rows) or BentoML's dispatcher (bentoml_service_adaptive_batch_size); None where
        there are none (plain, LitServe)."""
        if self.spec.family not in ("vae-serve", "bentoml"):
            return None
        try:
            status, body = self.get("/metrics", timeout=10.0)
        except (OSError, urllib.error.URLError):
            return None
        if status != 200:
            return None
        out: dict[str, float] = {}
        for line in body.decode(errors="replace").splitlines():
            match = _BATCH_RE.match(line)
            if match:
                labels = match["labels"]
                graph = re.search(r'graph="([^"]*)"', labels)
                key = f"{graph.group(1) if graph else 'encode'}_{match['kind']}"
                out[key] = out.get(key, 0.0) + float(match["value"])
        return out

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM to the leader; then SIGTERM and, 5 s later, SIGKILL to what is left of its tree."""
        if self.process is None:
            return
        started = time.monotonic()
        procs = tree(self.process.pid)  # before the leader goes: its orphans get a new parent
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.exit_code = self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.exit_code = self.process.wait(10)
        else:
            self.exit_code = self.process.returncode
        deadline = time.monotonic() + 5
        while still_alive(procs) and time.monotonic() < deadline:
            time.sleep(0.1)
        # what the leader left behind (LitServe's API servers and inference workers outlive a SIGTERM
        # to its main process): SIGTERM, then SIGKILL after 5 s, each to those processes by pid
        for sig in (signal.SIGTERM, signal.SIGKILL):
            left = still_alive(procs)
            if not left:
                break
            self.leftover_signalled.append(f"{signal.Signals(sig).name} to {len(left)} processes")
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + 5
            while still_alive(procs) and time.monotonic() < deadline:
                time.sleep(0.1)
        self.stop_seconds = round(time.monotonic() - started, 2)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def add_service_options(parser: argparse.ArgumentParser, seconds: float, connections: int) -> None:
    """The options of a script that drives this service alone on one model (cpu_ab, accept_balance)."""
    parser.add_argument("--seconds", type=float, default=seconds)
    parser.add_argument("--connections", type=int, default=connections)
    parser.add_argument("--model", default="mnist-vae")
    parser.add_argument("--version", default="1")
    parser.add_argument("--models-dir", type=Path, default=ROOT / "models")
    parser.add_argument("--output-dir", type=Path, default=ROOT / "benchmarks" / "results")


def service_server(args: argparse.Namespace, env: dict[str, str], log_path: Path,
                   cwd: Path = ROOT) -> RunningServer:
    """The benchmark's vae-serve configuration on args' model, with `env` on top (not started)."""
    spec = server_specs(args.model, args.version, args.models_dir / args.model / args.version, "cpu", {})[
        "vae-serve"]
    return RunningServer(replace(spec, env={**spec.env, **env}), log_path, cwd=cwd)
