"""uvicorn's HTTP protocol, answering requests it cannot parse in the service's JSON error shape.

uvicorn answers malformed HTTP (a bad request line, broken headers) with a text/plain 400 before any
ASGI app sees the request; callers that parse every error as JSON then fail twice. The body here is
the /v1 error shape (there is no request id: the request never existed as far as the app knows).
"""

from __future__ import annotations

import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol


class JsonErrorHttpToolsProtocol(HttpToolsProtocol):
    """HttpToolsProtocol whose 400 for unparseable requests is JSON."""

    def send_400_response(self, msg: str) -> None:
        body = orjson.dumps({"error": {"code": "bad_request", "message": f"malformed HTTP request: {msg}",
                                       "request_id": None}})
        content = [STATUS_LINE[400]]
        for name, value in self.server_state.default_headers:
            content.extend([name, b": ", value, b"\r\n"])
        content.extend([b"content-type: application/json\r\n",
                        b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
                        b"connection: close\r\n", b"\r\n", body])
        self.transport.write(b"".join(content))
        self.transport.close()
