"""Likelihoods, KL divergences and variational bounds as pure functions.

Conventions: every function returns per-example values (summed over data/latent dims, never
averaged over the batch) so callers choose the reduction; shapes are written next to the code.
"""

from __future__ import annotations

import math

import torch

LOG_2PI = math.log(2.0 * math.pi)


def log_standard_normal(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) summed over the last dim. z: (..., D) -> (...)."""
    return -0.5 * (z.pow(2) + LOG_2PI).sum(-1)


def log_normal_diag(z: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """log N(z; mean, diag exp(log_var)) summed over the last dim. (..., D) -> (...)."""
    return -0.5 * ((z - mean).pow(2) * torch.exp(-log_var) + log_var + LOG_2PI).sum(-1)


def gaussian_kl_to_standard(mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """Per-dimension KL(N(mean, exp(log_var)) || N(0, 1)). (B, D) -> (B, D); sum it for the total."""
    return 0.5 * (mean.pow(2) + torch.exp(log_var) - 1.0 - log_var)


def bernoulli_log_likelihood(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """log Bernoulli(x; sigmoid(logits)) summed over all but the first dim. (B, ...) -> (B,).

    Written as x*l - max(l, 0) - log1p(exp(-|l|)) on purpose, not binary_cross_entropy_with_logits:
    the ONNX exporter lowers the latter to Log(Sigmoid(l)), and ONNX Runtime's Sigmoid saturates, so
    log_w came out -inf for logits below about -18 (every background pixel of a well-trained MNIST
    model) and failed the export parity check. These elementary ops stay exact in every runtime.
    """
    return bernoulli_log_likelihood_terms(logits, x).flatten(1).sum(-1)


def bernoulli_log_likelihood_terms(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The per-pixel terms bernoulli_log_likelihood sums: (B, ...) -> (B, ...)."""
    return x * logits - torch.clamp(logits, min=0) - torch.log1p(torch.exp(-logits.abs()))


def gaussian_log_likelihood(mean: torch.Tensor, log_var: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, diag exp(log_var)) summed over all but the first dim. (B, ...) -> (B,).

    log_var broadcasts against mean, so a scalar (global) or per-pixel variance both work.
    """
    return gaussian_log_likelihood_terms(mean, log_var, x).flatten(1).sum(-1)


def gaussian_log_likelihood_terms(mean: torch.Tensor, log_var: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The per-pixel terms gaussian_log_likelihood sums: (B, ...) -> (B, ...)."""
    return -0.5 * ((x - mean).pow(2) * torch.exp(-log_var) + log_var + LOG_2PI)


def reparameterize(mean: torch.Tensor, log_var: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """z = mean + sigma * eps (Kingma & Welling 2014). mean, log_var: (B, D); eps: (B, K, D) -> (B, K, D)."""
    return mean.unsqueeze(1) + torch.exp(0.5 * log_var).unsqueeze(1) * eps


def iwae_bound(log_weights: torch.Tensor) -> torch.Tensor:
    """log (1/K) sum_k w_k, the importance-weighted bound (Burda et al. 2016). (B, K) -> (B,)."""
    k = log_weights.shape[-1]
    return torch.logsumexp(log_weights, dim=-1) - math.log(k)


def iwae_standard_error(log_weights: torch.Tensor) -> torch.Tensor:
    """Delta-method standard error of the log of the mean importance weight. (B, K) -> (B,).

    With w normalised by its max, Var[log mean(w)] ~= Var[w] / (K * mean(w)^2). NaN when K == 1.
    """
    k = log_weights.shape[-1]
    if k < 2:  # one sample says nothing about its own spread; NaN rather than a warning and a fake 0
        return torch.full_like(log_weights[..., 0], math.nan)
    w = torch.exp(log_weights - log_weights.max(dim=-1, keepdim=True).values)
    return w.std(dim=-1) / (math.sqrt(k) * w.mean(dim=-1))


def bits_per_dim(log_likelihood_nats: torch.Tensor, num_dims: int) -> torch.Tensor:
    """Negative log-likelihood in bits per data dimension."""
    return -log_likelihood_nats / (num_dims * math.log(2.0))
