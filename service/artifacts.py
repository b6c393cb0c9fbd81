"""The artifact contract, defined once, and its reader: find artifacts, read manifest.json, verify files.

Format: docs/artifact-format.md. The exporter (training/export.py) imports the definitions below
(format version, name rules, graph names and signatures, preprocessing, sha256) so the writer and the
reader cannot drift apart; this module imports nothing from training/ (the service never does).
Paths are only ever built from directory listings and manifest entries checked here, never from
request data.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from service.anomaly import (
    FISHER_STATISTICS,
    LATENT_METHODS,
    METHODS,
    LatentBank,
    MethodCalibration,
    TypicalityReference,
    transform_names,
)

FORMAT_VERSION = 1  # what the exporter writes
SUPPORTED_FORMAT_VERSIONS = {FORMAT_VERSION}
# Graph name -> (input names, output names); conditional models add a trailing "y" input to each.
GRAPH_IO: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "encoder": (("x",), ("mean", "log_var")),
    "decoder": (("z",), ("x_mean",)),
    "log_weights": (("x", "eps"), ("log_w",)),
    # Optional: the likelihood-ratio background model (Ren et al. 2019), same signature as log_weights
    # (eps (B, K, D) with the main model's latent_dim D).
    "background_log_weights": (("x", "eps"), ("log_w",)),
}
GRAPHS = ("encoder", "decoder", "log_weights")  # every Gaussian-latent artifact has these
# The anomaly methods latent_knn and fisher read the training images' encoder means from this .npy.
LATENT_BANK_FILE = "latent_bank.npy"
OPTIONAL_GRAPHS = ("background_log_weights",)  # loaded when the manifest lists them
# Each model family's graphs (manifest `model.family`; artifacts without it are "gaussian"). The VQ-VAE's
# (training/graphs_vq.py): codes are int64 (B, h, w) grids of codebook indices, z_e the encoder's
# (B, D, h, w) vectors before quantization, u (B, S, h*w) uniforms from which log_weights draws S code
# grids of the stochastic posterior, logits the prior's (B, K, h, w) next-code logits. prior_sample_row
# draws one row of codes (B, w) from uniforms u (B, w) and temperatures (B,), computing the same logits
# from cached activations v_hist (B, L, C, half, w) -> v_row (B, L, C, w), for fast sampling
# (training/pixelcnn.py IncrementalPrior: shapes and cache layout there).
FAMILY_GRAPH_IO: dict[str, dict[str, tuple[tuple[str, ...], tuple[str, ...]]]] = {
    "gaussian": GRAPH_IO,
    "vqvae": {
        "encoder": (("x",), ("codes", "z_e")),
        "decoder": (("codes",), ("x_mean",)),
        "prior": (("codes",), ("logits",)),
        "prior_sample_row": (("codes_above", "v_hist", "u", "temperature"), ("codes", "v_row")),
        "log_weights": (("x", "u"), ("log_w",)),
    },
}
FAMILY_GRAPHS: dict[str, tuple[str, ...]] = {"gaussian": GRAPHS, "vqvae": tuple(FAMILY_GRAPH_IO["vqvae"])}
FAMILY_OPTIONAL_GRAPHS: dict[str, tuple[str, ...]] = {"gaussian": OPTIONAL_GRAPHS, "vqvae": ()}
# Names and versions (docs/artifact-format.md): neither can be "..", contain a "/" or start with the "."
# that marks a half-written `.<version>.partial` export; 64 characters at most.
MODEL_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class ArtifactError(RuntimeError):
    """The artifact is missing, malformed or corrupt; the message names the file and the problem."""


@dataclass(frozen=True)
class Preprocessing:
    """How a raw image becomes the model input x; written by the exporter, applied by the service."""

    color_mode: str = "L"  # Pillow mode of x: "L" (grey, 1 channel) or "RGB" (3 channels)
    height: int = 28
    width: int = 28
    resample: str = "bilinear"  # Pillow resampling filter name for resizing
    # Pixel values are divided by 255 into [0, 1]. For Bernoulli models the likelihood endpoints
    # binarize x >= threshold (deterministic, so the same image always gets the same score);
    # training uses dynamic binarization instead (x ~ Bernoulli(grey level)).
    binarize_threshold: float | None = None

    @property
    def channels(self) -> int:
        return 1 if self.color_mode == "L" else 3

    def to_dict(self) -> dict:
        """The manifest's `preprocessing` object."""
        return {**asdict(self), "channels": self.channels, "value_range": [0.0, 1.0]}

    def likelihood_view(self, x: np.ndarray) -> np.ndarray:
        """What log_weights (and every anomaly score) sees: x (N, C, H, W) in [0, 1], binarized if set."""
        if self.binarize_threshold is None:
            return x
        return (x >= self.binarize_threshold).astype(x.dtype)


@dataclass(frozen=True)
class AnomalyCalibration:
    """The manifest's optional `anomaly` object: conformal calibration per scoring method."""

    k: int  # importance samples of every -log p(x) in the calibration
    alpha: float  # the exporter's suggested default level
    default_method: str
    methods: dict[str, MethodCalibration] = field(default_factory=dict)


@dataclass(frozen=True)
class GraphSpec:
    files: dict[str, str]  # runtime ("onnx" | "torchscript") -> file name inside the version folder
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class Manifest:
    """The parts of manifest.json the service relies on, checked; `raw` keeps everything for metadata."""

    name: str
    version: str
    directory: Path
    kind: str
    latent_dim: int  # gaussian: D; vqvae: the length of the flattened pre-quantization vectors, D*h*w
    channels: int
    height: int
    width: int
    likelihood: str
    labels: tuple[str, ...] | None
    preprocessing: Preprocessing
    graphs: dict[str, GraphSpec]
    raw: dict[str, Any]
    anomaly: AnomalyCalibration | None = None  # conformal calibration per method
    family: str = "gaussian"  # manifest model.family: which graphs there are and what they mean

    @property
    def conditional(self) -> bool:
        return self.labels is not None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)

    @property
    def data_dims(self) -> int:
        return self.channels * self.height * self.width

    def graph_path(self, graph: str, runtime: str) -> Path:
        return self.directory / self.graphs[graph].files[runtime]


def version_key(version: str) -> tuple[int, int | str]:
    """Numeric versions sort numerically and after non-numeric ones, so "10" is newer than "9"."""
    return (1, int(version)) if version.isdigit() else (0, version)


def discover(models_dir: Path, selected: list[str], all_versions: bool = False) -> list[Path]:
    """Version folders to load, for the `name[:version]` refs given (default: every model).

    A bare name means every version of it with `all_versions`, else only its latest version.
    """
    if not models_dir.is_dir():
        raise ArtifactError(f"models directory {models_dir} does not exist "
                            "(set VAE_MODELS_DIR or --models-dir)")
    found: dict[str, dict[str, Path]] = {}
    for model_dir in sorted(models_dir.iterdir()):
        if not model_dir.is_dir() or not MODEL_NAME_RE.fullmatch(model_dir.name):
            continue
        versions = {v.name: v for v in model_dir.iterdir()
                    if v.is_dir() and VERSION_RE.fullmatch(v.name) and (v / "manifest.json").is_file()}
        if versions:
            found[model_dir.name] = versions
    refs = selected or sorted(found)
    chosen = []
    for ref in refs:
        name, _, version = ref.partition(":")
        if name not in found:
            raise ArtifactError(f"model {name!r} not found in {models_dir} "
                                f"(found: {sorted(found) or 'none'})")
        if version and version not in found[name]:
            raise ArtifactError(f"model {name!r} has no version {version!r} (found: {sorted(found[name])})")
        if version:
            chosen.append(found[name][version])
        elif all_versions:
            chosen.extend(found[name][v] for v in sorted(found[name], key=version_key))
        else:
            chosen.append(found[name][max(found[name], key=version_key)])
    if not chosen:
        raise ArtifactError(f"no models found in {models_dir}: expected <name>/<version>/manifest.json "
                            "(export one with `python -m training export`)")
    return chosen


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks; the checksum of the manifest's `files`."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _inside(directory: Path, relative: str) -> Path:
    """Resolve a manifest-listed path, refusing anything that escapes the version folder."""
    path = (directory / relative).resolve()
    if Path(relative).is_absolute() or not path.is_relative_to(directory.resolve()):
        raise ArtifactError(f"{directory}/manifest.json lists a file outside the artifact: {relative!r}")
    return path


def verify_files(directory: Path, files: dict[str, str]) -> None:
    """Every listed file exists and matches its sha256; raise ArtifactError naming the first that does not."""
    for relative, expected in files.items():
        path = _inside(directory, relative)
        if not path.is_file():
            raise ArtifactError(f"{directory}: file {relative!r} listed in manifest.json is missing")
        actual = sha256_file(path)
        if actual != str(expected).lower():
            raise ArtifactError(f"{directory}: sha256 of {relative!r} is {actual}, manifest says {expected}; "
                                "the artifact is corrupt or was modified")


def read_verified(manifest: Manifest, graph: str, runtime: str) -> bytes:
    """The bytes of one graph file, checked against the manifest's sha256 again as they are read.

    Runtimes load from these bytes, never from the path, so the file that is served is exactly the
    file that was verified (a file swapped after start-up verification is refused, not loaded).
    """
    relative = manifest.graphs[graph].files[runtime]
    path = _inside(manifest.directory, relative)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ArtifactError(f"{manifest.directory}: cannot read {relative!r}: {exc}") from exc
    expected = str(manifest.raw.get("files", {}).get(relative, "")).lower()
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise ArtifactError(f"{manifest.directory}: sha256 of {relative!r} is {actual}, manifest says "
                            f"{expected or 'nothing'}; the artifact is corrupt or was modified")
    return data


def load_manifest(directory: Path, runtime: str) -> Manifest:
    """Read and check manifest.json, verify the files it lists, and make sure `runtime`'s graphs are there."""
    path = directory / "manifest.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"cannot read {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ArtifactError(f"{path}: expected a JSON object")
    version = raw.get("format_version")
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise ArtifactError(f"{path}: format_version {version!r} is not supported "
                            f"(this service reads {sorted(SUPPORTED_FORMAT_VERSIONS)}); upgrade the service")
    try:
        manifest = _parse(directory, raw, runtime)
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{path}: malformed manifest ({type(exc).__name__}: {exc})") from exc
    files = raw.get("files")
    if not isinstance(files, dict):
        raise ArtifactError(f"{path}: 'files' must map file names to sha256 digests")
    for spec in manifest.graphs.values():
        if spec.files[runtime] not in files:
            raise ArtifactError(f"{path}: graph file {spec.files[runtime]!r} has no checksum in 'files'; "
                                "refusing to load an unverified file")
    verify_files(directory, files)
    return manifest


def _parse(directory: Path, raw: dict[str, Any], runtime: str) -> Manifest:
    name = str(raw["name"])
    if not MODEL_NAME_RE.fullmatch(name):
        raise ValueError(f"name {name!r} does not match {MODEL_NAME_RE.pattern}")
    if name != directory.parent.name:
        raise ValueError(f"name {name!r} differs from its folder {directory.parent.name!r}")
    if str(raw["version"]) != directory.name:
        raise ValueError(f"version {raw['version']!r} differs from its folder {directory.name!r}")
    inp, prep, model = raw["input"], raw["preprocessing"], raw["model"]
    channels, height, width = int(inp["channels"]), int(inp["height"]), int(inp["width"])
    if min(channels, height, width) < 1 or channels not in (1, 3):
        raise ValueError(f"unsupported input shape {(channels, height, width)}")
    color_mode = str(prep["color_mode"])
    if {"L": 1, "RGB": 3}.get(color_mode) != channels:
        raise ValueError(f"preprocessing.color_mode {color_mode!r} does not give {channels} channels")
    threshold = prep.get("binarize_threshold")
    labels = raw.get("labels")
    family = str(model.get("family", "gaussian"))
    if family not in FAMILY_GRAPHS:
        raise ValueError(f"model.family {family!r} is not served by this service (known: "
                         f"{sorted(FAMILY_GRAPHS)}); upgrade the service")
    graphs = {}
    optional = FAMILY_OPTIONAL_GRAPHS[family]
    missing = [g for g in FAMILY_GRAPHS[family] if g not in raw["graphs"]]
    if missing:
        raise ValueError(f"a {family} artifact needs the graphs {list(FAMILY_GRAPHS[family])}; this one "
                         f"lacks {missing} (an older export?): re-export it with `python -m training export`")
    for graph in FAMILY_GRAPHS[family] + tuple(g for g in optional if g in raw["graphs"]):
        spec = raw["graphs"][graph]
        if runtime not in spec:
            raise ValueError(f"graph {graph} has no {runtime} file")
        graphs[graph] = GraphSpec(files={r: str(spec[r]) for r in ("onnx", "torchscript") if r in spec},
                                  inputs=tuple(spec["inputs"]), outputs=tuple(spec["outputs"]))
        _inside(directory, graphs[graph].files[runtime])
    anomaly = None
    if raw.get("anomaly"):
        anomaly = _parse_anomaly(raw["anomaly"], graphs, directory, int(model["latent_dim"]),
                                 raw.get("files") or {}, (height, width))
    return Manifest(
        name=name,
        version=str(raw["version"]),
        directory=directory,
        kind=str(model["kind"]),
        latent_dim=int(model["latent_dim"]),
        channels=channels,
        height=height,
        width=width,
        likelihood=str(raw["likelihood"]["family"]),
        labels=tuple(str(v) for v in labels) if labels else None,
        preprocessing=Preprocessing(
            color_mode=color_mode,
            height=int(prep.get("height", height)),
            width=int(prep.get("width", width)),
            resample=str(prep.get("resample", "bilinear")),
            binarize_threshold=None if threshold is None else float(threshold),
        ),
        graphs=graphs,
        raw=raw,
        anomaly=anomaly,
        family=family,
    )


def _load_latent_bank(raw: dict[str, Any], directory: Path, latent_dim: int, files: dict) -> LatentBank:
    """anomaly.latent_bank: a checksummed .npy of (M, latent_dim) finite float32 encoder means, prepared
    for the distances every latent_knn and fisher score takes."""
    rec = raw.get("latent_bank")
    if not isinstance(rec, dict) or not isinstance(rec.get("file"), str):
        raise ValueError("methods latent_knn and fisher need anomaly.latent_bank.file")
    if rec["file"] not in files:
        raise ValueError(f"latent bank {rec['file']!r} has no checksum in 'files'")
    try:
        bank = np.load(_inside(directory, rec["file"]), allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read latent bank {rec['file']!r}: {exc}") from exc
    if bank.ndim != 2 or bank.shape[1] != latent_dim or len(bank) < 5 or bank.dtype.kind != "f":
        raise ValueError(f"latent bank must be (M >= 5, {latent_dim}) floats, got {bank.shape} {bank.dtype}")
    if not np.isfinite(bank).all():
        raise ValueError("latent bank has non-finite values")
    return LatentBank(bank.astype(np.float32))


def _parse_anomaly(raw: dict[str, Any], graphs: dict[str, GraphSpec], directory: Path, latent_dim: int,
                   files: dict, image_size: tuple[int, int]) -> AnomalyCalibration:
    """The `anomaly` object (docs/artifact-format.md): methods unknown to this service are skipped."""
    methods: dict[str, MethodCalibration] = {}
    bank = None
    if LATENT_METHODS & set(raw["methods"]):
        bank = _load_latent_bank(raw, directory, latent_dim, files)
    for method, rec in dict(raw["methods"]).items():
        if method not in METHODS:
            continue
        scores = tuple(float(v) for v in rec["scores"])
        if not scores or list(scores) != sorted(scores) or not all(np.isfinite(scores)):
            raise ValueError(f"anomaly.methods.{method}.scores must be non-empty, increasing numbers")
        if int(rec.get("n", len(scores))) != len(scores):
            raise ValueError(f"anomaly.methods.{method}: n differs from the number of scores")
        ref = cref = None
        if method in ("typicality", "combined"):
            r = rec["reference"]
            ref = TypicalityReference(float(r["center"]), float(r["scale_low"]), float(r["scale_high"]))
        if method == "combined":
            r = rec["complexity_reference"]
            cref = TypicalityReference(float(r["center"]), float(r["scale_low"]), float(r["scale_high"]))
        if method == "likelihood_ratio" and "background_log_weights" not in graphs:
            raise ValueError("anomaly method likelihood_ratio needs the background_log_weights graph")
        fisher = None
        if method == "fisher":
            stats = rec["statistics"]
            if set(stats) != set(FISHER_STATISTICS):
                raise ValueError(f"anomaly.methods.fisher was calibrated with statistics {sorted(stats)}; "
                                 f"this service computes {sorted(FISHER_STATISTICS)}: re-export the model")
            transforms = tuple(rec.get("transforms", ()))
            if transforms != transform_names(*image_size):
                raise ValueError(f"anomaly.methods.fisher.transforms {list(transforms)} differ from this "
                                 f"service's {list(transform_names(*image_size))}: re-export the model")
            fisher = {name: tuple(float(v) for v in stats[name]["reference"]) for name in FISHER_STATISTICS}
            if not all(values and np.isfinite(values).all() for values in fisher.values()):
                raise ValueError("anomaly.methods.fisher.statistics need non-empty, finite references")
            tails = {name: stats[name]["tail"] for name in FISHER_STATISTICS}
            if tails != FISHER_STATISTICS:
                raise ValueError(f"anomaly.methods.fisher.statistics tails {tails} differ from this "
                                 f"service's {FISHER_STATISTICS}")
        methods[method] = MethodCalibration(method, scores, ref, cref, fisher_reference=fisher,
                                            latent_bank=bank if method in LATENT_METHODS else None)
    default = str(raw.get("default_method", "nll"))
    if default not in methods:
        raise ValueError(f"anomaly.default_method {default!r} has no calibration (have: {sorted(methods)})")
    alpha = float(raw.get("alpha", 0.01))
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"anomaly.alpha must be in (0, 1), got {alpha}")
    return AnomalyCalibration(k=int(raw["k"]), alpha=alpha, default_method=default, methods=methods)
