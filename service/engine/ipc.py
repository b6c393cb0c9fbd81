"""Messages between the HTTP worker processes and the inference process.

Transport: ZeroMQ (pyzmq) over a Unix-domain `ipc://` socket. The inference process binds a ROUTER
socket, each HTTP worker connects a DEALER socket: many requests in flight per connection, replies
matched by id, and zmq reports connects and disconnects (a crashed inference process is noticed at
once). Why not multiprocessing.Queue: its feeder thread and pipe add ~100 us and a lock per message;
why not shared memory for tensors: a 1-image request is 3 KB and a 64-image one 200 KB, which zmq
moves without extra copies (each array is its own frame), so shared memory would add bookkeeping
(allocation, lifetime across crashes) for no measurable gain at these sizes. What was measured
(py-spy and per-process CPU time, README "Where the time goes"): the fixed cost per message (pickle,
zmq send, waking the other process) dominated, which is why messages are coalesced per event-loop tick.

Encoding: pickle protocol 5; arrays of 64 KB or more travel out of band as raw frames (no copy into
the pickle) and are rebuilt as views of the received frames, smaller ones inside the pickle. Pickle is
safe here because both ends are this service's own processes and the socket lives in a private (0700)
directory.
"""

from __future__ import annotations

import pickle
from typing import Any

import zmq

OUT_OF_BAND_BYTES = 64 * 1024  # arrays at least this large travel as their own frame, without a copy


def pack(message: dict[str, Any]) -> list[Any]:
    """A message -> frames: [pickle, large buffer, large buffer, ...].

    Arrays of OUT_OF_BAND_BYTES or more travel out of band, each its own zero-copy frame; smaller ones
    inside the pickle. Profiled on 1-image encodes (a 3 KB image in, two 128-byte vectors out, per
    request), a frame per array made zmq's send the largest single cost of the inference process: each
    frame is a separate send, and pyzmq copies frames this small anyway.
    """
    buffers: list[pickle.PickleBuffer] = []

    def in_band(buffer: pickle.PickleBuffer) -> bool:
        if buffer.raw().nbytes < OUT_OF_BAND_BYTES:
            return True
        buffers.append(buffer)
        return False

    header = pickle.dumps(message, protocol=5, buffer_callback=in_band)
    return [header, *(b.raw() for b in buffers)]


def unpack(frames: list[Any]) -> dict[str, Any]:
    """Frames (bytes or zmq.Frame) -> the message; arrays are read-only views of the frames."""
    buffers = [f.buffer if isinstance(f, zmq.Frame) else f for f in frames[1:]]
    header = frames[0].bytes if isinstance(frames[0], zmq.Frame) else frames[0]
    return pickle.loads(header, buffers=buffers)


class Outbox:
    """Coalesces the messages of one event-loop tick into one zmq message per peer.

    Under load a worker has dozens of requests in flight and the engine dozens of replies ready in the
    same tick; sending each alone costs a pickle, a zmq send and a wake-up of the other process per
    request (profiled: about half of the engine's CPU). Sent as {"kind": "many", "items": [...]},
    the fixed costs are paid once per tick; a lone message still leaves in the same tick.
    """

    def __init__(self, send: Any, report: Any = None) -> None:
        self._send = send  # (route frames: list[bytes], frames: list) -> None, non-blocking
        # () -> dict of fields every outgoing message carries once (the engine's load report): computed
        # once per tick, not once per reply
        self._report = report
        self._pending: dict[tuple[bytes, ...], list[dict[str, Any]]] = {}
        self._scheduled = False

    def put(self, route: tuple[bytes, ...], message: dict[str, Any]) -> None:
        import asyncio

        self._pending.setdefault(route, []).append(message)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        pending, self._pending = self._pending, {}
        extra = self._report() if self._report is not None and pending else {}
        for route, items in pending.items():
            message = {**items[0], **extra} if len(items) == 1 else {"kind": "many", "items": items, **extra}
            self._send(list(route), pack(message))


def messages(message: dict[str, Any]) -> list[dict[str, Any]]:
    """The messages inside one received message (several when an Outbox coalesced them); fields an
    Outbox report added are on the received message itself."""
    return message["items"] if message.get("kind") == "many" else [message]


def error_fields(exc: Exception) -> list[Any]:
    """An engine error as [type name, message, retry_after_s] for the wire."""
    return [type(exc).__name__, str(exc), int(getattr(exc, "retry_after_s", 0))]
