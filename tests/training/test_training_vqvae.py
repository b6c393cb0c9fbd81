"""The VQ-VAE family: causal prior, EMA codebook, and both likelihood bounds against the exact log p(x)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from training import losses
from training.__main__ import main
from training.pixelcnn import GatedPixelCNN, IncrementalPrior, sample_rows, separable_draws
from training.train_vq import VQTrainConfig, iw_bound, model_from_checkpoint, train_vq
from training.vqvae import VQVAE, VQConfig, codebook_usage

TINY = {"input_shape": (1, 8, 8), "codebook_size": 4, "code_dim": 3, "channels": 8, "prior_channels": 8,
        "prior_layers": 2}  # a 2x2 grid of 4 codes: 4^4 = 256 grids, enumerable


def test_prior_logits_depend_only_on_earlier_positions() -> None:
    torch.manual_seed(0)
    prior = GatedPixelCNN(codebook_size=5, channels=8, layers=4, kernel=3).eval()
    codes = torch.randint(0, 5, (1, 4, 5))
    base = prior(codes)
    for pos in range(20):
        i, j = divmod(pos, 5)
        changed = codes.clone()
        changed[0, i, j] = (changed[0, i, j] + 1) % 5
        diff = (prior(changed) - base).abs().amax(dim=1)[0].flatten()  # (20,) change per position
        assert torch.all(diff[:pos + 1] == 0), f"position {pos} leaks into positions <= itself"
        if pos < 19:
            assert diff[pos + 1:].max() > 0, f"position {pos} reaches no later position"


def test_class_conditional_prior_uses_the_label() -> None:
    torch.manual_seed(0)
    prior = GatedPixelCNN(codebook_size=4, channels=8, layers=2, num_classes=3).eval()
    codes = torch.randint(0, 4, (2, 3, 3))
    assert not torch.allclose(prior(codes, torch.tensor([0, 0])), prior(codes, torch.tensor([1, 2])))


def incremental_logits(incremental: IncrementalPrior, codes: torch.Tensor, layers: int,
                       channels: int) -> torch.Tensor:
    """Teacher-forced logits (B, K, h, w) of `codes` from IncrementalPrior's row and step: the walk of
    sample_row with the codes given instead of drawn."""
    b, h, w = codes.shape
    half, size = incremental.half, incremental.prior.codebook_size
    padded = torch.full((b, h + half, w + half), size, dtype=torch.long)  # code K outside the grid
    padded[:, half:, half:] = codes
    v_hist, logits = torch.zeros(b, layers, channels, half, w), torch.zeros(b, size, h, w)
    for i in range(h):
        v_pre, v_row = incremental.row(padded[:, i:i + half, half:], v_hist)  # codes of rows i-half .. i-1
        v_hist = torch.cat([v_hist[:, :, :, 1:], v_row[:, :, :, None]], 3)
        h_hist = torch.zeros(b, layers, channels, half)
        for j in range(w):
            left = padded[:, i + half, j:j + half]  # codes of columns j-half .. j-1
            logits[:, :, i, j], h_col = incremental.step(left, h_hist, v_pre[..., j])
            h_hist = torch.cat([h_hist[..., 1:], h_col[..., None]], 3)
    return logits


def _biased_prior(kernel: int, layers: int) -> GatedPixelCNN:
    torch.manual_seed(kernel + layers)
    prior = GatedPixelCNN(codebook_size=11, channels=8, layers=layers, kernel=kernel).eval()
    for layer in prior.layers:  # non-zero biases everywhere, so wrong padding would show
        for conv in (layer.vertical, layer.horizontal, layer.vertical_to_horizontal, layer.horizontal_out):
            torch.nn.init.normal_(conv.bias, std=0.5)
    return prior


SHAPES = [(3, 5, (7, 7)), (5, 3, (4, 6)), (3, 1, (3, 3)), (7, 4, (5, 5))]  # kernel, layers, grid


@pytest.mark.parametrize(("kernel", "layers", "grid"), SHAPES)
def test_incremental_prior_gives_the_full_pass_logits(kernel: int, layers: int,
                                                     grid: tuple[int, int]) -> None:
    """row and step walked over a grid (caches, zero padding, code K outside the grid) equal one full
    pass at every position."""
    prior = _biased_prior(kernel, layers)
    codes = torch.randint(0, 11, (4, *grid))
    with torch.no_grad():
        walked = incremental_logits(IncrementalPrior(prior), codes, layers, 8)
        full = prior(codes)
    assert full.abs().max() > 0.1
    torch.testing.assert_close(walked, full, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("kernel", "layers", "grid"), SHAPES)
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_row_sampling_draws_what_the_full_pass_draws(kernel: int, layers: int, grid: tuple[int, int],
                                                     temperature: float) -> None:
    """sample_row, row after row, draws from the same uniforms exactly the codes of ancestral sampling
    with one full pass per position (uniforms mid-interval, so rounding cannot decide)."""
    prior = _biased_prior(kernel, layers)
    codes, u = separable_draws(prior, 6, grid, temperature=temperature, seed=kernel)
    assert len(codes.unique()) > 3
    with torch.no_grad():
        drawn = sample_rows(IncrementalPrior(prior).sample_row, u, torch.full((6,), temperature), grid=grid,
                            codebook_size=11, layers=layers, channels=8, half=kernel // 2)
    assert torch.equal(drawn, codes)


def test_incremental_prior_refuses_a_class_conditional_prior() -> None:
    with pytest.raises(ValueError, match="class-conditional"):
        IncrementalPrior(GatedPixelCNN(codebook_size=4, channels=8, layers=2, num_classes=3))


def test_ema_codebook_restarts_dead_entries_from_batch_vectors() -> None:
    torch.manual_seed(0)
    model = VQVAE(VQConfig(**TINY)).train()
    z_e = torch.randn(16, 3, 2, 2)
    model.quantizer.update(z_e, model.quantizer.nearest(z_e))  # initialises from batch vectors
    q = model.quantizer
    q.codebook[0], q.embed_sum[0] = 1e3, 1e3 * q.cluster_size[0]  # an entry far from every vector
    for _ in range(200):
        model.quantizer.update(z_e, model.quantizer.nearest(z_e))
    assert model.quantizer.codebook.abs().max() < 100, "the far entry was not restarted"
    assert int(model.quantizer.restarts) > 0
    usage = codebook_usage(model.quantizer.nearest(z_e), 4)
    assert usage["codes_used"] >= 2 and 1.0 <= usage["perplexity"] <= 4.0


def _trained_tiny(tmp_path, digits) -> VQVAE:
    config = VQTrainConfig(data="digits8", out_dir=str(tmp_path / "run"), model=VQConfig(**TINY), epochs=3,
                           prior_epochs=3, batch_size=64, progress=False, calibration_fraction=0.0)
    best = train_vq(config, splits=digits)
    return model_from_checkpoint(best)[0]


@pytest.fixture(scope="module")
def tiny_vq(tmp_path_factory, digits8) -> VQVAE:
    return _trained_tiny(tmp_path_factory.mktemp("vq"), digits8)


def _every_grid_log_q(model: VQVAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All 256 grids of the tiny model as uniforms that pick exactly them, and their log q(z|x):
    (N, 256, 4) uniforms (the middle of each code's CDF interval), (N, 256) log q."""
    log_q = model.posterior_log_probs(model.encode(x))  # (N, P=4, K=4)
    n = len(x)
    cdf = torch.cumsum(log_q.exp(), -1)
    lower = torch.cat([torch.zeros(n, 4, 1), cdf[..., :-1]], -1)
    every = torch.cartesian_prod(*[torch.arange(4)] * 4)[None, :, :, None].expand(n, 256, 4, 1)  # codes
    pick = lambda t: t.unsqueeze(1).expand(n, 256, 4, 4).gather(3, every).squeeze(-1)  # noqa: E731
    return pick((lower + cdf) / 2), pick(log_q).sum(-1)


def test_both_bounds_are_below_the_exact_log_likelihood(tiny_vq: VQVAE, digits8) -> None:
    x = torch.bernoulli(digits8.test_images[:12], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = tiny_vq.exact_log_likelihood(x).double()
        deterministic = tiny_vq.deterministic_bound(x).double()
        u, log_q = _every_grid_log_q(tiny_vq, x)
        log_w = tiny_vq.log_weights(x, u).double()  # (N, 256): every grid's weight
        elbo = (log_q.double().exp() * log_w).sum(-1)  # the stochastic posterior's ELBO, in closed form
        iw8 = torch.stack([iw_bound(tiny_vq, x, None, k=8, seed=s) for s in range(200)])  # (200, N)
        iw_many = iw_bound(tiny_vq, x, None, k=4096, seed=1)
    assert torch.all(deterministic <= exact + 1e-6)
    assert torch.all(elbo <= exact + 1e-6)
    # E[IW_8] <= log p(x): the mean of 200 estimates lies below it up to three standard errors
    assert torch.all(iw8.mean(0) <= exact + 3 * iw8.std(0) / math.sqrt(200))
    # With 4096 samples over 256 grids the importance-weighted estimate is close to the exact value
    # and tighter than both one-sample bounds.
    assert torch.allclose(iw_many, exact, atol=0.1), (iw_many - exact).abs().max()
    assert torch.all(iw_many >= elbo - 1e-6) and iw_many.mean() >= deterministic.mean()


def test_inverse_cdf_codes_follow_the_stochastic_posterior(tiny_vq: VQVAE, digits8) -> None:
    """The log q(z|x) subtracted in log_weights is the probability of the grid the uniforms picked: the
    q-weighted mean importance weight over all 256 grids is p(x) exactly (sum_z q(z) p(x,z)/q(z))."""
    x = torch.bernoulli(digits8.test_images[:3], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        u, log_q = _every_grid_log_q(tiny_vq, x)
        log_w = tiny_vq.log_weights(x, u)  # (3, 256)
        exact = tiny_vq.exact_log_likelihood(x)
    assert torch.allclose(torch.logsumexp(log_w + log_q, 1), exact, atol=1e-4)


def test_train_cli_resumes_and_records_every_stage(tmp_path) -> None:
    out = tmp_path / "run"
    args = ["train", "--model", "vqvae", "--data", "digits8", "--out-dir", str(out), "--epochs", "2",
            "--prior-epochs", "2", "--codebook-size", "8", "--code-dim", "4", "--channels", "8",
            "--prior-channels", "8", "--prior-layers", "2", "--subset", "300", "--no-progress",
            "--calibration-fraction", "0"]
    assert main(args) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records] == ["autoencoder"] * 2 + ["prior"] * 2 + ["temperature"]
    assert all(math.isfinite(r["val_reconstruction"]) for r in records[:2])
    assert records[-1]["chosen"] in (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
    model, ckpt = model_from_checkpoint(out / "best.pt")
    assert ckpt["progress"]["stage"] == "done" and model.config.posterior_temperature == records[-1]["chosen"]
    assert main([*args, "--resume"]) == 0  # everything done: resuming runs nothing more
    assert len((out / "metrics.jsonl").read_text().splitlines()) == len(records)
    assert main([*args, "--objective", "iwae"]) == 2  # a VAE-only flag is refused, not ignored


def test_sampling_gives_codes_in_range(tiny_vq: VQVAE) -> None:
    codes = tiny_vq.sample_codes(5, generator=torch.Generator().manual_seed(0))
    assert codes.shape == (5, 2, 2) and codes.min() >= 0 and codes.max() < 4
    assert losses.iwae_bound(torch.zeros(1, 3)).item() == pytest.approx(0.0)
