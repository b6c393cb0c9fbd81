"""The training loop: ELBO / beta-VAE / KL warm-up / IWAE / conditional / denoising, single process or DDP.

Launch with `python -m training train ...`, or `torchrun --nproc-per-node N -m training train ...` to
train data-parallel on PyTorch's DistributedDataParallel (gloo on CPU, NCCL on GPUs).
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from training import losses
from training.data import DataSplits, load_dataset, locate
from training.models import VAE, ModelConfig, check_choices


@dataclass
class TrainConfig:
    """One training run. Defaults are a quick but sound ELBO run; the default model overrides some."""

    data: str = "mnist5k"  # mnist5k | digits8 | idx:DIR | folder:DIR | npz:FILE
    out_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    conditional: bool = False  # feed labels to encoder and decoder (CVAE)
    objective: Literal["elbo", "iwae"] = "elbo"
    iw_samples: int = 5  # k of the IWAE objective (Burda et al. use 5 and 50)
    beta: float = 1.0  # weight of the KL term (Higgins et al. 2017); ELBO objective only
    kl_warmup_epochs: int = 0  # linear KL annealing from 0 to beta (Sonderby et al. 2016)
    input_noise: float = 0.0  # std of Gaussian noise added to the encoder's input (denoising VAE)
    binarize: Literal["dynamic", "none"] = "dynamic"  # dynamic binarization for Bernoulli models
    epochs: int = 100
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float = 100.0  # guards against the rare exploding step early in training
    ema_decay: float = 0.0  # > 0: evaluate and export a Polyak average of the weights
    patience: int = 30  # early stopping: epochs without a better validation score
    select_on: Literal["elbo", "iwae"] = "elbo"  # validation score for early stopping
    val_iw_samples: int = 64  # k for the validation IWAE bound
    val_fraction: float = 0.1
    # Fraction of the training images held out of training AND model selection for the conformal
    # calibration of anomaly scores (0: none, the split of mnist-vae/1: export then calibrates on the
    # validation split). At least calibration_min images: n calibration scores give p-values no smaller
    # than 1/(n+1), so 99 are needed before alpha = 0.01 can flag anything.
    calibration_fraction: float = 0.1
    calibration_min: int = 99
    # Small random affine augmentation of training images (applied to each image with augment_prob):
    # rotation up to +-augment_rotation degrees, shift up to +-augment_translation pixels, scale
    # 1 +- augment_scale. 0 everywhere: off.
    augment_prob: float = 0.0
    augment_rotation: float = 0.0
    augment_translation: float = 0.0
    augment_scale: float = 0.0
    # Background model for likelihood-ratio anomaly scores (Ren et al. 2019): replace each pixel of a
    # training image with probability perturb_rate by a uniform random value.
    perturb_rate: float = 0.0
    init_from: str | None = None  # start from this checkpoint's (EMA) weights, e.g. IWAE fine-tuning
    subset: int | None = None  # keep only this many training images (quick runs, tests)
    image_height: int = 28  # folder:DIR data only: images are resized to this size ...
    image_width: int = 28
    color_mode: Literal["L", "RGB"] = "L"  # ... and converted to grey (L) or RGB
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int | None = None  # torch CPU threads; None leaves torch's default
    progress: bool = True

    def __post_init__(self) -> None:
        # Literal fields are not checked by Python; a typo such as objective="iwea" in a --config file
        # would otherwise silently train the ELBO.
        check_choices(self)
        for name in ("epochs", "batch_size", "iw_samples", "val_iw_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if not 0.0 <= self.calibration_fraction < 1.0:
            raise ValueError(f"calibration_fraction must be in [0, 1), got {self.calibration_fraction}")
        if self.calibration_min < 0:
            raise ValueError(f"calibration_min must be >= 0, got {self.calibration_min}")
        for name in ("augment_prob", "perturb_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if isinstance(self.model, dict):
            self.model = ModelConfig(**self.model)

    @classmethod
    def from_dict(cls, raw: dict) -> TrainConfig:
        raw = dict(raw)
        model_raw = dict(raw.pop("model", None) or {})
        # A typo in a --config file must be an error, not a silently ignored option (or a TypeError).
        unknown = set(raw) - set(cls.__dataclass_fields__)
        unknown_model = set(model_raw) - set(ModelConfig.__dataclass_fields__)
        if unknown or unknown_model:
            names = sorted(unknown) + sorted("model." + k for k in unknown_model)
            raise ValueError(f"unknown training options: {names}")
        return cls(model=ModelConfig(**model_raw), **raw)

    def to_dict(self) -> dict:
        return asdict(self)


# -- distributed helpers -------------------------------------------------------------------------------
def _world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _maybe_init_distributed(device: torch.device) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL needs each rank's current device set before init
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


def load_dataset_for(config: dict, data: str | None = None, recorded: str | None = None) -> DataSplits:
    """The data and split a training config names (a TrainConfig or the dict stored in a checkpoint).

    data: where the data is now (overrides the config's spec); recorded: the absolute spec written at
    training time, tried when the config's (possibly relative) path does not resolve from here.
    """
    return load_dataset(
        data or locate([config["data"], recorded or ""]), height=config.get("image_height", 28),
        width=config.get("image_width", 28),
        color_mode=config.get("color_mode", "L"), val_fraction=config["val_fraction"], seed=config["seed"],
        subset=config["subset"], calibration_fraction=config.get("calibration_fraction", 0.0),
        calibration_min=config.get("calibration_min", 0),  # configs before it had no minimum
    )


def resolve_device(name: str) -> torch.device:
    """auto -> CUDA if present else CPU. Under torchrun a bare 'cuda' (or auto) means this rank's GPU,
    LOCAL_RANK; otherwise every rank would pile onto cuda:0."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


class Objective(nn.Module):
    """Per-example training loss of a VAE, as a module so DistributedDataParallel can wrap it."""

    def __init__(self, vae: VAE, config: TrainConfig) -> None:
        super().__init__()
        self.vae = vae
        self.config = config

    def forward(self, x: torch.Tensor, y: torch.Tensor | None, x_in: torch.Tensor,
                beta: float) -> torch.Tensor:
        """x: (B, C, H, W) target, x_in: encoder input (maybe noisy) -> mean loss (scalar)."""
        if self.config.objective == "iwae":
            # Denoising with IWAE would need q(z|x_in) in the weights; we keep the bound exact instead.
            return -self.vae.iwae_objective(x, self.config.iw_samples, y).mean()
        recon, kl = self.vae.elbo_terms(x, y, x_in)
        return -(recon - beta * kl).mean()


@torch.no_grad()
def validation_scores(vae: VAE, images: torch.Tensor, labels: torch.Tensor | None, k: int,
                      batch_size: int = 250) -> dict[str, float]:
    """Mean ELBO, KL and IWAE(k) bound over fixed (pre-binarized) validation images, in nats."""
    vae.eval()
    elbos, kls, iwaes = [], [], []
    device = next(vae.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(1234)  # the same eps every epoch
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(device)
        y = None if labels is None else labels[start:start + batch_size].to(device)
        eps = torch.randn(x.shape[0], k, vae.config.latent_dim, generator=gen).to(device)
        log_w = vae.log_weights(x, eps, y)  # (B, k)
        mean, log_var = vae.encode(x, y)
        elbos.append(log_w.mean(-1))
        kls.append(losses.gaussian_kl_to_standard(mean, log_var).sum(-1))
        iwaes.append(losses.iwae_bound(log_w))
    return {
        "val_elbo": torch.cat(elbos).mean().item(),
        "val_kl": torch.cat(kls).mean().item(),
        f"val_iwae_k{k}": torch.cat(iwaes).mean().item(),
    }


def augment_affine(x: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    """Random small rotation / shift / scale of each image with probability config.augment_prob.

    x: (B, C, H, W) grey levels in [0, 1] -> same shape; bilinear resampling, zeros outside.
    Uses torch's global generator (seeded per epoch by train()).
    """
    b, _, h, w = x.shape
    apply = torch.rand(b, device=x.device) < config.augment_prob  # (B,)
    angle = torch.deg2rad((2 * torch.rand(b, device=x.device) - 1) * config.augment_rotation)
    scale = 1 + (2 * torch.rand(b, device=x.device) - 1) * config.augment_scale
    shift = (2 * torch.rand(b, 2, device=x.device) - 1) * config.augment_translation  # pixels
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0] * 2 / w], -1),
                         torch.stack([sin, cos, shift[:, 1] * 2 / h], -1)], 1)  # (B, 2, 3)
    grid = nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    moved = nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros",
                                      align_corners=False).clamp(0.0, 1.0)
    return torch.where(apply[:, None, None, None], moved, x)  # untouched images stay bit-identical


def perturb(x: torch.Tensor, rate: float) -> torch.Tensor:
    """Ren et al. 2019's input perturbation for the background model: each pixel is replaced, with
    probability `rate`, by a uniform random value in [0, 1]. x: (B, C, H, W) -> same shape."""
    mask = torch.rand_like(x) < rate
    return torch.where(mask, torch.rand_like(x), x)


def prepare_eval_images(images: torch.Tensor, likelihood: str, seed: int) -> torch.Tensor:
    """Bernoulli models are scored on binary images: binarize once, stochastically, with a fixed seed."""
    if likelihood != "bernoulli":
        return images
    return torch.bernoulli(images, generator=torch.Generator().manual_seed(seed))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Checkpoints hold only tensors and plain containers, so weights_only loading (no pickle code) works."""
    return torch.load(path, map_location=map_location, weights_only=True)


def model_from_checkpoint(path: str | Path, use_ema: bool = True) -> tuple[VAE, dict]:
    ckpt = load_checkpoint(path)
    vae = VAE(ModelConfig(**ckpt["model_config"]))
    state = ckpt["ema_state"] if use_ema and ckpt.get("ema_state") else ckpt["model_state"]
    vae.load_state_dict(state)
    vae.eval()
    return vae, ckpt


def train(config: TrainConfig, resume: bool = False, splits: DataSplits | None = None) -> Path:
    """Train, writing metrics.jsonl, last.pt and best.pt into config.out_dir; returns best.pt's path.

    Under torchrun (WORLD_SIZE > 1) every rank trains on its own shard of each epoch inside
    DistributedDataParallel; only rank 0 validates and writes files, and it tells the other ranks
    when early stopping ends the run.
    """
    device = resolve_device(config.device)
    _maybe_init_distributed(device)
    rank, world = _world()
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)

    splits = splits or load_dataset_for(config.to_dict())
    if len(splits.train_images) < world:
        raise ValueError(f"{len(splits.train_images)} training images cannot be shared by {world} processes")
    mc = copy.deepcopy(config.model)
    mc.input_shape = splits.input_shape
    if config.conditional:
        mc.num_classes, mc.labels = len(splits.label_names), list(splits.label_names)
    vae = VAE(mc).to(device)
    if mc.likelihood == "bernoulli" and mc.architecture != "linear":
        _init_output_bias(vae, splits.train_images)
    if config.init_from and not (resume and (Path(config.out_dir) / "last.pt").exists()):
        init = load_checkpoint(config.init_from, device)
        vae.load_state_dict(init["ema_state"] or init["model_state"])  # strict: the same architecture
    objective: nn.Module = Objective(vae, config)
    if world > 1:
        # DDP broadcasts rank 0's initial weights and averages gradients in backward().
        device_ids = [device.index] if device.type == "cuda" else None
        objective = DistributedDataParallel(objective, device_ids=device_ids)
    optimizer = torch.optim.Adam(vae.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    out = Path(config.out_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    start_epoch, best, since_best = 0, -math.inf, 0
    ema_state: dict = {}
    if resume and (out / "last.pt").exists():
        ckpt = load_checkpoint(out / "last.pt", device)
        vae.load_state_dict(ckpt["model_state"])
        optimizer.load_state_dict(ckpt["optimizer_state"])
        ema_state = ckpt.get("ema_state") or {}
        start_epoch, best, since_best = ckpt["epoch"] + 1, ckpt["best_score"], ckpt["epochs_since_best"]
    elif rank == 0:
        # A fresh run in an old directory must not append to the old metrics (the training-curve
        # figure would mix runs) nor leave the old best.pt if this run's first epoch is worse.
        for stale in ("metrics.jsonl", "best.pt", "last.pt", "finished.json"):
            (out / stale).unlink(missing_ok=True)
    # Made after a resume so that, when the old run kept no average, it starts from the trained weights.
    ema = copy.deepcopy(vae).eval() if config.ema_decay > 0 else None
    if ema is not None and ema_state:
        ema.load_state_dict(ema_state)
    if rank == 0:
        (out / "config.json").write_text(json.dumps({**config.to_dict(), "model": mc.to_dict()}, indent=2))

    def labels_of(t: torch.Tensor) -> torch.Tensor | None:
        return t if config.conditional else None

    val_x = prepare_eval_images(splits.val_images, mc.likelihood, seed=config.seed + 7)
    n_train = len(splits.train_images)
    progress = _progress(range(start_epoch, config.epochs), config.progress and rank == 0)
    for epoch in progress:
        t0 = time.perf_counter()
        vae.train()
        # Seed per epoch (and rank) so a resumed run repeats exactly what an uninterrupted one does.
        torch.manual_seed(config.seed * 100_003 + epoch * 101 + rank)
        perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(config.seed + epoch))
        # Each rank trains on its own shard of the shuffled epoch. The shards must be equally long:
        # DDP all-reduces in every backward(), so a rank with one batch more would wait forever.
        perm = perm[: n_train - n_train % world][rank::world]
        beta = config.beta
        if config.kl_warmup_epochs:
            beta *= min(1.0, (epoch + 1) / config.kl_warmup_epochs)
        total, count = torch.zeros((), dtype=torch.float64), 0
        for start in range(0, len(perm), config.batch_size):
            idx = perm[start:start + config.batch_size]
            x = splits.train_images[idx].to(device)
            if config.augment_prob > 0:
                x = augment_affine(x, config)
            if config.perturb_rate > 0:
                x = perturb(x, config.perturb_rate)
            if config.binarize == "dynamic" and mc.likelihood == "bernoulli":
                x = torch.bernoulli(x)
            x_in = x + config.input_noise * torch.randn_like(x) if config.input_noise > 0 else x
            loss = objective(x, labels_of(splits.train_labels[idx].to(device)), x_in, beta)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(vae.parameters(), config.grad_clip)
            optimizer.step()
            if ema is not None:
                _ema_update(ema, vae, config.ema_decay)
            total += loss.detach().double().cpu() * len(idx)
            count += len(idx)
        if world > 1:  # the epoch's training loss over all shards, not just rank 0's
            summed = torch.stack([total, torch.tensor(float(count), dtype=torch.float64)]).to(device)
            dist.all_reduce(summed)
            total, count = summed[0].cpu(), int(summed[1].item())
        train_loss = (total / max(count, 1)).item()
        stop = False
        if rank == 0:
            scored = ema if ema is not None else vae
            scores = validation_scores(scored, val_x.to(device), labels_of(splits.val_labels.to(device)),
                                       config.val_iw_samples)
            key = "val_elbo" if config.select_on == "elbo" else f"val_iwae_k{config.val_iw_samples}"
            score = scores[key]
            improved = score > best
            best, since_best = (score, 0) if improved else (best, since_best + 1)
            record = {"epoch": epoch, "train_loss": train_loss, "beta": beta, **scores,
                      "best_score": best, "world_size": world, "seconds": time.perf_counter() - t0}
            _save_epoch(out, vae, ema, optimizer, mc, config, splits, epoch, best, since_best, improved)
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            if hasattr(progress, "set_postfix"):
                progress.set_postfix(val_elbo=f"{scores['val_elbo']:.2f}", best=f"{best:.2f}")
            stop = since_best >= config.patience
        if world > 1:
            # Only rank 0 knows the validation score: without this broadcast it would stop early
            # while the others ran on into an all-reduce that never completes.
            flag = torch.tensor([int(stop)], device=device)
            dist.broadcast(flag, src=0)
            stop = bool(flag.item())
        if stop:
            break
    if rank == 0:  # tells scripts (and people) that this run ended by itself, not by a kill
        last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
        reason = "early_stopping" if last["epoch"] + 1 < config.epochs else "max_epochs"
        (out / "finished.json").write_text(json.dumps({"reason": reason, "last_epoch": last["epoch"],
                                                       "best_score": last["best_score"]}) + "\n")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return out / "best.pt"


def _save_epoch(out: Path, vae: VAE, ema: VAE | None, optimizer: torch.optim.Optimizer, mc: ModelConfig,
                config: TrainConfig, splits: DataSplits, epoch: int, best: float, since_best: int,
                improved: bool) -> None:
    """last.pt every epoch, best.pt when the validation score improved; both replaced atomically."""
    ckpt = {
        "model_config": mc.to_dict(), "train_config": config.to_dict(), "epoch": epoch,
        "model_state": vae.state_dict(), "ema_state": ema.state_dict() if ema is not None else {},
        "optimizer_state": optimizer.state_dict(), "best_score": best, "epochs_since_best": since_best,
        "data": splits.name, "data_spec": splits.spec, "preprocessing": splits.preprocessing.to_dict(),
    }
    names = ("last.pt", "best.pt") if improved else ("last.pt",)
    for name in names:
        torch.save(ckpt, out / f"{name}.tmp")
        os.replace(out / f"{name}.tmp", out / name)  # a crash never leaves half a checkpoint


def _init_output_bias(vae: VAE, images: torch.Tensor) -> None:
    """Start the decoder at the mean image's logits: skips the slow first epochs of learning the mean."""
    last = [m for m in vae.decoder.modules() if isinstance(m, nn.Conv2d | nn.Linear)][-1]
    mean = images.mean(0).clamp(1e-3, 1 - 1e-3)  # (C, H, W)
    with torch.no_grad():
        if isinstance(last, nn.Linear):
            last.bias.copy_(torch.logit(mean).flatten())
        else:  # a final conv has one bias per channel
            last.bias.copy_(torch.logit(mean.mean(dim=(1, 2))))


@torch.no_grad()
def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p, 1.0 - decay)


def _progress(it: range, enabled: bool) -> Iterable[int]:
    """tqdm over the epochs, or the bare range (no bar, or serving installs without tqdm)."""
    if not enabled:
        return it
    try:
        from tqdm import tqdm
    except ImportError:
        return it
    return tqdm(it, desc="epochs", unit="epoch")
