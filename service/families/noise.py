"""Seeded noise that depends on what it is for, never on how the work is cut.

Importance sampling: sample j of image i of a request with seed s uses eps(s, i, j), a (D,) standard
normal vector. It comes from a counter-based generator (Philox 4x64, Salmon et al. 2011): key (s, i),
counter j * ceil(D / 4), so any range of samples [a, b) is drawn directly, without drawing the ones
before it. The engine can therefore cut log-weights work into rows of any size (time slices, batches,
chunk sizes) and k = 128 stays a prefix of k = 256, with the very same numbers.

Each 64-bit output gives one normal by Box-Muller's cosine branch on its two 32-bit halves: exact in
distribution (up to 32-bit uniforms) and fully vectorised.

Prior samples for /sample: z_i = temperature * eps_i, eps_i seeded by (seed, i) alone.

The VQ-VAE family draws uniforms instead, one per grid position: u(s, i, j) for sample j of image i
(key (s, i), counter j * ceil(P / 4), the top 53 bits of each 64-bit output), and for ancestral
sampling from its prior u(s, i) of sample i (key (s, i), counter word 1 set: a stream of its own).
"""

from __future__ import annotations

import math

import numpy as np

# Recorded in a calibration (manifest `anomaly.noise`), so a reader knows which numbers a seed gives.
SCHEME = "philox4x64 key (seed, image) counter sample*ceil(D/4); box-muller cosine of 32-bit halves"
TWO_PI = 2.0 * math.pi
_HALF = np.float64(2.0**-32)


def _blocks(latent_dim: int) -> int:
    """Philox counter steps per sample: each step gives four 64-bit outputs, one per latent dimension."""
    return -(-latent_dim // 4)


def sample_eps(seed: int, image: int, start: int, count: int, latent_dim: int) -> np.ndarray:
    """eps of samples start .. start + count - 1 of one image: (count, D) float32, N(0, I)."""
    blocks = _blocks(latent_dim)
    gen = np.random.Philox(key=[seed, image], counter=[start * blocks, 0, 0, 0])
    raw = gen.random_raw(count * blocks * 4).reshape(count, blocks * 4)[:, :latent_dim]  # (count, D) u64
    u1 = ((raw >> np.uint64(32)).astype(np.float64) + 0.5) * _HALF  # (0, 1): log is finite
    u2 = (raw & np.uint64(0xFFFFFFFF)).astype(np.float64) * _HALF  # [0, 1)
    return (np.sqrt(-2.0 * np.log(u1)) * np.cos(TWO_PI * u2)).astype(np.float32)


def rows_eps(keys: np.ndarray, count: int, latent_dim: int) -> np.ndarray:
    """eps for rows of log-weights work: keys (B, 3) of (seed, image, first sample) -> (B, count, D)."""
    return np.stack([sample_eps(int(s), int(i), int(j), count, latent_dim) for s, i, j in keys])


def prior_latents(seed: int, n: int, latent_dim: int, temperature: float) -> np.ndarray:
    """z_i = temperature * eps_i, eps_i ~ N(0, I) seeded by (seed, i): (n, D) float32."""
    z = np.stack([np.random.default_rng([seed, i]).standard_normal(latent_dim) for i in range(n)])
    return (temperature * z).astype(np.float32)


def _uniforms(gen: np.random.Philox, count: int, width: int) -> np.ndarray:
    """(count, width) float32 uniforms in [0, 1] from `gen` (53-bit, rounded to float32)."""
    blocks = _blocks(width)
    raw = gen.random_raw(count * blocks * 4).reshape(count, blocks * 4)[:, :width]
    return ((raw >> np.uint64(11)).astype(np.float64) * 2.0**-53).astype(np.float32)


def sample_uniforms(seed: int, image: int, start: int, count: int, positions: int) -> np.ndarray:
    """u of samples start .. start + count - 1 of one image: (count, P) float32."""
    gen = np.random.Philox(key=[seed, image], counter=[start * _blocks(positions), 0, 0, 0])
    return _uniforms(gen, count, positions)


def rows_uniforms(keys: np.ndarray, count: int, positions: int) -> np.ndarray:
    """u for rows of log-weights work: keys (B, 3) of (seed, image, first sample) -> (B, count, P)."""
    return np.stack([sample_uniforms(int(s), int(i), int(j), count, positions) for s, i, j in keys])


def prior_uniforms(seed: int, n: int, positions: int) -> np.ndarray:
    """The uniforms of ancestral sampling, one per position of each of n samples: (n, P) float32."""
    return np.concatenate([_uniforms(np.random.Philox(key=[seed, i], counter=[0, 1, 0, 0]), 1, positions)
                           for i in range(n)])


def importance_keys(n: int, k: int, seed: int, chunk: int) -> np.ndarray:
    """Rows of importance-sampling work for n images with k samples each, `chunk` samples per row:
    (n * ceil(k / chunk), 3) int64 keys (seed, image, first sample), image-major."""
    rows = -(-k // chunk)
    keys = np.empty((n, rows, 3), dtype=np.int64)
    keys[..., 0] = seed
    keys[..., 1] = np.arange(n)[:, None]
    keys[..., 2] = np.arange(rows)[None, :] * chunk
    return keys.reshape(n * rows, 3)
