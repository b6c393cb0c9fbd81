"""The HTTP protocol's coalesced writes (service/api/http_protocol.py): a response's head and body, which
uvicorn writes separately, reach the socket's transport as one write, byte for byte the same response.

A real uvicorn HttpToolsProtocol on a real socket, on the standard asyncio loop (whose transports are
Python objects, so their write can be watched; uvloop's cannot), answering a real HTTP client.
"""

from __future__ import annotations

import asyncio

import pytest
import uvicorn
from uvicorn.server import ServerState

from service.api.http_protocol import http_protocol

BODY = b'{"ok": true}'


async def app(scope: dict, receive: object, send: object) -> None:
    assert scope["type"] == "http"
    await send({"type": "http.response.start", "status": 200,  # type: ignore[operator]
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(BODY))]})
    await send({"type": "http.response.body", "body": BODY})  # type: ignore[operator]


async def _two_requests(coalesce: bool) -> tuple[list[bytes], bytes]:
    """Two requests on one kept-alive connection: what the socket's transport was asked to write, and
    what the client read."""
    config = uvicorn.Config(app, loop="asyncio", lifespan="off", log_config=None)
    config.load()
    writes: list[bytes] = []

    class Watched(http_protocol(10.0, coalesce)):  # type: ignore[misc, valid-type]
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            write = transport.write

            def watched(data: bytes) -> None:
                writes.append(bytes(data))
                write(data)

            transport.write = watched  # type: ignore[method-assign]
            super().connection_made(transport)

    state = ServerState()
    server = await asyncio.get_running_loop().create_server(
        lambda: Watched(config=config, server_state=state, app_state={}), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    received = b""
    for _ in range(2):
        writer.write(b"GET / HTTP/1.1\r\nhost: test\r\n\r\n")
        received += await asyncio.wait_for(reader.readuntil(BODY), 5)
    writer.close()
    server.close()
    for protocol_connection in list(state.connections):
        protocol_connection.shutdown()
    await server.wait_closed()
    return writes, received


@pytest.mark.parametrize("coalesce", [True, False])
def test_a_response_is_one_write_when_coalesced(coalesce: bool) -> None:
    writes, received = asyncio.run(_two_requests(coalesce))
    responses = received.split(b"HTTP/1.1 ")[1:]
    assert len(responses) == 2 and all(r.startswith(b"200 OK") and r.endswith(BODY) for r in responses)
    assert b"".join(writes) == received  # nothing lost, added or reordered
    assert len(writes) == (2 if coalesce else 4)  # head and body: one write per response, or two
