"""Losses and bounds against torch.distributions, hand computations and closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Bernoulli, Independent, Normal, kl_divergence

from training import losses
from training.models import VAE, ModelConfig


def test_gaussian_kl_to_standard_matches_torch() -> None:
    gen = torch.Generator().manual_seed(0)
    mean = torch.randn(7, 5, generator=gen) * 2
    log_var = torch.randn(7, 5, generator=gen)
    ours = losses.gaussian_kl_to_standard(mean, log_var)
    ref = kl_divergence(Normal(mean, torch.exp(0.5 * log_var)), Normal(0.0, 1.0))
    assert ours.shape == (7, 5)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    # Zero exactly at the prior, and positive elsewhere.
    assert torch.equal(losses.gaussian_kl_to_standard(torch.zeros(3), torch.zeros(3)), torch.zeros(3))
    assert (ours > 0).all()


def test_log_normal_diag_matches_torch() -> None:
    gen = torch.Generator().manual_seed(1)
    z, mean, log_var = (torch.randn(4, 3, 6, generator=gen) for _ in range(3))
    ref = Independent(Normal(mean, torch.exp(0.5 * log_var)), 1).log_prob(z)
    torch.testing.assert_close(losses.log_normal_diag(z, mean, log_var), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(losses.log_standard_normal(z),
                               Independent(Normal(torch.zeros_like(z), 1.0), 1).log_prob(z))


def test_bernoulli_log_likelihood_by_hand() -> None:
    logits = torch.tensor([[0.0, 2.0], [-1.0, 3.0]])
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])

    def sig(v: float) -> float:
        return 1 / (1 + math.exp(-v))

    expected = torch.tensor([
        math.log(0.5) + math.log(1 - sig(2.0)),
        math.log(1 - sig(-1.0)) + math.log(sig(3.0)),
    ])
    torch.testing.assert_close(losses.bernoulli_log_likelihood(logits, x), expected)
    # Sums over every non-batch dimension, like Independent(Bernoulli, 3).
    big_logits = torch.randn(2, 1, 3, 3)
    big_x = torch.bernoulli(torch.full((2, 1, 3, 3), 0.5))
    torch.testing.assert_close(losses.bernoulli_log_likelihood(big_logits, big_x),
                               Independent(Bernoulli(logits=big_logits), 3).log_prob(big_x))


def test_bernoulli_log_likelihood_is_stable_at_extreme_logits() -> None:
    """The regression behind the ONNX parity failure: log sigmoid must not underflow to -inf."""
    logits = torch.tensor([[-100.0, 100.0, -30.0, 30.0]])
    x = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    # log(1 - sigmoid(-100)) ~ 0, log sigmoid(100) ~ 0, log sigmoid(-30) ~ -30, log(1 - sigmoid(30)) ~ -30.
    torch.testing.assert_close(losses.bernoulli_log_likelihood(logits, x), torch.tensor([-60.0]))


def test_gaussian_log_likelihood_by_hand() -> None:
    mean = torch.tensor([[0.0, 1.0]])
    x = torch.tensor([[0.5, 1.0]])
    log_var = torch.tensor(math.log(0.25))  # a global sigma = 0.5 broadcasts
    # log N(0.5; 0, 0.25) + log N(1; 1, 0.25) = 2 * (-0.5 log(2 pi 0.25)) - 0.5 * 0.25 / 0.25
    expected = -math.log(2 * math.pi * 0.25) - 0.5
    torch.testing.assert_close(losses.gaussian_log_likelihood(mean, log_var, x), torch.tensor([expected]))
    per_pixel = torch.tensor([[0.0, math.log(4.0)]])
    # pixel 1: sigma^2 = 1, (0.5)^2 / 1; pixel 2: sigma^2 = 4, residual 0.
    expected = -0.5 * (0.25 + math.log(2 * math.pi)) - 0.5 * (math.log(4.0) + math.log(2 * math.pi))
    torch.testing.assert_close(losses.gaussian_log_likelihood(mean, per_pixel, x), torch.tensor([expected]))


def test_iwae_bound_k1_and_jensen() -> None:
    log_w = torch.randn(6, 1, generator=torch.Generator().manual_seed(0)) * 10
    torch.testing.assert_close(losses.iwae_bound(log_w), log_w[:, 0])
    log_w = torch.randn(6, 50, generator=torch.Generator().manual_seed(1)) * 3
    bound = losses.iwae_bound(log_w)
    assert (bound >= log_w.mean(-1)).all()  # Jensen: log mean exp >= mean log
    assert (bound <= log_w.max(-1).values).all()
    # Equal weights: the bound is that weight, whatever K.
    torch.testing.assert_close(losses.iwae_bound(torch.full((2, 7), -3.0)), torch.full((2,), -3.0))
    # Hand case: log((e^0 + e^log 3) / 2) = log 2.
    torch.testing.assert_close(losses.iwae_bound(torch.tensor([[0.0, math.log(3.0)]])),
                               torch.tensor([math.log(2.0)]))


def test_iwae_standard_error() -> None:
    assert torch.isnan(losses.iwae_standard_error(torch.zeros(3, 1))).all()  # undefined for K = 1
    assert torch.equal(losses.iwae_standard_error(torch.zeros(2, 10)), torch.zeros(2))
    log_w = torch.randn(1, 4000, generator=torch.Generator().manual_seed(2))
    se = losses.iwae_standard_error(log_w)
    w = torch.exp(log_w)
    torch.testing.assert_close(se, w.std(-1) / (math.sqrt(4000) * w.mean(-1)), rtol=1e-4, atol=1e-6)


def test_reparameterize_shapes_and_values() -> None:
    mean = torch.tensor([[1.0, -2.0]])
    log_var = torch.tensor([[0.0, math.log(4.0)]])
    eps = torch.tensor([[[1.0, 1.0], [0.0, -0.5], [2.0, 0.0]]])  # (B=1, K=3, D=2)
    z = losses.reparameterize(mean, log_var, eps)
    assert z.shape == (1, 3, 2)
    torch.testing.assert_close(z, torch.tensor([[[2.0, 0.0], [1.0, -3.0], [3.0, -2.0]]]))
    zeros = torch.zeros(5, 4)
    assert losses.reparameterize(zeros, zeros, torch.zeros(5, 7, 4)).shape == (5, 7, 4)


def test_bits_per_dim() -> None:
    one_bit_per_dim = torch.tensor([-64 * math.log(2.0)])
    torch.testing.assert_close(losses.bits_per_dim(one_bit_per_dim, 64), torch.tensor([1.0]))


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_log_weights_average_is_recon_minus_kl(likelihood: str) -> None:
    """E_eps[log_w] = E_q[log p(x|z)] - KL(q || p): the ELBO from log_weights equals the analytic form."""
    torch.manual_seed(0)
    vae = VAE(ModelConfig(input_shape=(1, 4, 4), latent_dim=3, architecture="mlp", hidden_dim=16,
                          likelihood=likelihood)).eval()
    x = torch.rand(3, 1, 4, 4)
    if likelihood == "bernoulli":
        x = torch.bernoulli(x)
    k = 20_000
    eps = torch.randn(3, k, 3, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        log_w = vae.log_weights(x, eps).double()  # (3, k)
        mean, log_var = vae.encode(x)
        z = losses.reparameterize(mean, log_var, eps)
        recon = vae.log_px_given_z(x, z).double()  # (3, k)
        kl = losses.gaussian_kl_to_standard(mean, log_var).sum(-1).double()
    # Per sample, log_w - log p(x|z) = log p(z) - log q(z|x), whose mean is -KL.
    elbo_mc = log_w.mean(-1)
    analytic = recon.mean(-1) - kl
    tolerance = 4 * (log_w - recon).std(-1) / math.sqrt(k) + 1e-6
    assert ((elbo_mc - analytic).abs() <= tolerance).all(), (elbo_mc, analytic, tolerance)
    # log q(z|x) written through eps equals the density of z under N(mean, diag var).
    log_q_direct = losses.log_normal_diag(z, mean.unsqueeze(1), log_var.unsqueeze(1)).double()
    torch.testing.assert_close(log_w - recon, losses.log_standard_normal(z).double() - log_q_direct,
                               rtol=1e-4, atol=1e-4)
