"""What the sync and async clients share besides the protocol: settings, headers, the default model."""

from __future__ import annotations

import random
from typing import Any

import httpx

from vae_client._calls import Call, Target, Version
from vae_client._retry import RetryPolicy, RetryState

__version__ = "0.1.0"

DEFAULT_URL = "http://127.0.0.1:8000"


class ClientBase:
    """Settings common to `VAEClient` and `AsyncVAEClient`.

    Args:
        base_url: where the service listens, e.g. "http://127.0.0.1:8000".
        model: default model name for the model calls (each call can pass `model=`).
        version: default model version; when set, calls use /v1/models/{name}/versions/{version}/...
        api_key: sent as `Authorization: Bearer <key>` (the service's VAE_API_KEYS).
        timeout: seconds per attempt (float or httpx.Timeout; None: no timeout). Calls take `timeout=`.
        max_retries, backoff, max_backoff, retry_budget: see `vae_client.RetryPolicy` (retry_budget is
            its `budget`).
        headers: extra headers for every request.
        seed: seed of the retry jitter (for reproducible tests).
        transport: an httpx transport (sync for VAEClient, async for AsyncVAEClient), e.g.
            httpx.MockTransport in tests.

    Every model call takes `model=`, `version=`, `request_id=` (sent as X-Request-ID; the result's
    `request_id` is the one the service used) and `timeout=`. Errors raise `vae_client.VAEError`
    subclasses.
    """

    def __init__(self, base_url: str = DEFAULT_URL, *, model: str | None = None,
                 version: str | int | None = None, api_key: str | None = None,
                 timeout: float | httpx.Timeout | None = 30.0,
                 max_retries: int = 3, backoff: float = 0.5, max_backoff: float = 10.0,
                 retry_budget: float = 30.0, headers: dict[str, str] | None = None,
                 seed: int | None = None, transport: Any = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.default_model = model
        self.default_version = version
        self.retry_policy = RetryPolicy(max_retries=max_retries, backoff=backoff, max_backoff=max_backoff,
                                        budget=retry_budget)
        self._rng = random.Random(seed)  # jitter only; a seed makes waits reproducible in tests
        self._timeout = timeout
        self._headers = {"User-Agent": f"vae-client/{__version__}", "Accept": "application/json",
                         **(headers or {})}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._http = self._open(transport)

    def _open(self, transport: Any) -> Any:
        """The httpx client (sync or async) of the subclass."""
        raise NotImplementedError

    def _http_options(self) -> dict[str, Any]:
        """Arguments for httpx.Client / httpx.AsyncClient."""
        return {"base_url": self.base_url, "headers": self._headers, "timeout": self._timeout}

    def _target(self, model: str | None, version: Version = None) -> Target:
        """(model name, version) of a call: its own arguments, else the client's defaults."""
        name = model or self.default_model
        if not name:
            raise ValueError("no model: pass model=... to the call or to the client")
        return name, self.default_version if version is None else version

    def _retry_state(self, call: Call[Any]) -> RetryState:
        return RetryState(self.retry_policy, call.retry, call.idempotent, self._rng)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base_url!r}, model={self.default_model!r})"
