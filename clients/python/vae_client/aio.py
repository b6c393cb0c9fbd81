"""`AsyncVAEClient`: the asyncio client of the /v1 API (httpx.AsyncClient underneath).

Same calls, arguments and results as `VAEClient` (see its docstrings); only the I/O differs.
"""

from __future__ import annotations

import asyncio
import time
from types import TracebackType
from typing import Any, TypeVar

import httpx

from vae_client import _calls as calls
from vae_client._base import ClientBase
from vae_client._calls import UNSET, Call, ImageFormat, Label, Labels, Options, Timeout, Version
from vae_client._images import Images
from vae_client._retry import connection_failed, not_ready
from vae_client.errors import ConnectionFailed, Unavailable
from vae_client.types import (
    AnomalyResult,
    DecodeResult,
    EncodeResult,
    Health,
    LogLikelihoodResult,
    ModelDetail,
    ModelInfo,
    ReconstructResult,
    SampleResult,
)

T = TypeVar("T")


class AsyncVAEClient(ClientBase):
    """Asyncio client of a vae-serve service (`async with AsyncVAEClient(...) as client:` or `aclose()`).

    Arguments: see `ClientBase`. Example::

        async with AsyncVAEClient("http://127.0.0.1:8000", model="mnist-vae") as client:
            z = (await client.encode(images)).mean    # (N, latent_dim)
    """

    _http: httpx.AsyncClient

    def _open(self, transport: httpx.AsyncBaseTransport | None) -> httpx.AsyncClient:
        return httpx.AsyncClient(**self._http_options(), transport=transport)

    # -- lifecycle -------------------------------------------------------------------------------------
    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def __aenter__(self) -> AsyncVAEClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def _run(self, call: Call[T]) -> T:
        """Send `call`, retrying as the retry policy allows; parse the final answer."""
        state = self._retry_state(call)
        while True:
            request = self._http.build_request(**call.request_args())
            try:
                response = await self._http.send(request)
            except httpx.TransportError as exc:
                wait = state.after_error(exc)
                if wait is None:
                    raise connection_failed(exc, request) from exc
            else:
                wait = state.after_response(response)
                if wait is None:
                    return call.parse(response)
            await asyncio.sleep(wait)

    # -- operations ------------------------------------------------------------------------------------
    async def health(self, *, request_id: str | None = None, timeout: Timeout = UNSET) -> Health:
        """Async `VAEClient.health`."""
        call = calls.health(Options(request_id, timeout))
        return await self._run(call)

    async def ready(self, *, request_id: str | None = None, timeout: Timeout = UNSET) -> bool:
        """Async `VAEClient.ready`."""
        try:
            await self._run(calls.ready(Options(request_id, timeout)))
        except Unavailable:
            return False
        return True

    async def wait_until_ready(self, timeout: float = 60.0, interval: float = 0.25) -> Health:
        """Async `VAEClient.wait_until_ready`."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return await self._run(calls.ready(Options(None, min(4 * interval, timeout))))
            except (Unavailable, ConnectionFailed) as exc:
                if time.monotonic() + interval > deadline:
                    raise not_ready(timeout, exc) from exc
            await asyncio.sleep(interval)

    async def models(self, *, request_id: str | None = None, timeout: Timeout = UNSET) -> list[ModelInfo]:
        """Async `VAEClient.models`."""
        call = calls.models(Options(request_id, timeout))
        return await self._run(call)

    async def model(self, name: str | None = None, *, version: Version = None, request_id: str | None = None,
                    timeout: Timeout = UNSET) -> ModelDetail:
        """Async `VAEClient.model`."""
        call = calls.model(self._target(name, version), Options(request_id, timeout))
        return await self._run(call)

    async def encode(self, images: Images, *, label: Labels = None, include: str | None = None,
                     model: str | None = None, version: Version = None, request_id: str | None = None,
                     timeout: Timeout = UNSET) -> EncodeResult:
        """Async `VAEClient.encode`."""
        call = calls.encode(self._target(model, version), images, label, Options(request_id, timeout),
                            include)
        return await self._run(call)

    async def decode(self, latents: Any, *, format: ImageFormat = "array", label: Labels = None,
                     model: str | None = None, version: Version = None, request_id: str | None = None,
                     timeout: Timeout = UNSET) -> DecodeResult:
        """Async `VAEClient.decode`."""
        call = calls.decode(self._target(model, version), latents, label, format,
                            Options(request_id, timeout))
        return await self._run(call)

    async def sample(self, n: int = 16, *, seed: int | None = None, temperature: float | None = None,
                     label: Label | None = None, format: ImageFormat = "array", model: str | None = None,
                     version: Version = None, request_id: str | None = None, timeout: Timeout = UNSET
                     ) -> SampleResult:
        """Async `VAEClient.sample`."""
        call = calls.sample(self._target(model, version), n, seed, temperature, label, format,
                            Options(request_id, timeout))
        return await self._run(call)

    async def reconstruct(self, images: Images, *, format: ImageFormat = "array", label: Labels = None,
                          model: str | None = None, version: Version = None, request_id: str | None = None,
                          timeout: Timeout = UNSET) -> ReconstructResult:
        """Async `VAEClient.reconstruct`."""
        call = calls.reconstruct(self._target(model, version), images, label, format,
                                 Options(request_id, timeout))
        return await self._run(call)

    async def log_likelihood(self, images: Images, *, k: int | None = None, seed: int | None = None,
                             label: Labels = None, model: str | None = None, version: Version = None,
                             request_id: str | None = None, timeout: Timeout = UNSET) -> LogLikelihoodResult:
        """Async `VAEClient.log_likelihood`."""
        call = calls.log_likelihood(self._target(model, version), images, k, seed, label,
                                    Options(request_id, timeout))
        return await self._run(call)

    async def anomaly_score(self, images: Images, *, k: int | None = None, seed: int | None = None,
                            label: Labels = None, model: str | None = None, version: Version = None,
                            request_id: str | None = None, timeout: Timeout = UNSET, **params: Any
                            ) -> AnomalyResult:
        """Async `VAEClient.anomaly_score`."""
        call = calls.anomaly_score(self._target(model, version), images, k, seed, label, params,
                                   Options(request_id, timeout))
        return await self._run(call)
