"""When to retry and how long to wait: exponential backoff with jitter, Retry-After, a total budget.

Pure decisions (no sleeping, no sending), so the sync and async clients share every rule and differ
only in `time.sleep` versus `asyncio.sleep`.

Retried: 429 (queue full) and 503 (not ready, draining), both of which the service answers before
doing any work; connection failures before the request was sent (refused, connect timeout) for any
method; other transport failures (reset, read timeout) only for GETs, because a POST may have been
processed. Never retried: any other status (4xx other than 429 are the caller's to fix; 500 and 504
mean work was done or attempted, and repeating an expensive request under load makes things worse).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from vae_client.errors import ConnectionFailed, Unavailable, VAEError, retry_after_seconds

RETRY_STATUSES = frozenset({429, 503})


@dataclass(frozen=True)
class RetryPolicy:
    """Retry settings of a client.

    max_retries: retries after the first attempt (0 disables retrying).
    backoff: the first computed wait in seconds, doubled per retry, times a random factor in [0.5, 1].
    max_backoff: cap of one computed wait (a longer Retry-After from the server is still honoured).
    budget: no retry starts if its wait would end more than this many seconds after the first attempt.
    """

    max_retries: int = 3
    backoff: float = 0.5
    max_backoff: float = 10.0
    budget: float = 30.0

    def __post_init__(self) -> None:
        if self.max_retries < 0 or self.backoff < 0 or self.max_backoff < 0 or self.budget < 0:
            raise ValueError("max_retries, backoff, max_backoff and budget must be >= 0")


class RetryState:
    """The retry decisions for one call: each `after_*` returns the wait before the next attempt, or None."""

    def __init__(self, policy: RetryPolicy, enabled: bool, idempotent: bool, rng: random.Random,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.policy, self.enabled, self.idempotent = policy, enabled, idempotent
        self.rng, self.clock = rng, clock
        self.started = clock()
        self.retries = 0

    def _wait(self, retry_after: float | None) -> float | None:
        if not self.enabled or self.retries >= self.policy.max_retries:
            return None
        computed = min(self.policy.max_backoff, self.policy.backoff * 2.0 ** self.retries)
        wait = computed * self.rng.uniform(0.5, 1.0)  # jitter: clients rejected together come back apart
        if retry_after is not None:
            # Never earlier than the server asked; up to 10% later so that callers do not return in step.
            wait = max(wait, retry_after * self.rng.uniform(1.0, 1.1))
        if self.clock() - self.started + wait > self.policy.budget:
            return None
        self.retries += 1
        return wait

    def after_response(self, response: httpx.Response) -> float | None:
        if response.status_code not in RETRY_STATUSES:
            return None
        return self._wait(retry_after_seconds(response))

    def after_error(self, exc: httpx.TransportError) -> float | None:
        never_sent = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)
        if not (never_sent or self.idempotent):
            return None
        return self._wait(None)


def connection_failed(exc: httpx.TransportError, request: httpx.Request) -> ConnectionFailed:
    """The client's exception for a request that got no answer (after any retries)."""
    code = "timeout" if isinstance(exc, httpx.TimeoutException) else "connection_error"
    return ConnectionFailed(None, code, f"{request.method} {request.url}: {type(exc).__name__}: {exc}",
                            request.headers.get("x-request-id"))


def not_ready(timeout: float, last: VAEError) -> Unavailable:
    """wait_until_ready's error: the service did not become ready in time (`last`: the last answer)."""
    return Unavailable(last.status, "not_ready", f"not ready after {timeout:g}s; last answer: {last}",
                       last.request_id)
