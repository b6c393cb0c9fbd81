"""Scores of an exported artifact, computed by the service's own pipelines.

The exported ONNX graphs run in ONNX Runtime and the model math is the service's model family
(service/families): the same code that serves a request, with a runner that calls the graphs directly
instead of through the batchers. So the calibration written at export and the numbers of
`python -m training ood-eval` are exactly what a served model gives, up to the per-request seed.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.anomaly import LatentBank, TypicalityReference, anomaly_scores
from service.artifacts import FAMILY_GRAPH_IO, AnomalyCalibration, Preprocessing
from service.families import DEFAULT_CHUNK, Arrays
from service.families.common import METHOD_NEEDS, ImageFamily
from service.families.gaussian import GaussianLatentVAE


@dataclass(frozen=True)
class ScoreReferences:
    """What the scores need besides the images: references from the validation split, the latent bank."""

    typicality: TypicalityReference | None = None  # typicality, combined
    complexity: TypicalityReference | None = None  # combined
    latent_bank: np.ndarray | LatentBank | None = None  # (M, D) latent_knn, fisher
    fisher: dict[str, np.ndarray] | None = None  # fisher: {statistic: (m,) sorted validation values}

    @classmethod
    def from_calibration(cls, cal: AnomalyCalibration | None) -> ScoreReferences:
        """The references a manifest's `anomaly` object carries (none for older artifacts)."""
        if cal is None:
            return cls()
        by = cal.methods
        banks = [c.latent_bank for c in by.values() if c.latent_bank is not None]
        return cls(typicality=by["typicality"].typicality if "typicality" in by else None,
                   complexity=by["combined"].complexity_reference if "combined" in by else None,
                   latent_bank=banks[0] if banks else None,
                   fisher=by["fisher"].fisher_arrays if "fisher" in by else None)

    def available(self, method: str, has_background: bool) -> bool:
        """Whether `method` can be scored with these references (and a background graph)."""
        return {"likelihood_ratio": has_background, "typicality": self.typicality is not None,
                "combined": self.typicality is not None and self.complexity is not None,
                "latent_knn": self.latent_bank is not None,
                "fisher": self.latent_bank is not None and self.fisher is not None}.get(method, True)


class GraphScorer:
    """The operations of an artifact folder's graphs, in ONNX Runtime on CPU, one call at a time.

    directory: a version folder (or an export's temporary folder) holding the encoder, decoder and
    log_weights graphs and, when present, background_log_weights.onnx. likelihood: the decoder's
    family ("bernoulli" or "gaussian"), for fisher's reconstruction errors. batch_rows: rows per encoder or
    decoder call; a log_weights call takes at most decoder_rows / chunk rows, since its decoder runs once
    per row and sample (results depend on neither).
    """

    def __init__(self, directory: Path, latent_dim: int, preprocessing: Preprocessing, likelihood: str,
                 threads: int = 1, chunk: int = DEFAULT_CHUNK, batch_rows: int = 256,
                 input_shape: tuple[int, int, int] | None = None, conditional: bool = False,
                 decoder_rows: int = 4096, family: ImageFamily | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        shape = input_shape or (preprocessing.channels, preprocessing.height, preprocessing.width)
        # family: the model's family object (e.g. a VQ-VAE's); default: a Gaussian-latent model
        self.family = family or GaussianLatentVAE(latent_dim=latent_dim, input_shape=shape,
                                                  preprocessing=preprocessing, likelihood=likelihood,
                                                  conditional=conditional, chunk=chunk)
        self.graph_io = FAMILY_GRAPH_IO[self.family.name]
        self.sessions = {}
        for graph in self.graph_io:  # the family's graphs, optional ones included: loaded when present
            path = Path(directory) / f"{graph}.onnx"
            if path.is_file():
                self.sessions[graph] = ort.InferenceSession(str(path), sess_options=options,
                                                            providers=["CPUExecutionProvider"])
        self.batch_rows = batch_rows
        # A (rows, chunk) log_weights call decodes rows * chunk images at once: 256 x 128 conv decodes of
        # 32x32 RGB images held 12 GB of activations in ONNX Runtime's arena.
        self.decoder_rows = decoder_rows

    @classmethod
    def from_artifact(cls, directory: Path, threads: int = 1) -> GraphScorer:
        """From a version folder, verified by the service's own reader."""
        from service.artifacts import load_manifest
        from service.families import family_for

        m = load_manifest(Path(directory), "onnx")
        return cls(m.directory, m.latent_dim, m.preprocessing, m.likelihood, threads=threads,
                   input_shape=m.input_shape, conditional=m.conditional,
                   family=family_for(m))  # type: ignore[arg-type]

    @property
    def has_background(self) -> bool:
        return "background_log_weights" in self.sessions

    async def _run_graph(self, graph: str, feeds: Arrays) -> Arrays:
        """The family's GraphRunner: rows in calls of at most batch_rows, as the device thread runs them."""
        session, (inputs, outputs) = self.sessions[graph], self.graph_io[graph]
        inputs += ("y",) if self.family.conditional else ()
        rows = len(next(iter(feeds.values())))
        per_row = self.family.chunk if graph in self.family.sliced_graphs else 1  # decodes per row
        step = max(1, min(self.batch_rows, self.decoder_rows // per_row))
        parts = []
        for i in range(0, rows, step):
            batch = self.family.device_feeds(graph, {k: v[i:i + step] for k, v in feeds.items()})
            parts.append(dict(zip(outputs, session.run(None, {n: batch[n] for n in inputs}), strict=True)))
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def nll(self, images: np.ndarray, k: int, seed: int, graph: str = "log_weights",
            labels: np.ndarray | None = None) -> np.ndarray:
        """-log p(x) in nats by the IW bound with k samples: (N, C, H, W) in [0, 1] -> (N,) float64.

        Image i gets the noise of image i of a request with this seed, as the service draws it.
        labels: (N,) int64 classes of a conditional model.
        """
        x = np.asarray(images, dtype=np.float32)
        out = asyncio.run(self.family.log_likelihood(self._run_graph, x, labels, k, seed, graph))
        return -out["log_likelihood"]

    def latent_means(self, images: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
        """The family's latent vectors of the likelihood view (Gaussian: encoder means), as the service
        computes them: (N, C, H, W) -> (N, L) float32."""
        view = self.family.preprocessing.likelihood_view(np.asarray(images, dtype=np.float32))
        return asyncio.run(self.family.latent_vectors(self._run_graph, view, labels))

    def anomaly_inputs(self, images: np.ndarray, k: int, seed: int, methods: tuple[str, ...],
                       labels: np.ndarray | None = None) -> dict:
        """The family's anomaly_inputs for every method in `methods` at once (one pass over the graphs)."""
        needs = set().union(*(METHOD_NEEDS.get(m, frozenset()) for m in methods))
        if not self.has_background:
            needs.discard("background_nll")
        x = np.asarray(images, dtype=np.float32)
        return asyncio.run(self.family.anomaly_inputs(self._run_graph, x, labels, k, seed, needs))

    def all_scores(self, images: np.ndarray, k: int, seed: int, methods: tuple[str, ...],
                   references: ScoreReferences, labels: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """{method: (N,) scores} for the methods these references support, from one pass over the graphs.

        images: (N, C, H, W) in [0, 1], the preprocessed input before the likelihood view.
        """
        wanted = tuple(m for m in methods if references.available(m, self.has_background))
        inputs = self.anomaly_inputs(images, k, seed, wanted, labels)
        nll = inputs.pop("nll")
        inputs.pop("standard_error")
        return {method: anomaly_scores(method, nll, typicality=references.typicality,
                                       complexity_reference=references.complexity,
                                       latent_bank=references.latent_bank, fisher_reference=references.fisher,
                                       **inputs)
                for method in wanted}
