"""`VAEClient`: the synchronous client of the /v1 API (httpx.Client underneath)."""

from __future__ import annotations

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


class VAEClient(ClientBase):
    """Synchronous client of a vae-serve service (`with VAEClient(...) as client:` or `client.close()`).

    Arguments: see `ClientBase`. Example::

        with VAEClient("http://127.0.0.1:8000", model="mnist-vae") as client:
            z = client.encode(images).mean            # (N, latent_dim)
            x = client.decode(z).images               # (N, C, H, W) float32
    """

    _http: httpx.Client

    def _open(self, transport: httpx.BaseTransport | None) -> httpx.Client:
        return httpx.Client(**self._http_options(), transport=transport)

    # -- lifecycle -------------------------------------------------------------------------------------
    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> VAEClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _run(self, call: Call[T]) -> T:
        """Send `call`, retrying as the retry policy allows; parse the final answer."""
        state = self._retry_state(call)
        while True:
            request = self._http.build_request(**call.request_args())
            try:
                response = self._http.send(request)
            except httpx.TransportError as exc:
                wait = state.after_error(exc)
                if wait is None:
                    raise connection_failed(exc, request) from exc
            else:
                wait = state.after_response(response)
                if wait is None:
                    return call.parse(response)
            time.sleep(wait)

    # -- operations ------------------------------------------------------------------------------------
    def health(self, *, request_id: str | None = None, timeout: Timeout = UNSET) -> Health:
        """GET /healthz: the process is alive (also while loading or draining)."""
        call = calls.health(Options(request_id, timeout))
        return self._run(call)

    def ready(self, *, request_id: str | None = None, timeout: Timeout = UNSET) -> bool:
        """GET /readyz once: True when every model is loaded and warmed up, False while not (503)."""
        try:
            self._run(calls.ready(Options(request_id, timeout)))
        except Unavailable:
            return False
        return True

    def wait_until_ready(self, timeout: float = 60.0, interval: float = 0.25) -> Health:
        """Poll /readyz until it answers 200 (the result lists the models); Unavailable after `timeout` s."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self._run(calls.ready(Options(None, min(4 * interval, timeout))))
            except (Unavailable, ConnectionFailed) as exc:
                if time.monotonic() + interval > deadline:
                    raise not_ready(timeout, exc) from exc
            time.sleep(interval)

    def models(self, *, request_id: str | None = None, timeout: Timeout = UNSET) -> list[ModelInfo]:
        """GET /v1/models: every loaded model with its input shape and latent size."""
        call = calls.models(Options(request_id, timeout))
        return self._run(call)

    def model(self, name: str | None = None, *, version: Version = None, request_id: str | None = None,
              timeout: Timeout = UNSET) -> ModelDetail:
        """GET /v1/models/{name}: metadata, metrics, runtime and limits (default: the client's model)."""
        call = calls.model(self._target(name, version), Options(request_id, timeout))
        return self._run(call)

    def encode(self, images: Images, *, label: Labels = None, include: str | None = None,
               model: str | None = None, version: Version = None, request_id: str | None = None,
               timeout: Timeout = UNSET) -> EncodeResult:
        """Posterior mean, variance and log-variance (N, latent_dim) of each image; for a VQ-VAE its code
        grid (N, h, w), and with include="pre_quantization" the encoder's vectors (N, D, h, w).

        `images`: a (C, H, W) or (N, C, H, W) float array in [0, 1] or a list of (C, H, W) arrays (sent as
        exact values), or PIL images, PNG/JPEG bytes or file paths (sent as files, which the service
        converts and resizes). `label`: one class for all images, or one per image (conditional models).
        """
        call = calls.encode(self._target(model, version), images, label, Options(request_id, timeout),
                            include)
        return self._run(call)

    def decode(self, latents: Any, *, format: ImageFormat = "array", label: Labels = None,
               model: str | None = None, version: Version = None, request_id: str | None = None,
               timeout: Timeout = UNSET) -> DecodeResult:
        """E[x|z] of each latent vector ((D,) or (N, D) floats), or of each code grid of a VQ-VAE ((h, w) or
        (N, h, w) integers); images (N, C, H, W) float32.

        format="array" returns the exact floats; "png" transfers 8-bit PNGs (smaller), kept in `.png`.
        """
        call = calls.decode(self._target(model, version), latents, label, format,
                            Options(request_id, timeout))
        return self._run(call)

    def sample(self, n: int = 16, *, seed: int | None = None, temperature: float | None = None,
               label: Label | None = None, format: ImageFormat = "array", model: str | None = None,
               version: Version = None, request_id: str | None = None, timeout: Timeout = UNSET
               ) -> SampleResult:
        """`n` samples from the prior, z = temperature * eps, decoded; the seed used is in the result."""
        call = calls.sample(self._target(model, version), n, seed, temperature, label, format,
                            Options(request_id, timeout))
        return self._run(call)

    def reconstruct(self, images: Images, *, format: ImageFormat = "array", label: Labels = None,
                    model: str | None = None, version: Version = None, request_id: str | None = None,
                    timeout: Timeout = UNSET) -> ReconstructResult:
        """Decoded posterior means of `images` (see `encode`), with per-image mse and sse."""
        call = calls.reconstruct(self._target(model, version), images, label, format,
                                 Options(request_id, timeout))
        return self._run(call)

    def log_likelihood(self, images: Images, *, k: int | None = None, seed: int | None = None,
                       label: Labels = None, model: str | None = None, version: Version = None,
                       request_id: str | None = None, timeout: Timeout = UNSET) -> LogLikelihoodResult:
        """Importance-weighted log p(x) in nats with k samples (default: the service's), ELBO, bits/dim."""
        call = calls.log_likelihood(self._target(model, version), images, k, seed, label,
                                    Options(request_id, timeout))
        return self._run(call)

    def anomaly_score(self, images: Images, *, k: int | None = None, seed: int | None = None,
                      label: Labels = None, model: str | None = None, version: Version = None,
                      request_id: str | None = None, timeout: Timeout = UNSET, **params: Any
                      ) -> AnomalyResult:
        """Anomaly score per image, its conformal p-value and is_anomaly (p_value <= alpha).

        Further query parameters the service accepts go in `params`, e.g. method="fisher", alpha=0.05.
        """
        call = calls.anomaly_score(self._target(model, version), images, k, seed, label, params,
                                   Options(request_id, timeout))
        return self._run(call)
