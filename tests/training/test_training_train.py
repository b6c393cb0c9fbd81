"""The training loop and objective: resume, early stopping, beta / KL warm-up / IWAE / denoising, CVAE."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from training import losses
from training.data import DataSplits
from training.models import VAE, ModelConfig
from training.train import Objective, TrainConfig, load_checkpoint, model_from_checkpoint, train


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def test_resume_repeats_an_uninterrupted_run(tmp_path: Path, make_config, digits8: DataSplits) -> None:
    """4 epochs in one go == 2 epochs, then --resume to 4: same weights, EMA, optimizer and metrics.
    Dropout and dynamic binarization draw random numbers, so this also checks the per-epoch seeding."""
    options = {"subset": 200, "ema_decay": 0.9, "model": {"dropout": 0.1}}
    full = train(make_config(tmp_path / "full", epochs=4, **options), splits=digits8)
    half = tmp_path / "half"
    train(make_config(half, epochs=2, **options), splits=digits8)
    assert len(_metrics(half)) == 2
    resumed = train(make_config(half, epochs=4, **options), resume=True, splits=digits8)

    a, b = load_checkpoint(full.parent / "last.pt"), load_checkpoint(resumed.parent / "last.pt")
    assert a["epoch"] == b["epoch"] == 3
    for key in ("model_state", "ema_state"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    assert a["optimizer_state"]["state"][0]["step"] == b["optimizer_state"]["state"][0]["step"]
    assert _without_timing(_metrics(full.parent)) == _without_timing(_metrics(half))
    # The EMA model is the one evaluated and exported.
    vae, _ = model_from_checkpoint(resumed)
    assert torch.equal(vae.state_dict()["decoder.net.0.weight"], b["ema_state"]["decoder.net.0.weight"])


def test_early_stopping_after_patience(tmp_path: Path, make_config, digits8: DataSplits) -> None:
    """With lr = 0 the validation score never improves after epoch 0: patience 2 stops after epoch 2."""
    best = train(make_config(tmp_path, epochs=20, lr=0.0, patience=2, subset=100), splits=digits8)
    records = _metrics(tmp_path)
    assert [r["epoch"] for r in records] == [0, 1, 2]
    assert len({r["val_elbo"] for r in records}) == 1  # deterministic validation: same eps every epoch
    assert load_checkpoint(best)["epoch"] == 0
    last = load_checkpoint(tmp_path / "last.pt")
    assert last["epoch"] == 2 and last["epochs_since_best"] == 2


def test_fresh_run_replaces_old_metrics(tmp_path: Path, make_config, digits8: DataSplits) -> None:
    train(make_config(tmp_path, epochs=3, subset=100), splits=digits8)
    train(make_config(tmp_path, epochs=1, subset=100), splits=digits8)
    assert [r["epoch"] for r in _metrics(tmp_path)] == [0]
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 0


def test_kl_warmup_schedule(tmp_path: Path, make_config, digits8: DataSplits) -> None:
    train(make_config(tmp_path, epochs=3, kl_warmup_epochs=4, beta=2.0, subset=100), splits=digits8)
    assert [r["beta"] for r in _metrics(tmp_path)] == [0.5, 1.0, 1.5]


def _small_vae(**options: object) -> VAE:
    torch.manual_seed(0)
    options = {"architecture": "mlp", **options}
    return VAE(ModelConfig(input_shape=(1, 8, 8), latent_dim=3, hidden_dim=16, **options))


def test_objective_beta_weights_the_kl() -> None:
    vae = _small_vae()
    objective = Objective(vae, TrainConfig(model=vae.config))
    x = torch.bernoulli(torch.full((6, 1, 8, 8), 0.3))

    def loss(beta: float) -> torch.Tensor:
        torch.manual_seed(7)  # the same eps for every beta
        return objective(x, None, x, beta)

    torch.manual_seed(7)
    recon, kl = vae.elbo_terms(x)
    torch.testing.assert_close(loss(0.0), -recon.mean())
    torch.testing.assert_close(loss(1.0), -(recon - kl).mean())
    torch.testing.assert_close(loss(3.0) - loss(1.0), 2 * kl.mean())
    assert (kl > 0).all()


def test_objective_iwae_matches_the_bound() -> None:
    vae = _small_vae()
    objective = Objective(vae, TrainConfig(model=vae.config, objective="iwae", iw_samples=4))
    x = torch.bernoulli(torch.full((5, 1, 8, 8), 0.3))
    torch.manual_seed(3)
    got = objective(x, None, x, beta=123.0)  # beta does not enter the IWAE bound
    torch.manual_seed(3)
    eps = torch.randn(5, 4, 3)
    torch.testing.assert_close(got, -losses.iwae_bound(vae.log_weights(x, eps)).mean())


def test_denoising_encodes_the_noisy_input_and_scores_the_clean_one() -> None:
    vae = _small_vae().eval()
    x = torch.bernoulli(torch.full((4, 1, 8, 8), 0.3))
    x_noisy = x + 0.5 * torch.randn_like(x)
    torch.manual_seed(1)
    recon, kl = vae.elbo_terms(x, x_in=x_noisy)
    torch.manual_seed(1)
    mean, log_var = vae.encode(x_noisy)
    z = losses.reparameterize(mean, log_var, torch.randn_like(mean).unsqueeze(1))
    torch.testing.assert_close(recon, vae.log_px_given_z(x, z)[:, 0])
    torch.testing.assert_close(kl, losses.gaussian_kl_to_standard(mean, log_var).sum(-1))
    torch.manual_seed(1)
    clean_recon, _ = vae.elbo_terms(x)
    assert not torch.allclose(recon, clean_recon)


def test_input_noise_training_runs(tmp_path: Path, make_config, digits8: DataSplits) -> None:
    best = train(make_config(tmp_path, epochs=1, input_noise=0.3, subset=100), splits=digits8)
    assert torch.isfinite(torch.tensor(_metrics(tmp_path)[0]["val_elbo"]))
    assert best.exists()


@pytest.mark.parametrize("architecture", ["mlp", "conv", "linear"])
def test_conditional_vae_depends_on_the_label(architecture: str) -> None:
    likelihood = "gaussian" if architecture == "linear" else "bernoulli"
    vae = _small_vae(num_classes=3, architecture=architecture, likelihood=likelihood, channels=4).eval()
    z = torch.randn(5, 3)
    with torch.no_grad():
        outs = [vae.decode_mean(z, torch.full((5,), c)) for c in range(3)]
        encoded = [vae.encode(torch.rand(1, 1, 8, 8).expand(2, 1, 8, 8), torch.tensor([0, 1]))[0]]
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[1], outs[2])
    assert not torch.allclose(encoded[0][0], encoded[0][1])  # the encoder sees the label too
    with pytest.raises(AssertionError, match="labels"):
        vae.decode_mean(z)


def test_trained_cvae_uses_its_labels(tmp_path: Path, make_config, digits8: DataSplits) -> None:
    best = train(make_config(tmp_path, epochs=8, lr=3e-3, conditional=True), splits=digits8)
    vae, ckpt = model_from_checkpoint(best)
    assert vae.config.num_classes == 10 and vae.config.labels == [str(i) for i in range(10)]
    assert ckpt["train_config"]["conditional"] is True
    z = torch.randn(200, vae.config.latent_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        means = torch.stack([vae.decode_mean(z, torch.full((200,), c)).mean(0) for c in range(10)])
    # Class-conditional mean images differ clearly (pixel values in [0, 1]).
    distances = torch.cdist(means.flatten(1), means.flatten(1))
    assert distances[~torch.eye(10, dtype=torch.bool)].min() > 0.3
    # Scoring with the right label beats a wrong one on average.
    x = (digits8.test_images[:100] >= 0.5).float()
    y = digits8.test_labels[:100]
    eps = torch.randn(100, 16, vae.config.latent_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        right = losses.iwae_bound(vae.log_weights(x, eps, y)).mean()
        wrong = losses.iwae_bound(vae.log_weights(x, eps, (y + 5) % 10)).mean()
    assert right > wrong + 1.0


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="architecture"):
        ModelConfig(architecture="cnv")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="objective"):
        TrainConfig(objective="iwea")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="probabilistic PCA"):
        ModelConfig(architecture="linear")
    with pytest.raises(ValueError, match="divisible by 4"):
        ModelConfig(input_shape=(1, 6, 6))
    with pytest.raises(ValueError, match="unknown training options"):
        TrainConfig.from_dict({"epoch": 3})
    with pytest.raises(ValueError, match=r"model\.latent"):
        TrainConfig.from_dict({"model": {"latent": 3}})
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)
