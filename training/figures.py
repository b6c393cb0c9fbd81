"""PNG figures of a trained model: samples, reconstructions, latent traversals/map, training curves."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on training machines
import matplotlib.pyplot as plt
import numpy as np
import torch

from training.models import VAE


def _grid(images: torch.Tensor, rows: int) -> np.ndarray:
    """(N, C, H, W) in [0, 1] -> one (rows*H, cols*W[, C]) array."""
    n, c, h, w = images.shape
    cols = -(-n // rows)
    canvas = np.ones((rows * h, cols * w, c), dtype=np.float32)
    for i, img in enumerate(images.clamp(0, 1).numpy()):
        r, q = divmod(i, cols)
        canvas[r * h:(r + 1) * h, q * w:(q + 1) * w] = img.transpose(1, 2, 0)
    return canvas[..., 0] if c == 1 else canvas


def _save(array: np.ndarray, path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 6 * array.shape[0] / array.shape[1] + 0.4))
    ax.imshow(array, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(title)
    ax.axis("off")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


@torch.no_grad()
def make_all(vae: VAE, images: torch.Tensor, labels: torch.Tensor, latent_stats: dict, out: Path,
             metrics_path: str | Path | None, seed: int) -> dict[str, str]:
    """Write every figure; returns {name: path relative to out's parent}."""
    gen = torch.Generator().manual_seed(seed)
    cfg = vae.config
    made: dict[str, str] = {}
    cond = bool(cfg.num_classes)

    # Samples from the prior (conditional: one row per class).
    z = torch.randn(64 if not cond else 8 * cfg.num_classes, cfg.latent_dim, generator=gen)
    y = torch.arange(cfg.num_classes).repeat_interleave(8) if cond else None
    rows = cfg.num_classes if cond else 8
    _save(_grid(vae.decode_mean(z, y), rows), out / "samples.png", "Samples x ~ E[x|z], z ~ N(0, I)")
    made["samples"] = "figures/samples.png"

    # Input / reconstruction pairs: odd columns are inputs, even columns their reconstructions.
    # Evenly spaced picks: test sets such as mnist5k's are sorted by class.
    picks = torch.linspace(0, len(images) - 1, min(32, len(images))).long()
    x = images[picks]
    y_rec = labels[picks] if cond else None
    rec = vae.decode_mean(vae.encode(x, y_rec)[0], y_rec)
    pairs = torch.stack([x, rec], dim=1).reshape(-1, *x.shape[1:])
    _save(_grid(pairs, 8), out / "reconstructions.png", "Input (left) and reconstruction (right)")
    made["reconstructions"] = "figures/reconstructions.png"

    # Traversals of the 8 dimensions with the most KL, from -3 to 3 around a test image's mean.
    top = np.argsort(latent_stats["kl_per_dim"])[::-1][:8]
    base = latent_stats["posterior_means"][0]
    steps = torch.linspace(-3, 3, 9)
    zs = base.repeat(len(top) * len(steps), 1)
    for r, dim in enumerate(top):
        zs[r * len(steps):(r + 1) * len(steps), dim] = steps
    y_tr = labels[:1].repeat(len(zs)) if cond else None
    _save(_grid(vae.decode_mean(zs, y_tr), len(top)), out / "traversals.png",
          "Latent traversals, -3..3 (rows: dims by KL)")
    made["latent_traversals"] = "figures/traversals.png"

    # 2-D map of the posterior means (first two principal components), coloured by class.
    mu = latent_stats["posterior_means"]
    centred = mu - mu.mean(0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    proj = (centred @ v[:2].T).numpy()
    if proj.shape[1] < 2:  # a 1-D latent space: plot it against zeros rather than fail the evaluation
        proj = np.concatenate([proj, np.zeros_like(proj)], axis=1)
    fig, ax = plt.subplots(figsize=(6, 5))
    sc = ax.scatter(proj[:, 0], proj[:, 1], c=labels[: len(proj)].numpy(), cmap="tab10", s=6)
    fig.colorbar(sc, ax=ax, label="class")
    ax.set_title("Posterior means, first two principal components")
    fig.savefig(out / "latent_map.png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    made["latent_map"] = "figures/latent_map.png"

    if metrics_path and Path(metrics_path).exists():
        records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
        fig, ax = plt.subplots(figsize=(7, 4))
        epochs = [r["epoch"] for r in records]
        ax.plot(epochs, [-r["train_loss"] for r in records], label="train objective")
        ax.plot(epochs, [r["val_elbo"] for r in records], label="validation ELBO")
        for key in records[-1]:
            if key.startswith("val_iwae"):
                ax.plot(epochs, [r[key] for r in records], label=f"validation {key[4:]}")
        lo = np.percentile([r["val_elbo"] for r in records], 5)
        ax.set_ylim(bottom=lo)
        ax.set_xlabel("epoch")
        ax.set_ylabel("nats per image")
        ax.legend()
        ax.set_title("Training curves")
        fig.savefig(out / "training_curves.png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        made["training_curves"] = "figures/training_curves.png"
    return made


def plot_curves(series: dict[str, list[float | None]], path: Path, title: str) -> None:
    """Line per named series, against its own epoch index (nats per image)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, values in series.items():
        ax.plot(range(len(values)), [math.nan if v is None else v for v in values], label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats per image")
    ax.legend()
    ax.set_title(title)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
