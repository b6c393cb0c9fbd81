"""Export a VQ-VAE checkpoint to `models/<name>/<version>/`: its five graphs (training/graphs_vq.py) in
TorchScript and ONNX, checked against eager PyTorch on real digits, the conformal calibration of every
anomaly score (the same code as the Gaussian family's: training/export.py calibrate_anomaly), the
report, and a checksummed manifest with `model.family = "vqvae"`.

Parity of log_weights is checked with uniforms placed in the middle of the CDF interval of the code
they select, so no runtime's float32 rounding can pick a neighbouring code; the codes themselves must
match exactly. prior_sample_row must also draw what the full prior pass draws: sampling through it from
uniforms in the middle of the CDF intervals of the full pass's draws must give the same codes
(check_sampling).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from service.artifacts import FAMILY_GRAPH_IO, FORMAT_VERSION, MODEL_NAME_RE, VERSION_RE, Preprocessing
from service.families.vqvae import VQVAE as ServedVQVAE
from service.families.vqvae import PriorShape
from training import losses
from training.data import DataSplits
from training.export import (
    ANOMALY_ALPHA,
    ONNX_OPSET,
    ExportError,
    _quiet,
    _split_record,
    calibrate_anomaly,
    export_torchscript,
    staged_version,
    write_manifest,
)
from training.graphs_vq import build_graphs, example_inputs
from training.pixelcnn import IncrementalPrior, sample_rows, separable_draws
from training.scoring import GraphScorer
from training.vqvae import VQVAE

GRAPH_IO = FAMILY_GRAPH_IO["vqvae"]
ABS_TOLERANCE = 1e-4  # z_e, x_mean
LOGITS_TOLERANCE = 1e-3  # prior logits (tens of nats in magnitude)
LOG_WEIGHTS_ATOL, LOG_WEIGHTS_RTOL = 1e-4, 2e-5  # as the Gaussian family: atol + rtol * sum |terms|

log = logging.getLogger(__name__)


def export_onnx(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], names: list[str],
                outputs: list[str], path: Path) -> None:
    """ONNX with a dynamic batch dimension (and a dynamic sample dimension of u)."""
    batch, samples = torch.export.Dim("batch", min=1), torch.export.Dim("samples", min=1)
    dynamic = {name: {0: batch} for name in names}
    if "u" in dynamic:
        dynamic["u"] = {0: batch, 1: samples}
    with _quiet():
        torch.onnx.export(module, inputs, str(path), input_names=names, output_names=outputs,
                          dynamic_shapes=dynamic, opset_version=ONNX_OPSET, dynamo=True,
                          external_data=False, verbose=False)


@torch.no_grad()
def parity_inputs(model: VQVAE, x: torch.Tensor, samples: int, seed: int) -> tuple[dict, torch.Tensor]:
    """Real inputs for each graph, and the magnitude of the terms each log_w sums, (N, S).

    The uniforms sit in the middle of the CDF interval of codes drawn from q, so every runtime picks
    those codes whatever its rounding.
    """
    gen = torch.Generator().manual_seed(seed)
    codes = model.codes(x)
    log_q = model.posterior_log_probs(model.encode(x)).double()  # (N, P, K)
    n, p, _ = log_q.shape
    drawn = torch.multinomial(log_q.exp().reshape(n * p, -1), samples, replacement=True, generator=gen)
    drawn = drawn.reshape(n, p, samples).permute(0, 2, 1)  # (N, S, P)
    cdf = torch.cumsum(log_q.exp(), -1)
    lower = torch.cat([torch.zeros(n, p, 1, dtype=cdf.dtype), cdf[..., :-1]], -1)
    middle = ((lower + cdf) / 2).unsqueeze(1).expand(n, samples, p, -1)
    u = middle.gather(3, drawn.unsqueeze(-1)).squeeze(-1).float()  # (N, S, P)
    grids = drawn.reshape(n * samples, *model.config.grid)
    out = model.decoder_output(grids).double()
    x_rep = x.unsqueeze(1).expand(n, samples, *x.shape[1:]).reshape(n * samples, *x.shape[1:]).double()
    pixels = losses.bernoulli_log_likelihood_terms(out, x_rep) if model.config.likelihood == "bernoulli" \
        else losses.gaussian_log_likelihood_terms(torch.sigmoid(out), model.obs_log_var.double(), x_rep)
    prior_terms = torch.log_softmax(model.prior(grids).double(), 1).gather(1, grids.unsqueeze(1)).abs()
    q_terms = log_q.unsqueeze(1).expand(n, samples, p, -1).gather(3, drawn.unsqueeze(-1)).abs()
    magnitude = (pixels.abs().flatten(1).sum(-1) + prior_terms.flatten(1).sum(-1)).reshape(n, samples)
    magnitude = magnitude + q_terms.flatten(2).sum(-1)
    _, row_u = separable_draws(model.prior, len(x), model.config.grid, seed=seed)
    inputs = {"encoder": (x,), "decoder": (codes,), "prior": (codes,), "log_weights": (x, u),
              "prior_sample_row": _sample_row_inputs(model, row_u)}
    return inputs, magnitude


def _prior_shape(model: VQVAE) -> PriorShape:
    """The prior's sampling cache as the service sizes it (layers, channels, kernel // 2)."""
    cfg = model.config
    return PriorShape(cfg.prior_layers, cfg.prior_channels, cfg.prior_kernel // 2)


def _walk_shape(model: VQVAE) -> dict:
    """The keyword arguments of pixelcnn.sample_rows for this model."""
    shape = _prior_shape(model)
    return {"grid": model.config.grid, "codebook_size": model.config.codebook_size, "layers": shape.layers,
            "channels": shape.channels, "half": shape.half}


def _sample_row_inputs(model: VQVAE, u: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The real inputs prior_sample_row gets at the middle grid row of a sampling walk from u (n, h*w)."""
    incremental = IncrementalPrior(model.prior)
    calls: list[tuple[torch.Tensor, ...]] = []

    def sample_row(*args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(args)
        return incremental.sample_row(*args)

    sample_rows(sample_row, u, torch.ones(len(u)), **_walk_shape(model))
    return calls[len(calls) // 2]


def check_sampling(model: VQVAE, directory: Path, codes: torch.Tensor, u: torch.Tensor) -> dict:
    """Sampling through the exported prior_sample_row from u (n, h*w), uniforms in the middle of the CDF
    intervals of `codes` under the full prior pass (pixelcnn.separable_draws), must draw exactly `codes`
    in every runtime: the row graph's logits are the full pass's, well within every interval. Raise
    ExportError if not."""
    import onnxruntime as ort

    graph = "prior_sample_row"
    session = ort.InferenceSession(str(directory / f"{graph}.onnx"), providers=["CPUExecutionProvider"])
    with _quiet():
        scripted = torch.jit.load(str(directory / f"{graph}.pt"))

    def onnx_row(*args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feeds = {n: t.numpy() for n, t in zip(GRAPH_IO[graph][0], args, strict=True)}
        return tuple(torch.from_numpy(a) for a in session.run(None, feeds))

    report: dict[str, int] = {}
    with torch.no_grad():
        for runtime, sample_row in (("onnx", onnx_row), ("torchscript", scripted)):
            drawn = sample_rows(sample_row, u, torch.ones(len(u)), **_walk_shape(model))
            report[runtime] = int((drawn != codes).sum())
            if report[runtime]:
                raise ExportError(f"{graph} ({runtime}) drew {report[runtime]} of {codes.numel()} codes "
                                  "other than the full prior pass from uniforms in the middle of their CDF "
                                  "intervals")
    return {"codes_differing": report, "rows": len(codes)}


def check_parity(model: VQVAE, directory: Path, inputs: dict, magnitude: torch.Tensor) -> dict[str, dict]:
    """ONNX Runtime and TorchScript against eager PyTorch; raise ExportError on a mismatch."""
    import onnxruntime as ort

    graphs = build_graphs(model)
    report: dict[str, dict] = {}
    for graph, args in inputs.items():
        with torch.no_grad():
            eager = graphs[graph](*args)
        eager_out = [t.numpy() for t in (eager if isinstance(eager, tuple) else (eager,))]
        session = ort.InferenceSession(str(directory / f"{graph}.onnx"), providers=["CPUExecutionProvider"])
        onnx_out = session.run(None, {n: t.numpy() for n, t in zip(GRAPH_IO[graph][0], args, strict=True)})
        with _quiet(), torch.no_grad():
            scripted = torch.jit.load(str(directory / f"{graph}.pt"))(*args)
        ts_out = [t.numpy() for t in (scripted if isinstance(scripted, tuple) else (scripted,))]
        errors: dict[str, float] = {}
        for runtime, outputs in (("onnx", onnx_out), ("torchscript", ts_out)):
            for name, ref, got in zip(GRAPH_IO[graph][1], eager_out, outputs, strict=True):
                if ref.dtype.kind == "i":
                    if not np.array_equal(ref, got):
                        raise ExportError(f"{graph} {runtime} output {name!r}: {int((ref != got).sum())} of "
                                          f"{ref.size} codes differ from eager PyTorch")
                    continue
                diff = np.abs(ref.astype(np.float64) - got)
                if graph == "log_weights":
                    bound = LOG_WEIGHTS_ATOL + LOG_WEIGHTS_RTOL * magnitude.numpy()
                else:
                    logits = graph.startswith("prior")  # prior logits, and the activations they come from
                    bound = np.full(diff.shape, LOGITS_TOLERANCE if logits else ABS_TOLERANCE)
                if not (diff <= bound).all():
                    worst = np.unravel_index(int(np.nanargmax(diff - bound)), diff.shape)
                    raise ExportError(f"{graph} {runtime} output {name!r} differs from eager PyTorch at "
                                      f"{[int(i) for i in worst]}: {float(got[worst]):.6g} vs "
                                      f"{float(ref[worst]):.6g} (allowed {float(bound[worst]):.3g})")
                errors[runtime] = max(errors.get(runtime, 0.0), float(diff.max()))
        report[graph] = {"max_abs_error": errors, "rows": int(args[0].shape[0])}
    return report


def export_vq_model(model: VQVAE, splits: DataSplits, models_dir: str | Path, name: str, version: str, *,
                    metrics: dict | None = None, training: dict | None = None,
                    report_dir: str | Path | None = None, calibration_k: int = 256, seed: int = 0,
                    force: bool = False, anomaly_method: str = "auto", alpha: float = ANOMALY_ALPHA,
                    selection_per_shift: int = 100) -> Path:
    """Write models_dir/name/version atomically; returns its path. Raises ExportError if a check fails."""
    if not MODEL_NAME_RE.fullmatch(name) or not VERSION_RE.fullmatch(version):
        raise ExportError(f"model name {name!r} / version {version!r} must match {MODEL_NAME_RE.pattern} / "
                          f"{VERSION_RE.pattern}")
    if model.config.num_classes:
        raise ExportError("class-conditional VQ-VAE priors are trained and evaluated, but not exported yet: "
                          "train without --conditional to serve the model")
    model = model.cpu().eval()
    with staged_version(models_dir, name, version, force) as tmp:
        prep = splits.preprocessing
        if model.config.likelihood == "bernoulli":
            prep = dataclasses.replace(prep, binarize_threshold=0.5)
        for graph, module in build_graphs(model).items():
            example = example_inputs(graph, model, batch=2)
            export_torchscript(module, example, tmp / f"{graph}.pt")
            export_onnx(module, example, list(GRAPH_IO[graph][0]), list(GRAPH_IO[graph][1]),
                        tmp / f"{graph}.onnx")
        x = torch.from_numpy(prep.likelihood_view(splits.test_images[:16].numpy()))
        parity = check_parity(model, tmp, *parity_inputs(model, x, samples=32, seed=seed))
        draws = separable_draws(model.prior, 16, model.config.grid, seed=seed + 1)
        parity["prior_sampling"] = check_sampling(model, tmp, *draws)
        family = ServedVQVAE(grid=model.config.grid, codebook_size=model.config.codebook_size,
                             code_dim=model.config.code_dim, input_shape=model.config.input_shape,
                             preprocessing=prep, likelihood=model.config.likelihood,
                             prior=_prior_shape(model))
        scorer = GraphScorer(tmp, _latent_dim(model), prep, model.config.likelihood,
                             input_shape=model.config.input_shape, family=family)
        anomaly_record = calibrate_anomaly(tmp, scorer, splits, calibration_k, seed, anomaly_method, alpha,
                                           selection_per_shift)
        anomaly_record["latent_bank"]["source"] = ("flattened pre-quantization vectors z_e of the training "
                                                   "split's likelihood view")
        if report_dir and Path(report_dir).is_dir():
            shutil.copytree(report_dir, tmp / "report")
        manifest = _manifest(model, name, version, prep, splits, parity, metrics, training)
        manifest["anomaly"] = anomaly_record
        write_manifest(tmp, manifest)
    return Path(models_dir) / name / version


def _latent_dim(model: VQVAE) -> int:
    """The length of the flattened pre-quantization vectors: what anomaly scores compare."""
    h, w = model.config.grid
    return model.config.code_dim * h * w


def _manifest(model: VQVAE, name: str, version: str, prep: Preprocessing, splits: DataSplits, parity: dict,
              metrics: dict | None, training: dict | None) -> dict:
    cfg = model.config
    c, h, w = cfg.input_shape
    likelihood: dict = {"family": cfg.likelihood}
    if cfg.likelihood == "gaussian":
        likelihood.update(variance="global", mean_std=float(torch.exp(0.5 * model.obs_log_var.detach())))
    return {
        "format_version": FORMAT_VERSION,
        "name": name,
        "version": version,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "framework": {"torch": torch.__version__, "onnx_opset": ONNX_OPSET},
        "model": {
            "family": "vqvae",
            "kind": "vqvae",
            "architecture": "conv",
            "latent_dim": _latent_dim(model),
            "grid": list(cfg.grid),
            "codebook_size": cfg.codebook_size,
            "code_dim": cfg.code_dim,
            "posterior_temperature": cfg.posterior_temperature,
            "config": cfg.to_dict(),
        },
        "input": {"channels": c, "height": h, "width": w, "dtype": "float32", "value_range": [0.0, 1.0]},
        "preprocessing": prep.to_dict(),
        "likelihood": likelihood,
        "prior": {"family": "gated_pixelcnn", "channels": cfg.prior_channels, "layers": cfg.prior_layers,
                  "kernel": cfg.prior_kernel, "order": "raster"},
        "labels": None,
        "graphs": {graph: {"onnx": f"{graph}.onnx", "torchscript": f"{graph}.pt", "inputs": list(ins),
                           "outputs": list(outs)} for graph, (ins, outs) in GRAPH_IO.items()},
        "parity": parity,
        "data": {"name": splits.name, "spec": splits.spec, "description": splits.description,
                 "split": _split_record(splits)},
        "metrics": metrics or {},
        "training": training or {},
    }
