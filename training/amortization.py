"""The amortization gap of a Gaussian-latent VAE (Cremer, Li & Duvenaud 2018, "Inference suboptimality
in variational autoencoders").

For each of N test images a factorised Gaussian q*(z|x) = N(m, diag exp(v)) of its own is fitted by
Adam on the ELBO, starting from the encoder's q(z|x) and stopped when the ELBO stops improving. Then

    log p(x) - ELBO(q)  =  [log p(x) - ELBO(q*)]  +  [ELBO(q*) - ELBO(q)]
       inference gap         approximation gap       amortization gap

with log p(x) estimated by the importance-weighted bound with k samples (of whichever of q and q* gives
the tighter bound; both are lower bounds, so the larger is the better estimate). Every ELBO is
E_q[log p(x|z)] - KL(q || p(z)) with the KL in closed form and the expectation over `elbo_samples`
fixed draws, the same draws for q and q*.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

from training import losses
from training.models import VAE

ELBO_SAMPLES = 1000
STEP_SAMPLES = 16  # reparameterised samples per optimisation step
CHECK_EVERY = 50  # steps between checks of the (fixed-noise) ELBO


class LatentModel(Protocol):
    """What the gap needs of a model: its amortized posterior and its joint density, differentiable in z."""

    def encode(self, x: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, H, W) -> mean, log_var (B, D) of q(z|x)."""
        ...

    def log_joint(self, x: torch.Tensor, z: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """log p(x|z) + log p(z): x (B, C, H, W), z (B, S, D) -> (B, S)."""
        ...


class CheckpointModel:
    """A VAE from a checkpoint (training/models.py)."""

    def __init__(self, vae: VAE) -> None:
        self.vae = vae.eval()
        for p in self.vae.parameters():
            p.requires_grad_(False)

    def encode(self, x: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.vae.encode(x, y)

    def log_joint(self, x: torch.Tensor, z: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return self.vae.log_px_given_z(x, z, y) + losses.log_standard_normal(z)


def _elbo(model: LatentModel, x: torch.Tensor, y: torch.Tensor | None, mean: torch.Tensor,
          log_var: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """E_q[log p(x, z)] over the given eps (B, S, D) plus the entropy of q in closed form: (B,)."""
    z = losses.reparameterize(mean, log_var, eps)
    entropy = 0.5 * (log_var + 1.0 + losses.LOG_2PI).sum(-1)
    return model.log_joint(x, z, y).mean(-1) + entropy


def _iw(model: LatentModel, x: torch.Tensor, y: torch.Tensor | None, mean: torch.Tensor,
        log_var: torch.Tensor, k: int, gen: torch.Generator, chunk: int = 500) -> torch.Tensor:
    """log (1/k) sum_i p(x, z_i) / q(z_i|x), z_i ~ N(mean, diag exp(log_var)): (B,) float64."""
    parts = []
    for k0 in range(0, k, chunk):
        eps = torch.randn(len(x), min(chunk, k - k0), mean.shape[1], generator=gen)
        z = losses.reparameterize(mean, log_var, eps)
        log_q = losses.log_standard_normal(eps) - 0.5 * log_var.sum(-1, keepdim=True)
        parts.append(model.log_joint(x, z, y) - log_q)
    return losses.iwae_bound(torch.cat(parts, 1).double())


def amortization_gap(model: LatentModel | VAE, x: torch.Tensor, y: torch.Tensor | None = None,
                     k: int = 5000, seed: int = 0, lr: float = 1e-2, max_steps: int = 5000,
                     patience: int = 4) -> dict:
    """x: (N, C, H, W) (binarized for Bernoulli models) -> per-image bounds and the mean gaps, in nats."""
    if isinstance(model, VAE):
        model = CheckpointModel(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        q_mean, q_log_var = model.encode(x, y)
    d = q_mean.shape[1]
    fixed_eps = torch.randn(len(x), ELBO_SAMPLES, d, generator=gen)

    def fixed_elbo(mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:  # (N,) in chunks of images
        return torch.cat([_elbo(model, x[i:i + 50], None if y is None else y[i:i + 50], mean[i:i + 50],
                                log_var[i:i + 50], fixed_eps[i:i + 50]) for i in range(0, len(x), 50)])

    mean = q_mean.clone().requires_grad_(True)
    log_var = q_log_var.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([mean, log_var], lr=lr)
    with torch.no_grad():
        best = fixed_elbo(mean, log_var).mean().item()
    best_state = (mean.detach().clone(), log_var.detach().clone())
    since, steps = 0, 0
    while steps < max_steps and since < patience:
        for _ in range(CHECK_EVERY):
            eps = torch.randn(len(x), STEP_SAMPLES, d, generator=gen)
            loss = -_elbo(model, x, y, mean, log_var, eps).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        steps += CHECK_EVERY
        with torch.no_grad():
            value = fixed_elbo(mean, log_var).mean().item()
        if value > best + 1e-3:
            best, since, best_state = value, 0, (mean.detach().clone(), log_var.detach().clone())
        else:
            since += 1
    with torch.no_grad():
        star_mean, star_log_var = best_state
        elbo_q = fixed_elbo(q_mean, q_log_var).double()
        elbo_star = fixed_elbo(star_mean, star_log_var).double()
        iw_q = _iw(model, x, y, q_mean, q_log_var, k, gen)
        iw_star = _iw(model, x, y, star_mean, star_log_var, k, gen)
    log_px = torch.maximum(iw_q, iw_star)
    n = len(x)
    rows = {"elbo_q": elbo_q, "elbo_q_star": elbo_star, "iw_bound_q": iw_q, "iw_bound_q_star": iw_star,
            "log_px_estimate": log_px, "amortization_gap": elbo_star - elbo_q,
            "approximation_gap": log_px - elbo_star, "inference_gap": log_px - elbo_q}
    return {"images": n, "k": k, "elbo_samples": ELBO_SAMPLES, "optimisation_steps": steps, "lr": lr,
            **{name: {"mean": float(t.mean()),
                      "standard_error": float(t.std() / math.sqrt(n)) if n > 1 else math.nan}
               for name, t in rows.items()}}


def render_markdown(gap: dict) -> str:
    names = {"elbo_q": "ELBO, amortized q(z\\|x) (the encoder)", "elbo_q_star": "ELBO, optimised q*(z\\|x)",
             "iw_bound_q": f"IW bound, k={gap['k']}, samples from q",
             "iw_bound_q_star": f"IW bound, k={gap['k']}, samples from q*",
             "log_px_estimate": "log p(x) estimate (the larger IW bound)",
             "amortization_gap": "amortization gap ELBO(q*) - ELBO(q)",
             "approximation_gap": "approximation gap log p(x) - ELBO(q*)",
             "inference_gap": "inference gap log p(x) - ELBO(q)"}
    lines = [f"## Amortization gap ({gap['images']} test digits spread over the split; Cremer et al. 2018)",
             "",
             "| quantity | nats (mean ± s.e. over images) |", "|---|---|"]
    lines += [f"| {label} | {gap[key]['mean']:.2f} ± {gap[key]['standard_error']:.2f} |"
              for key, label in names.items()]
    lines += ["", f"q* per image: Adam (lr {gap['lr']:g}, {STEP_SAMPLES} samples per step) from the "
              f"encoder's q, stopped after {gap['optimisation_steps']} steps when the ELBO on "
              f"{gap['elbo_samples']} fixed samples stopped improving.", ""]
    return "\n".join(lines)
