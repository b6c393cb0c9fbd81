"""The VAE family: encoders q(z|x), decoders p(x|z), and the model that ties them to a prior N(0, I).

One `VAE` class covers the plain, beta-, conditional and IWAE-trained models (they differ in the
objective and in whether labels are fed in), and the `linear` architecture gives probabilistic PCA,
whose exact log p(x) is available in closed form to check the estimators against.
"""

from __future__ import annotations

import functools
import math
import typing
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from torch import nn

from training import losses

Architecture = Literal["mlp", "conv", "linear"]
Likelihood = Literal["bernoulli", "gaussian"]
GaussianVariance = Literal["fixed", "global", "pixel"]


@functools.cache
def literal_choices(cls: type) -> dict[str, tuple]:
    """{field: allowed values} for a dataclass's Literal-typed fields (the CLI turns them into choices)."""
    hints = typing.get_type_hints(cls)  # evaluates the annotations, strings under `from __future__`
    return {name: typing.get_args(hint) for name, hint in hints.items() if typing.get_origin(hint) is Literal}


def check_choices(config: object) -> None:
    """Literal fields are not checked by Python: a typo such as architecture="cnv" in a --config file
    would otherwise silently build a different model (or objective="iwea" train the ELBO)."""
    for name, allowed in literal_choices(type(config)).items():
        value = getattr(config, name)
        if value not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(map(str, allowed))}, got {value!r}")


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model; stored in checkpoints and manifests."""

    input_shape: tuple[int, int, int] = (1, 28, 28)  # (C, H, W)
    latent_dim: int = 32  # more than MNIST needs: unused units collapse to the prior (see active units)
    architecture: Architecture = "conv"
    likelihood: Likelihood = "bernoulli"
    gaussian_variance: GaussianVariance = "global"  # fixed | learned global | learned per-pixel
    fixed_std: float = 0.1  # sigma of p(x|z) when gaussian_variance == "fixed"
    hidden_dim: int = 512  # width of the fully connected layers
    channels: int = 32  # base width of the conv layers
    num_classes: int = 0  # > 0 makes a conditional VAE (Sohn et al. 2015): labels go to q and p
    dropout: float = 0.0  # on hidden layers; regularises small data sets such as mnist5k
    labels: list[str] = field(default_factory=list)  # class names, len == num_classes

    def __post_init__(self) -> None:
        self.input_shape = tuple(int(v) for v in self.input_shape)  # type: ignore[assignment]
        check_choices(self)
        if len(self.input_shape) != 3 or min(self.input_shape) < 1:
            raise ValueError(f"input_shape must be (C, H, W), got {self.input_shape}")
        if self.latent_dim < 1 or self.hidden_dim < 1 or self.channels < 1 or self.num_classes < 0:
            raise ValueError("latent_dim, hidden_dim and channels must be positive, num_classes >= 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.fixed_std <= 0:
            raise ValueError(f"fixed_std must be positive, got {self.fixed_std}")
        if self.architecture == "linear" and self.likelihood != "gaussian":
            raise ValueError("the linear model (probabilistic PCA) needs likelihood='gaussian'")
        if self.architecture == "conv" and (self.input_shape[1] % 4 or self.input_shape[2] % 4):
            raise ValueError(f"conv architecture needs height and width divisible by 4, got "
                             f"{self.input_shape}")
        if self.num_classes and self.labels and len(self.labels) != self.num_classes:
            raise ValueError("labels must name every class")

    @property
    def data_dim(self) -> int:
        c, h, w = self.input_shape
        return c * h * w

    def to_dict(self) -> dict:
        return asdict(self)


class Encoder(nn.Module):
    """q(z|x[,y]) = N(mean, diag exp(log_var)). x: (B, C, H, W), y: (B,) int64 -> two (B, D)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c, h, w = config.input_shape
        self.num_classes = config.num_classes
        if config.architecture == "conv":
            ch = config.channels
            self.body = nn.Sequential(
                nn.Conv2d(c, ch, 3, padding=1), nn.ELU(),
                nn.Conv2d(ch, 2 * ch, 4, stride=2, padding=1), nn.ELU(),  # H/2
                nn.Conv2d(2 * ch, 2 * ch, 4, stride=2, padding=1), nn.ELU(),  # H/4
                nn.Flatten(),
            )
            features = 2 * ch * (h // 4) * (w // 4)
        else:
            self.body = nn.Flatten()
            features = config.data_dim
        features += config.num_classes  # the label joins the features before the MLP head
        if config.architecture == "linear":
            self.head: nn.Module = nn.Identity()
            head_dim = features
        else:
            self.head = nn.Sequential(
                nn.Linear(features, config.hidden_dim), nn.ELU(), nn.Dropout(config.dropout),
                nn.Linear(config.hidden_dim, config.hidden_dim), nn.ELU(), nn.Dropout(config.dropout),
            )
            head_dim = config.hidden_dim
        self.mean = nn.Linear(head_dim, config.latent_dim)
        self.log_var = nn.Linear(head_dim, config.latent_dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)  # (B, F)
        if self.num_classes:
            assert y is not None, "a conditional encoder needs labels"
            h = torch.cat([h, nn.functional.one_hot(y, self.num_classes).to(h.dtype)], dim=-1)
        h = self.head(h)
        return self.mean(h), self.log_var(h)


class Decoder(nn.Module):
    """The network of p(x|z[,y]): z (N, D), y (N,) -> logits (bernoulli) or pre-sigmoid mean, (N, C, H, W)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c, h, w = config.input_shape
        self.input_shape = config.input_shape
        self.num_classes = config.num_classes
        in_dim = config.latent_dim + config.num_classes
        if config.architecture == "linear":
            self.net: nn.Module = nn.Linear(in_dim, config.data_dim)
        elif config.architecture == "mlp":
            self.net = nn.Sequential(
                nn.Linear(in_dim, config.hidden_dim), nn.ELU(), nn.Dropout(config.dropout),
                nn.Linear(config.hidden_dim, config.hidden_dim), nn.ELU(), nn.Dropout(config.dropout),
                nn.Linear(config.hidden_dim, config.data_dim),
            )
        else:
            ch = config.channels
            self.net = nn.Sequential(
                nn.Linear(in_dim, config.hidden_dim), nn.ELU(), nn.Dropout(config.dropout),
                nn.Linear(config.hidden_dim, 2 * ch * (h // 4) * (w // 4)), nn.ELU(),
                nn.Unflatten(1, (2 * ch, h // 4, w // 4)),
                nn.ConvTranspose2d(2 * ch, 2 * ch, 4, stride=2, padding=1), nn.ELU(),  # H/2
                nn.ConvTranspose2d(2 * ch, ch, 4, stride=2, padding=1), nn.ELU(),  # H
                nn.Conv2d(ch, c, 3, padding=1),
            )

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if self.num_classes:
            assert y is not None, "a conditional decoder needs labels"
            z = torch.cat([z, nn.functional.one_hot(y, self.num_classes).to(z.dtype)], dim=-1)
        return self.net(z).reshape(-1, *self.input_shape)


class VAE(nn.Module):
    """Encoder, decoder and likelihood; prior p(z) = N(0, I)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        if config.likelihood == "gaussian":
            shape = config.input_shape if config.gaussian_variance == "pixel" else ()
            init = 2.0 * math.log(config.fixed_std)
            self.obs_log_var = nn.Parameter(torch.full(shape, init),
                                            requires_grad=config.gaussian_variance != "fixed")

    # -- pieces -------------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) -> mean, log_var (B, D)."""
        return self.encoder(x, y)

    def decode_mean(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """E[x|z] in data space. z: (N, D) -> (N, C, H, W); in [0, 1] except for the linear model."""
        out = self.decoder(z, y)
        return out if self.config.architecture == "linear" else torch.sigmoid(out)

    def log_px_given_z(self, x: torch.Tensor, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """log p(x|z). x: (B, C, H, W), z: (B, K, D), y: (B,) -> (B, K)."""
        b, k, d = z.shape
        x_rep = x.unsqueeze(1).expand(b, k, *x.shape[1:]).reshape(b * k, *x.shape[1:])
        y_rep = None if y is None else y.unsqueeze(1).expand(b, k).reshape(b * k)
        out = self.decoder(z.reshape(b * k, d), y_rep)  # (B*K, C, H, W)
        if self.config.likelihood == "bernoulli":
            ll = losses.bernoulli_log_likelihood(out, x_rep)
        else:
            ll = losses.gaussian_log_likelihood(self._gaussian_mean(out), self.obs_log_var, x_rep)
        return ll.reshape(b, k)

    def _gaussian_mean(self, out: torch.Tensor) -> torch.Tensor:
        return out if self.config.architecture == "linear" else torch.sigmoid(out)

    @torch.no_grad()
    def log_weight_magnitude(self, x: torch.Tensor, eps: torch.Tensor,
                             y: torch.Tensor | None = None) -> torch.Tensor:
        """The sum of the absolute values of every term log_weights adds up: (B, K) float64.

        log_w sums C*H*W pixel terms of log p(x|z) and D terms each of log p(z) and log q(z|x). Its float32
        rounding grows with these terms, not with |log_w|: a Gaussian decoder's pixel terms can run to
        thousands of nats of either sign and sum to nearly zero. Export parity is judged against this.
        """
        b, k, d = eps.shape
        mean, log_var = self.encode(x, y)
        z = losses.reparameterize(mean, log_var, eps)  # (B, K, D)
        x_rep = x.unsqueeze(1).expand(b, k, *x.shape[1:]).reshape(b * k, *x.shape[1:])
        y_rep = None if y is None else y.unsqueeze(1).expand(b, k).reshape(b * k)
        out = self.decoder(z.reshape(b * k, d), y_rep).double()  # (B*K, C, H, W)
        if self.config.likelihood == "bernoulli":
            pixels = losses.bernoulli_log_likelihood_terms(out, x_rep.double())
        else:
            pixels = losses.gaussian_log_likelihood_terms(self._gaussian_mean(out), self.obs_log_var.double(),
                                                          x_rep.double())
        gauss = 0.5 * (z.double().pow(2) + losses.LOG_2PI)  # |log N(z; 0, 1)| per dim, (B, K, D)
        log_q = 0.5 * (eps.double().pow(2) + losses.LOG_2PI + log_var.double().unsqueeze(1))
        return (pixels.abs().flatten(1).sum(-1).reshape(b, k) + gauss.sum(-1) + log_q.abs().sum(-1))

    def log_weights(self, x: torch.Tensor, eps: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Importance log-weights log p(x, z_k) - log q(z_k|x), z_k = mean + sigma * eps_k.

        x: (B, C, H, W), eps: (B, K, D) standard normal -> (B, K). Given eps, this is deterministic,
        which is what makes seeded log-likelihoods reproducible in the service.
        """
        mean, log_var = self.encode(x, y)
        z = losses.reparameterize(mean, log_var, eps)  # (B, K, D)
        # log q(z|x) in terms of eps: the Jacobian of z(eps) is diag(sigma).
        log_q = losses.log_standard_normal(eps) - 0.5 * log_var.sum(-1, keepdim=True)
        return self.log_px_given_z(x, z, y) + losses.log_standard_normal(z) - log_q

    # -- objectives ---------------------------------------------------------------------------------
    def elbo_terms(
        self, x: torch.Tensor, y: torch.Tensor | None = None, x_in: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One-sample reconstruction term and analytic KL, each (B,). x_in: a corrupted input (denoising)."""
        mean, log_var = self.encode(x if x_in is None else x_in, y)
        eps = torch.randn_like(mean).unsqueeze(1)
        z = losses.reparameterize(mean, log_var, eps)  # (B, 1, D)
        recon = self.log_px_given_z(x, z, y)[:, 0]
        kl = losses.gaussian_kl_to_standard(mean, log_var).sum(-1)
        return recon, kl

    def iwae_objective(self, x: torch.Tensor, k: int, y: torch.Tensor | None = None) -> torch.Tensor:
        """The IWAE bound with k fresh samples per example, (B,)."""
        eps = torch.randn(x.shape[0], k, self.config.latent_dim, device=x.device)
        return losses.iwae_bound(self.log_weights(x, eps, y))

    # -- closed form for the linear model -----------------------------------------------------------
    def exact_log_likelihood(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Exact log p(x[|y]) of the linear model, x ~ N(b_y, W W^T + diag(sigma^2)). (B, C, H, W) -> (B,).

        For a conditional model the label's one-hot only shifts the mean (b_y = b + W_y y), so the
        decoder's weight is split into its latent part W and label part W_y.
        """
        if self.config.architecture != "linear":
            raise ValueError("exact log-likelihood is only available for architecture='linear'")
        linear: nn.Linear = self.decoder.net  # type: ignore[assignment]
        d = self.config.latent_dim
        w = linear.weight.double()[:, :d]  # (P, D)
        noise = torch.exp(self.obs_log_var.double()).expand(self.config.input_shape).reshape(-1)  # (P,)
        cov = w @ w.T + torch.diag(noise)
        # The mean is the decoder at z = 0, which includes the label shift; (B, P).
        mean = self.decoder(torch.zeros(x.shape[0], d, device=x.device), y).double().flatten(1)
        dist = torch.distributions.MultivariateNormal(mean, covariance_matrix=cov)
        return dist.log_prob(x.double().flatten(1)).to(x.dtype)
