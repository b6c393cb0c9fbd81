"""The VQ-VAE family (training/vqvae.py): a grid of codebook indices as the latent, a PixelCNN prior.

Graphs (service/artifacts.py, FAMILY_GRAPH_IO["vqvae"]): encoder x -> codes (N, h, w) int64 and the
pre-quantization vectors z_e (N, D, h, w); decoder codes -> E[x | codes]; prior codes -> next-code logits
(N, K, h, w) in one teacher-forced pass (kept for Triton clients and evaluation; no operation here uses
it); prior_sample_row, one grid row of codes drawn from uniforms, its logits (the full pass's) computed
from cached activations (training/pixelcnn.py IncrementalPrior); log_weights x, u -> log p(x, z_s) -
log q(z_s | x) for code grids drawn from the stochastic posterior q(k | x) ~ softmax(-||z_e - e_k||^2 /
tau) by inverse CDF of the uniforms u.

- log_likelihood: as the Gaussian family, with uniforms u(seed, image, sample) (families/noise.py) in
  place of eps: the importance-weighted bound with k samples, independent of chunk and batch size.
- sample: ancestral sampling in raster order, run on the device thread (SAMPLER, a batcher of its own):
  each batch is one prior_sample_row call that draws the next grid row of every sample in it, each
  sample at its own grid row, so samples of concurrent requests share every call whatever their
  progress, a sample costs h calls and one full prior pass of compute in all (not one pass per
  position), and no call holds the device longer than one row (encodes of other requests run between
  calls). Each sample carries its code grid and the prior's vertical-stack cache (PriorShape) from call
  to call. Position p of sample i takes the code where the CDF of softmax(logits / temperature) first
  reaches u(seed, i)[p].
- anomaly scores: -log p(x) from the IW bound; latent_knn and fisher compare the flattened z_e
  (N, D*h*w), which is what the manifest's latent_dim counts and the latent bank holds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from service.artifacts import AnomalyCalibration, Manifest, Preprocessing
from service.families.base import Arrays, GraphRunner, LatentSpace, Operation, Options
from service.families.common import ImageFamily
from service.families.noise import importance_keys, prior_uniforms, rows_uniforms

DEFAULT_CHUNK = 128
SAMPLER = "prior_sampler"  # the device loop of ancestral sampling (a batcher, not a graph file)


@dataclass(frozen=True)
class PriorShape:
    """The sampling cache of the gated PixelCNN prior: each of `layers` layers' vertical-stack output
    (`channels` channels) at the `half` = kernel // 2 grid rows above the next row."""

    layers: int
    channels: int
    half: int

    def empty_cache(self, rows: int, width: int) -> np.ndarray:
        """v_hist (rows, L, C, half, w) before the first grid row: the zero padding above the grid."""
        return np.zeros((rows, self.layers, self.channels, self.half, width), np.float32)


class VQVAE(ImageFamily):
    """The operations of one VQ-VAE (shapes in service/families/base.py)."""

    name = "vqvae"
    sliced_graphs = frozenset({"log_weights"})
    device_loops = frozenset({SAMPLER})  # batchers whose device work is the family's loop, not one graph
    unbatched_graphs = frozenset({"prior", "prior_sample_row"})  # the sampler calls the second

    def __init__(self, *, grid: tuple[int, int], codebook_size: int, code_dim: int,
                 input_shape: tuple[int, int, int], preprocessing: Preprocessing, likelihood: str,
                 prior: PriorShape, calibration: AnomalyCalibration | None = None,
                 chunk: int = DEFAULT_CHUNK) -> None:
        super().__init__(input_shape=input_shape, preprocessing=preprocessing, likelihood=likelihood,
                         conditional=False, calibration=calibration, chunk=chunk)
        self.grid, self.codebook_size, self.code_dim, self.prior = grid, codebook_size, code_dim, prior
        self.positions = grid[0] * grid[1]

    @classmethod
    def from_manifest(cls, manifest: Manifest, chunk: int = DEFAULT_CHUNK) -> VQVAE:
        model, prior = manifest.raw["model"], manifest.raw["prior"]
        return cls(grid=(int(model["grid"][0]), int(model["grid"][1])),
                   codebook_size=int(model["codebook_size"]), code_dim=int(model["code_dim"]),
                   input_shape=manifest.input_shape, preprocessing=manifest.preprocessing,
                   likelihood=manifest.likelihood,
                   prior=PriorShape(int(prior["layers"]), int(prior["channels"]), int(prior["kernel"]) // 2),
                   calibration=manifest.anomaly, chunk=chunk)

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
            return {SAMPLER: items * self.grid[0], "decoder": items}  # a sampler call per grid row
        if operation == "reconstruct":
            return {"encoder": items, "decoder": items}
        rows = items * math.ceil(options.k / self.chunk)
        if operation == "log_likelihood":
            return {"log_weights": rows}
        return self.anomaly_work(items, options, rows)

    def work_at_once(self, operation: Operation, items: int, options: Options) -> dict[str, int]:
        """Sampling queues one grid row's sampler rows at a time (n rows per call)."""
        if operation == "sample":
            return {SAMPLER: items, "decoder": items}
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
        if graph == SAMPLER:
            feeds = self.sampler_state(rows, np.full((rows, self.positions), 0.5, np.float32), 1.0)
            return feeds, {name: value.shape for name, value in feeds.items()
                           if name not in ("u", "temperature")}
        return {"x": x, "u_key": np.zeros((rows, 3), np.int64)}, {"log_w": (rows, self.chunk)}

    # -- operations --------------------------------------------------------------------------------------
    async def encode(self, runner: GraphRunner, x: np.ndarray, y: np.ndarray | None) -> Arrays:
        """x (N, C, H, W) -> codes (N, h, w) int64, z_e (N, D, h, w) float32."""
        return await runner("encoder", {"x": x})

    async def decode(self, runner: GraphRunner, z: np.ndarray, y: np.ndarray | None) -> Arrays:
        """codes (N, h, w) -> x_mean = E[x | codes] (N, C, H, W) float32."""
        return await runner("decoder", {"codes": z})

    def sampler_state(self, n: int, u: np.ndarray, temperature: float) -> Arrays:
        """The state of n samples before their first grid row: what device_loop takes and gives back."""
        return {"codes": np.zeros((n, *self.grid), np.int64), "u": u,  # u (n, P)
                "temperature": np.full(n, temperature, np.float32), "row": np.zeros(n, np.int64),
                "v_hist": self.prior.empty_cache(n, self.grid[1])}

    async def sample(self, runner: GraphRunner, y: np.ndarray | None, options: Options) -> Arrays:
        """Ancestral sampling from the prior (the device loop below): z (n, h, w) and x_mean."""
        n = options.n
        feeds = self.sampler_state(n, prior_uniforms(options.seed, n, self.positions), options.temperature)
        while feeds["row"].min() < self.grid[0]:
            feeds.update(await runner(SAMPLER, feeds))
        return {"z": feeds["codes"], **await self.decode(runner, feeds["codes"], y)}

    def device_loop(self, name: str, run_graph: Callable[[str, Arrays], Arrays], feeds: Arrays) -> Arrays:
        """On the device thread: draw the next grid row of each sample (B of them, from any requests).
        Takes and gives codes (B, h, w) int64, row (B,) int64 (each sample's next grid row) and v_hist
        (PriorShape); takes u (B, P) f32 and temperature (B,) f32 too."""
        assert name == SAMPLER
        codes, row, v_hist = feeds["codes"].copy(), feeds["row"].copy(), feeds["v_hist"].copy()
        active = np.flatnonzero(row < self.grid[0])  # (A,)
        if not len(active):
            return {"codes": codes, "row": row, "v_hist": v_hist}
        width, i = self.grid[1], row[active]
        above = i[:, None] + np.arange(-self.prior.half, 0)  # (A, half) the grid rows above
        inside = codes[active[:, None], np.maximum(above, 0)]  # (A, half, w)
        columns = i[:, None] * width + np.arange(width)  # (A, w) positions of the row
        out = run_graph("prior_sample_row", {
            "codes_above": np.where((above >= 0)[..., None], inside, self.codebook_size),  # K: outside
            "v_hist": v_hist[active], "u": feeds["u"][active[:, None], columns],
            "temperature": feeds["temperature"][active]})
        codes[active, i] = out["codes"]
        v_hist[active] = np.concatenate([v_hist[active, :, :, 1:], out["v_row"][:, :, :, None]], axis=3)
        row[active] += 1
        return {"codes": codes, "row": row, "v_hist": v_hist}

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
