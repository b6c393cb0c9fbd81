"""service/logs.py: the lines of one event-loop turn go out in one write, in order, and nothing is held
where no loop would write it (WARNING and above, threads without a loop, the process's end)."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator

import pytest

from service.logs import TurnStreamHandler, flush_logs


class Writes:
    """A text stream that records each write() call."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def write(self, text: str) -> int:
        self.calls.append(text)
        return len(text)

    def flush(self) -> None:
        pass

    @property
    def lines(self) -> list[str]:
        return "".join(self.calls).splitlines()


@pytest.fixture()
def logged() -> Iterator[tuple[logging.Logger, Writes]]:
    stream = Writes()
    handler = TurnStreamHandler(stream)  # type: ignore[arg-type]
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("test_svc_logs")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    yield logger, stream
    logger.handlers[:] = []


def test_the_lines_of_one_loop_turn_are_one_write_at_its_end(logged: tuple[logging.Logger, Writes]) -> None:
    logger, stream = logged

    async def turn() -> list[str]:
        for i in range(5):
            logger.info("line %d", i)
        before_the_turn_ends = list(stream.calls)
        await asyncio.sleep(0)  # the turn ends: the handler's call_soon runs before this task resumes
        return before_the_turn_ends

    assert asyncio.run(turn()) == []
    assert stream.calls == ["".join(f"INFO line {i}\n" for i in range(5))]


Logged = tuple[logging.Logger, Writes]


def test_a_warning_goes_out_at_once_after_the_lines_held_before_it(logged: Logged) -> None:
    logger, stream = logged

    async def turn() -> None:
        logger.info("first")
        logger.warning("second")
        assert stream.lines == ["INFO first", "WARNING second"]  # within the same turn
        logger.info("third")
        await asyncio.sleep(0)

    asyncio.run(turn())
    assert stream.lines == ["INFO first", "WARNING second", "INFO third"]
    assert len(stream.calls) == 2


def test_without_a_running_loop_every_line_is_written_at_once(logged: tuple[logging.Logger, Writes]) -> None:
    logger, stream = logged
    logger.info("main thread, no loop")
    assert stream.lines == ["INFO main thread, no loop"]

    async def from_a_thread_beside_the_loop() -> None:
        thread = threading.Thread(target=logger.info, args=("device thread",))
        thread.start()
        thread.join()
        assert stream.lines[-1] == "INFO device thread"  # not held for the loop's turn

    asyncio.run(from_a_thread_beside_the_loop())


def test_flush_logs_writes_what_a_loop_that_stopped_still_held(logged: tuple[logging.Logger, Writes]) -> None:
    logger, stream = logged
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers[:] = logger.handlers  # flush_logs flushes the root logger's handlers
    try:
        loop = asyncio.new_event_loop()

        async def log_and_stop() -> None:
            logger.info("held")
            loop.stop()  # the loop stops before it runs the handler's call_soon

        task = loop.create_task(log_and_stop())
        loop.run_forever()
        assert task.done()
        assert stream.calls == []
        flush_logs()
        assert stream.lines == ["INFO held"]
        loop.close()
    finally:
        root.handlers[:] = saved


def test_a_second_loop_writes_what_a_closed_loop_still_held(logged: Logged) -> None:
    logger, stream = logged
    first = asyncio.new_event_loop()

    async def log_and_stop() -> None:
        logger.info("from the first loop")
        first.stop()  # closed before the handler's call_soon runs: its line stays held

    task = first.create_task(log_and_stop())
    first.run_forever()
    first.close()
    assert task.done() and stream.calls == []

    async def second() -> None:
        logger.info("from the second loop")
        await asyncio.sleep(0)

    asyncio.run(second())
    assert stream.calls == ["INFO from the first loop\nINFO from the second loop\n"]


def test_no_more_than_max_held_lines_wait_for_the_turn_to_end(logged: Logged) -> None:
    logger, stream = logged
    handler = logger.handlers[0]
    assert isinstance(handler, TurnStreamHandler)

    async def burst() -> int:
        for i in range(handler.MAX_HELD + 5):
            logger.info("line %d", i)
        return len(stream.lines)

    assert asyncio.run(burst()) == handler.MAX_HELD  # written at once when the bound was reached
    assert stream.lines == [f"INFO line {i}" for i in range(handler.MAX_HELD + 5)]
