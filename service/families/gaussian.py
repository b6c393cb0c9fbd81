"""The Gaussian-latent family: q(z|x) = N(mu(x), diag sigma^2(x)), p(z) = N(0, I), a Bernoulli or
Gaussian decoder. Covers the conv/MLP VAE, the beta-VAE, the conditional VAE, the IWAE and the
linear-Gaussian model: all export the same three graphs (service/artifacts.py, GRAPH_IO).

Importance sampling (log_likelihood, anomaly_score): image i of a request with k samples becomes
ceil(k / chunk) rows of a log-weights graph, row r holding x_i and the samples r*chunk ..
(r+1)*chunk - 1 whose noise is drawn on the device thread from the key (seed, i, r*chunk)
(families/noise.py). Rows of any requests stack into one (B, chunk, D) batch; samples past k (the
padding of the last row) are dropped. The noise of a sample depends on (seed, i, j) alone, so neither
`chunk` nor how rows are batched changes a result.
"""

from __future__ import annotations

import math

import numpy as np

from service.artifacts import AnomalyCalibration, Manifest, Preprocessing
from service.families.base import Arrays, GraphRunner, LatentSpace, Operation, Options
from service.families.common import ImageFamily
from service.families.noise import importance_keys, prior_latents, rows_eps

DEFAULT_CHUNK = 128  # samples per log-weights row; an execution detail (results do not depend on it)
LOG_WEIGHTS_GRAPHS = ("log_weights", "background_log_weights")


class GaussianLatentVAE(ImageFamily):
    """The operations of one Gaussian-latent model (shapes in service/families/base.py)."""

    name = "gaussian"
    sliced_graphs = frozenset(LOG_WEIGHTS_GRAPHS)  # time-sliced batches (engine/batching.py)

    def __init__(self, *, latent_dim: int, input_shape: tuple[int, int, int], preprocessing: Preprocessing,
                 likelihood: str, conditional: bool, calibration: AnomalyCalibration | None = None,
                 chunk: int = DEFAULT_CHUNK) -> None:
        super().__init__(input_shape=input_shape, preprocessing=preprocessing, likelihood=likelihood,
                         conditional=conditional, calibration=calibration, chunk=chunk)
        self.latent_dim = latent_dim

    @classmethod
    def from_manifest(cls, manifest: Manifest, chunk: int = DEFAULT_CHUNK) -> GaussianLatentVAE:
        return cls(latent_dim=manifest.latent_dim, input_shape=manifest.input_shape,
                   preprocessing=manifest.preprocessing, likelihood=manifest.likelihood,
                   conditional=manifest.conditional, calibration=manifest.anomaly, chunk=chunk)

    @staticmethod
    def latent_space(manifest: Manifest) -> LatentSpace:
        d = (manifest.latent_dim,)
        return LatentSpace("latents", d, "float32", None,
                           (("mean", "FP32", d), ("variance", "FP32", d), ("log_variance", "FP32", d)))

    @staticmethod
    def encodings(out: Arrays, include: frozenset[str]) -> dict[str, np.ndarray]:
        """q(z|x) as mean, variance and log-variance (N, D) float64."""
        log_var = out["log_var"].astype(np.float64)
        return {"mean": out["mean"].astype(np.float64), "variance": np.exp(log_var), "log_variance": log_var}

    # -- cost and execution ------------------------------------------------------------------------------
    def work(self, operation: Operation, items: int, options: Options) -> dict[str, int]:
        """Graph -> rows that one request of `items` images (or latents, or samples) submits.

        The one cost formula: the inference process admits with it, and so do the HTTP workers before
        they read a body.
        """
        if operation == "encode":
            return {"encoder": items}
        if operation in ("decode", "sample"):
            return {"decoder": items}
        if operation == "reconstruct":
            return {"encoder": items, "decoder": items}
        rows = items * math.ceil(options.k / self.chunk)
        if operation == "log_likelihood":
            return {options.graph: rows}
        return self.anomaly_work(items, options, rows)

    def device_feeds(self, graph: str, feeds: Arrays) -> Arrays:
        """On the device thread, just before a batch runs: draw the noise of log-weights rows."""
        if graph in LOG_WEIGHTS_GRAPHS:
            feeds = dict(feeds)
            feeds["eps"] = rows_eps(feeds.pop("eps_key"), self.chunk, self.latent_dim)  # (B, chunk, D)
        return feeds

    def warm_feeds(self, graph: str, rows: int) -> tuple[Arrays, dict[str, tuple[int, ...]]]:
        """A batch of `rows` zero rows of `graph` (before device_feeds) and the output shapes it must give."""
        x = np.zeros((rows, *self.input_shape), np.float32)
        if graph == "encoder":
            feeds, shapes = {"x": x}, {"mean": (rows, self.latent_dim), "log_var": (rows, self.latent_dim)}
        elif graph == "decoder":
            feeds = {"z": np.zeros((rows, self.latent_dim), np.float32)}
            shapes = {"x_mean": (rows, *self.input_shape)}
        else:
            feeds, shapes = {"x": x, "eps_key": np.zeros((rows, 3), np.int64)}, {"log_w": (rows, self.chunk)}
        return self._labelled(feeds, np.zeros(rows, np.int64)), shapes

    # -- operations --------------------------------------------------------------------------------------
    async def sample(self, runner: GraphRunner, y: np.ndarray | None, options: Options) -> Arrays:
        """z_i = temperature * eps_i, eps_i seeded by (seed, i): z (n, D) and its decoding."""
        z = prior_latents(options.seed, options.n, self.latent_dim, options.temperature)  # (n, D)
        return {"z": z, **await self.decode(runner, z, y)}

    async def encode(self, runner: GraphRunner, x: np.ndarray, y: np.ndarray | None) -> Arrays:
        """x (N, C, H, W) -> mean, log_var (N, D) float32."""
        return await runner("encoder", self._labelled({"x": x}, y))

    async def decode(self, runner: GraphRunner, z: np.ndarray, y: np.ndarray | None) -> Arrays:
        """z (N, D) -> x_mean = E[x|z] (N, C, H, W) float32."""
        return await runner("decoder", self._labelled({"z": z}, y))

    async def log_weights(self, runner: GraphRunner, x: np.ndarray, y: np.ndarray | None, k: int, seed: int,
                          graph: str = "log_weights") -> np.ndarray:
        """log importance weights of the likelihood view of x: (N, C, H, W) -> (N, k) float64."""
        view = self.preprocessing.likelihood_view(x)
        n, rows = len(view), math.ceil(k / self.chunk)
        feeds = {"x": np.repeat(view, rows, axis=0), "eps_key": importance_keys(n, k, seed, self.chunk)}
        y_rows = None if y is None else np.repeat(y, rows)
        out = await runner(graph, self._labelled(feeds, y_rows))
        return out["log_w"].reshape(n, rows * self.chunk)[:, :k].astype(np.float64)

    async def latent_vectors(self, runner: GraphRunner, view: np.ndarray, y: np.ndarray | None) -> np.ndarray:
        """The encoder means (N, D): what the latent bank holds for the training images' likelihood view."""
        return (await self.encode(runner, view, y))["mean"]

    async def reconstruct_rows(self, runner: GraphRunner, x: np.ndarray,
                               y: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """The posterior means (N, D) and their decodings (N, C, H, W)."""
        mean = (await self.encode(runner, x, y))["mean"]
        return mean, (await self.decode(runner, mean, y))["x_mean"]
