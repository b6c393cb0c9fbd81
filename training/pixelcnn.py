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

from collections.abc import Callable

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


class IncrementalPrior(nn.Module):
    """Fast ancestral sampling from a GatedPixelCNN (Ramachandran et al. 2017, "Fast generation for
    convolutional autoregressive models"): the same logits as a full pass, computed once per position.

    A full pass costs h*w positions through every layer, so sampling with full passes costs (h*w)^2;
    this costs h*w, because each layer's activations are computed once and cached:
      - the vertical stack at row i depends only on rows above i, so `row` computes it for a whole row
        (every layer, every column) once, when row i begins;
      - the horizontal stack at (i, j) depends on the vertical stack at (i, j) and on columns left of j
        in row i, so `step` computes one position through every layer from the cached columns.
    Caches hold each layer's *output* (= the next layer's input) at the `half` rows above (vertical) or
    columns left (horizontal) of the current position; slot l is layer l's output, the last slot is kept
    only so every layer has one (no layer reads it). Positions outside the grid are the zero padding of
    the full pass: caches start at zero and code K (one past the codebook) embeds to the zero vector.

        row:  codes_above (B, half, w) int64, v_hist (B, L, C, half, w)
              -> v_pre (B, L, 2C, w) (each layer's vertical pre-activation at row i),
                 v_row (B, L, C, w)  (each layer's vertical output at row i: the next rows' v_hist)
        step: codes_left (B, half) int64, h_hist (B, L, C, half), v_pre (B, L, 2C) (at column j)
              -> logits (B, K) (of position (i, j)), h_col (B, L, C) (each layer's horizontal output at j)
    """

    def __init__(self, prior: GatedPixelCNN) -> None:
        super().__init__()
        if any(layer.label is not None for layer in prior.layers):
            raise ValueError("incremental sampling of a class-conditional prior is not supported")
        self.prior = prior
        self.half = prior.layers[0].half

    def _embed(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (...) in 0..K (K: outside the grid) -> (..., C), zero for K."""
        table = self.prior.embed.weight
        return F.embedding(codes, torch.cat([table, torch.zeros_like(table[:1])]))

    def row(self, codes_above: torch.Tensor, v_hist: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        half = self.half
        below = self._embed(codes_above).permute(0, 3, 1, 2)  # (B, C, half, w): layer 0's input above row i
        pre, out = [], []
        current = torch.zeros_like(below[:, :, :1])  # layer 0's input at row i: masked (mask A), so zeros
        for index, layer in enumerate(self.prior.layers):
            above = below if index == 0 else v_hist[:, index - 1]  # (B, C, half, w)
            window = F.pad(torch.cat([above, current], dim=2), (half, half, 0, 0))  # (B, C, half+1, w+2half)
            v_pre = F.conv2d(window, layer.vertical.weight * layer.vertical_mask, layer.vertical.bias)
            current = layer._gate(v_pre)  # (B, C, 1, w): this layer's output at row i
            pre.append(v_pre[:, :, 0])
            out.append(current[:, :, 0])
        return torch.stack(pre, 1), torch.stack(out, 1)

    def step(self, codes_left: torch.Tensor, h_hist: torch.Tensor,
             v_pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        left = self._embed(codes_left).permute(0, 2, 1)[:, :, None]  # (B, C, 1, half): layer 0's input
        current = torch.zeros_like(left[..., :1])  # layer 0's input at (i, j): masked, so zeros
        outputs = []
        for index, layer in enumerate(self.prior.layers):
            before = left if index == 0 else h_hist[:, index - 1, :, None]  # (B, C, 1, half)
            window = torch.cat([before, current], dim=3)  # (B, C, 1, half+1)
            h_pre = F.conv2d(window, layer.horizontal.weight * layer.horizontal_mask, layer.horizontal.bias)
            vertical = v_pre[:, index, :, None, None]  # (B, 2C, 1, 1)
            h_out = layer.horizontal_out(layer._gate(layer.vertical_to_horizontal(vertical) + h_pre))
            current = h_out if layer.first else current + h_out  # (B, C, 1, 1)
            outputs.append(current[:, :, 0, 0])
        return self.prior.head(current)[:, :, 0, 0], torch.stack(outputs, 1)


Row = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def incremental_logits(row: Row, step: Step, codes: torch.Tensor, *, codebook_size: int, layers: int,
                       channels: int, half: int) -> torch.Tensor:
    """Teacher-forced logits of every position of `codes` (B, h, w) from a row and a step function
    (IncrementalPrior's, or its exported graphs'): (B, K, h, w), equal to a full pass of the prior.
    This is the sampling walk with the codes given; export checks the graphs with it."""
    b, h, w = codes.shape
    padded = torch.full((b, h + half, w + half), codebook_size, dtype=torch.long)  # K: outside the grid
    padded[:, half:, half:] = codes
    v_hist = torch.zeros(b, layers, channels, half, w)
    logits = torch.zeros(b, codebook_size, h, w)
    for i in range(h):
        v_pre, v_row = row(padded[:, i:i + half, half:], v_hist)  # codes of rows i-half .. i-1
        v_hist = torch.cat([v_hist[:, :, :, 1:], v_row[:, :, :, None]], 3)
        h_hist = torch.zeros(b, layers, channels, half)
        for j in range(w):
            logits[:, :, i, j], h_col = step(padded[:, i + half, j:j + half], h_hist, v_pre[..., j])
            h_hist = torch.cat([h_hist[..., 1:], h_col[..., None]], 3)
    return logits
