"""What a model family is: its graphs and its operations, as small pipelines over graph calls.

A family turns one request's inputs into outputs by calling its graphs through a `GraphRunner`:
- in the service's inference process the runner submits rows to that graph's dynamic batcher, so the
  rows of every request share batches, and a request crosses the process boundary once each way;
- in training (evaluation, export calibration, ood-eval) the runner calls ONNX Runtime directly.
Both run the very same pipeline code, so served scores equal the exporter's calibration by
construction. A family never sees HTTP, processes or batchers.

Operations (rows first; shapes per request of N items; z is the family's latent, LatentSpace: (N, D)
float32 for the Gaussian family, (N, h, w) int64 code grids for the VQ-VAE):
    encode:         x (N, C, H, W) [, y (N,)]         -> gaussian: mean, log_var (N, D) f32;
                                                         vqvae: codes (N, h, w) i64, z_e (N, D, h, w) f32
    decode:         z [, y (N,)]                      -> x_mean (N, C, H, W) f32
    sample:         [y (n,)]; n, seed, temperature    -> z, x_mean (n, C, H, W) f32
    reconstruct:    x [, y]                           -> x_mean (N, C, H, W) f32, sse (N,) f64
    log_likelihood: x [, y]; k, seed [, graph]        -> log_likelihood, elbo, standard_error (N,) f64
    anomaly_score:  x [, y]; k, seed, method, alpha   -> score, p_value, percentile, threshold,
                                                         standard_error (N,) f64 (NaN unless the method
                                                         is in anomaly.STANDARD_ERROR_METHODS),
                                                         is_anomaly (N,) bool
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

Arrays = dict[str, np.ndarray]  # name -> (rows, ...)
Operation = Literal["encode", "decode", "sample", "reconstruct", "log_likelihood", "anomaly_score"]
OPERATIONS: tuple[Operation, ...] = ("encode", "decode", "sample", "reconstruct", "log_likelihood",
                                     "anomaly_score")


class GraphRunner(Protocol):
    """Runs rows of one graph (any number of rows) and returns the outputs of exactly those rows."""

    async def __call__(self, graph: str, feeds: Arrays) -> Arrays: ...


class FamilyError(Exception):
    """The model produced something no answer can be made of (e.g. non-finite log-likelihoods)."""


@dataclass(frozen=True)
class Options:
    """The options of one operation, already validated against the service's limits.

    k, seed: importance samples and noise seed (log_likelihood, anomaly_score); graph: which
    log-weights graph (log_likelihood: "background_log_weights" scores the background model);
    n, temperature: samples and prior scale (sample); method, alpha: the anomaly score and level.
    """

    k: int = 0
    seed: int = 0
    graph: str = "log_weights"
    n: int = 0
    temperature: float = 1.0
    method: str = "nll"
    alpha: float = 0.01


class Family(Protocol):
    """A model family (one module in service/families/); every served artifact gets one instance."""

    name: str
    chunk: int  # rows of importance sampling carry this many samples each (an execution detail)
    sliced_graphs: frozenset[str]  # graphs of importance-sampling rows: batched by time slice
    device_loops: frozenset[str]  # batchers whose device work is device_loop(), e.g. ancestral sampling
    unbatched_graphs: frozenset[str]  # graphs with no batcher: only device loops call them, or nothing

    def work(self, operation: Operation, items: int, options: Options) -> dict[str, int]:
        """Graph -> rows one request of `items` items submits: the one cost formula of admission."""
        ...

    def work_at_once(self, operation: Operation, items: int, options: Options) -> dict[str, int]:
        """Graph -> the most rows the request has queued at one time (what queue capacity is checked
        against): work() unless the operation submits its rows step by step (ancestral sampling)."""
        ...

    def device_loop(self, name: str, run_graph: Callable[[str, Arrays], Arrays], feeds: Arrays) -> Arrays:
        """On the device thread: one batch of the loop `name`, calling graphs through run_graph directly."""
        ...

    def device_feeds(self, graph: str, feeds: Arrays) -> Arrays:
        """On the device thread before a batch runs: e.g. draw the noise of keyed rows."""
        ...

    def warm_feeds(self, graph: str, rows: int) -> tuple[Arrays, dict[str, tuple[int, ...]]]:
        """A warm-up batch of `graph` and the output shapes it must give."""
        ...

    async def run(self, operation: Operation, runner: GraphRunner, inputs: Arrays,
                  options: Options) -> Arrays:
        """One operation of one request."""
        ...

    @staticmethod
    def encodings(out: Arrays, include: frozenset[str]) -> dict[str, np.ndarray]:
        """The encode outputs clients get (LatentSpace.encode_outputs), from the encode operation's
        arrays; `include`: the optional outputs asked for."""
        ...


@dataclass(frozen=True)
class LatentSpace:
    """A family's latents as clients see them, on every protocol: what decode takes, what encode gives.

    input: decode's input (the /v1 body key and the V2 input name), one item of `shape` and `dtype`,
    values in [0, upper) when upper is set (codebook indices); encode_outputs: (name, V2 datatype,
    per-item shape) of every encode output, the optional ones (asked for with ?include=) last.
    """

    input: str
    shape: tuple[int, ...]
    dtype: Literal["float32", "int64"]
    upper: int | None
    encode_outputs: tuple[tuple[str, str, tuple[int, ...]], ...]
    optional_outputs: frozenset[str] = frozenset()

    @property
    def size(self) -> int:
        """Numbers in one latent item."""
        return int(np.prod(self.shape))


NO_OPTIONS = Options()  # operations without options (encode, decode, reconstruct)
