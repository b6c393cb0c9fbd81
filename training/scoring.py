"""Anomaly scores of an exported artifact, computed the way the service computes them.

The exported ONNX graphs run in ONNX Runtime, noise comes from the service's own seeded generator
(service.estimators.chunk_eps: rows of `chunk` samples per (seed, image, chunk)), inputs get the
manifest's likelihood view (binarized for Bernoulli models) and the scores come from service.anomaly.
So the calibration written at export and the numbers of `python -m training ood-eval` are what a
served model gives, up to the per-request seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.anomaly import (
    LATENT_METHODS,
    TypicalityReference,
    anomaly_scores,
    orientation_views,
    reconstruction_error,
)
from service.artifacts import GRAPH_IO, AnomalyCalibration, Preprocessing
from service.estimators import chunk_eps

DEFAULT_CHUNK = 128  # the service's default VAE_IW_CHUNK_SIZE


@dataclass(frozen=True)
class ScoreReferences:
    """What the scores need besides the images: references from the validation split, the latent bank."""

    typicality: TypicalityReference | None = None  # typicality, combined
    complexity: TypicalityReference | None = None  # combined
    latent_bank: np.ndarray | None = None  # (M, D) latent_knn, fisher
    fisher: dict[str, tuple[float, ...]] | None = None  # fisher

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
                   fisher=by["fisher"].fisher_reference if "fisher" in by else None)

    def available(self, method: str, has_background: bool) -> bool:
        """Whether `method` can be scored with these references (and a background graph)."""
        return {"likelihood_ratio": has_background, "typicality": self.typicality is not None,
                "combined": self.typicality is not None and self.complexity is not None,
                "latent_knn": self.latent_bank is not None,
                "fisher": self.latent_bank is not None and self.fisher is not None}.get(method, True)


class GraphScorer:
    """-log p(x) (IW bound) of the log_weights graphs of an artifact folder, in ONNX Runtime on CPU.

    directory: a version folder (or an export's temporary folder) holding the encoder, decoder and
    log_weights graphs and, when present, background_log_weights.onnx. likelihood: the decoder's
    family ("bernoulli" or "gaussian"), for fisher's reconstruction errors.
    """

    def __init__(self, directory: Path, latent_dim: int, preprocessing: Preprocessing, likelihood: str,
                 threads: int = 1, chunk: int = DEFAULT_CHUNK) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.sessions = {}
        for graph in ("encoder", "decoder", "log_weights", "background_log_weights"):
            path = Path(directory) / f"{graph}.onnx"
            if path.is_file():
                self.sessions[graph] = ort.InferenceSession(str(path), sess_options=options,
                                                            providers=["CPUExecutionProvider"])
        self.latent_dim = latent_dim
        self.preprocessing = preprocessing
        self.likelihood = likelihood
        self.chunk = chunk

    @classmethod
    def from_artifact(cls, directory: Path, threads: int = 1) -> GraphScorer:
        """From a version folder, verified by the service's own reader."""
        from service.artifacts import load_manifest

        m = load_manifest(Path(directory), "onnx")
        return cls(m.directory, m.latent_dim, m.preprocessing, m.likelihood, threads=threads)

    @property
    def has_background(self) -> bool:
        return "background_log_weights" in self.sessions

    def nll(self, images: np.ndarray, k: int, seed: int, graph: str = "log_weights",
            batch_rows: int = 64) -> np.ndarray:
        """-log p(x) in nats by the IW bound with k samples. images: (N, C, H, W) in [0, 1] -> (N,) float64.

        The images are put in the likelihood view first; image i gets the noise rows
        chunk_eps(seed, i, c, chunk, D), c = 0..ceil(k / chunk) - 1, of which the first k are used,
        exactly as the service draws them for image i of a request.
        """
        x = self.preprocessing.likelihood_view(np.asarray(images, dtype=np.float32))
        session = self.sessions[graph]
        names = GRAPH_IO[graph][0]
        chunks = math.ceil(k / self.chunk)
        out = np.empty(len(x))
        per_batch = max(1, batch_rows // chunks)
        for start in range(0, len(x), per_batch):
            xb = x[start:start + per_batch]  # (b, C, H, W)
            rows_x = np.repeat(xb, chunks, axis=0)  # (b * chunks, C, H, W)
            eps = np.stack([chunk_eps(seed, start + i, c, self.chunk, self.latent_dim)
                            for i in range(len(xb)) for c in range(chunks)])  # (b * chunks, chunk, D)
            log_w = session.run(None, {names[0]: rows_x, names[1]: eps})[0]  # (b * chunks, chunk)
            log_w = log_w.reshape(len(xb), chunks * self.chunk)[:, :k].astype(np.float64)  # (b, k)
            top = log_w.max(axis=1, keepdims=True)
            out[start:start + len(xb)] = -(top[:, 0] + np.log(np.exp(log_w - top).mean(axis=1)))
        return out

    def latent_means(self, images: np.ndarray, batch: int = 256) -> np.ndarray:
        """Encoder means of the likelihood view, as the service encodes it: (N, C, H, W) -> (N, D) float32."""
        return self._encode(self.preprocessing.likelihood_view(np.asarray(images, dtype=np.float32)), batch)

    def reconstruction_errors(self, images: np.ndarray, batch: int = 256) -> np.ndarray:
        """fisher's reconstruction errors of the likelihood view and its transforms: (N, C, H, W) ->
        (1 + T, N).

        Binarizing (per pixel) and transforming (moving pixels) commute, so these are the service's
        errors of anomaly.orientation_views(view), encoded and decoded the same way.
        """
        view = self.preprocessing.likelihood_view(np.asarray(images, dtype=np.float32))
        rows = orientation_views(view)  # ((1 + T) N, C, H, W)
        means = self._encode(rows, batch)
        name = GRAPH_IO["decoder"][0][0]
        recon = np.concatenate([self.sessions["decoder"].run(None, {name: means[i:i + batch]})[0]
                                for i in range(0, len(means), batch)])
        return reconstruction_error(rows, recon, self.likelihood).reshape(-1, len(view))

    def _encode(self, x: np.ndarray, batch: int) -> np.ndarray:
        """Encoder means of model inputs (N, C, H, W) -> (N, D) float32, in batches."""
        name = GRAPH_IO["encoder"][0][0]
        return np.concatenate([self.sessions["encoder"].run(None, {name: x[i:i + batch]})[0]
                               for i in range(0, len(x), batch)]).astype(np.float32)

    def all_scores(self, images: np.ndarray, k: int, seed: int, methods: tuple[str, ...],
                   references: ScoreReferences) -> dict[str, np.ndarray]:
        """{method: (N,) scores} for the methods these references support, from one pass over the graphs.

        images: (N, C, H, W) in [0, 1], the preprocessed input before the likelihood view.
        """
        raw = np.asarray(images, dtype=np.float32)
        nll = self.nll(raw, k, seed)
        bg = self.nll(raw, k, seed, "background_log_weights") if self.has_background else None
        view = self.preprocessing.likelihood_view(raw)
        wanted = [m for m in methods if references.available(m, self.has_background)]
        mu = self.latent_means(raw) if LATENT_METHODS & set(wanted) else None
        errors = self.reconstruction_errors(raw) if "fisher" in wanted else None  # (1 + T, N)
        return {method: anomaly_scores(method, nll, images=view, background_nll=bg,
                                       typicality=references.typicality,
                                       complexity_reference=references.complexity, raw_images=raw,
                                       latent_mean=mu, reconstruction_errors=errors,
                                       latent_bank=references.latent_bank,
                                       fisher_reference=references.fisher)
                for method in wanted}
