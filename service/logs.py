"""Logging: the request id of the current request on every line, as text or one JSON object per line;
the lines an event loop's turn produces written together."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import TextIO

# Set by the request middleware; "-" outside a request (start-up, batch workers).
request_id_var: ContextVar[str] = ContextVar("request_id", default="-")


class RequestIdFilter(logging.Filter):
    """Attach the current request id to every record, whichever logger made it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers; extra fields passed with `extra=` are kept."""

    _STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "request_id"}

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in record.__dict__.items() if k not in self._STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TurnStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that writes the INFO and DEBUG lines of one turn of an event loop at its end,
    in one write() system call, instead of one call per line.

    Every request adds an access-log line; written one by one they were a system call per request
    (3.5 % of the py-spy samples of a worker serving 1-image encodes, docs/benchmarks.md). The lines
    are held only on a thread running an event loop and only until the loop's current turn ends (a
    call_soon), so a line is never later than the callbacks already queued before it, and never more
    than MAX_HELD of them. WARNING and above are written at once, after the lines held before them (a
    crash right after an error loses no error line); other threads write at once too. What a process
    still holds when it exits goes out with flush(), which logging.shutdown() calls at interpreter
    exit and flush_logs() in forked children.
    """

    MAX_HELD = 1000

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._held: list[str] = []  # formatted lines with their terminators, oldest first
        # The loop whose turn's end will write them: another loop (a test's, after the first one was
        # closed with lines held) schedules a write of its own.
        self._flush_on: asyncio.AbstractEventLoop | None = None

    def emit(self, record: logging.LogRecord) -> None:  # called with self.lock held (Handler.handle)
        try:
            line = self.format(record) + self.terminator
        except Exception:  # what logging.StreamHandler does: report, never raise into the caller
            self.handleError(record)
            return
        if record.levelno < logging.WARNING:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop on this thread: write at once
                pass
            else:
                self._held.append(line)
                if len(self._held) >= self.MAX_HELD:
                    self.flush()
                elif self._flush_on is not loop:
                    self._flush_on = loop
                    loop.call_soon(self.flush)
                return
        self._held.append(line)
        self.flush()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]  # an RLock: emit holds it already when it calls this
            self._flush_on = None
            try:
                if self._held:
                    text = "".join(self._held)
                    self._held.clear()
                    self.stream.write(text)
                self.stream.flush()
            except Exception:  # a closed or broken stream must not break the loop's callbacks
                self._held.clear()


def flush_logs() -> None:
    """Write what the handlers still hold: the last thing a forked child does (it exits without
    running logging's exit hook)."""
    for handler in logging.getLogger().handlers:
        handler.flush()


def configure_logging(level: str, json_logs: bool) -> None:
    """Route every logger (ours and uvicorn's) through one stderr handler with request ids."""
    handler = TurnStreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    if json_logs:
        handler.setFormatter(JsonFormatter())
    else:
        text = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
        handler.setFormatter(logging.Formatter(text))
    # No format here shows the caller's file and line, thread, process or task, so the record need not
    # look them up (the logging HOWTO's "Optimization" switches; the process id is a system call):
    # 10.8-12.6 vs 14.3 us per access-log line (benchmarks/log_line_cost.py).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging.logAsyncioTasks = False  # Python 3.12+ (an unused attribute before)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
