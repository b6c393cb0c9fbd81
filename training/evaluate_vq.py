"""Test-set evaluation of a VQ-VAE: both likelihood bounds, codebook usage, sample quality and figures.

Bernoulli models are scored on the test digits binarized once (seed 0), as the Gaussian family's
evaluation does, so the nats are comparable with its importance-weighted NLL.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from training import losses
from training.data import DataSplits
from training.evaluate import BINARIZATION_SEED, json_safe
from training.sample_quality import SAMPLES, sample_quality, train_classifier
from training.train import prepare_eval_images
from training.train_vq import all_codes
from training.vqvae import VQVAE, codebook_usage


@torch.no_grad()
def vq_bounds(model: VQVAE, x: torch.Tensor, y: torch.Tensor | None, k: int, seed: int,
              rows: int = 4096) -> dict[str, torch.Tensor]:
    """Per-image deterministic bound, IW bound with k samples, its standard error and the stochastic
    posterior's ELBO estimate (each (N,) float64); the k uniforms per image are drawn in chunks."""
    gen = torch.Generator().manual_seed(seed)
    det, iw, se, elbo = [], [], [], []
    k_chunk = min(k, rows)
    per = max(1, rows // k)
    for start in range(0, len(x), per):
        xb = x[start:start + per]
        yb = None if y is None else y[start:start + per]
        det.append(model.deterministic_bound(xb, yb).double())
        parts = []
        for k0 in range(0, k, k_chunk):
            u = torch.rand(len(xb), min(k_chunk, k - k0), model.config.positions, generator=gen)
            parts.append(model.log_weights(xb, u, yb).double())
        log_w = torch.cat(parts, 1)  # (b, k)
        iw.append(losses.iwae_bound(log_w))
        se.append(losses.iwae_standard_error(log_w))
        elbo.append(log_w.mean(-1))
    return {"deterministic": torch.cat(det), "iw": torch.cat(iw), "standard_error": torch.cat(se),
            "elbo": torch.cat(elbo)}


def evaluate_vq(model: VQVAE, splits: DataSplits, out_dir: str | Path, k: int = 1000, seed: int = 0,
                metrics_path: str | Path | None = None, figures: bool = True,
                classifier_cache: Path | None = None) -> dict:
    """Evaluate on the test split; writes report.json, report.md and figures/ into out_dir."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    cfg = model.config
    labels = splits.test_labels if cfg.num_classes else None
    x = prepare_eval_images(splits.test_images, cfg.likelihood, seed=BINARIZATION_SEED)
    bounds = vq_bounds(model, x, labels, k, seed)
    test_codes = all_codes(model, x)
    train_codes = all_codes(model, prepare_eval_images(splits.train_images, cfg.likelihood, seed=5))
    with torch.no_grad():
        recon = torch.cat([model.log_px_given_codes(x[i:i + 500], test_codes[i:i + 500])
                           for i in range(0, len(x), 500)]).double()
    test_usage = codebook_usage(test_codes, cfg.codebook_size)
    train_usage = codebook_usage(train_codes, cfg.codebook_size)
    gen = torch.Generator().manual_seed(seed)
    y_samples = (torch.arange(SAMPLES) % cfg.num_classes) if cfg.num_classes else None
    codes = model.sample_codes(SAMPLES, y=y_samples, generator=gen)
    with torch.no_grad():
        samples = model.decode_mean(codes)
    classifier = train_classifier(splits, cache=classifier_cache)
    iw, det = bounds["iw"], bounds["deterministic"]
    report = {
        "family": "vqvae",
        "data": splits.name,
        "test_images": len(x),
        "binarization": f"stochastic, seed {BINARIZATION_SEED}" if cfg.likelihood == "bernoulli" else "none",
        "k": k,
        "posterior_temperature": cfg.posterior_temperature,
        "test_nll": float(-iw.mean()),  # the tighter (importance-weighted) bound, as the Gaussian family's
        "test_nll_standard_error": float(iw.std() / math.sqrt(len(iw))),
        "test_nll_estimator_se_mean": float(bounds["standard_error"].mean()),
        "test_nll_deterministic": float(-det.mean()),
        "test_nll_deterministic_standard_error": float(det.std() / math.sqrt(len(det))),
        "test_elbo": float(bounds["elbo"].mean()),
        "test_bits_per_dim": float(losses.bits_per_dim(iw, math.prod(cfg.input_shape)).mean()),
        "test_reconstruction_log_likelihood": float(recon.mean()),
        "test_log_prior": float((det - recon).mean()),
        "codebook_size": cfg.codebook_size,
        "grid": list(cfg.grid),
        "test_perplexity": test_usage["perplexity"],
        "test_codes_used": test_usage["codes_used"],
        "test_fraction_codes_used": test_usage["fraction_used"],
        "train_dead_codes": train_usage["codes_unused"],  # entries no training image uses
        "sample_quality": sample_quality(samples, splits, classifier),
        "seconds": None,
    }
    if figures:
        report["figures"] = _figures(model, splits, samples[:64], out / "figures", metrics_path)
    report["seconds"] = time.perf_counter() - t0
    (out / "report.json").write_text(json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n")
    (out / "report.md").write_text(render_markdown(report))
    return report


@torch.no_grad()
def _figures(model: VQVAE, splits: DataSplits, samples: torch.Tensor, out: Path,
             metrics_path: str | Path | None) -> dict[str, str]:
    from training.figures import _grid, _save, plot_curves

    out.mkdir(parents=True, exist_ok=True)
    _save(_grid(samples, 8), out / "samples.png", "Samples: codes from the PixelCNN prior, decoded")
    picks = torch.linspace(0, len(splits.test_images) - 1, 32).long()
    x = splits.test_images[picks]
    rec = model.decode_mean(model.codes(x))
    _save(_grid(torch.stack([x, rec], 1).reshape(-1, *x.shape[1:]), 8), out / "reconstructions.png",
          "Input (left) and reconstruction from its codes (right)")
    made = {"samples": "figures/samples.png", "reconstructions": "figures/reconstructions.png"}
    if metrics_path and Path(metrics_path).exists():
        records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
        series = {
            "autoencoder: validation log p(x | z_q)": [r.get("val_reconstruction") for r in records
                                                        if r["stage"] == "autoencoder"],
            "prior: validation log p(z)": [r.get("val_log_prior") for r in records if r["stage"] == "prior"],
        }
        plot_curves(series, out / "training_curves.png", "VQ-VAE training (each stage from epoch 0)")
        made["training_curves"] = "figures/training_curves.png"
    return made


def render_markdown(report: dict) -> str:
    q = report["sample_quality"]
    lines = [
        f"# VQ-VAE evaluation on {report['data']} ({report['test_images']} test images)",
        "",
        "| metric | value |",
        "|---|---|",
        f"| NLL, importance-weighted bound, k={report['k']}, stochastic posterior tau = "
        f"{report['posterior_temperature']:g} (nats) | {report['test_nll']:.2f} ± "
        f"{report['test_nll_standard_error']:.2f} |",
        f"| NLL, deterministic bound -log p(x \\| z_q) - log p(z_q) (nats) | "
        f"{report['test_nll_deterministic']:.2f} ± {report['test_nll_deterministic_standard_error']:.2f} |",
        f"| ELBO of the stochastic posterior (nats) | {report['test_elbo']:.2f} |",
        f"| log p(x \\| z_q) (nats) | {report['test_reconstruction_log_likelihood']:.2f} |",
        f"| log p(z_q) under the PixelCNN prior (nats) | {report['test_log_prior']:.2f} |",
        f"| bits per dimension | {report['test_bits_per_dim']:.4f} |",
        f"| codebook: entries used on the test digits | {report['test_codes_used']} / "
        f"{report['codebook_size']} "
        f"({100 * report['test_fraction_codes_used']:.0f} %), perplexity {report['test_perplexity']:.1f} |",
        f"| codebook: entries no training image uses (dead) | {report['train_dead_codes']} |",
        f"| FID of {q['samples']} samples vs {q['test_images']} test digits (classifier features) | "
        f"{q['fid']:.2f} (test digits half vs half: {q['fid_test_halves']:.2f}) |",
        f"| smallest class share of the samples | {100 * q['min_class_fraction']:.1f} % |",
        f"| feature classifier's test accuracy | {100 * q['classifier_test_accuracy']:.1f} % |",
        "",
        "Class shares of the samples (the feature classifier's labels): "
        + ", ".join(f"{k}: {100 * v:.1f} %" for k, v in q["class_fractions"].items()) + ".",
        "",
        f"Binarization of the test images: {report['binarization']}.",
        "",
    ]
    for title, path in (report.get("figures") or {}).items():
        lines += [f"## {title.replace('_', ' ').capitalize()}", "", f"![{title}]({path})", ""]
    return "\n".join(lines)
