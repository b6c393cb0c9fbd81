"""vae_client: a typed Python client of the vae-serve /v1 API (sync `VAEClient`, async `AsyncVAEClient`).

    from vae_client import VAEClient
    with VAEClient("http://127.0.0.1:8000", model="mnist-vae") as client:
        result = client.encode(images)            # numpy (N, C, H, W) in [0, 1], PIL images, bytes or paths
        result.mean, result.variance              # numpy (N, latent_dim)

Install with `pip install ./clients/python` (the `vae-client` distribution: httpx, numpy and Pillow,
none of the server stack); documentation in docs/client.md.
"""

from vae_client._base import __version__
from vae_client._retry import RetryPolicy
from vae_client.aio import AsyncVAEClient
from vae_client.client import VAEClient
from vae_client.errors import (
    ConnectionFailed,
    DeadlineExceeded,
    InvalidInput,
    ModelNotFound,
    Overloaded,
    PayloadTooLarge,
    RetryableError,
    ServerError,
    Unauthorized,
    Unavailable,
    UnexpectedResponse,
    VAEError,
)
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

__all__ = [
    "AnomalyResult",
    "AsyncVAEClient",
    "ConnectionFailed",
    "DeadlineExceeded",
    "DecodeResult",
    "EncodeResult",
    "Health",
    "InvalidInput",
    "LogLikelihoodResult",
    "ModelDetail",
    "ModelInfo",
    "ModelNotFound",
    "Overloaded",
    "PayloadTooLarge",
    "ReconstructResult",
    "RetryPolicy",
    "RetryableError",
    "SampleResult",
    "ServerError",
    "Unauthorized",
    "Unavailable",
    "UnexpectedResponse",
    "VAEClient",
    "VAEError",
    "__version__",
]
