"""`python -m training train / evaluate / export`: end to end on a small subset, options and --config."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from training.__main__ import _train_config, build_parser, main
from training.train import load_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY = ["--data", "digits8", "--subset", "300", "--architecture", "mlp", "--latent-dim", "4", "--hidden-dim",
        "32", "--val-iw-samples", "8", "--threads", "1", "--no-progress", "--device", "cpu"]


def _strict_json(path: Path) -> dict:
    """json.loads that refuses NaN / Infinity, as strict readers of report.json and manifest.json do."""
    def refuse(token: str) -> float:
        raise ValueError(f"{path} contains {token}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_train_evaluate_export_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run, models = tmp_path / "run", tmp_path / "models"
    assert main(["train", *TINY, "--epochs", "2", "--out-dir", str(run)]) == 0
    assert capsys.readouterr().out.strip() == str(run / "best.pt")
    assert {p.name for p in run.iterdir()} == {"best.pt", "last.pt", "metrics.jsonl", "config.json",
                                               "finished.json"}

    # k = 1 makes the estimator's standard error undefined: it must come out as null, not NaN.
    assert main(["evaluate", str(run / "best.pt"), "--k", "1"]) == 0
    report_dir = run / "report"
    report = _strict_json(report_dir / "report.json")
    assert report["test_nll_estimator_se_mean"] is None
    assert main(["evaluate", str(run / "best.pt"), "--k", "16"]) == 0
    report = _strict_json(report_dir / "report.json")
    assert report["k"] == 16 and report["data"] == "digits8" and report["test_images"] == 75
    assert math.isfinite(report["test_nll"]) and report["test_nll"] > 0
    assert -report["test_nll"] >= report["test_elbo"] - 1e-6  # the IW bound is above the ELBO
    assert report["test_bits_per_dim"] == pytest.approx(report["test_nll"] / (64 * math.log(2)))
    assert 0 <= report["active_units"] <= report["latent_dim"] == 4
    assert len(report["kl_per_dim"]) == 4 and report["test_kl"] == pytest.approx(sum(report["kl_per_dim"]))
    markdown = (report_dir / "report.md").read_text()
    assert "NLL" in markdown and "k=16" in markdown
    assert set(report["figures"]) == {"samples", "reconstructions", "latent_traversals", "latent_map",
                                      "training_curves"}
    for rel in report["figures"].values():
        assert f"]({rel})" in markdown
        with Image.open(report_dir / rel) as im:
            assert im.format == "PNG" and im.width > 50 and im.height > 50
            im.verify()

    assert main(["export", str(run / "best.pt"), "--models-dir", str(models), "--name", "digits-vae",
                 "--version", "2", "--calibration-k", "8"]) == 0
    artifact = models / "digits-vae" / "2"
    manifest = _strict_json(artifact / "manifest.json")
    assert manifest["format_version"] == 1 and manifest["name"] == "digits-vae" and manifest["version"] == "2"
    assert manifest["metrics"]["test_nll"] == pytest.approx(report["test_nll"])
    assert manifest["metrics"]["test_nll_estimator_se_mean"] == report["test_nll_estimator_se_mean"]
    ckpt = load_checkpoint(run / "best.pt")
    assert manifest["training"]["best_epoch"] == ckpt["epoch"]
    assert manifest["training"]["config"]["subset"] == 300
    assert "report/report.json" in manifest["files"] and "report/figures/samples.png" in manifest["files"]
    on_disk = {str(p.relative_to(artifact)) for p in artifact.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(manifest["files"]) == on_disk
    for rel, digest in manifest["files"].items():
        assert hashlib.sha256((artifact / rel).read_bytes()).hexdigest() == digest

    # A second export to the same version is refused (exit 1, message) and leaves the artifact alone.
    assert main(["export", str(run / "best.pt"), "--models-dir", str(models), "--name", "digits-vae",
                 "--version", "2"]) == 1
    assert "exists" in capsys.readouterr().err
    assert _strict_json(artifact / "manifest.json") == manifest


def test_train_help_lists_documented_options() -> None:
    result = subprocess.run([sys.executable, "-m", "training", "train", "--help"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    for flag, words in {
        "--data": "mnist5k", "--epochs": "maximum number of epochs", "--subset": "quick runs",
        "--threads": "CPU threads", "--conditional": "labels", "--no-progress": "progress bar",
        "--objective": "{elbo,iwae}", "--architecture": "{mlp,conv,linear}", "--latent-dim": "dimension of z",
        "--config": "JSON", "--resume": "last.pt",
    }.items():
        assert flag in text and words in text, flag
    assert "--input-shape" not in text and "--num-classes" not in text and "--labels" not in text
    assert "(default: None) (default" not in text  # one default per option, not argparse's None too


def _parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["train", *argv])


def test_option_types() -> None:
    config = _train_config(_parse("--subset", "50", "--threads", "2", "--epochs", "3", "--lr", "0.01",
                                  "--conditional", "--no-progress", "--objective", "iwae",
                                  "--architecture", "conv", "--dropout", "0.2"))
    assert config.subset == 50 and isinstance(config.subset, int)
    assert config.threads == 2 and config.epochs == 3 and config.lr == 0.01
    assert config.conditional is True and config.progress is False and config.objective == "iwae"
    assert config.model.architecture == "conv" and config.model.dropout == 0.2
    defaults = _train_config(_parse())
    assert defaults.subset is None and defaults.threads is None and defaults.progress is True
    assert _train_config(_parse("--no-conditional")).conditional is False


@pytest.mark.parametrize("argv", [["--subset", "ten"], ["--threads", "1.5"], ["--architecture", "cnv"],
                                  ["--objective", "vae"], ["--input-shape", "1,8,8"], ["--epochs", "2.5"]])
def test_bad_options_are_rejected(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        _parse(*argv)
    assert info.value.code == 2
    assert "error" in capsys.readouterr().err


def test_config_file_and_flag_override(tmp_path: Path) -> None:
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps({
        "data": "digits8", "epochs": 1, "subset": 100, "progress": False, "threads": 1, "val_iw_samples": 4,
        "out_dir": str(tmp_path / "from-file"),
        "model": {"architecture": "mlp", "latent_dim": 3, "hidden_dim": 16},
    }))
    run = tmp_path / "run"
    assert main(["train", "--config", str(config_file), "--latent-dim", "2", "--out-dir", str(run)]) == 0
    written = json.loads((run / "config.json").read_text())
    assert written["epochs"] == 1 and written["subset"] == 100  # from the file
    assert written["model"]["hidden_dim"] == 16 and written["model"]["architecture"] == "mlp"
    assert written["model"]["latent_dim"] == 2  # the flag wins
    assert not (tmp_path / "from-file").exists()
    assert load_checkpoint(run / "best.pt")["model_config"]["latent_dim"] == 2
    # The config.json a run writes is itself a valid --config file.
    again = tmp_path / "again"
    assert main(["train", "--config", str(run / "config.json"), "--out-dir", str(again)]) == 0
    assert json.loads((again / "config.json").read_text())["model"] == written["model"]


@pytest.mark.parametrize(("argv", "message"), [
    (["--data", "npz:/does/not/exist.npz"], "exist.npz"),
    (["--data", "cifar10"], "unknown data set"),
    (["--architecture", "linear"], "likelihood"),
])
def test_errors_exit_2_with_a_message(argv: list[str], message: str, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--out-dir", str(tmp_path), "--no-progress", *argv]) == 2
    assert message in capsys.readouterr().err


def test_unknown_config_key_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "c.json").write_text(json.dumps({"epoch": 3, "model": {"latent": 2}}))
    assert main(["train", "--config", str(tmp_path / "c.json")]) == 2
    err = capsys.readouterr().err
    assert "epoch" in err and "model.latent" in err
