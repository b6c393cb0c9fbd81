"""Exceptions of the client: one per class of failure, built from the service's error body.

Every error answer of the service looks like `{"error": {"code", "message", "request_id"}}`; the
status picks the exception class, so callers catch what they can act on (`Overloaded`: slow down,
`InvalidInput`: fix the request) and still see the stable `code` and the `request_id` for the logs.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx


class VAEError(Exception):
    """Base of every error raised by the client.

    `status` is the HTTP status (None when no answer came back), `code` the service's stable
    machine-readable code, `request_id` the X-Request-ID of the failed request (for the server logs).
    """

    def __init__(self, status: int | None, code: str, message: str, request_id: str | None = None,
                 details: Any = None) -> None:
        super().__init__(f"{status or 'no answer'} {code}: {message}"
                         + (f" (request id {request_id})" if request_id else ""))
        self.status = status
        self.code = code
        self.message = message
        self.request_id = request_id
        self.details = details


class InvalidInput(VAEError):
    """The request was refused as it is (400, 413, 415, 422 and other 4xx): change it, do not retry."""


class PayloadTooLarge(InvalidInput):
    """413: the body or an image is too large; send fewer or smaller images."""


class Unauthorized(VAEError):
    """401/403: missing or wrong API key."""


class ModelNotFound(VAEError):
    """404. `code` is `model_not_found` for an unknown model, `not_found` for a route the server lacks
    (e.g. `version=` against a server without the versioned routes)."""


class RetryableError(VAEError):
    """An answer that says "try again later"; `retry_after` is the server's Retry-After in seconds."""

    def __init__(self, status: int | None, code: str, message: str, request_id: str | None = None,
                 details: Any = None, retry_after: float | None = None) -> None:
        super().__init__(status, code, message, request_id, details)
        self.retry_after = retry_after


class Overloaded(RetryableError):
    """429: the service's queue is full. Raised once the client's retries are used up."""


class Unavailable(RetryableError):
    """503: the service is not ready or is shutting down. Raised once the retries are used up."""


class DeadlineExceeded(VAEError):
    """504: the request passed the service's deadline (send fewer images or a smaller k)."""


class ServerError(VAEError):
    """500 and other 5xx: inference failed on the server."""


class ConnectionFailed(VAEError):
    """No HTTP answer: connection refused or reset, or the client's timeout passed (status None)."""


class UnexpectedResponse(VAEError):
    """A 2xx answer that is not the JSON the API defines (a proxy page, a truncated body)."""


def _class_for(status: int) -> type[VAEError]:
    if status in (401, 403):
        return Unauthorized
    if status == 404:
        return ModelNotFound
    if status == 413:
        return PayloadTooLarge
    if status == 429:
        return Overloaded
    if status == 503:
        return Unavailable
    if status == 504:
        return DeadlineExceeded
    if 400 <= status < 500:
        return InvalidInput
    return ServerError


def retry_after_seconds(response: httpx.Response) -> float | None:
    """The Retry-After header in seconds (delta-seconds or an HTTP date), None if absent or unreadable."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def error_from_response(response: httpx.Response) -> VAEError:
    """The exception for an error answer; tolerant of bodies that are not the service's JSON shape."""
    status = response.status_code
    code, message, details = f"http_{status}", response.reason_phrase or "error", None
    request_id = response.headers.get("x-request-id")
    try:
        error = json.loads(response.content)["error"]
        code, message = str(error["code"]), str(error["message"])
        request_id = error.get("request_id") or request_id
        details = error.get("details")
    except (ValueError, KeyError, TypeError):
        text = response.text.strip()
        if text:
            message = text[:500]
    cls = _class_for(status)
    if issubclass(cls, RetryableError):
        return cls(status, code, message, request_id, details, retry_after=retry_after_seconds(response))
    return cls(status, code, message, request_id, details)
