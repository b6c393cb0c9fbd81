"""The estimators against the one model whose log p(x) is known exactly: the linear VAE (pPCA).

For x = W z + b + noise, z ~ N(0, I), noise ~ N(0, diag sigma^2): x ~ N(b, W W^T + diag sigma^2).
The importance-weighted bound must approach that from below as k grows; the ELBO must stay below.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from scipy.stats import multivariate_normal

from training import losses
from training.data import DataSplits
from training.evaluate import importance_weighted_stats
from training.models import VAE, ModelConfig
from training.train import TrainConfig, model_from_checkpoint, train


def _linear_vae(p_shape: tuple[int, int, int], d: int, seed: int, std: float = 0.5,
                num_classes: int = 0) -> VAE:
    torch.manual_seed(seed)
    vae = VAE(ModelConfig(input_shape=p_shape, latent_dim=d, architecture="linear", likelihood="gaussian",
                          gaussian_variance="global", fixed_std=std, num_classes=num_classes))
    return vae.eval()


def test_exact_log_likelihood_by_hand() -> None:
    """P = 2, D = 1 with known W, b, sigma: compare with scipy's multivariate normal."""
    vae = _linear_vae((1, 1, 2), 1, seed=0, std=0.5)
    with torch.no_grad():
        vae.decoder.net.weight.copy_(torch.tensor([[1.0], [2.0]]))
        vae.decoder.net.bias.copy_(torch.tensor([0.5, -1.0]))
    cov = [[1.0 + 0.25, 2.0], [2.0, 4.0 + 0.25]]
    x = torch.tensor([[[[0.0, 0.0]]], [[[1.5, 1.0]]], [[[-2.0, 3.0]]]])
    expected = multivariate_normal(mean=[0.5, -1.0], cov=cov).logpdf(x.flatten(1).numpy())
    torch.testing.assert_close(vae.exact_log_likelihood(x).double(), torch.from_numpy(expected),
                               rtol=1e-5, atol=1e-5)


def test_exact_log_likelihood_per_pixel_variance_and_labels() -> None:
    """Per-pixel noise and a conditional model (the label shifts the mean) against torch.distributions."""
    torch.manual_seed(3)
    vae = VAE(ModelConfig(input_shape=(1, 2, 2), latent_dim=2, architecture="linear", likelihood="gaussian",
                          gaussian_variance="pixel", num_classes=3)).eval()
    with torch.no_grad():
        vae.obs_log_var.copy_(torch.randn(1, 2, 2) * 0.3)
        vae.decoder.net.weight.normal_()
    x, y = torch.randn(5, 1, 2, 2), torch.tensor([0, 1, 2, 1, 0])
    w = vae.decoder.net.weight.detach().double()
    cov = w[:, :2] @ w[:, :2].T + torch.diag(vae.obs_log_var.detach().double().exp().flatten())
    mean = vae.decoder.net.bias.detach().double() + w[:, 2:][:, y].T  # b + W_y onehot(y)
    expected = torch.distributions.MultivariateNormal(mean, cov).log_prob(x.double().flatten(1))
    torch.testing.assert_close(vae.exact_log_likelihood(x, y).double(), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="linear"):
        VAE(ModelConfig(input_shape=(1, 4, 4), architecture="mlp")).exact_log_likelihood(x)


def _set_near_posterior_encoder(vae: VAE, mean_noise: float, log_var_shift: float) -> None:
    """Set q(z|x) to the exact pPCA posterior N(M^-1 W^T (x - b), sigma^2 M^-1), M = W^T W + sigma^2 I,
    kept diagonal, then spoil it a little so that the ELBO has a real gap to close."""
    w = vae.decoder.net.weight.detach().double()  # (P, D)
    b = vae.decoder.net.bias.detach().double()
    s2 = float(vae.obs_log_var.detach().exp())
    m_inv = torch.linalg.inv(w.T @ w + s2 * torch.eye(w.shape[1], dtype=torch.float64))
    a = m_inv @ w.T  # (D, P)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        noise = torch.randn(a.shape, generator=gen, dtype=torch.float64)
        vae.encoder.mean.weight.copy_(a + mean_noise * noise)
        vae.encoder.mean.bias.copy_(-(a @ b))
        vae.encoder.log_var.weight.zero_()
        vae.encoder.log_var.bias.copy_(torch.log(s2 * torch.diagonal(m_inv)) + log_var_shift)


def test_iw_bound_converges_to_exact_from_below() -> None:
    """Hand-built pPCA (P = 12, D = 3) with a slightly wrong encoder, on data drawn from the model."""
    vae = _linear_vae((1, 3, 4), 3, seed=1, std=0.5)
    _set_near_posterior_encoder(vae, mean_noise=0.05, log_var_shift=0.5)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        z = torch.randn(40, 3, generator=gen)
        x = vae.decode_mean(z) + 0.5 * torch.randn(40, 1, 3, 4, generator=gen)
    exact = vae.exact_log_likelihood(x).double().detach()

    k = 5000
    stats = importance_weighted_stats(vae, x, None, k, seed=0)
    gap = stats["log_likelihood"] - exact
    assert gap.abs().mean() < 0.05, gap
    assert stats["standard_error"].max() < 0.05
    elbo_gap = stats["elbo"] - exact
    assert elbo_gap.max() < 0 and elbo_gap.mean() < -0.2  # a real gap, strictly below for every image

    # E[IW_k] increases with k and stays below log p(x): estimate it for each k by splitting the same
    # 5000 log-weights into 5000/k disjoint groups and averaging (low-variance, same draws for every k).
    eps = torch.randn(40, k, 3, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        log_w = vae.log_weights(x, eps).double()
    means = []
    for kk in (1, 5, 50, 500):
        bounds = losses.iwae_bound(log_w.reshape(40, k // kk, kk))  # (40, groups)
        means.append(float((bounds - exact[:, None]).mean()))
    assert means == sorted(means), means
    assert means[-1] < 0 and means[0] < -0.2, means
    torch.testing.assert_close(torch.tensor(means[0]), elbo_gap.mean().float(), atol=0.05, rtol=0)


def test_trained_linear_vae_on_digits8(tmp_path: Path, digits8: DataSplits) -> None:
    """Train pPCA on digits8 briefly; at k = 5000 the IW estimate sits within 0.1 nats of exact log p(x)."""
    config = TrainConfig.from_dict({
        "data": "digits8", "out_dir": str(tmp_path), "epochs": 10, "batch_size": 64, "lr": 3e-3,
        "val_iw_samples": 8, "progress": False,
        "model": {"architecture": "linear", "likelihood": "gaussian", "latent_dim": 4, "fixed_std": 0.3},
    })
    vae, _ = model_from_checkpoint(train(config, splits=digits8))
    x = digits8.test_images[:40]
    exact = vae.exact_log_likelihood(x).double().detach()
    assert torch.isfinite(exact).all()
    big = importance_weighted_stats(vae, x, None, 5000, seed=0)
    small = importance_weighted_stats(vae, x, None, 1, seed=0)
    assert (big["log_likelihood"] - exact).abs().mean() < 0.1
    # k = 1: the estimate is the one-sample ELBO, below log p(x) on average.
    assert float((small["log_likelihood"] - exact).mean()) < -0.05
    assert float((big["elbo"] - exact).mean()) < -0.05  # the k-sample average of log_w is the ELBO
    assert math.isfinite(float(big["log_likelihood"].mean()))
