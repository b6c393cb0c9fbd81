"""Dynamic batching: a bounded row queue per (model, graph) and one execution thread per device.

The batcher knows nothing of HTTP or models. A caller submits a dict of arrays whose first dimension
is rows; the batcher groups rows of many callers into batches of at most `max_batch_rows`, waiting
at most `max_delay_s` for company (Triton's max_queue_delay), runs each batch on its device's single
thread, and hands every caller its own rows back. A submission larger than a batch is split over
several batches; one smaller than the space left in a batch shares it with others.

Scheduling between graphs on one device (why cheap work is not starved by expensive work):
- each batcher has at most one batch on its device at a time, and the device thread takes batches
  in arrival order, so busy batchers take turns: round-robin by batch;
- a batcher with a time slice (`max_batch_seconds`, used for log_weights) caps its batches at the
  rows that fit in the slice at its measured cost per row, so an encode batch never waits behind
  more than one slice of log-likelihood work, however large the log-likelihood requests are;
- with several execution threads a time-sliced batcher leaves one of them to cheap work: while a
  request with no time-sliced work (an encode, a decode, a reconstruct...) is in flight on the device
  or ended less than LENDING_IDLE_S ago (DeviceExecutor.cheap_request). With none, it takes that
  thread too: a worker holding every connection of a log-likelihood or anomaly-score load would
  otherwise leave a core idle (the encoder and decoder batches of an anomaly score belong to requests
  that wait for their log-weights slices anyway, so they do not hold the thread back).

Admission (all checked before anything is queued, so overload is answered at once):
- `queued_rows` is bounded by `max_queue_rows` (QueueFull);
- deadline-aware: from the measured seconds per row of this batcher and of the other busy batchers
  on the device, the time until a new submission would finish is estimated; if it exceeds the
  admission share of the time left before the request's deadline, QueueFull with a Retry-After from
  the estimate; if the submission alone could never finish in time, TooExpensive.

Invariants:
- `queued_rows` counts rows waiting in the queue (not yet handed to a batch).
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
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np

from service.engine.interface import (
    Arrays,
    BatchFailed,
    DeadlineExceeded,
    QueueFull,
    TooExpensive,
)
from service.engine.interface import EngineClosed as BatcherClosed
from service.logs import request_id_var

log = logging.getLogger(__name__)

RunFn = Callable[[Arrays], Arrays]
# A time-sliced batcher takes the execution thread it leaves to cheap work only once no cheap request
# has been in flight for this long: a steady stream of cheap requests has moments with none in flight,
# and a slice started in such a moment would make the next cheap batch wait for it.
LENDING_IDLE_S = 1.0
T = TypeVar("T")
__all__ = ["Arrays", "BatchFailed", "Batcher", "BatcherClosed", "DeadlineExceeded", "DeviceExecutor",
           "QueueFull", "TooExpensive"]


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


class DeviceExecutor:
    """The execution threads of one device, shared by every model and graph placed on it.

    `instances` threads (Triton's instance count, VAE_DEVICE_INSTANCES): 1 by default, so the device
    always sees the largest batches the queue could form; on a CPU with idle cores several instances,
    each with one intra-op thread, work on different batches instead of synchronising inside one.
    The event loop never blocks on inference.
    """

    def __init__(self, device: str, instances: int = 1) -> None:
        assert instances >= 1, "a device needs at least one execution thread"
        self.device = device
        self.instances = instances
        self._executor = ThreadPoolExecutor(max_workers=instances, thread_name_prefix=f"vae-{device}")
        self.batchers: list[Batcher] = []  # every batcher on this device, for the admission estimate
        # A batcher takes its rows only once it holds a turn, and waiters get turns in arrival order:
        # graphs alternate batch by batch, and rows that arrive while the device is busy still join
        # the next batch (taking rows early and then waiting behind a long batch would leave them out).
        self.turns = asyncio.Semaphore(instances)
        self._cheap_in_flight = 0  # requests with no time-sliced work, in flight on this device
        self._cheap_ended = -math.inf  # time.monotonic() when the last of them ended

    @contextlib.contextmanager
    def cheap_request(self) -> Iterator[None]:
        """Around a request with no time-sliced work: while it runs (and LENDING_IDLE_S after), time-sliced
        batchers leave it an execution thread (Batcher.parallelism)."""
        self._cheap_in_flight += 1
        try:
            yield
        finally:
            self._cheap_in_flight -= 1
            self._cheap_ended = time.monotonic()

    def cheap_work_recent(self) -> bool:
        return self._cheap_in_flight > 0 or time.monotonic() - self._cheap_ended < LENDING_IDLE_S

    def busy_round_s(self, exclude: Batcher) -> float:
        """Device seconds the other busy batchers take per round-robin turn (one batch each)."""
        return sum(b.batch_seconds() for b in self.batchers if b is not exclude and b.busy)

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
    parts: list[tuple[int, Arrays]] = field(default_factory=list)  # (first row, outputs) per batch


# (submission, first row, end row) of one slice of a batch
_Slice = tuple[_Submission, int, int]


class Batcher:
    """Queue + batch-forming loop for one graph of one model; see the module docstring."""

    def __init__(self, *, run: RunFn, worker: DeviceExecutor, max_batch_rows: int, max_queue_rows: int,
                 max_delay_s: float, observer: BatchObserver | None = None, name: str = "batcher",
                 max_batch_seconds: float | None = None, admission_share: float = 1.0) -> None:
        assert max_batch_rows >= 1 and max_queue_rows >= 1, "batch and queue sizes must be positive"
        assert 0.0 < admission_share <= 1.0, "admission_share is a fraction of the time left"
        self.name = name
        self.max_batch_rows = max_batch_rows
        self.max_queue_rows = max_queue_rows
        self.max_delay_s = max_delay_s
        self.max_batch_seconds = max_batch_seconds  # time slice; None = batches of max_batch_rows
        self.admission_share = admission_share  # admit if the estimate fits in this share of the time left
        self._run = run
        self._worker = worker
        worker.batchers.append(self)
        self._observer = observer or NullObserver()
        self._queue: collections.deque[_Submission] = collections.deque()
        self._queued_rows = 0
        self._running_rows = 0  # rows of the batches on the device now
        # Batches of this batcher running at once while cheap requests are about. A time-sliced
        # (expensive) batcher leaves one instance to them when there are several, so cheap work always
        # finds a free one (a flood of log-likelihood work cannot occupy every execution thread); with
        # none about it uses every instance (parallelism).
        self.max_running = worker.instances if max_batch_seconds is None or worker.instances == 1 \
            else worker.instances - 1
        self._running: set[asyncio.Task[None]] = set()
        self._batch_done = asyncio.Event()  # set when one of this batcher's batches finishes
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        # Cost model of one batch of r rows: fixed + r * per_row seconds. Seeded by `calibrate` at
        # warm-up, then a running mean of measured batches (Retry-After and admission use it).
        self._fixed_s = 0.0005
        self._per_row_s = 0.001

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    @property
    def busy(self) -> bool:
        return self._queued_rows > 0 or self._running_rows > 0

    @property
    def seconds_per_row(self) -> float:
        return self._per_row_s

    def calibrate(self, small: tuple[int, float], large: tuple[int, float]) -> None:
        """Seed the cost model from two timed batches (rows, seconds), e.g. the warm-up's 1 and max rows."""
        (r1, s1), (r2, s2) = small, large
        per_row = (s2 - s1) / (r2 - r1) if r2 > r1 else s2 / max(1, r2)
        self._per_row_s = max(per_row, 1e-7)
        self._fixed_s = max(0.0, s1 - r1 * self._per_row_s)

    def batch_rows(self) -> int:
        """Rows per batch now: max_batch_rows, or fewer when a time slice caps them."""
        if self.max_batch_seconds is None:
            return self.max_batch_rows
        fit = int((self.max_batch_seconds - self._fixed_s) / self._per_row_s)
        return max(1, min(self.max_batch_rows, fit))

    def batch_seconds(self, rows: int | None = None) -> float:
        """Estimated device seconds of one batch of `rows` rows (default: a full batch now)."""
        rows = self.batch_rows() if rows is None else rows
        return self._fixed_s + rows * self._per_row_s

    def estimate_s(self, rows: int) -> float:
        """Seconds until `rows` more rows, queued behind the current queue, would have run.

        Batches of this batcher alternate with one batch of every other busy batcher on the device.
        """
        per_batch = self.batch_rows()
        ahead = self._queued_rows + self._running_rows + rows
        rounds = math.ceil(ahead / per_batch / self.parallelism())  # instances run batches side by side
        return rounds * (self.batch_seconds(per_batch) + self._worker.busy_round_s(exclude=self))

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=f"batcher {self.name}")

    async def stop(self) -> None:
        """Stop forming batches; every submission still waiting fails with BatcherClosed."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for task in list(self._running):
            task.cancel()
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
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

    def always_tried(self, rows: int) -> bool:
        """One batch on an idle device is always tried: it is also the measurement that corrects a cost
        estimate inflated by a slow batch (else a bad estimate could refuse work forever)."""
        return not self.busy and rows <= self.batch_rows()

    def too_expensive(self, rows: int, left_s: float) -> float | None:
        """Admission's test of work that could never finish in time: the device seconds `rows` rows need
        alone (whole batches at the current batch size) when that is more than `left_s`, else None.

        check_deadline refuses with it, and the start-up warning counts with it what fits, so the two
        cannot disagree.
        """
        # An idle device tries one batch whatever the estimate says, but not when the deadline leaves less
        # than a one-row batch takes: no batch of this graph finishes that fast (a 0.1 ms deadline).
        if self.always_tried(rows) and left_s >= self.batch_seconds(1):
            return None
        alone = math.ceil(rows / self.batch_rows()) * self.batch_seconds()
        return alone if alone > left_s else None

    def check_deadline(self, rows: int, deadline: float) -> None:
        """Refuse at once work that could not finish before `deadline` (see the module docstring)."""
        left = (deadline - time.monotonic()) * self.admission_share
        if self.always_tried(rows) and left >= self.batch_seconds(1):
            return
        alone = self.too_expensive(rows, left)
        if alone is not None:
            self._observer.rejected("too_expensive")
            raise TooExpensive(f"{self.name}: this request needs about {alone:.1f}s of device time, "
                               f"more than its deadline allows ({left:.1f}s); send fewer images or a "
                               "smaller k")
        expected = self.estimate_s(rows)
        if expected > left:
            self._observer.rejected("deadline_estimate")
            raise QueueFull(f"{self.name}: the queue would finish this request in about {expected:.1f}s, "
                            f"after its deadline ({left:.1f}s left)",
                            max(1, min(60, math.ceil(expected - left))))

    async def submit(self, inputs: Arrays, deadline: float) -> Arrays:
        """Queue `inputs` (each (rows, ...)) and wait for the outputs of exactly these rows, in order.

        deadline: `time.monotonic()` value after which DeadlineExceeded is raised and the rest dropped.
        """
        rows = {len(a) for a in inputs.values()}
        assert len(rows) == 1, f"all inputs of a submission need the same number of rows, got {rows}"
        n = rows.pop()
        assert n >= 1, "a submission needs at least one row"
        self.check_capacity(n)
        self.check_deadline(n, deadline)
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
            while not self._may_start():  # while every instance is busy, rows keep joining the queue
                self._batch_done.clear()
                await self._batch_done.wait()
            await self._worker.turns.acquire()
            batch = self._take()
            if not batch:
                self._worker.turns.release()
                continue
            task = asyncio.create_task(self._execute(batch))
            self._running.add(task)
            task.add_done_callback(self._finished)

    def parallelism(self) -> int:
        """Batches of this batcher that may run at once now: max_running, or every instance of the device
        while no cheap request needs the one a time-sliced batcher leaves (DeviceExecutor.cheap_request).

        Admission's estimate divides by it too: batches side by side on shared cores each take longer,
        and the cost model, which learns from their times, must not count them as one at a time.
        """
        if self.max_running < self._worker.instances and not self._worker.cheap_work_recent():
            return self._worker.instances
        return self.max_running

    def _may_start(self) -> bool:
        # Checked before waiting for a turn, so a batch queued elsewhere gets the next free instance.
        return len(self._running) < self.parallelism()

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._worker.turns.release()
        self._batch_done.set()

    async def _gather(self) -> None:
        """Return when a full batch is queued, or when the oldest queued row has waited max_delay_s."""
        while True:
            while not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            if self._queued_rows >= self.batch_rows():
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
        """Pop up to batch_rows() rows in FIFO order, splitting a submission where the batch ends."""
        batch: list[_Slice] = []
        rows = 0
        limit = self.batch_rows()
        now = time.monotonic()
        while self._queue and rows < limit:
            sub = self._queue[0]
            if sub.future.done():  # cancelled or failed while queued
                self._drop(sub)
                continue
            if sub.taken == 0:
                self._observer.queue_wait(now - sub.enqueued_at)
            n = min(sub.rows - sub.taken, limit - rows)
            batch.append((sub, sub.taken, sub.taken + n))
            sub.taken += n
            rows += n
            self._queued_rows -= n
            if sub.taken == sub.rows:
                self._queue.popleft()
        self._running_rows += rows
        self._observer.depth(self._queued_rows)
        return batch

    async def _execute(self, batch: list[_Slice]) -> None:
        rows = sum(end - start for _, start, end in batch)
        try:
            return await self._execute_rows(batch, rows)
        finally:
            self._running_rows -= rows

    async def _execute_rows(self, batch: list[_Slice], rows: int) -> None:
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
        self._learn(rows, seconds)
        offset = 0
        for sub, start, end in batch:
            n = end - start
            part = {k: v[offset:offset + n] for k, v in outputs.items()}
            offset += n
            if sub.future.done():
                continue  # the caller left; drop its outputs
            sub.parts.append((start, part))
            sub.finished += n
            if sub.finished == sub.rows:  # batches may finish out of order: reassemble by first row
                parts = [p for _, p in sorted(sub.parts, key=lambda item: item[0])]
                sub.future.set_result(parts[0] if len(parts) == 1 else
                                      {k: np.concatenate([p[k] for p in parts]) for k in part})

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

    def _learn(self, rows: int, seconds: float) -> None:
        """Move the per-row cost towards this batch's (a running mean; the fixed part stays)."""
        per_row = max(1e-7, (seconds - self._fixed_s) / rows)
        self._per_row_s = 0.8 * self._per_row_s + 0.2 * per_row

    def _retry_after(self) -> int:
        """Seconds until the queue has drained at the measured rate (at least 1)."""
        return max(1, min(60, math.ceil(self.estimate_s(0))))
