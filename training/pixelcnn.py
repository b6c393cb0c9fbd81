"""A gated PixelCNN (van den Oord et al. 2016, "Conditional image generation with PixelCNN decoders")
over a grid of discrete codes: the learned prior of the VQ-VAE.

Two stacks avoid the blind spot of a single masked convolution: the vertical stack sees every row
above the current one, the horizontal stack the positions to the left in the current row, and the
vertical stack feeds the horizontal one. The first layer masks the current position itself (mask A);
later layers may use it (mask B) because their inputs already exclude it. Masks are applied by
multiplying the weights in forward, so the graph exports to ONNX as plain convolutions.

One pass gives the logits of every position, conditioned on the codes before it in raster order:
    codes (B, h, w) int64 [, y (B,) int64] -> logits (B, K, h, w)
so log p(z) is one teacher-forced pass and sampling runs position by position.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class GatedLayer(nn.Module):
    """One gated layer of both stacks: tanh(a) * sigmoid(b) on each, with a label bias when conditional."""

    def __init__(self, channels: int, kernel: int, first: bool, num_classes: int) -> None:
        super().__init__()
        half = kernel // 2
        self.half, self.first = half, first
        self.vertical = nn.Conv2d(channels, 2 * channels, (half + 1, kernel))
        self.horizontal = nn.Conv2d(channels, 2 * channels, (1, half + 1))
        self.vertical_to_horizontal = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.horizontal_out = nn.Conv2d(channels, channels, 1)
        self.label = nn.Embedding(num_classes, 2 * channels) if num_classes else None
        # mask A: the vertical stack must not see the current row, the horizontal one the current position
        vertical_mask = torch.ones_like(self.vertical.weight)
        horizontal_mask = torch.ones_like(self.horizontal.weight)
        if first:
            vertical_mask[:, :, -1] = 0
            horizontal_mask[:, :, :, -1] = 0
        self.register_buffer("vertical_mask", vertical_mask, persistent=False)
        self.register_buffer("horizontal_mask", horizontal_mask, persistent=False)

    @staticmethod
    def _gate(x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        return torch.tanh(a) * torch.sigmoid(b)

    def forward(self, v: torch.Tensor, h: torch.Tensor,
                label: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """v, h: (B, C, rows, cols) -> the same shapes."""
        half = self.half
        # Pad so output (i, j) sees input rows i-half .. i and columns j-half .. j+half (vertical), and
        # columns j-half .. j of row i (horizontal).
        v_pre = F.conv2d(F.pad(v, (half, half, half, 0)), self.vertical.weight * self.vertical_mask,
                         self.vertical.bias)  # (B, 2C, rows, cols)
        h_pre = F.conv2d(F.pad(h, (half, 0, 0, 0)), self.horizontal.weight * self.horizontal_mask,
                         self.horizontal.bias)
        bias = 0 if label is None or self.label is None else self.label(label)[:, :, None, None]
        v_out = self._gate(v_pre + bias)
        h_mid = self._gate(self.vertical_to_horizontal(v_pre) + h_pre + bias)
        h_out = self.horizontal_out(h_mid)
        return v_out, (h_out if self.first else h + h_out)


class GatedPixelCNN(nn.Module):
    """p(z | y) = prod over positions in raster order of softmax(logits)."""

    def __init__(self, codebook_size: int, channels: int = 64, layers: int = 6, kernel: int = 3,
                 num_classes: int = 0) -> None:
        super().__init__()
        if kernel % 2 == 0 or kernel < 3:
            raise ValueError(f"prior_kernel must be odd and >= 3, got {kernel}")
        self.codebook_size = codebook_size
        self.embed = nn.Embedding(codebook_size, channels)
        self.layers = nn.ModuleList(GatedLayer(channels, kernel, i == 0, num_classes) for i in range(layers))
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, 4 * channels, 1), nn.ReLU(),
                                  nn.Conv2d(4 * channels, codebook_size, 1))

    def forward(self, codes: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """codes (B, h, w) int64 -> logits (B, K, h, w); position p's logits depend only on codes < p."""
        x = self.embed(codes).permute(0, 3, 1, 2)  # (B, C, h, w)
        v, h = x, x
        for layer in self.layers:
            v, h = layer(v, h, y)
        return self.head(h)

    def log_prob(self, codes: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """log p(codes [| y]) summed over positions: (B, h, w) -> (B,)."""
        log_p = torch.log_softmax(self(codes, y), dim=1)  # (B, K, h, w)
        return torch.gather(log_p, 1, codes.unsqueeze(1)).flatten(1).sum(-1)
