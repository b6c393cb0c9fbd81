"""How the processes of the service signal each other: one definition for the supervisor and its children.

Semantics (as gunicorn's and nginx's master/worker pairs): the supervisor alone orchestrates shutdown.
SIGTERM or SIGINT may reach it, any child, or the whole process group (systemd's default
`KillMode=control-group`, `kill -TERM -- -PGID`, Ctrl-C in a terminal); every way drains exactly as
SIGTERM to the supervisor does:

- a child that gets SIGTERM or SIGINT does not act on it: it asks the supervisor (STOP_REQUEST), which
  counts all the copies of one group-wide signal as one;
- the supervisor then tells each HTTP worker to drain (DRAIN, with the drain mode in shared memory:
  keep answering 503 for VAE_DRAIN_DELAY_S first, or close at once), waits for the workers, and only
  then stops the inference process (DRAIN), so work in flight finishes;
- a second SIGTERM or SIGINT to the supervisor (or the group) hurries: the workers skip the delay;
- a child whose supervisor dies is killed by the kernel (PR_SET_PDEATHSIG, supervisor.py).

SIGHUP (RESCAN) to the supervisor is passed to whoever runs the models (the inference process, or with
engines per worker every HTTP worker), which loads new model versions beside the running ones and
retires removed ones (engine/registry.py, engine/local.py); HTTP workers of a shared engine ignore it.
"""

from __future__ import annotations

import contextlib
import os
import signal
from multiprocessing.sharedctypes import Synchronized
from types import FrameType

SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT)
DRAIN = signal.SIGUSR1  # supervisor -> child: drain (HTTP worker) or stop (inference process)
STOP_REQUEST = signal.SIGUSR2  # child -> supervisor: a shutdown signal reached me
RESCAN = signal.SIGHUP  # anyone -> supervisor -> inference process: load new model versions, retire gone ones

# The drain mode the supervisor writes before sending DRAIN.
DRAIN_WITH_DELAY = 1  # a first SIGTERM: answer 503 for VAE_DRAIN_DELAY_S so load balancers notice
DRAIN_NOW = 2  # SIGINT, or a second signal: close the port at once, still finish what is in flight


class Supervision:
    """What a child knows of its supervisor: its pid and the shared drain mode."""

    def __init__(self, supervisor_pid: int, drain_mode: Synchronized) -> None:
        self.supervisor_pid = supervisor_pid
        self.drain_mode = drain_mode

    def request_stop(self, sig: int | None = None, frame: FrameType | None = None) -> None:
        """Signal handler of a child for SIGTERM and SIGINT: leave the decision to the supervisor."""
        if os.getppid() == self.supervisor_pid:  # else it is gone and PR_SET_PDEATHSIG ends us
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.supervisor_pid, STOP_REQUEST)

    def forward_shutdown_signals(self) -> None:
        for sig in SHUTDOWN_SIGNALS:
            signal.signal(sig, self.request_stop)
        # SIGHUP (rescan the models) is for whoever runs the models (engine/local.py installs its handler);
        # its default action would end an HTTP worker of a shared engine that gets the group's copy.
        signal.signal(RESCAN, signal.SIG_IGN)
        # Told to drain before it serves (still importing or loading): nothing in flight, leave at once.
        # Each child replaces this with its drain once it serves (api/worker.py, engine/server.py).
        signal.signal(DRAIN, lambda sig, frame: os._exit(0))

    def drains_now(self) -> bool:
        return self.drain_mode.value == DRAIN_NOW


# Set in each child right after fork (supervisor._child); None in the supervisor and in single-process
# mode, where SIGTERM and SIGINT act directly.
current: Supervision | None = None
