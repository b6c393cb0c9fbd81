"""The process tree of `python -m service`: a supervisor, N HTTP workers and, with a shared engine, one
inference process.

    supervisor (this module): binds the port, starts and watches the children, restarts crashed ones,
        and orchestrates shutdown. It does no request work.
    HTTP workers (api/worker.py): accept connections (each on its own socket of the port, or on one
        socket they share: VAE_REUSE_PORT) and do everything per
        request (HTTP, parsing, image decoding, validation, serialisation); with a shared engine they
        call it through a RemoteEngine, per worker (VAE_ENGINE_PLACEMENT, the default on the CPU) each
        loads the models and batches its own requests (a LocalEngine in its own event loop).
    inference process (engine/server.py; shared engine only): owns the runtime sessions and the
        batchers of the device, so rows from every worker share batches.

Failures:
- an HTTP worker dies: its connections are lost (as with any crashed server; with a listening socket
  per worker, also the connections the kernel had queued for it but it had not yet accepted), the
  others keep serving, and a new worker takes its place on the same port.
- the inference process dies: every worker notices the disconnect at once, answers its requests in
  flight 503 and reports not ready (/readyz 503); a new inference process is started, and the
  workers become ready again when it has loaded and warmed up its models.
- the inference process fails before it was ever ready (a refused model, VAE_ON_BAD_MODEL=fail), or
  with engines per worker a worker exits before any worker was ever ready: start-up fails with exit
  status 3.
Shutdown (SIGTERM or Ctrl-C to the supervisor, to any child or to the whole process group; see
service/signals.py): the workers drain (see api/worker.py), then the inference process is stopped, then
the supervisor exits 0.

Children are forked (not spawned): they start in milliseconds with the supervisor's imports, and a
test harness that patches the runtime before calling main() patches the children too. The supervisor
itself stays single-threaded so forking is safe.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable
from multiprocessing.context import ForkProcess
from pathlib import Path
from types import FrameType

from prometheus_client import multiprocess

from service import signals
from service.config import Settings
from service.engine.interface import WorkerSlot
from service.logs import flush_logs
from service.metrics import enable_multiprocess

log = logging.getLogger("service.supervisor")
RUNTIME_PREFIX = "vae-serve-"  # the supervisor's runtime directories, in the temporary directory
RUNTIME_OWNER = "supervisor"  # "<host> <pid>" of the supervisor that made the directory
RESTART_BACKOFF_S = (0.1, 0.5, 1.0, 2.0, 5.0, 10.0)  # repeated crashes wait longer, up to 10 s
PR_SET_PDEATHSIG = 1  # prctl option: the signal a child gets when its parent dies


def bind_socket(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """The supervisor's socket on the service's address.

    Shared (reuse_port False): a listening socket every worker accepts from. Per worker (True): a
    socket bound with SO_REUSEPORT that never listens: it holds the port (and gives port 0 its number),
    while each worker listens on a socket of its own (worker_socket) and the kernel spreads new
    connections over the listening ones.
    """
    sock = _tcp_socket(socket.AF_INET6 if ":" in host else socket.AF_INET, reuse_port)
    sock.bind((host, port))
    if not reuse_port:
        sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def worker_socket(reserved: socket.socket) -> socket.socket:
    """An HTTP worker's own socket on the supervisor's address (SO_REUSEPORT), bound but not listening
    yet: the server listens once the worker's start-up (loading the models) is done, so the kernel
    gives a worker that is still starting, or restarting after a crash, no connections."""
    sock = _tcp_socket(reserved.family, reuse_port=True)
    sock.bind(reserved.getsockname())
    return sock


def _tcp_socket(family: socket.AddressFamily, reuse_port: bool) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    return sock


def make_runtime_dir() -> Path:
    """A new private directory (mode 0700: the IPC socket is private) for this supervisor's IPC socket
    and metrics files, labelled with its host and pid; the directories of killed supervisors go first.

    A supervisor removes its directory when it exits, but one killed with SIGKILL (or by the OOM
    killer) cannot, and each start would leave another behind (~150 KB of metrics files each).
    """
    removed = remove_stale_runtime_dirs()
    if removed:
        log.info("removed %d runtime director%s of supervisors that were killed: %s", len(removed),
                 "y" if len(removed) == 1 else "ies", ", ".join(str(p) for p in removed))
    path = Path(tempfile.mkdtemp(prefix=RUNTIME_PREFIX))
    (path / RUNTIME_OWNER).write_text(f"{socket.gethostname()} {os.getpid()}\n")
    return path


def remove_stale_runtime_dirs(root: Path | None = None) -> list[Path]:
    """Remove the runtime directories under `root` (the temporary directory) whose supervisor is gone:
    only this user's, labelled by a supervisor of this host (a /tmp shared between containers has
    other hosts' pids) whose pid no longer exists. Unlabelled or unreadable ones are left alone."""
    removed = []
    for path in sorted(Path(root or tempfile.gettempdir()).glob(RUNTIME_PREFIX + "*")):
        try:
            if path.stat().st_uid != os.getuid():
                continue
            host, pid = (path / RUNTIME_OWNER).read_text().split()
            if host != socket.gethostname() or _process_exists(int(pid)):
                continue
        except (OSError, ValueError):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process holds that pid now
        return True
    return True


def _child(target: Callable[..., None], supervision: signals.Supervision, *args: object) -> None:
    """Entry point of every forked child: it dies with the supervisor, however the supervisor dies, and
    leaves shutdown signals to it (service/signals.py).

    Without this a supervisor killed with SIGKILL (or by the OOM killer) leaves its workers holding
    the port and its inference process holding the models, with nobody to stop them (Linux only).
    """
    signals.current = supervision
    supervision.forward_shutdown_signals()  # before anything slow: a group signal may come at any time
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != supervision.supervisor_pid:  # it died before prctl took effect
        os._exit(1)
    try:
        target(*args)
    finally:
        flush_logs()  # a forked child ends in os._exit: logging's exit hook does not run


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.ctx = multiprocessing.get_context("fork")
        self.workers: dict[int, ForkProcess] = {}
        # One byte per worker: 1 when that worker is connected to the engine (readiness of the whole).
        self.ready_flags = self.ctx.Array("b", max(1, settings.worker_processes), lock=False)
        self.engine: ForkProcess | None = None
        self.engine_ready = self.ctx.Event()
        self.engine_ever_ready = False
        self.per_worker = settings.engine_per_worker  # no inference process: each worker runs the models
        self.workers_ever_ready = False
        self.signals_received = 0  # SIGTERM and SIGINT delivered to the supervisor itself
        self.child_asked = False  # a child got a shutdown signal (signals.STOP_REQUEST)
        self.drain_mode = self.ctx.Value("i", 0, lock=False)  # read by the children on signals.DRAIN
        self._crashes: dict[str, int] = {}  # role -> consecutive crashes, for the restart backoff
        self._forwarded = 0  # the stop level last forwarded to the workers
        self._drain_deadline: float | None = None

    @property
    def stop_requested(self) -> int:
        """0: serving; 1: draining; 2 or more: hurrying. The copies of one group-wide signal that the
        children pass on (STOP_REQUEST) count once, whichever arrives first."""
        return max(self.signals_received, int(self.child_asked))

    # -- lifecycle ---------------------------------------------------------------------------------------
    def run(self) -> int:
        runtime_dir = make_runtime_dir()
        metrics_dir = runtime_dir / "metrics"
        metrics_dir.mkdir()
        self.metrics_dir = str(metrics_dir)
        self.endpoint: str | None = None if self.per_worker else f"ipc://{runtime_dir}/engine.sock"
        enable_multiprocess(self.metrics_dir)
        try:
            self.sock = bind_socket(self.settings.host, self.settings.port, self.settings.listen_per_worker)
        except OSError as exc:
            log.error("cannot listen on %s:%d: %s", self.settings.host, self.settings.port, exc)
            shutil.rmtree(runtime_dir, ignore_errors=True)
            return 2
        for sig in signals.SHUTDOWN_SIGNALS:
            signal.signal(sig, self._on_signal)
        signal.signal(signals.STOP_REQUEST, self._on_stop_request)
        signal.signal(signals.RESCAN, self._on_rescan)
        try:
            if not self.per_worker:
                self._start_engine()
            for index in range(self.settings.worker_processes):
                self._start_worker(index)
            host, port = self.sock.getsockname()[:2]
            log.info("listening on http://%s:%d: %d HTTP worker(s), %s", host, port, len(self.workers),
                     "each running the models itself" if self.per_worker else "one inference process")
            return self._supervise()
        finally:
            self._kill_all()
            self.sock.close()
            shutil.rmtree(runtime_dir, ignore_errors=True)

    def _supervise(self) -> int:
        while True:
            sentinels = [p.sentinel for p in self.workers.values()]
            if self.engine is not None:
                sentinels.append(self.engine.sentinel)
            multiprocessing.connection.wait(sentinels, timeout=0.2)
            if self.engine_ready.is_set():
                self.engine_ever_ready = True
                self._crashes.pop("engine", None)
            if any(self.ready_flags[:]):
                self.workers_ever_ready = True
            if self.stop_requested:
                status = self._drain_step()
                if status is not None:
                    return status
                continue
            if self.engine is not None and not self.engine.is_alive():
                if not self.engine_ever_ready:
                    log.error("the inference process could not start (exit status %s); stopping",
                              self.engine.exitcode)
                    return 3
                self._reap(self.engine, "inference process")
                self._start_engine(restart=True)
            for index, proc in list(self.workers.items()):
                if not proc.is_alive():
                    self.ready_flags[index] = 0
                    if self.per_worker and not self.workers_ever_ready:
                        log.error("HTTP worker %d could not start (exit status %s; it loads the models "
                                  "itself); stopping", index, proc.exitcode)
                        return 3
                    self._reap(proc, f"HTTP worker {index}")
                    self._start_worker(index, restart=True)

    def _drain_step(self) -> int | None:
        """While stopping: forward signals to the workers; once they are gone stop the engine; 0 when done."""
        self._forward_stop()
        assert self._drain_deadline is not None
        if any(p.is_alive() for p in self.workers.values()):
            if time.monotonic() < self._drain_deadline:
                return None
            log.error("HTTP workers did not finish draining in time; killing them")
        if self.engine is not None and self.engine.is_alive() and self.engine.pid is not None:
            os.kill(self.engine.pid, signals.DRAIN)
            self.engine.join(10.0)
        log.info("stopped")
        return 0

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        before = self.stop_requested
        self.signals_received += 1
        if before == 0:
            log.info("signal %d: draining the HTTP workers, then stopping the inference process", sig)
        # A first SIGTERM keeps answering 503 for the drain delay; Ctrl-C or a second signal closes at once.
        hurry = sig != signal.SIGTERM or self.stop_requested > 1
        self._forward_stop(signals.DRAIN_NOW if hurry else signals.DRAIN_WITH_DELAY)

    def _on_stop_request(self, sig: int, frame: FrameType | None) -> None:
        """A child got SIGTERM or SIGINT (alone, or as part of the process group): drain as for SIGTERM."""
        if self.stop_requested == 0:
            log.info("a child received a shutdown signal: draining the HTTP workers, then stopping the "
                     "inference process")
        self.child_asked = True
        self._forward_stop(signals.DRAIN_WITH_DELAY)

    def _on_rescan(self, sig: int, frame: FrameType | None) -> None:
        """SIGHUP: whoever runs the models (the inference process, or every worker) looks for new and
        removed model versions (engine/registry.py)."""
        runners = list(self.workers.values()) if self.per_worker else [self.engine]
        log.info("signal %d: rescanning the models directory", sig)
        for proc in runners:
            if proc is not None and proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signals.RESCAN)

    def _forward_stop(self, mode: int | None = None) -> None:
        """Tell every live worker to drain, once per stop level (at once, so /readyz turns 503 within
        milliseconds); a higher level (a second signal) hurries them."""
        if self._forwarded >= self.stop_requested:
            return
        self._forwarded = self.stop_requested
        if mode is not None:
            self.drain_mode.value = mode  # before the signal: the workers read it in their handler
        for proc in self.workers.values():
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signals.DRAIN)
        if self._drain_deadline is None:
            self._drain_deadline = time.monotonic() + self.settings.drain_delay_s + \
                self.settings.drain_timeout_s + 10.0

    # -- children ------------------------------------------------------------------------------------------
    def _start_engine(self, restart: bool = False) -> None:
        from service.engine.server import run as run_engine

        if restart:
            self._backoff("engine")
        self.engine_ready.clear()
        self.engine = self.ctx.Process(target=_child, name="vae-inference",
                                       args=(run_engine, self._supervision(), self.settings, self.endpoint,
                                             self.engine_ready))
        self.engine.start()
        log.info("inference process started (pid %s)", self.engine.pid)

    def _start_worker(self, index: int, restart: bool = False) -> None:
        from service.api.worker import run_worker

        if restart:
            self._backoff(f"worker-{index}")
        self.ready_flags[index] = 0
        proc = self.ctx.Process(target=_child, name=f"vae-http-{index}",
                                args=(run_worker, self._supervision(), self.settings, self.sock,
                                      self.endpoint, self.metrics_dir, WorkerSlot(index, self.ready_flags)))
        proc.start()
        self.workers[index] = proc
        log.info("HTTP worker %d started (pid %s)", index, proc.pid)

    def _supervision(self) -> signals.Supervision:
        return signals.Supervision(os.getpid(), self.drain_mode)

    def _backoff(self, role: str) -> None:
        crashes = self._crashes.get(role, 0)
        self._crashes[role] = crashes + 1
        time.sleep(RESTART_BACKOFF_S[min(crashes, len(RESTART_BACKOFF_S) - 1)])

    def _reap(self, proc: ForkProcess, role: str) -> None:
        proc.join(0)
        code = proc.exitcode
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit status {code}"
        log.error("%s (pid %s) died (%s); restarting it", role, proc.pid, how)
        if proc.pid is not None:
            multiprocess.mark_process_dead(proc.pid, self.metrics_dir)

    def _kill_all(self) -> None:
        procs = [*self.workers.values(), *([self.engine] if self.engine is not None else [])]
        for proc in procs:
            if proc.is_alive():
                proc.kill()
        for proc in procs:
            proc.join(5.0)
