"""Training of the VQ-VAE family (`python -m training train --model vqvae`), in three resumable stages:

1. autoencoder: encoder, EMA codebook and decoder on -log p(x | z_q) + beta * commitment, early-stopped
   on the validation reconstruction term; codebook usage logged every epoch;
2. prior: the gated PixelCNN on the training images' codes, early-stopped on the validation codes'
   log p(z) (the autoencoder is frozen);
3. posterior temperature: tau of the stochastic posterior, the value in TEMPERATURES with the highest
   importance-weighted bound on the validation images.

metrics.jsonl gets one record per epoch with its stage; last.pt is written every epoch (so a killed
run resumes where it stopped) and best.pt holds the best autoencoder with the best prior.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch

from training import losses
from training.data import DataSplits
from training.models import check_choices
from training.train import _progress, load_checkpoint, load_dataset_for, prepare_eval_images, resolve_device
from training.vqvae import VQVAE, VQConfig, codebook_usage

TEMPERATURES = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)  # tau candidates of the stochastic posterior
TEMPERATURE_K = 32  # importance samples per validation image when choosing tau
STAGES = ("autoencoder", "prior", "temperature", "done")


@dataclass
class VQTrainConfig:
    """One VQ-VAE training run; the shared options mean what they mean in TrainConfig."""

    data: str = "mnist5k"
    out_dir: str = "runs/vqvae"
    model: VQConfig = field(default_factory=VQConfig)
    conditional: bool = False  # a class-conditional prior
    binarize: Literal["dynamic", "none"] = "dynamic"
    epochs: int = 60  # autoencoder stage
    prior_epochs: int = 100
    batch_size: int = 64
    lr: float = 1e-3
    prior_lr: float = 1e-3
    patience: int = 15
    prior_patience: int = 15
    val_fraction: float = 0.1
    calibration_fraction: float = 0.1
    calibration_min: int = 99
    subset: int | None = None
    image_height: int = 28
    image_width: int = 28
    color_mode: Literal["L", "RGB"] = "L"
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        check_choices(self)
        if isinstance(self.model, dict):
            self.model = VQConfig(**self.model)
        for name in ("epochs", "prior_epochs", "batch_size", "patience", "prior_patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, raw: dict) -> VQTrainConfig:
        raw = dict(raw)
        model_raw = dict(raw.pop("model", None) or {})
        unknown = set(raw) - set(cls.__dataclass_fields__)
        unknown_model = set(model_raw) - set(VQConfig.__dataclass_fields__)
        if unknown or unknown_model:
            names = sorted(unknown) + sorted("model." + k for k in unknown_model)
            raise ValueError(f"unknown VQ-VAE training options: {names}")
        return cls(model=VQConfig(**model_raw), **raw)

    def to_dict(self) -> dict:
        return asdict(self)


def model_from_checkpoint(path: str | Path) -> tuple[VQVAE, dict]:
    ckpt = load_checkpoint(path)
    model = VQVAE(VQConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model_state"])
    model.eval()
    return model, ckpt


@torch.no_grad()
def all_codes(model: VQVAE, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """The deterministic posterior's codes of every image: (N, C, H, W) -> (N, h, w) int64."""
    model.eval()
    device = next(model.parameters()).device
    parts = [model.codes(images[i:i + batch].to(device)).cpu() for i in range(0, len(images), batch)]
    return torch.cat(parts)


@torch.no_grad()
def iw_bound(model: VQVAE, images: torch.Tensor, labels: torch.Tensor | None, k: int, seed: int,
             temperature: float | None = None, rows: int = 4096) -> torch.Tensor:
    """Importance-weighted bound log (1/k) sum_i w_i per image, (N,) float64; uniforms seeded by `seed`."""
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    per = max(1, rows // k)
    out = []
    for start in range(0, len(images), per):
        x = images[start:start + per].to(device)
        y = None if labels is None else labels[start:start + per].to(device)
        u = torch.rand(len(x), k, model.config.positions, generator=gen).to(device)
        out.append(losses.iwae_bound(model.log_weights(x, u, y, temperature).double().cpu()))
    return torch.cat(out)


def train_vq(config: VQTrainConfig, resume: bool = False, splits: DataSplits | None = None) -> Path:
    """Run the stages not yet done; returns best.pt's path."""
    device = resolve_device(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("the VQ-VAE trains in one process (its EMA codebook is not all-reduced)")
    splits = splits or load_dataset_for(config.to_dict())
    mc = copy.deepcopy(config.model)
    mc.input_shape = splits.input_shape
    if config.conditional:
        mc.num_classes, mc.labels = len(splits.label_names), list(splits.label_names)
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    model = VQVAE(mc).to(device)
    state = {"stage": "autoencoder", "epoch": 0, "best": -math.inf, "since_best": 0}
    if resume and (out / "last.pt").exists():
        ckpt = load_checkpoint(out / "last.pt", device)
        model.load_state_dict(ckpt["model_state"])
        mc = VQConfig(**ckpt["model_config"])
        model.config = mc
        state = ckpt["progress"]
    else:
        for stale in ("metrics.jsonl", "best.pt", "last.pt", "finished.json"):
            (out / stale).unlink(missing_ok=True)
    (out / "config.json").write_text(json.dumps({**config.to_dict(), "model": mc.to_dict(),
                                                 "family": "vqvae"}, indent=2))
    val_x = prepare_eval_images(splits.val_images, mc.likelihood, seed=config.seed + 7)
    labels = (lambda t: t) if config.conditional else (lambda t: None)
    run = _Run(config, splits, out, device)
    if state["stage"] == "autoencoder":
        state = run.autoencoder(model, val_x, state, resume)
    if state["stage"] == "prior":
        state = run.prior(model, val_x, labels, state, resume)
    if state["stage"] == "temperature":
        best_ckpt = load_checkpoint(out / "best.pt", device)
        model.load_state_dict(best_ckpt["model_state"])
        scores = {tau: iw_bound(model, val_x, labels(splits.val_labels), TEMPERATURE_K, config.seed + 11,
                                tau).mean().item() for tau in TEMPERATURES}
        model.config.posterior_temperature = max(scores, key=scores.get)
        run.log({"stage": "temperature", "val_iw_bound_k32": {str(t): s for t, s in scores.items()},
                 "chosen": model.config.posterior_temperature})
        state = {**state, "stage": "done"}
        run.save(model, state, best=True)
    final = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    record = {"reason": "done", "temperature": final.get("chosen")}
    (out / "finished.json").write_text(json.dumps(record) + "\n")
    return out / "best.pt"


class _Run:
    """The stages' shared plumbing: data, files and the epoch loop's bookkeeping."""

    def __init__(self, config: VQTrainConfig, splits: DataSplits, out: Path, device: torch.device) -> None:
        self.config, self.splits, self.out, self.device = config, splits, out, device

    def log(self, record: dict) -> None:
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def save(self, model: VQVAE, state: dict, best: bool,
             optimizer: torch.optim.Optimizer | None = None) -> None:
        ckpt = {"family": "vqvae", "model_config": model.config.to_dict(), "model_state": model.state_dict(),
                "train_config": self.config.to_dict(), "progress": state, "epoch": state["epoch"],
                "best_score": state["best"], "optimizer_state": optimizer.state_dict() if optimizer else {},
                "data": self.splits.name, "data_spec": self.splits.spec,
                "preprocessing": self.splits.preprocessing.to_dict()}
        for name in ("last.pt", "best.pt") if best else ("last.pt",):
            torch.save(ckpt, self.out / f"{name}.tmp")
            os.replace(self.out / f"{name}.tmp", self.out / name)

    def _batches(self, epoch: int) -> list[torch.Tensor]:
        n = len(self.splits.train_images)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.config.seed + epoch))
        return [perm[i:i + self.config.batch_size] for i in range(0, n, self.config.batch_size)]

    def _optimizer(self, params: Iterable[torch.nn.Parameter], lr: float, state: dict,
                   resume: bool) -> torch.optim.Adam:
        """Adam for a stage, with its moments from last.pt when resuming that stage mid-way."""
        optimizer = torch.optim.Adam(params, lr=lr)
        if resume and state["epoch"] > 0:
            saved = load_checkpoint(self.out / "last.pt", self.device).get("optimizer_state")
            if saved:
                optimizer.load_state_dict(saved)
        return optimizer

    def _binarized(self, x: torch.Tensor, likelihood: str) -> torch.Tensor:
        if self.config.binarize == "dynamic" and likelihood == "bernoulli":
            return torch.bernoulli(x)
        return x

    def autoencoder(self, model: VQVAE, val_x: torch.Tensor, state: dict, resume: bool) -> dict:
        cfg = self.config
        params = [p for n, p in model.named_parameters() if not n.startswith("prior.")]
        optimizer = self._optimizer(params, cfg.lr, state, resume)
        for epoch in _progress(range(state["epoch"], cfg.epochs), cfg.progress):
            t0 = time.perf_counter()
            torch.manual_seed(cfg.seed * 100_003 + epoch * 101)
            model.train()
            total, count, restarts = 0.0, 0, int(model.quantizer.restarts)
            for idx in self._batches(epoch):
                x = self._binarized(self.splits.train_images[idx].to(self.device), model.config.likelihood)
                terms = model.training_terms(x)
                loss = (-terms["recon"] + model.config.commitment * terms["commitment"]).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item() * len(idx)
                count += len(idx)
            model.eval()
            with torch.no_grad():
                codes = all_codes(model, val_x)
                recon = torch.cat([model.log_px_given_codes(val_x[i:i + 500].to(self.device),
                                                            codes[i:i + 500].to(self.device)).cpu()
                                   for i in range(0, len(val_x), 500)]).mean().item()
            usage = codebook_usage(codes, model.config.codebook_size)
            improved = recon > state["best"]
            since = 0 if improved else state["since_best"] + 1
            state = {"stage": "autoencoder", "epoch": epoch + 1, "best": max(recon, state["best"]),
                     "since_best": since}
            if since >= cfg.patience or epoch + 1 >= cfg.epochs:
                state = {"stage": "prior", "epoch": 0, "best": -math.inf, "since_best": 0,
                         "autoencoder_epochs": epoch + 1}
            self.log({"stage": "autoencoder", "epoch": epoch, "train_loss": total / count,
                      "val_reconstruction": recon, "val_perplexity": usage["perplexity"],
                      "val_codes_used": usage["codes_used"],
                      "restarts": int(model.quantizer.restarts) - restarts,
                      "seconds": time.perf_counter() - t0})
            self.save(model, state, best=improved, optimizer=optimizer)
            if state["stage"] != "autoencoder":
                break
        # The prior learns the codes of the best autoencoder, not of the last epoch's.
        best = load_checkpoint(self.out / "best.pt", self.device)
        model.load_state_dict(best["model_state"])
        self.save(model, state, best=False)
        return state

    def prior(self, model: VQVAE, val_x: torch.Tensor, labels: Callable, state: dict, resume: bool) -> dict:
        cfg = self.config
        val_codes = all_codes(model, val_x)
        train_y, val_y = labels(self.splits.train_labels), labels(self.splits.val_labels)
        optimizer = self._optimizer(model.prior.parameters(), cfg.prior_lr, state, resume)
        for epoch in _progress(range(state["epoch"], cfg.prior_epochs), cfg.progress):
            t0 = time.perf_counter()
            torch.manual_seed(cfg.seed * 100_019 + epoch * 103)
            # A fresh binarization of the training images every epoch (as the autoencoder saw them): more
            # distinct code grids than one fixed binarization, which the prior would otherwise overfit.
            binarized = prepare_eval_images(self.splits.train_images, model.config.likelihood,
                                            seed=cfg.seed * 1_000 + epoch)
            train_codes = all_codes(model, binarized)
            model.prior.train()
            total, count = 0.0, 0
            for idx in self._batches(10_000 + epoch):
                codes = train_codes[idx].to(self.device)
                y = None if train_y is None else train_y[idx].to(self.device)
                loss = -model.prior.log_prob(codes, y).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item() * len(idx)
                count += len(idx)
            model.prior.eval()
            with torch.no_grad():
                val = model.prior.log_prob(val_codes.to(self.device),
                                           None if val_y is None else val_y.to(self.device)).mean().item()
            improved = val > state["best"]
            since = 0 if improved else state["since_best"] + 1
            state = {**state, "stage": "prior", "epoch": epoch + 1, "best": max(val, state["best"]),
                     "since_best": since}
            done = since >= cfg.prior_patience or epoch + 1 >= cfg.prior_epochs
            self.log({"stage": "prior", "epoch": epoch, "train_log_prior": -total / count,
                      "val_log_prior": val, "seconds": time.perf_counter() - t0})
            if done:
                state = {**state, "stage": "temperature", "prior_epochs": epoch + 1}
            self.save(model, state, best=improved, optimizer=optimizer)
            if done:
                break
        return state

