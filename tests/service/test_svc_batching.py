"""The batcher on its own: a real device thread and a fake graph (out = 2 * x), faults injected."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pytest

from service.engine.batching import (
    Arrays,
    Batcher,
    BatcherClosed,
    BatchFailed,
    DeadlineExceeded,
    DeviceExecutor,
    QueueFull,
)


class FakeGraph:
    """out = 2 * x, recording batch sizes; optional delay and one-shot failure."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.batches: list[int] = []
        self.fail_next = False
        self.gate: threading.Event | None = None  # when set, each batch waits for it
        self.entered = 0

    def __call__(self, feeds: Arrays) -> Arrays:
        self.entered += 1
        if self.gate is not None:
            self.gate.wait(5)
        if self.delay:
            time.sleep(self.delay)
        self.batches.append(len(feeds["x"]))
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("injected")
        return {"y": feeds["x"] * 2}


def run(test: Callable[[Batcher, FakeGraph], Awaitable[None]], graph: FakeGraph | None = None,
        **kwargs: Any) -> FakeGraph:
    graph = graph or FakeGraph()
    options = dict(max_batch_rows=8, max_queue_rows=64, max_delay_s=0.02) | kwargs

    async def main() -> None:
        worker = DeviceExecutor("cpu")
        batcher = Batcher(run=graph, worker=worker, name="test", **options)
        batcher.start()
        try:
            await test(batcher, graph)
        finally:
            await batcher.stop()
            worker.close()

    asyncio.run(main())
    return graph


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


def rows(start: int, n: int) -> Arrays:
    return {"x": np.arange(start, start + n, dtype=np.float32)[:, None]}


def later(seconds: float = 5.0) -> float:
    return time.monotonic() + seconds


def test_concurrent_submissions_share_batches_and_get_their_own_rows() -> None:
    async def test(b: Batcher, g: FakeGraph) -> None:
        outs = await asyncio.gather(*(b.submit(rows(10 * i, 3), later()) for i in range(4)))
        for i, out in enumerate(outs):
            np.testing.assert_array_equal(out["y"][:, 0], 2 * np.arange(10 * i, 10 * i + 3))
        assert max(g.batches) == 8 and sum(g.batches) == 12  # 12 rows in batches of at most 8

    run(test)


def test_large_submission_is_split_over_batches() -> None:
    async def test(b: Batcher, g: FakeGraph) -> None:
        out = await b.submit(rows(0, 21), later())
        np.testing.assert_array_equal(out["y"][:, 0], 2 * np.arange(21))
        assert g.batches == [8, 8, 5]

    run(test)


def test_lone_request_waits_at_most_the_queue_delay() -> None:
    async def test(b: Batcher, g: FakeGraph) -> None:
        started = time.monotonic()
        await b.submit(rows(0, 1), later())
        assert time.monotonic() - started < 0.5

    run(test, max_delay_s=0.05)


def test_full_queue_rejects_at_once_with_retry_after() -> None:
    async def test(b: Batcher, g: FakeGraph) -> None:
        g.gate = threading.Event()  # hold the first batch on the device
        first = asyncio.ensure_future(b.submit(rows(0, 8), later()))
        await until(lambda: g.entered == 1)  # the first batch is now running; the queue is empty
        queued = asyncio.ensure_future(b.submit(rows(0, 10), later()))
        await asyncio.sleep(0)
        assert b.queued_rows == 10
        with pytest.raises(QueueFull) as info:
            await b.submit(rows(0, 3), later())
        assert info.value.retry_after_s >= 1
        g.gate.set()
        await asyncio.gather(first, queued)
        assert b.queued_rows == 0

    run(test, max_queue_rows=12)


def test_deadline_drops_the_remaining_rows() -> None:
    async def test(b: Batcher, g: FakeGraph) -> None:
        with pytest.raises(DeadlineExceeded):
            await b.submit(rows(0, 40), later(0.15))  # 5 batches of 0.1 s: cannot finish in time
        assert b.queued_rows == 0
        await asyncio.sleep(0.25)
        assert sum(g.batches) < 40  # the rest was never computed
        out = await b.submit(rows(0, 2), later())  # and the batcher still serves
        np.testing.assert_array_equal(out["y"][:, 0], [0, 2])

    run(test, FakeGraph(delay=0.1))


def test_cancelled_submission_leaves_no_rows_behind() -> None:
    async def test(b: Batcher, g: FakeGraph) -> None:
        g.gate = threading.Event()
        blocker = asyncio.ensure_future(b.submit(rows(0, 8), later()))
        await until(lambda: g.entered == 1)
        victim = asyncio.ensure_future(b.submit(rows(100, 16), later()))
        await until(lambda: b.queued_rows == 16)
        victim.cancel()  # the client went away
        await until(victim.done)
        assert victim.cancelled()
        assert b.queued_rows == 0
        g.gate.set()
        await blocker
        await b.submit(rows(0, 1), later())
        assert g.batches == [8, 1]  # the cancelled rows never ran

    run(test)


def test_failed_batch_fails_only_its_submissions() -> None:
    async def test(b: Batcher, g: FakeGraph) -> None:
        g.fail_next = True
        results = await asyncio.gather(b.submit(rows(0, 2), later()), b.submit(rows(2, 2), later()),
                                       return_exceptions=True)
        assert all(isinstance(r, BatchFailed) for r in results)
        out = await b.submit(rows(0, 3), later())
        np.testing.assert_array_equal(out["y"][:, 0], [0, 2, 4])

    run(test)


def test_failure_mid_split_fails_the_whole_submission_only() -> None:
    async def test(b: Batcher, g: FakeGraph) -> None:
        big = asyncio.ensure_future(b.submit(rows(0, 24), later()))
        await asyncio.sleep(0)
        g.fail_next = True
        with pytest.raises(BatchFailed):
            await big
        assert b.queued_rows == 0
        assert (await b.submit(rows(0, 1), later()))["y"][0, 0] == 0

    run(test)


def test_wrong_output_rows_fail_the_batch() -> None:
    class Truncating(FakeGraph):
        def __call__(self, feeds: Arrays) -> Arrays:
            return {"y": feeds["x"][:1]}  # one row whatever the batch size

    async def test(b: Batcher, g: FakeGraph) -> None:
        with pytest.raises(BatchFailed):
            await b.submit(rows(0, 3), later())

    run(test, Truncating())


def test_stop_fails_waiting_submissions_and_refuses_new_ones() -> None:
    async def main() -> None:
        worker = DeviceExecutor("cpu")
        gate = threading.Event()
        batcher = Batcher(run=lambda f: (gate.wait(5), {"y": f["x"]})[1], worker=worker, max_batch_rows=2,
                          max_queue_rows=64, max_delay_s=0.0)
        batcher.start()
        waiting = asyncio.ensure_future(batcher.submit(rows(0, 6), later()))
        await asyncio.sleep(0.05)
        await batcher.stop()
        gate.set()
        with pytest.raises(BatcherClosed):
            await waiting
        with pytest.raises(BatcherClosed):
            await batcher.submit(rows(0, 1), later())
        worker.close()

    asyncio.run(main())


def test_several_instances_run_batches_side_by_side_and_rows_come_back_in_order() -> None:
    """Two execution threads: a submission split over batches that finish out of order is reassembled."""

    class SlowFirst:
        def __init__(self) -> None:
            self.calls = 0
            self.concurrent = 0
            self.most_concurrent = 0
            self.lock = threading.Lock()

        def __call__(self, feeds: Arrays) -> Arrays:
            with self.lock:
                self.calls += 1
                first = self.calls == 1
                self.concurrent += 1
                self.most_concurrent = max(self.most_concurrent, self.concurrent)
            time.sleep(0.3 if first else 0.05)  # the first batch finishes last
            with self.lock:
                self.concurrent -= 1
            return {"y": feeds["x"] * 2}

    graph = SlowFirst()

    async def main() -> None:
        worker = DeviceExecutor("cpu", instances=2)
        batcher = Batcher(run=graph, worker=worker, name="test", max_batch_rows=2, max_queue_rows=64,
                          max_delay_s=0.0)
        batcher.start()
        try:
            x = np.arange(6, dtype=np.float32)[:, None]  # 3 batches of 2 rows
            out = await batcher.submit({"x": x}, time.monotonic() + 10)
            np.testing.assert_array_equal(out["y"], 2 * x)
        finally:
            await batcher.stop()
            worker.close()

    asyncio.run(main())
    assert graph.calls == 3 and graph.most_concurrent == 2


class ConcurrencyGraph:
    """out = 2 * x after `delay` seconds, recording how many of its batches ran at once."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.lock = threading.Lock()
        self.concurrent = self.most_concurrent = 0

    def __call__(self, feeds: Arrays) -> Arrays:
        with self.lock:
            self.concurrent += 1
            self.most_concurrent = max(self.most_concurrent, self.concurrent)
        time.sleep(self.delay)
        with self.lock:
            self.concurrent -= 1
        return {"y": feeds["x"] * 2}


@pytest.mark.parametrize("cheap_request", ["none", "in flight", "ended just now"])
def test_time_sliced_batches_take_every_instance_only_without_cheap_requests(cheap_request: str) -> None:
    """On a 2-instance device a time-sliced batcher runs 2 batches at once while no cheap request (one
    with no time-sliced work) is in flight or ended within LENDING_IDLE_S, else 1: that instance stays
    free for cheap work. Batches of other graphs alone do not hold it (an anomaly score's encoder rows)."""
    sliced_graph, other_graph = ConcurrencyGraph(0.05), ConcurrencyGraph(0.0)

    async def main() -> None:
        worker = DeviceExecutor("cpu", instances=2)
        sliced = Batcher(run=sliced_graph, worker=worker, name="log_weights", max_batch_rows=2,
                         max_queue_rows=64, max_delay_s=0.0, max_batch_seconds=10.0)
        other = Batcher(run=other_graph, worker=worker, name="encoder", max_batch_rows=8, max_queue_rows=64,
                        max_delay_s=0.0)
        sliced.start()
        other.start()
        try:
            assert sliced.max_running == 1 and other.max_running == 2
            await other.submit(rows(0, 1), later())  # the other graph's work of a sliced request
            x = rows(0, 8)  # 4 batches of 2 rows, 0.2 s of work in all: within LENDING_IDLE_S
            if cheap_request == "ended just now":
                with worker.cheap_request():
                    await other.submit(rows(0, 1), later())
            with worker.cheap_request() if cheap_request == "in flight" else contextlib.nullcontext():
                out = await sliced.submit(x, later())
            np.testing.assert_array_equal(out["y"], 2 * x["x"])
        finally:
            await sliced.stop()
            await other.stop()
            worker.close()

    asyncio.run(main())
    assert sliced_graph.most_concurrent == (2 if cheap_request == "none" else 1)


def test_an_idle_device_tries_one_batch_unless_the_deadline_is_shorter_than_any_batch() -> None:
    """One batch on an idle device is always tried, even when the cost model says it is too slow (the
    run corrects an inflated estimate), but a deadline below a one-row batch's time is refused at once."""
    from service.engine.interface import TooExpensive

    worker = DeviceExecutor("cpu")
    batcher = Batcher(run=FakeGraph(), worker=worker, name="test", max_batch_rows=8, max_queue_rows=64,
                      max_delay_s=0.0)
    try:
        batcher.calibrate((1, 0.010), (8, 0.080))  # 10 ms per row as measured
        batcher.check_deadline(8, time.monotonic() + 0.05 / batcher.admission_share)  # 80 ms > 50: tried
        with pytest.raises(TooExpensive):
            batcher.check_deadline(1, time.monotonic() + 0.0001)  # 0.1 ms: no batch is that fast
    finally:
        worker.close()
