"""The graphs a VQ-VAE artifact holds, as modules with tensor-only signatures for export.

    encoder:     x (B, C, H, W) float32            -> codes (B, h, w) int64, z_e (B, D, h, w) float32
    decoder:     codes (B, h, w) int64             -> x_mean (B, C, H, W) float32
    prior:       codes (B, h, w) int64             -> logits (B, K, h, w) float32: position p's logits
                                                      depend only on the codes before p (raster order)
    prior_sample_row: codes_above (B, half, w) int64, v_hist (B, L, C, half, w) f32, u (B, w) f32,
                 temperature (B,) f32 -> codes (B, w) int64, v_row (B, L, C, w) f32: one row of codes
                 drawn by inverse CDF of u from cached activations (training/pixelcnn.py
                 IncrementalPrior), so a sample costs one prior pass in all instead of one per position
    log_weights: x (B, C, H, W), u (B, S, h*w) f32 -> log_w (B, S): log p(x, z_s) - log q(z_s | x), with
                                                      z_s drawn from the stochastic posterior by inverse
                                                      CDF of the uniforms u

Names and signatures come from the artifact contract in service/artifacts.py (FAMILY_GRAPH_IO).
"""

from __future__ import annotations

import torch
from torch import nn

from service.artifacts import FAMILY_GRAPH_IO
from training.pixelcnn import IncrementalPrior
from training.vqvae import VQVAE

GRAPH_IO = FAMILY_GRAPH_IO["vqvae"]


class EncoderGraph(nn.Module):
    def __init__(self, model: VQVAE) -> None:
        super().__init__()
        self.encoder, self.quantizer = model.encoder, model.quantizer

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z_e = self.encoder(x)
        return self.quantizer.nearest(z_e), z_e


class DecoderGraph(nn.Module):
    def __init__(self, model: VQVAE) -> None:
        super().__init__()
        self.decoder, self.quantizer = model.decoder, model.quantizer

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decoder(self.quantizer.embed(codes)))  # VQVAE.decode_mean


class PriorGraph(nn.Module):
    def __init__(self, model: VQVAE) -> None:
        super().__init__()
        self.prior = model.prior

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.prior(codes)


class PriorSampleRowGraph(nn.Module):
    def __init__(self, model: VQVAE) -> None:
        super().__init__()
        self.incremental = IncrementalPrior(model.prior)

    def forward(self, codes_above: torch.Tensor, v_hist: torch.Tensor, u: torch.Tensor,
                temperature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.incremental.sample_row(codes_above, v_hist, u, temperature)


class LogWeightsGraph(nn.Module):
    def __init__(self, model: VQVAE) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return self.model.log_weights(x, u)


def build_graphs(model: VQVAE) -> dict[str, nn.Module]:
    graphs: dict[str, nn.Module] = {
        "encoder": EncoderGraph(model), "decoder": DecoderGraph(model), "prior": PriorGraph(model),
        "prior_sample_row": PriorSampleRowGraph(model),
        "log_weights": LogWeightsGraph(model)}
    assert set(graphs) == set(GRAPH_IO)
    return graphs


def example_inputs(graph: str, model: VQVAE, batch: int, samples: int = 3) -> tuple[torch.Tensor, ...]:
    """Random inputs of the right shapes, for tracing; parity is checked on real data separately."""
    c, h, w = model.config.input_shape
    gh, gw = model.config.grid
    codes = torch.randint(0, model.config.codebook_size, (batch, gh, gw))
    cfg = model.config
    layers, channels, half = cfg.prior_layers, cfg.prior_channels, cfg.prior_kernel // 2
    # code K (one past the codebook) stands for a position outside the grid
    above = torch.randint(0, model.config.codebook_size + 1, (batch, half, gw))
    return {
        "encoder": (torch.rand(batch, c, h, w),),
        "decoder": (codes,),
        "prior": (codes,),
        "prior_sample_row": (above, torch.randn(batch, layers, channels, half, gw), torch.rand(batch, gw),
                             torch.ones(batch)),
        "log_weights": (torch.rand(batch, c, h, w), torch.rand(batch, samples, gh * gw)),
    }[graph]
