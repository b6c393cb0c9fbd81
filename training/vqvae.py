"""The VQ-VAE family (van den Oord et al. 2017): a grid of discrete codes instead of a Gaussian latent.

    encoder:  x (B, C, H, W) -> z_e (B, D, H/4, W/4), one D-vector per grid position
    quantize: each z_e vector -> the index of its nearest codebook entry, codes (B, H/4, W/4) int64
    decoder:  codes -> e[codes] (B, D, H/4, W/4) -> logits (Bernoulli) or mean (Gaussian) (B, C, H, W)
    prior:    a gated PixelCNN over the code grid (training/pixelcnn.py), p(z) = prod_p p(z_p | z_<p)

The codebook follows an exponential moving average of the encoder vectors assigned to each entry
(decay ~0.99, Laplace-smoothed counts; van den Oord et al. 2017, appendix A.1) instead of a codebook
loss, and entries no batch vector has chosen for a while restart at a random batch vector, so no
code stays dead. The encoder gets the reconstruction gradient straight through the quantization and a
commitment loss beta * ||z_e - sg(e)||^2.

Likelihood bounds (nats, same units as the Gaussian family):
- deterministic posterior q(z|x) = 1[z = z_q(x)]: log p(x) >= log p(x | z_q(x)) + log p(z_q(x));
- stochastic posterior q(z|x) = prod_p softmax_k(-||z_e,p - e_k||^2 / tau): the importance-weighted
  bound log (1/K) sum_i p(x, z_i) / q(z_i | x), z_i ~ q, so the service's `k` means what it means for
  the Gaussian family. tau is chosen on validation digits (the one that gives the highest bound).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from training import losses
from training.models import Likelihood, check_choices
from training.pixelcnn import GatedPixelCNN

DOWNSAMPLING = 4  # the encoder halves height and width twice: 28x28 -> a 7x7 grid


@dataclass
class VQConfig:
    """Everything needed to rebuild a VQ-VAE and its prior; stored in checkpoints and manifests."""

    input_shape: tuple[int, int, int] = (1, 28, 28)  # (C, H, W); H and W divisible by 4
    codebook_size: int = 64  # K entries
    code_dim: int = 16  # D, the length of each codebook vector
    channels: int = 32  # width of the encoder and decoder convolutions
    likelihood: Likelihood = "bernoulli"
    fixed_std: float = 0.1  # initial sigma of a Gaussian decoder (a learned global variance)
    commitment: float = 0.25  # beta of the commitment loss
    codebook_decay: float = 0.99  # EMA decay of the codebook
    codebook_epsilon: float = 1e-5  # Laplace smoothing of the EMA counts
    dead_code_threshold: float = 0.5  # restart an entry whose EMA count (vectors per batch) falls below
    prior_channels: int = 32
    prior_layers: int = 5
    prior_kernel: int = 3
    num_classes: int = 0  # > 0: a class-conditional prior (the codes' decoder stays unconditional)
    labels: list[str] = field(default_factory=list)
    posterior_temperature: float = 1.0  # tau of the stochastic posterior (set on validation digits)

    def __post_init__(self) -> None:
        self.input_shape = tuple(int(v) for v in self.input_shape)  # type: ignore[assignment]
        check_choices(self)
        _, h, w = self.input_shape
        if h % DOWNSAMPLING or w % DOWNSAMPLING:
            raise ValueError(f"the VQ-VAE needs height and width divisible by {DOWNSAMPLING}, got "
                             f"{self.input_shape}")
        if self.codebook_size < 2 or self.code_dim < 1 or self.channels < 1:
            raise ValueError("codebook_size must be >= 2, code_dim and channels positive")
        if not 0.0 < self.codebook_decay < 1.0:
            raise ValueError(f"codebook_decay must be in (0, 1), got {self.codebook_decay}")
        if self.posterior_temperature <= 0:
            raise ValueError(f"posterior_temperature must be positive, got {self.posterior_temperature}")

    @property
    def grid(self) -> tuple[int, int]:
        """(h, w) of the code grid."""
        return self.input_shape[1] // DOWNSAMPLING, self.input_shape[2] // DOWNSAMPLING

    @property
    def positions(self) -> int:
        h, w = self.grid
        return h * w

    def to_dict(self) -> dict:
        return asdict(self)


class ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class EMAQuantizer(nn.Module):
    """Nearest-neighbour quantization against a codebook kept as an EMA of its assigned vectors."""

    def __init__(self, config: VQConfig) -> None:
        super().__init__()
        k, d = config.codebook_size, config.code_dim
        self.decay, self.epsilon = config.codebook_decay, config.codebook_epsilon
        self.dead_threshold = config.dead_code_threshold
        self.register_buffer("codebook", torch.randn(k, d) * 0.1)  # (K, D)
        self.register_buffer("cluster_size", torch.ones(k))  # EMA of vectors per batch, (K,)
        self.register_buffer("embed_sum", self.codebook.clone())  # EMA of their sum, (K, D)
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))
        self.register_buffer("restarts", torch.zeros((), dtype=torch.long))

    def distances(self, z_e: torch.Tensor) -> torch.Tensor:
        """Squared distances to every entry: z_e (B, D, h, w) -> (B, h, w, K)."""
        flat = z_e.permute(0, 2, 3, 1)  # (B, h, w, D)
        return ((flat.pow(2).sum(-1, keepdim=True) - 2 * flat @ self.codebook.t())
                + self.codebook.pow(2).sum(-1))

    def nearest(self, z_e: torch.Tensor) -> torch.Tensor:
        """codes (B, h, w) int64."""
        return self.distances(z_e).argmin(-1)

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, h, w) -> z_q (B, D, h, w)."""
        return F.embedding(codes, self.codebook).permute(0, 3, 1, 2)

    @torch.no_grad()
    def update(self, z_e: torch.Tensor, codes: torch.Tensor) -> None:
        """One EMA step of the codebook from a training batch, then restart the entries gone dead."""
        flat = z_e.permute(0, 2, 3, 1).reshape(-1, z_e.shape[1])  # (N, D)
        if not bool(self.initialised):  # start from real encoder vectors: no entry begins far from the data
            self.codebook.copy_(flat[torch.randint(len(flat), (len(self.codebook),), device=flat.device)])
            self.embed_sum.copy_(self.codebook)
            self.initialised.fill_(True)
            codes = self.nearest(z_e)
        one_hot = F.one_hot(codes.reshape(-1), len(self.codebook)).to(flat.dtype)  # (N, K)
        self.cluster_size.lerp_(one_hot.sum(0), 1 - self.decay)
        self.embed_sum.lerp_(one_hot.t() @ flat, 1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.epsilon) / (n + len(self.codebook) * self.epsilon) * n
        self.codebook.copy_(self.embed_sum / smoothed.unsqueeze(1))
        dead = self.cluster_size < self.dead_threshold
        if dead.any():
            picks = flat[torch.randint(len(flat), (int(dead.sum()),), device=flat.device)]
            self.codebook[dead] = picks
            self.embed_sum[dead] = picks
            self.cluster_size[dead] = 1.0
            self.restarts += int(dead.sum())


class VQVAE(nn.Module):
    """Encoder, EMA codebook, decoder and the PixelCNN prior over the codes."""

    def __init__(self, config: VQConfig) -> None:
        super().__init__()
        self.config = config
        c = config.input_shape[0]
        ch, d = config.channels, config.code_dim
        self.encoder = nn.Sequential(
            nn.Conv2d(c, ch, 4, stride=2, padding=1), nn.ReLU(),  # H/2
            nn.Conv2d(ch, ch, 4, stride=2, padding=1),  # H/4
            ResidualBlock(ch), ResidualBlock(ch), nn.ReLU(),
            nn.Conv2d(ch, d, 1),
        )
        self.quantizer = EMAQuantizer(config)
        self.decoder = nn.Sequential(
            nn.Conv2d(d, ch, 3, padding=1),
            ResidualBlock(ch), ResidualBlock(ch), nn.ReLU(),
            nn.ConvTranspose2d(ch, ch, 4, stride=2, padding=1), nn.ReLU(),  # H/2
            nn.ConvTranspose2d(ch, c, 4, stride=2, padding=1),  # H
        )
        self.prior = GatedPixelCNN(config.codebook_size, config.prior_channels, config.prior_layers,
                                   config.prior_kernel, config.num_classes)
        if config.likelihood == "gaussian":
            self.obs_log_var = nn.Parameter(torch.tensor(2.0 * math.log(config.fixed_std)))

    # -- pieces -------------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) -> z_e (B, D, h, w)."""
        return self.encoder(x)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) -> codes (B, h, w) int64, the deterministic posterior."""
        return self.quantizer.nearest(self.encode(x))

    def decoder_output(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, h, w) -> logits (Bernoulli) or pre-sigmoid mean (Gaussian), (B, C, H, W)."""
        return self.decoder(self.quantizer.embed(codes))

    def decode_mean(self, codes: torch.Tensor) -> torch.Tensor:
        """E[x | codes] in [0, 1]: (B, h, w) -> (B, C, H, W)."""
        return torch.sigmoid(self.decoder_output(codes))

    def log_px_given_codes(self, x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """log p(x | z). x: (B, C, H, W), codes: (B, h, w) -> (B,)."""
        out = self.decoder_output(codes)
        if self.config.likelihood == "bernoulli":
            return losses.bernoulli_log_likelihood(out, x)
        return losses.gaussian_log_likelihood(torch.sigmoid(out), self.obs_log_var, x)

    def log_prior(self, codes: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """log p(z[|y]) by the PixelCNN, teacher-forced: codes (B, h, w) -> (B,)."""
        return self.prior.log_prob(codes, y)

    def posterior_log_probs(self, z_e: torch.Tensor, temperature: float | None = None) -> torch.Tensor:
        """log q(k | x) per position of the stochastic posterior: z_e (B, D, h, w) -> (B, h*w, K)."""
        tau = temperature or self.config.posterior_temperature
        dist = self.quantizer.distances(z_e).flatten(1, 2)  # (B, P, K)
        return torch.log_softmax(-dist / tau, dim=-1)

    # -- objectives and bounds ----------------------------------------------------------------------
    def training_terms(self, x: torch.Tensor, x_in: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Reconstruction log-likelihood (B,) with straight-through gradients, commitment (B,), and the
        batch's codes (B, h, w). Updates the codebook when training."""
        z_e = self.encode(x if x_in is None else x_in)
        codes = self.quantizer.nearest(z_e)
        if self.training:
            self.quantizer.update(z_e.detach(), codes)
            codes = self.quantizer.nearest(z_e.detach())  # entries may have moved or restarted
        z_q = self.quantizer.embed(codes)
        commitment = (z_e - z_q.detach()).pow(2).flatten(1).sum(-1)
        z_st = z_e + (z_q - z_e).detach()  # straight through: the decoder's gradient reaches the encoder
        out = self.decoder(z_st)
        if self.config.likelihood == "bernoulli":
            recon = losses.bernoulli_log_likelihood(out, x)
        else:
            recon = losses.gaussian_log_likelihood(torch.sigmoid(out), self.obs_log_var, x)
        return {"recon": recon, "commitment": commitment, "codes": codes}

    def deterministic_bound(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """log p(x | z_q(x)) + log p(z_q(x)) <= log p(x): the ELBO of the point-mass posterior. (B,)."""
        codes = self.codes(x)
        return self.log_px_given_codes(x, codes) + self.log_prior(codes, y)

    def log_weights(self, x: torch.Tensor, u: torch.Tensor, y: torch.Tensor | None = None,
                    temperature: float | None = None) -> torch.Tensor:
        """log p(x, z_i) - log q(z_i | x) for K samples of the stochastic posterior.

        x: (B, C, H, W); u: (B, K, P) uniforms in [0, 1), one per sample and grid position, turned into
        codes by the inverse CDF of q (so, given u, this is deterministic, as for the Gaussian family's
        eps) -> (B, K).
        """
        b, k, p = u.shape
        log_q = self.posterior_log_probs(self.encode(x), temperature)  # (B, P, Kc)
        cdf = torch.cumsum(log_q.exp(), dim=-1)  # (B, P, Kc)
        below = cdf.unsqueeze(1) < u.unsqueeze(-1)  # (B, K, P, Kc)
        codes = below.sum(-1).clamp(max=log_q.shape[-1] - 1)  # (B, K, P): the first entry with cdf >= u
        log_q_z = torch.gather(log_q.unsqueeze(1).expand(b, k, p, -1), 3, codes.unsqueeze(-1)).squeeze(-1)
        grid = codes.reshape(b * k, *self.config.grid)  # (B*K, h, w)
        x_rep = x.unsqueeze(1).expand(b, k, *x.shape[1:]).reshape(b * k, *x.shape[1:])
        y_rep = None if y is None else y.unsqueeze(1).expand(b, k).reshape(b * k)
        joint = self.log_px_given_codes(x_rep, grid) + self.log_prior(grid, y_rep)  # (B*K,)
        return joint.reshape(b, k) - log_q_z.sum(-1)

    def exact_log_likelihood(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """log p(x) = logsumexp_z [log p(x|z) + log p(z)] over every code grid: only for tiny models
        (K ** (h*w) grids; e.g. K = 4 on a 2x2 grid is 256). x (B, C, H, W) -> (B,)."""
        kc, p = self.config.codebook_size, self.config.positions
        if kc ** p > 65_536:
            raise ValueError(f"{kc}^{p} code grids are too many to enumerate")
        every = torch.cartesian_prod(*[torch.arange(kc)] * p).reshape(-1, p)  # (K^P, P)
        grids = every.reshape(-1, *self.config.grid).to(x.device)
        out = []
        for i in range(len(x)):
            xi = x[i:i + 1].expand(len(grids), *x.shape[1:])
            yi = None if y is None else y[i:i + 1].expand(len(grids))
            out.append(torch.logsumexp(self.log_px_given_codes(xi, grids) + self.log_prior(grids, yi), 0))
        return torch.stack(out)

    # -- generation --------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_codes(self, n: int, temperature: float = 1.0, y: torch.Tensor | None = None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """Ancestral sampling from the prior, position by position in raster order: (n, h, w) int64."""
        h, w = self.config.grid
        codes = torch.zeros(n, h, w, dtype=torch.long)
        for pos in range(h * w):
            i, j = divmod(pos, w)
            logits = self.prior(codes, y)[:, :, i, j] / temperature  # (n, K)
            probs = torch.softmax(logits, -1)
            codes[:, i, j] = torch.multinomial(probs, 1, generator=generator)[:, 0]
        return codes


def codebook_usage(codes: torch.Tensor, codebook_size: int) -> dict[str, float]:
    """Perplexity, entries used and entries unused of a set of codes (any shape, int64)."""
    counts = torch.bincount(codes.reshape(-1), minlength=codebook_size).double()
    probs = counts / counts.sum()
    entropy = -(probs[probs > 0] * probs[probs > 0].log()).sum()
    used = int((counts > 0).sum())
    return {"perplexity": float(entropy.exp()), "codes_used": used, "codes_unused": codebook_size - used,
            "fraction_used": used / codebook_size}
