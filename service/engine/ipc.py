"""Messages between the HTTP worker processes and the inference process.

Transport: ZeroMQ (pyzmq) over a Unix-domain `ipc://` socket. The inference process binds a ROUTER
socket, each HTTP worker connects a DEALER socket: many requests in flight per connection, replies
matched by id, and zmq reports connects and disconnects (a crashed inference process is noticed at
once). Why not multiprocessing.Queue: its feeder thread and pipe add ~100 us and a lock per message;
why not shared memory for tensors: a 1-image request is 3 KB and a 64-image one 200 KB, which zmq
moves without extra copies (each array is its own frame), so shared memory would add bookkeeping
(allocation, lifetime across crashes) for no measurable gain at these sizes. Measured:
benchmarks/ipc_roundtrip.py.

Encoding: pickle protocol 5 with out-of-band buffers, so numpy arrays travel as raw frames (no
copy into the pickle) and are rebuilt as views of the received frames. Pickle is safe here because
both ends are this service's own processes and the socket lives in a private (0700) directory.
"""

from __future__ import annotations

import pickle
from typing import Any

import zmq


def pack(message: dict[str, Any]) -> list[Any]:
    """A message -> frames: [pickle header, buffer, buffer, ...] (arrays as out-of-band buffers)."""
    buffers: list[pickle.PickleBuffer] = []
    header = pickle.dumps(message, protocol=5, buffer_callback=buffers.append)
    return [header, *(b.raw() for b in buffers)]


def unpack(frames: list[Any]) -> dict[str, Any]:
    """Frames (bytes or zmq.Frame) -> the message; arrays are read-only views of the frames."""
    buffers = [f.buffer if isinstance(f, zmq.Frame) else f for f in frames[1:]]
    header = frames[0].bytes if isinstance(frames[0], zmq.Frame) else frames[0]
    return pickle.loads(header, buffers=buffers)


def error_fields(exc: Exception) -> list[Any]:
    """An engine error as [type name, message, retry_after_s] for the wire."""
    return [type(exc).__name__, str(exc), int(getattr(exc, "retry_after_s", 0))]
