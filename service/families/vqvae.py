"""The VQ-VAE family (training/vqvae.py): a grid of codebook indices as the latent, a PixelCNN prior.

Graphs (service/artifacts.py, FAMILY_GRAPH_IO["vqvae"]): encoder x -> codes (N, h, w) int64 and the
pre-quantization vectors z_e (N, D, h, w); decoder codes -> E[x | codes]; prior codes -> next-code logits
(N, K, h, w) in one teacher-forced pass (kept for Triton clients and evaluation; no operation here uses
it); prior_row and prior_step, the same logits one position at a time from cached activations
(training/pixelcnn.py IncrementalPrior); log_weights x, u -> log p(x, z_s) - log q(z_s | x) for code
grids drawn from the stochastic posterior q(k | x) ~ softmax(-||z_e - e_k||^2 / tau) by inverse CDF of
the uniforms u.

- log_likelihood: as the Gaussian family, with uniforms u(seed, image, sample) (families/noise.py) in
  place of eps: the importance-weighted bound with k samples, independent of chunk and batch size.
- sample: ancestral sampling in raster order, run on the device thread as a loop (SAMPLER, a batcher of
  its own). Each row carries its code grid and the prior's caches: at the start of each grid row one
  prior_row call computes the vertical stack for the whole row, then one prior_step call per position
  gives that position's logits, so a sample costs one full prior pass in all, not one per position.
  Each loop call advances every row of its batch by up to STEPS_PER_CALL positions, each row at its own
  position (rows of concurrent requests share every prior_step call whatever their progress), and no
  call holds the device longer than that (encodes of other requests run between calls). Position p of
  sample i takes the code where the CDF of softmax(logits / temperature) first reaches u(seed, i)[p].
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
STEPS_PER_CALL = 7  # positions one sampler call advances each row: a 7x7 grid's row, 7 calls per sample


@dataclass(frozen=True)
class PriorShape:
    """What the sampling caches of the gated PixelCNN prior hold: `layers` layers of `channels` channels,
    `half` = kernel // 2 rows above (vertical stack) or columns left (horizontal stack) of a position."""

    layers: int
    channels: int
    half: int

    def caches(self, rows: int, width: int) -> Arrays:
        """Empty caches of `rows` samples (the zero padding above and left of the grid)."""
        layers, c, half = self.layers, self.channels, self.half
        return {"v_hist": np.zeros((rows, layers, c, half, width), np.float32),  # layer outputs, rows above
                "v_pre": np.zeros((rows, layers, 2 * c, width), np.float32),  # vertical pre-activations
                "h_hist": np.zeros((rows, layers, c, half), np.float32)}  # layer outputs, columns left


class VQVAE(ImageFamily):
    """The operations of one VQ-VAE (shapes in service/families/base.py)."""

    name = "vqvae"
    sliced_graphs = frozenset({"log_weights"})
    device_loops = frozenset({SAMPLER})  # batchers whose device work is the family's loop, not one graph
    unbatched_graphs = frozenset({"prior", "prior_row", "prior_step"})  # the loop calls the last two

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
            return {SAMPLER: items * math.ceil(self.positions / STEPS_PER_CALL), "decoder": items}
        if operation == "reconstruct":
            return {"encoder": items, "decoder": items}
        rows = items * math.ceil(options.k / self.chunk)
        if operation == "log_likelihood":
            return {"log_weights": rows}
        return self.anomaly_work(items, options, rows)

    def work_at_once(self, operation: Operation, items: int, options: Options) -> dict[str, int]:
        """Sampling queues one position's prior rows at a time (n rows per step)."""
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
            feeds = self._sampler_feeds(rows, np.full((rows, self.positions), 0.5, np.float32), 1.0)
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

    def _sampler_feeds(self, n: int, u: np.ndarray, temperature: float) -> Arrays:
        """The state of n samples before their first position: what device_loop takes and gives back."""
        return {"codes": np.zeros((n, *self.grid), np.int64), "u": u,  # u (n, P)
                "temperature": np.full(n, temperature, np.float32), "position": np.zeros(n, np.int64),
                **self.prior.caches(n, self.grid[1])}

    async def sample(self, runner: GraphRunner, y: np.ndarray | None, options: Options) -> Arrays:
        """Ancestral sampling from the prior (the device loop below): z (n, h, w) and x_mean."""
        n = options.n
        feeds = self._sampler_feeds(n, prior_uniforms(options.seed, n, self.positions), options.temperature)
        while feeds["position"].min() < self.positions:
            feeds.update(await runner(SAMPLER, feeds))
        return {"z": feeds["codes"], **await self.decode(runner, feeds["codes"], y)}

    def device_loop(self, name: str, run_graph: Callable[[str, Arrays], Arrays], feeds: Arrays) -> Arrays:
        """On the device thread: advance each row (B of them, from any requests) by up to STEPS_PER_CALL
        positions. Takes and gives codes (B, h, w) int64, position (B,) int64 (each row's next position)
        and the caches of PriorShape.caches; takes u (B, P) f32 and temperature (B,) f32 too."""
        assert name == SAMPLER
        state = {key: feeds[key].copy() for key in ("codes", "position", "v_hist", "v_pre", "h_hist")}
        codes, position = state["codes"], state["position"]
        v_hist, v_pre, h_hist = state["v_hist"], state["v_pre"], state["h_hist"]
        u, temperature = feeds["u"].astype(np.float64), feeds["temperature"].astype(np.float64)
        outside, back = self.codebook_size, np.arange(-self.prior.half, 0)  # code K: outside the grid
        for _ in range(STEPS_PER_CALL):
            rows = np.flatnonzero(position < self.positions)  # (A,)
            if not len(rows):
                break
            i, j = np.divmod(position[rows], self.grid[1])
            starting, first = rows[j == 0], i[j == 0]  # rows beginning grid row `first`
            if len(starting):  # the vertical stack of the new grid row, all layers and columns at once
                above = first[:, None] + back  # (S, half) grid rows above
                inside = codes[starting[:, None], np.maximum(above, 0)]  # (S, half, w)
                codes_above = np.where((above >= 0)[..., None], inside, outside)
                out = run_graph("prior_row", {"codes_above": codes_above, "v_hist": v_hist[starting]})
                v_pre[starting] = out["v_pre"]
                v_hist[starting] = np.concatenate([v_hist[starting, :, :, 1:], out["v_row"][..., None, :]], 3)
                h_hist[starting] = 0.0
            left = j[:, None] + back  # (A, half) columns left of each row's position
            codes_left = np.where(left >= 0, codes[rows[:, None], i[:, None], np.maximum(left, 0)], outside)
            column = v_pre[rows, :, :, j]  # (A, L, 2C): the vertical stack at each row's column
            out = run_graph("prior_step", {"codes_left": codes_left, "h_hist": h_hist[rows], "v_pre": column})
            scaled = out["logits"].astype(np.float64) / temperature[rows, None]  # (A, K)
            probs = np.exp(scaled - scaled.max(axis=1, keepdims=True))
            cdf = np.cumsum(probs, axis=1) / probs.sum(axis=1, keepdims=True)
            picked = (cdf < u[rows, position[rows]][:, None]).sum(axis=1)  # first code whose CDF reaches u
            codes[rows, i, j] = np.minimum(picked, self.codebook_size - 1)
            h_hist[rows] = np.concatenate([h_hist[rows, :, :, 1:], out["h_col"][:, :, :, None]], 3)
            position[rows] += 1
        return state

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
