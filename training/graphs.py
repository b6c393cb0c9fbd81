"""The graphs an artifact holds, as modules with tensor-only signatures for export.

    encoder:     x (B, C, H, W) float32 [, y (B,) int64]                -> mean (B, D), log_var (B, D)
    decoder:     z (B, D) float32 [, y (B,) int64]                      -> x_mean (B, C, H, W)
    log_weights: x (B, C, H, W), eps (B, K, D) float32 [, y (B,) int64] -> log_w (B, K)
    background_log_weights (optional): log_weights of the likelihood-ratio background model
                 (Ren et al. 2019), same signature and the same latent dimension D

Names and signatures come from the artifact contract in service/artifacts.py (GRAPH_IO).

log_weights lets the service compute importance-weighted log-likelihoods with nothing but a
log-sum-exp: log p(x) ~= logsumexp_k(log_w) - log K, with eps ~ N(0, I) drawn by the service.
"""

from __future__ import annotations

import torch
from torch import nn

from service.artifacts import GRAPH_IO, GRAPHS
from training.models import VAE


# The encoder and decoder graphs hold only their own half of the VAE: a traced TorchScript module keeps
# every parameter of the modules it holds, used or not, so holding the whole VAE doubled their files.
class EncoderGraph(nn.Module):
    def __init__(self, vae: VAE) -> None:
        super().__init__()
        self.encoder = vae.encoder

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(x, y)  # VAE.encode


class DecoderGraph(nn.Module):
    def __init__(self, vae: VAE) -> None:
        super().__init__()
        self.decoder = vae.decoder
        self.linear = vae.config.architecture == "linear"

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        out = self.decoder(z, y)  # VAE.decode_mean: E[x|z], a sigmoid except for the linear model
        return out if self.linear else torch.sigmoid(out)


class LogWeightsGraph(nn.Module):
    def __init__(self, vae: VAE) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, eps: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.vae.log_weights(x, eps, y)


def build_graphs(vae: VAE, background: VAE | None = None) -> dict[str, nn.Module]:
    """The required graphs, plus background_log_weights when a background model is given."""
    graphs: dict[str, nn.Module] = {"encoder": EncoderGraph(vae), "decoder": DecoderGraph(vae),
                                    "log_weights": LogWeightsGraph(vae)}
    assert tuple(graphs) == GRAPHS
    if background is not None:
        graphs["background_log_weights"] = LogWeightsGraph(background)
    return graphs


def input_names(graph: str, conditional: bool) -> list[str]:
    return list(GRAPH_IO[graph][0]) + (["y"] if conditional else [])


def output_names(graph: str) -> list[str]:
    return list(GRAPH_IO[graph][1])


def example_inputs(graph: str, vae: VAE, batch: int, k: int = 3) -> tuple[torch.Tensor, ...]:
    """Random inputs of the right shapes, for tracing; parity is checked on real data separately."""
    c, h, w = vae.config.input_shape
    d = vae.config.latent_dim
    first: tuple[torch.Tensor, ...] = {
        "encoder": (torch.rand(batch, c, h, w),),
        "decoder": (torch.randn(batch, d),),
        "log_weights": (torch.rand(batch, c, h, w), torch.randn(batch, k, d)),
        "background_log_weights": (torch.rand(batch, c, h, w), torch.randn(batch, k, d)),
    }[graph]
    if vae.config.num_classes:
        first = (*first, torch.arange(batch) % vae.config.num_classes)
    return first
