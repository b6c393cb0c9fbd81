"""Dynamic batching: a bounded row queue per (model, graph) and one execution thread per device.

The batcher knows nothing of HTTP or models. A caller submits a dict of arrays whose first dimension
is rows; the batcher groups rows of many callers into batches of at most `max_batch_rows`, waiting
at most `max_delay_s` for company (Triton's max_queue_delay), runs each batch on its device's single
thread, and hands every caller its own rows back. A submission larger than a batch is split over
several batches; one smaller than the space left in a batch shares it with others.

Invariants:
- `queued_rows` counts rows waiting in the queue (not yet handed to a batch); it is the admission
  bound, checked before anything is queued, so overload is rejected at once (QueueFull).
- a caller that stops waiting (deadline, client gone) cancels its future; its rows still queued
  are dropped at once, and the outputs of rows already running are discarded.
- a batch that raises fails exactly the submissions with rows in it; the loop goes on.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np

from service.logs import request_id_var

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]  # name -> (rows, ...)
RunFn = Callable[[Arrays], Arrays]
T = TypeVar("T")


class QueueFull(Exception):
    """Admitting these rows would exceed the queue bound; retry after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(Exception):
    """The submission was not finished before its deadline; its remaining work was dropped."""


class BatchFailed(Exception):
    """The batch holding (some of) these rows raised in the runtime."""


class BatcherClosed(Exception):
    """The batcher is stopping or stopped (service shutdown)."""


class BatchObserver(Protocol):
    """Where the batcher reports what it does (Prometheus in the service, nothing in unit tests)."""

    def queue_wait(self, seconds: float) -> None: ...
    def batch(self, rows: int, seconds: float) -> None: ...
    def depth(self, rows: int) -> None: ...
    def failure(self) -> None: ...
    def rejected(self, reason: str) -> None: ...


class NullObserver:
    def queue_wait(self, seconds: float) -> None: ...
    def batch(self, rows: int, seconds: float) -> None: ...
    def depth(self, rows: int) -> None: ...
    def failure(self) -> None: ...
    def rejected(self, reason: str) -> None: ...


class DeviceWorker:
    """The single execution thread of one device, shared by every model and graph placed on it.

    One thread means batches never compete for the device (or for CPU cores with each other), and
    the event loop never blocks on inference.
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"vae-{device}")

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


@dataclass(eq=False)
class _Submission:
    inputs: Arrays
    rows: int
    future: asyncio.Future[Arrays]
    enqueued_at: float
    request_id: str = "-"  # for the logs of the device thread and the batch loop
    taken: int = 0  # rows handed to batches so far
    finished: int = 0  # rows whose outputs came back
    parts: list[Arrays] = field(default_factory=list)


# (submission, first row, end row) of one slice of a batch
_Slice = tuple[_Submission, int, int]


class Batcher:
    """Queue + batch-forming loop for one graph of one model; see the module docstring."""

    def __init__(self, *, run: RunFn, worker: DeviceWorker, max_batch_rows: int, max_queue_rows: int,
                 max_delay_s: float, observer: BatchObserver | None = None, name: str = "batcher") -> None:
        assert max_batch_rows >= 1 and max_queue_rows >= 1, "batch and queue sizes must be positive"
        self.name = name
        self.max_batch_rows = max_batch_rows
        self.max_queue_rows = max_queue_rows
        self.max_delay_s = max_delay_s
        self._run = run
        self._worker = worker
        self._observer = observer or NullObserver()
        self._queue: collections.deque[_Submission] = collections.deque()
        self._queued_rows = 0
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._seconds_per_batch = 0.01  # running mean, for Retry-After

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=f"batcher {self.name}")

    async def stop(self) -> None:
        """Stop forming batches; every submission still waiting fails with BatcherClosed."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while self._queue:
            self._fail(self._queue.popleft(), BatcherClosed(f"{self.name} is shutting down"))
        self._queued_rows = 0
        self._observer.depth(0)

    def check_capacity(self, rows: int) -> None:
        """Raise (BatcherClosed or QueueFull) if a submission of `rows` rows would be refused now."""
        if self._closed:
            raise BatcherClosed(f"{self.name} is shutting down")
        if self._queued_rows + rows > self.max_queue_rows:
            self._observer.rejected("queue_full")
            raise QueueFull(f"{self.name}: {self._queued_rows} rows queued, {rows} more would exceed the "
                            f"limit of {self.max_queue_rows}", self._retry_after())

    async def submit(self, inputs: Arrays, deadline: float) -> Arrays:
        """Queue `inputs` (each (rows, ...)) and wait for the outputs of exactly these rows, in order.

        deadline: `time.monotonic()` value after which DeadlineExceeded is raised and the rest dropped.
        """
        rows = {len(a) for a in inputs.values()}
        assert len(rows) == 1, f"all inputs of a submission need the same number of rows, got {rows}"
        n = rows.pop()
        assert n >= 1, "a submission needs at least one row"
        self.check_capacity(n)
        submission = _Submission(inputs, n, asyncio.get_running_loop().create_future(), time.monotonic(),
                                 request_id_var.get())
        self._queue.append(submission)
        self._queued_rows += n
        self._observer.depth(self._queued_rows)
        self._wakeup.set()
        try:
            # wait_for cancels the future on timeout and when this task is cancelled (client gone).
            return await asyncio.wait_for(submission.future, max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            self._observer.rejected("deadline")
            raise DeadlineExceeded(f"{self.name}: not finished before the request deadline") from None
        finally:
            if submission.future.cancelled():
                self._drop(submission)

    # -- the loop --------------------------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            await self._gather()
            batch = self._take()
            if batch:
                await self._execute(batch)

    async def _gather(self) -> None:
        """Return when a full batch is queued, or when the oldest queued row has waited max_delay_s."""
        while True:
            while not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            if self._queued_rows >= self.max_batch_rows:
                return
            remaining = self._queue[0].enqueued_at + self.max_delay_s - time.monotonic()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    def _take(self) -> list[_Slice]:
        """Pop up to max_batch_rows rows in FIFO order, splitting a submission where the batch ends."""
        batch: list[_Slice] = []
        rows = 0
        now = time.monotonic()
        while self._queue and rows < self.max_batch_rows:
            sub = self._queue[0]
            if sub.future.done():  # cancelled or failed while queued
                self._drop(sub)
                continue
            if sub.taken == 0:
                self._observer.queue_wait(now - sub.enqueued_at)
            n = min(sub.rows - sub.taken, self.max_batch_rows - rows)
            batch.append((sub, sub.taken, sub.taken + n))
            sub.taken += n
            rows += n
            self._queued_rows -= n
            if sub.taken == sub.rows:
                self._queue.popleft()
        self._observer.depth(self._queued_rows)
        return batch

    async def _execute(self, batch: list[_Slice]) -> None:
        rows = sum(end - start for _, start, end in batch)
        try:
            slices = [(sub.inputs, start, end) for sub, start, end in batch]
            outputs, seconds = await self._worker.call(self._run_batch, slices)
            bad = {k: v.shape for k, v in outputs.items() if len(v) != rows}
            if bad:
                raise BatchFailed(f"runtime returned {bad} for a batch of {rows} rows")
        except asyncio.CancelledError:
            for sub, _, _ in batch:
                self._fail(sub, BatcherClosed(f"{self.name} is shutting down"))
            raise
        except Exception as exc:
            # Logged with the ids of every request in the batch, so each caller's error can be traced.
            ids = ",".join(sorted({sub.request_id for sub, _, _ in batch}))
            log.error("batch of %d rows failed in %s: %s: %s", rows, self.name, type(exc).__name__, exc,
                      exc_info=not isinstance(exc, BatchFailed), extra={"request_id": ids})
            self._observer.failure()
            for sub, _, _ in batch:
                self._fail(sub, BatchFailed(f"inference failed in {self.name}: {type(exc).__name__}"))
            return
        self._observer.batch(rows, seconds)
        self._seconds_per_batch = 0.9 * self._seconds_per_batch + 0.1 * seconds
        offset = 0
        for sub, start, end in batch:
            n = end - start
            part = {k: v[offset:offset + n] for k, v in outputs.items()}
            offset += n
            if sub.future.done():
                continue  # the caller left; drop its outputs
            sub.parts.append(part)
            sub.finished += n
            if sub.finished == sub.rows:
                sub.future.set_result(part if len(sub.parts) == 1 else
                                      {k: np.concatenate([p[k] for p in sub.parts]) for k in part})

    def _run_batch(self, slices: list[tuple[Arrays, int, int]]) -> tuple[Arrays, float]:
        """Runs on the device thread: stack the slices into one batch, run it, time it."""
        names = slices[0][0].keys()
        feeds = {k: np.concatenate([inputs[k][a:b] for inputs, a, b in slices]) for k in names}
        started = time.perf_counter()
        outputs = self._run(feeds)
        return outputs, time.perf_counter() - started

    # -- bookkeeping ----------------------------------------------------------------------------------
    def _drop(self, sub: _Submission) -> None:
        """Forget the rows of `sub` that are still queued (it was cancelled or failed)."""
        if sub.taken < sub.rows:
            self._queued_rows -= sub.rows - sub.taken
            sub.taken = sub.rows
            with contextlib.suppress(ValueError):
                self._queue.remove(sub)
            self._observer.depth(self._queued_rows)

    def _fail(self, sub: _Submission, exc: Exception) -> None:
        self._drop(sub)
        if not sub.future.done():
            sub.future.set_exception(exc)

    def _retry_after(self) -> int:
        """Seconds until the queue has drained at the recent batch rate (at least 1)."""
        batches = self._queued_rows / self.max_batch_rows
        return max(1, min(60, math.ceil(batches * self._seconds_per_batch)))
