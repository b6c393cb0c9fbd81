"""The VQ-VAE family (training/vqvae.py): a grid of codebook indices as the latent, a PixelCNN prior.

Graphs (service/artifacts.py, FAMILY_GRAPH_IO["vqvae"]): encoder x -> codes (N, h, w) int64 and the
pre-quantization vectors z_e (N, D, h, w); decoder codes -> E[x | codes]; prior codes -> next-code logits
(N, K, h, w); log_weights x, u -> log p(x, z_s) - log q(z_s | x) for code grids drawn from the stochastic
posterior q(k | x) ~ softmax(-||z_e - e_k||^2 / tau) by inverse CDF of the uniforms u.

- log_likelihood: as the Gaussian family, with uniforms u(seed, image, sample) (families/noise.py) in
  place of eps: the importance-weighted bound with k samples, independent of chunk and batch size.
- sample: ancestral sampling in raster order. Each of the h*w steps is one call of the prior graph for
  all n samples, so the steps of concurrent requests share the prior's batches. Position p of sample i
  takes the code where the CDF of softmax(logits / temperature) first reaches u(seed, i)[p].
- anomaly scores: -log p(x) from the IW bound; latent_knn and fisher compare the flattened z_e
  (N, D*h*w), which is what the manifest's latent_dim counts and the latent bank holds.
"""

from __future__ import annotations

import math

import numpy as np

from service.artifacts import AnomalyCalibration, Manifest, Preprocessing
from service.families.base import Arrays, GraphRunner, LatentSpace, Operation, Options
from service.families.common import ImageFamily
from service.families.noise import importance_keys, prior_uniforms, rows_uniforms

DEFAULT_CHUNK = 128


class VQVAE(ImageFamily):
    """The operations of one VQ-VAE (shapes in service/families/base.py)."""

    name = "vqvae"
    sliced_graphs = frozenset({"log_weights"})

    def __init__(self, *, grid: tuple[int, int], codebook_size: int, code_dim: int,
                 input_shape: tuple[int, int, int], preprocessing: Preprocessing, likelihood: str,
                 calibration: AnomalyCalibration | None = None, chunk: int = DEFAULT_CHUNK) -> None:
        super().__init__(input_shape=input_shape, preprocessing=preprocessing, likelihood=likelihood,
                         conditional=False, calibration=calibration, chunk=chunk)
        self.grid, self.codebook_size, self.code_dim = grid, codebook_size, code_dim
        self.positions = grid[0] * grid[1]

    @classmethod
    def from_manifest(cls, manifest: Manifest, chunk: int = DEFAULT_CHUNK) -> VQVAE:
        model = manifest.raw["model"]
        return cls(grid=(int(model["grid"][0]), int(model["grid"][1])),
                   codebook_size=int(model["codebook_size"]), code_dim=int(model["code_dim"]),
                   input_shape=manifest.input_shape, preprocessing=manifest.preprocessing,
                   likelihood=manifest.likelihood, calibration=manifest.anomaly, chunk=chunk)

    @staticmethod
    def latent_space(manifest: Manifest) -> LatentSpace:
        model = manifest.raw["model"]
        grid = (int(model["grid"][0]), int(model["grid"][1]))
        vectors = (int(model["code_dim"]), *grid)
        return LatentSpace("codes", grid, "int64", int(model["codebook_size"]),
                           (("codes", "INT64", grid), ("pre_quantization", "FP32", vectors)),
                           optional_outputs=frozenset({"pre_quantization"}))

    @staticmethod
    def encodings(out: Arrays, include: frozenset[str]) -> dict[str, np.ndarray]:
        """The code grid (N, h, w) int64 and, when asked for, z_e (N, D, h, w) float64."""
        encoded = {"codes": out["codes"].astype(np.int64)}
        if "pre_quantization" in include:
            encoded["pre_quantization"] = out["z_e"].astype(np.float64)
        return encoded

    # -- cost and execution ------------------------------------------------------------------------------
    def work(self, operation: Operation, items: int, options: Options) -> dict[str, int]:
        """Graph -> rows that one request of `items` images (or code grids, or samples) submits."""
        if operation == "encode":
            return {"encoder": items}
        if operation == "decode":
            return {"decoder": items}
        if operation == "sample":
            return {"prior": items * self.positions, "decoder": items}
        if operation == "reconstruct":
            return {"encoder": items, "decoder": items}
        rows = items * math.ceil(options.k / self.chunk)
        if operation == "log_likelihood":
            return {"log_weights": rows}
        return self.anomaly_work(items, options, rows)

    def work_at_once(self, operation: Operation, items: int, options: Options) -> dict[str, int]:
        """Sampling queues one position's prior rows at a time (n rows per step)."""
        if operation == "sample":
            return {"prior": items, "decoder": items}
        return self.work(operation, items, options)

    def device_feeds(self, graph: str, feeds: Arrays) -> Arrays:
        """On the device thread, just before a batch runs: draw the uniforms of log-weights rows."""
        if graph == "log_weights":
            feeds = dict(feeds)
            feeds["u"] = rows_uniforms(feeds.pop("u_key"), self.chunk, self.positions)  # (B, chunk, P)
        return feeds

    def warm_feeds(self, graph: str, rows: int) -> tuple[Arrays, dict[str, tuple[int, ...]]]:
        """A batch of `rows` zero rows of `graph` (before device_feeds) and the output shapes it must give."""
        x = np.zeros((rows, *self.input_shape), np.float32)
        codes = np.zeros((rows, *self.grid), np.int64)
        if graph == "encoder":
            return {"x": x}, {"codes": (rows, *self.grid), "z_e": (rows, self.code_dim, *self.grid)}
        if graph == "decoder":
            return {"codes": codes}, {"x_mean": (rows, *self.input_shape)}
        if graph == "prior":
            return {"codes": codes}, {"logits": (rows, self.codebook_size, *self.grid)}
        return {"x": x, "u_key": np.zeros((rows, 3), np.int64)}, {"log_w": (rows, self.chunk)}

    # -- operations --------------------------------------------------------------------------------------
    async def encode(self, runner: GraphRunner, x: np.ndarray, y: np.ndarray | None) -> Arrays:
        """x (N, C, H, W) -> codes (N, h, w) int64, z_e (N, D, h, w) float32."""
        return await runner("encoder", {"x": x})

    async def decode(self, runner: GraphRunner, z: np.ndarray, y: np.ndarray | None) -> Arrays:
        """codes (N, h, w) -> x_mean = E[x | codes] (N, C, H, W) float32."""
        return await runner("decoder", {"codes": z})

    async def sample(self, runner: GraphRunner, y: np.ndarray | None, options: Options) -> Arrays:
        """Ancestral sampling from the prior, one prior call per grid position: z (n, h, w) and x_mean."""
        n, (h, w) = options.n, self.grid
        u = prior_uniforms(options.seed, n, self.positions).astype(np.float64)  # (n, P)
        codes = np.zeros((n, h, w), np.int64)
        for position in range(self.positions):
            i, j = divmod(position, w)
            logits = (await runner("prior", {"codes": codes}))["logits"][:, :, i, j].astype(np.float64)
            scaled = logits / options.temperature  # (n, K)
            probs = np.exp(scaled - scaled.max(axis=1, keepdims=True))
            cdf = np.cumsum(probs, axis=1) / probs.sum(axis=1, keepdims=True)
            picked = (cdf < u[:, position:position + 1]).sum(axis=1)  # the first code whose CDF reaches u
            codes[:, i, j] = np.minimum(picked, self.codebook_size - 1)
        return {"z": codes, **await self.decode(runner, codes, y)}

    async def log_weights(self, runner: GraphRunner, x: np.ndarray, y: np.ndarray | None, k: int, seed: int,
                          graph: str = "log_weights") -> np.ndarray:
        """log importance weights of the likelihood view of x: (N, C, H, W) -> (N, k) float64."""
        view = self.preprocessing.likelihood_view(x)
        n, rows = len(view), math.ceil(k / self.chunk)
        feeds = {"x": np.repeat(view, rows, axis=0), "u_key": importance_keys(n, k, seed, self.chunk)}
        out = await runner(graph, feeds)
        return out["log_w"].reshape(n, rows * self.chunk)[:, :k].astype(np.float64)

    async def latent_vectors(self, runner: GraphRunner, view: np.ndarray, y: np.ndarray | None) -> np.ndarray:
        """The flattened pre-quantization vectors (N, D*h*w): what the latent bank holds."""
        return (await self.encode(runner, view, y))["z_e"].reshape(len(view), -1)

    async def reconstruct_rows(self, runner: GraphRunner, x: np.ndarray,
                               y: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """The flattened z_e (N, D*h*w) and the decoding of the codes (N, C, H, W)."""
        encoded = await self.encode(runner, x, y)
        x_mean = (await self.decode(runner, encoded["codes"], y))["x_mean"]
        return encoded["z_e"].reshape(len(x), -1), x_mean
