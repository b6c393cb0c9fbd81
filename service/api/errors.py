"""Typed errors and the one place where each becomes an HTTP status and a JSON body.

Body of every error response: {"error": {"code": "...", "message": "...", "request_id": "..."}},
except on the Open Inference Protocol paths (/v2...), whose specification fixes the body as
{"error": "<message>"} (the request id is still in the X-Request-ID header). Codes are stable strings
callers can branch on; messages say what to change.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.engine import interface as engine
from service.logs import request_id_var


class ServiceError(Exception):
    """Base of every error the service raises on purpose; `status` and `code` decide the response."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}
        self.details = details


class InvalidInput(ServiceError):
    status, code = 422, "invalid_input"


class ModelNotFound(ServiceError):
    status, code = 404, "model_not_found"


class PayloadTooLarge(ServiceError):
    status, code = 413, "payload_too_large"


class RequestTimeout(ServiceError):
    """The body did not arrive in time; the connection is closed (the client may still be sending)."""

    status, code = 408, "request_timeout"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Connection": "close"})


class UnsupportedMediaType(ServiceError):
    status, code = 415, "unsupported_media_type"


class Unauthorized(ServiceError):
    status, code = 401, "unauthorized"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class Overloaded(ServiceError):
    """The queue is full: retry later. Raised at once, before any work is queued."""

    status, code = 429, "overloaded"

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message, headers={"Retry-After": str(max(1, retry_after_s))})


class DeadlineExceeded(ServiceError):
    status, code = 504, "deadline_exceeded"


class Unavailable(ServiceError):
    """Not ready, or shutting down; another replica should take the request."""

    status, code = 503, "unavailable"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Retry-After": "1"})


class TooExpensive(ServiceError):
    """The request alone needs more device time than its deadline allows on this machine."""

    status, code = 422, "too_expensive"


class InferenceFailed(ServiceError):
    """A batch failed in the runtime; only the requests in that batch see this."""

    status, code = 500, "inference_failed"


# Codes for the errors the framework raises itself (routing, method, parsing).
_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
               413: "payload_too_large", 415: "unsupported_media_type", 422: "invalid_input"}


def error_body(status: int, code: str, message: str, details: Any = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message, "request_id": request_id_var.get()}
    if details is not None:
        error["details"] = details
    return {"error": error}


def is_v2_path(path: str) -> bool:
    return path == "/v2" or path.startswith("/v2/")


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None,
                   details: Any = None, *, path: str = "") -> JSONResponse:
    """The error body of the protocol that `path` belongs to."""
    if is_v2_path(path):
        # Triton and KServe answer every invalid request 400; the V2 body is {"error": message}.
        return JSONResponse({"error": message}, status_code=400 if status == 422 else status, headers=headers)
    return JSONResponse(error_body(status, code, message, details), status_code=status, headers=headers)


def _describe_validation(errors: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """A readable one-line message plus the list of problems (location, message) for programs."""
    details = [{"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", ""))} for e in errors]
    parts = [f"{'.'.join(d['loc']) or 'request'}: {d['msg']}" for d in details[:5]]
    more = f" (and {len(details) - 5} more)" if len(details) > 5 else ""
    return "invalid request: " + "; ".join(parts) + more, details


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    return error_response(exc.status, exc.code, exc.message, exc.headers, exc.details, path=request.url.path)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    message, details = _describe_validation(list(exc.errors()))
    return error_response(422, "invalid_input", message, details=details, path=request.url.path)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return http_error_response(exc, request.url.path)


def http_error_response(exc: StarletteHTTPException, path: str) -> JSONResponse:
    """The framework's own HTTP errors (routing, method, form parsing) in the error shape."""
    status = exc.status_code
    code = _HTTP_CODES.get(status, HTTPStatus(status).phrase.lower().replace(" ", "_"))
    message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(status).phrase
    if status == 404 and message == "Not Found":
        message = "no such route; see /docs for the API"
    elif status == 405:
        message = "method not allowed on this route; see /docs for the allowed methods"
    return error_response(status, code, message, dict(exc.headers or {}), path=path)


def from_engine_error(exc: engine.EngineError) -> ServiceError:
    """The engine's HTTP-agnostic errors as the typed errors above (one mapping for every protocol)."""
    if isinstance(exc, engine.QueueFull):
        return Overloaded(f"the service is at capacity ({exc}); retry after the Retry-After seconds",
                          exc.retry_after_s)
    if isinstance(exc, engine.TooExpensive):
        return TooExpensive(str(exc))
    if isinstance(exc, engine.DeadlineExceeded):
        return DeadlineExceeded(f"{exc}; send fewer images or a smaller k, or retry later")
    if isinstance(exc, engine.EngineClosed):
        return Unavailable(f"{exc}; retry on another replica")
    if isinstance(exc, engine.EngineUnavailable):
        return Unavailable(str(exc))
    if isinstance(exc, engine.UnknownModel):
        return ModelNotFound(str(exc))
    return InferenceFailed(f"{exc}; other requests are unaffected, retrying may succeed")


async def _engine_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, engine.EngineError)
    return await _service_error(request, from_engine_error(exc))


class BadRequest(ServiceError):
    status, code = 400, "bad_request"


async def _v2_codec_error(request: Request, exc: Exception) -> JSONResponse:
    return await _service_error(request, BadRequest(str(exc)))


def install_error_handlers(app: FastAPI) -> None:
    """Replace FastAPI's default handlers so every error has the same JSON shape."""
    from service.api.v2_codec import V2CodecError

    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(V2CodecError, _v2_codec_error)
    app.add_exception_handler(engine.EngineError, _engine_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
