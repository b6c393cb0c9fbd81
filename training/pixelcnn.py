"""A gated PixelCNN (van den Oord et al. 2016, "Conditional image generation with PixelCNN decoders")
over a grid of discrete codes: the learned prior of the VQ-VAE.

Two stacks avoid the blind spot of a single masked convolution: the vertical stack sees every row
above the current one, the horizontal stack the positions to the left in the current row, and the
vertical stack feeds the horizontal one. The first layer masks the current position itself (mask A);
later layers may use it (mask B) because their inputs already exclude it. Masks are applied by
multiplying the weights in forward, so the graph exports to ONNX as plain convolutions.

One pass gives the logits of every position, conditioned on the codes before it in raster order:
    codes (B, h, w) int64 [, y (B,) int64] -> logits (B, K, h, w)
so log p(z) is one teacher-forced pass. Sampling runs position by position; IncrementalPrior caches the
stacks' activations so that a whole sample costs one pass, not one per position.
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
    convolutional autoregressive models"): the same logits as a full pass, each computed once.

    Sampling with full passes costs h*w passes over all h*w positions; this costs one, because each
    layer's activations are computed once and kept:
      - the vertical stack at row i depends only on rows above i, so it is computed for a whole row
        (every layer, every column) once, when row i begins, from the cached rows above (v_hist);
      - the horizontal stack at (i, j) depends on the vertical stack at (i, j) and on columns left of j
        in row i, so each position runs through every layer once, on vectors (B, C): matrix products,
        no convolutions, so no layout conversions in ONNX Runtime.
    `sample_row` draws a whole grid row, each code by inverse CDF of a uniform; `row` and `step` are the
    same computation with the caches stacked, to check the logits against a full pass. Caches hold each
    layer's *output* (= the next layer's input) at the `half` rows above or columns left of the current
    position; slot l is layer l's output, the last slot is kept only so every layer has one. Positions
    outside the grid are the zero padding of the full pass: caches start at zero and code K (one past
    the codebook) embeds to the zero vector.

        sample_row: codes_above (B, half, w) int64, v_hist (B, L, C, half, w), u (B, w) f32 in [0, 1),
                    temperature (B,) f32
              -> codes (B, w) int64 (column j: the first code whose CDF of softmax(logits / temperature)
                 reaches u[:, j]), v_row (B, L, C, w) (each layer's vertical output at row i: the next
                 rows' v_hist)
        row:  codes_above, v_hist -> v_pre (B, L, 2C, w) (vertical pre-activations at row i), v_row
        step: codes_left (B, half) int64, h_hist (B, L, C, half), v_pre (B, L, 2C) (at column j)
              -> logits (B, K) (of position (i, j)), h_col (B, L, C) (each layer's output at j)
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

    def _vertical(self, codes_above: torch.Tensor,
                  v_hist: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Each layer's vertical pre-activation (B, 2C, w) and output (B, C, w) at the row below v_hist."""
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
        return pre, out

    def _horizontal_weights(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's horizontal convolution as a matrix (2C, n*C) over its n input columns concatenated:
        j-half .. j, or j-half .. j-1 for the first layer (mask A hides column j); and its bias."""
        weights = []
        for layer in self.prior.layers:
            weight = (layer.horizontal.weight * layer.horizontal_mask)[:, :, 0]  # (2C, C, half+1)
            if layer.first:
                weight = weight[:, :, :self.half]
            weights.append((weight.permute(0, 2, 1).reshape(len(weight), -1), layer.horizontal.bias))
        return weights

    def _horizontal(self, left: list[torch.Tensor], history: list[list[torch.Tensor]],
                    vertical: list[torch.Tensor], weights: list[tuple[torch.Tensor, torch.Tensor]],
                    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One position through every layer -> logits (B, K) and each layer's output (B, C).

        left: the embeddings (B, C) of the codes at columns j-half .. j-1 (layer 0's input); history[l]:
        layer l's outputs (B, C) at those columns; vertical[l]: vertical_to_horizontal of layer l's
        vertical pre-activation at column j, (B, 2C)."""
        current = left[0]  # replaced by layer 0's output; layer 0 reads only `left`
        outputs = []
        for index, layer in enumerate(self.prior.layers):
            weight, bias = weights[index]
            window = left if index == 0 else [*history[index - 1], current]
            h_pre = F.linear(torch.cat(window, dim=1), weight, bias)  # (B, 2C)
            h_out = _pointwise(layer.horizontal_out, layer._gate(vertical[index] + h_pre))
            current = h_out if layer.first else current + h_out
            outputs.append(current)
        head = self.prior.head  # ReLU, 1x1 conv, ReLU, 1x1 conv
        return _pointwise(head[3], F.relu(_pointwise(head[1], F.relu(current)))), outputs

    def _to_horizontal(self, v_pre: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """vertical_to_horizontal of each layer's (B, 2C, w) pre-activations -> [layer][column] (B, 2C)."""
        return [list(_pointwise(layer.vertical_to_horizontal, v.transpose(1, 2)).unbind(1))
                for layer, v in zip(self.prior.layers, v_pre, strict=True)]

    def sample_row(self, codes_above: torch.Tensor, v_hist: torch.Tensor, u: torch.Tensor,
                   temperature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v_pre, v_out = self._vertical(codes_above, v_hist)
        columns, weights = self._to_horizontal(v_pre), self._horizontal_weights()
        last = self.prior.codebook_size - 1
        zeros = torch.zeros_like(v_out[0][:, :, 0])  # (B, C): what lies left of the grid
        left = [zeros] * self.half
        history = [[zeros] * self.half for _ in self.prior.layers]
        codes = []
        for j in range(v_out[0].shape[-1]):  # the width is static (only the batch is dynamic): unrolled
            logits, outputs = self._horizontal(left, history, [c[j] for c in columns], weights)
            cdf = torch.cumsum(torch.softmax(logits / temperature[:, None], dim=1), dim=1)  # (B, K)
            code = torch.clamp((cdf < u[:, j:j + 1]).sum(dim=1), max=last)  # (B,) the first CDF >= u
            codes.append(code)
            left = [*left[1:], self._embed(code)]
            history = [[*h[1:], o] for h, o in zip(history, outputs, strict=True)]
        return torch.stack(codes, dim=1), torch.stack(v_out, dim=1)

    def row(self, codes_above: torch.Tensor, v_hist: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pre, out = self._vertical(codes_above, v_hist)
        return torch.stack(pre, 1), torch.stack(out, 1)

    def step(self, codes_left: torch.Tensor, h_hist: torch.Tensor,
             v_pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        left = list(self._embed(codes_left).unbind(1))
        history = [list(h_hist[:, index].unbind(-1)) for index in range(h_hist.shape[1])]
        vertical = [_pointwise(layer.vertical_to_horizontal, v_pre[:, index])
                    for index, layer in enumerate(self.prior.layers)]
        logits, outputs = self._horizontal(left, history, vertical, self._horizontal_weights())
        return logits, torch.stack(outputs, 1)


def _pointwise(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution applied to vectors: (..., C_in) -> (..., C_out)."""
    return F.linear(x, conv.weight[:, :, 0, 0], conv.bias)


SampleRow = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                    tuple[torch.Tensor, torch.Tensor]]


def sample_rows(sample_row: SampleRow, u: torch.Tensor, temperature: torch.Tensor, *, grid: tuple[int, int],
                codebook_size: int, layers: int, channels: int, half: int) -> torch.Tensor:
    """Code grids (n, h, w) drawn by a sample_row function (IncrementalPrior's or its exported graph's)
    from uniforms u (n, h*w) in raster order: the service's sampling loop, in torch, for checks."""
    n, (h, w) = len(u), grid
    padded = torch.full((n, h + half, w), codebook_size, dtype=torch.long)  # K above the grid
    v_hist = torch.zeros(n, layers, channels, half, w)
    for i in range(h):
        codes, v_row = sample_row(padded[:, i:i + half], v_hist, u[:, i * w:(i + 1) * w], temperature)
        padded[:, i + half] = codes
        v_hist = torch.cat([v_hist[:, :, :, 1:], v_row[:, :, :, None]], 3)
    return padded[:, half:]


@torch.no_grad()
def separable_draws(prior: GatedPixelCNN, n: int, grid: tuple[int, int], temperature: float = 1.0,
                    seed: int = 0, min_probability: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Code grids (n, h, w) drawn from the prior with one full pass per position (float64), and uniforms
    u (n, h*w) float32 in the middle of each drawn code's CDF interval, so a sampler whose logits match
    the full pass to well within that margin draws exactly these grids from u, whatever its rounding.
    A drawn code less likely than min_probability is replaced by the most likely one, so every margin is
    at least min_probability / 2."""
    gen = torch.Generator().manual_seed(seed)
    h, w = grid
    codes, u = torch.zeros(n, h, w, dtype=torch.long), torch.zeros(n, h * w)
    for position in range(h * w):
        i, j = divmod(position, w)
        probs = torch.softmax(prior(codes)[:, :, i, j].double() / temperature, dim=1)  # (n, K)
        drawn = torch.multinomial(probs, 1, generator=gen)[:, 0]
        likely = probs.gather(1, drawn[:, None])[:, 0] >= min_probability
        drawn = torch.where(likely, drawn, probs.argmax(dim=1))
        cdf = torch.cumsum(probs, dim=1)
        u[:, position] = (cdf - probs / 2).gather(1, drawn[:, None])[:, 0].float()
        codes[:, i, j] = drawn
    return codes, u
