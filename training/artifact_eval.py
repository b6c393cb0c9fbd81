"""Sample quality and the amortization gap of an exported Gaussian-latent artifact (models/NAME/VERSION).

`python -m training evaluate models/mnist-vae/2 --amortization-gap 100` measures a committed model
whose checkpoint is gone: the TorchScript graphs are differentiable, and log p(x, z) for any z follows
from the log_weights graph. With (mean, log_var) = encoder(x) and eps = (z - mean) / sigma,

    log_weights(x, eps) = log p(x, z) - log q(z|x),   log q(z|x) = log N(eps; 0, I) - sum(log_var) / 2

so log p(x, z) = log_weights(x, eps) + log N(eps; 0, I) - sum(log_var) / 2. The results join the
artifact's report (report.json, report.md) and the manifest's checksums are brought up to date.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from service.artifacts import load_manifest, sha256_file
from training import losses
from training.evaluate import (
    BINARIZATION_SEED,
    json_safe,
    manifest_metrics,
    sample_quality_markdown,
    spread_indices,
)
from training.export import _quiet
from training.train import load_dataset_for, prepare_eval_images

SECTION_START = "<!-- evaluate: sample quality and amortization gap -->"


class ArtifactModel:
    """encode, decode_mean and log_joint of an exported Gaussian-latent model, through its TorchScript."""

    def __init__(self, directory: Path) -> None:
        self.manifest = load_manifest(directory, "torchscript")
        if (self.manifest.raw.get("model") or {}).get("family", "gaussian") != "gaussian":
            raise ValueError(f"{directory} is not a Gaussian-latent model")
        with _quiet():
            self.graphs = {g: torch.jit.load(str(self.manifest.graph_path(g, "torchscript"))).eval()
                           for g in ("encoder", "decoder", "log_weights")}
        for graph in self.graphs.values():
            for p in graph.parameters():
                p.requires_grad_(False)

    @staticmethod
    def _args(y: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        return () if y is None else (y,)

    def encode(self, x: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.graphs["encoder"](x, *self._args(y))

    def decode_mean(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.graphs["decoder"](z, *self._args(y))

    def log_joint(self, x: torch.Tensor, z: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """log p(x|z) + log p(z): x (B, C, H, W), z (B, S, D) -> (B, S)."""
        mean, log_var = self.encode(x, y)
        eps = (z - mean.unsqueeze(1)) * torch.exp(-0.5 * log_var).unsqueeze(1)
        log_w = self.graphs["log_weights"](x, eps, *self._args(y))
        return log_w + losses.log_standard_normal(eps) - 0.5 * log_var.sum(-1, keepdim=True)


def evaluate_artifact(directory: Path, k: int = 5000, seed: int = 0, amortization_images: int = 0,
                      sample_quality: bool = True, classifier_cache: Path | None = None,
                      data: str | None = None) -> dict:
    """Measure, then write into the artifact's report and re-checksum the manifest; returns the results."""
    from training import sample_quality as sq
    from training.amortization import amortization_gap

    model = ArtifactModel(directory)
    m = model.manifest
    config = (m.raw.get("training") or {}).get("config")
    if not config:
        raise ValueError(f"{directory}/manifest.json records no training config, so its data split is "
                         "unknown; evaluate the checkpoint instead")
    splits = load_dataset_for(config, data)
    labels = splits.test_labels if m.conditional else None
    results: dict = {}
    if sample_quality:
        gen = torch.Generator().manual_seed(seed)
        y = torch.arange(sq.SAMPLES) % len(m.labels) if m.labels else None
        with torch.no_grad():
            samples = model.decode_mean(torch.randn(sq.SAMPLES, m.latent_dim, generator=gen), y)
        results["sample_quality"] = sq.sample_quality(samples, splits,
                                                      sq.train_classifier(splits, cache=classifier_cache))
    if amortization_images:
        x = prepare_eval_images(splits.test_images, m.likelihood, seed=BINARIZATION_SEED)
        picks = spread_indices(len(x), amortization_images)  # test splits may be sorted by class
        results["amortization"] = amortization_gap(model, x[picks], None if labels is None else labels[picks],
                                                   k=k, seed=seed)
    report_dir = m.directory / "report"
    report_dir.mkdir(exist_ok=True)
    report_json = report_dir / "report.json"
    report = json.loads(report_json.read_text()) if report_json.is_file() else {}
    report.update(json_safe(results))
    report_json.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    write_report_sections(m.directory)
    return results


def write_report_sections(directory: Path) -> None:
    """(Re)write report.md's sample-quality and amortization sections from report.json, and bring the
    manifest's checksums of both files up to date."""
    from training.amortization import render_markdown as amortization_markdown

    report_dir = directory / "report"
    report_json = report_dir / "report.json"
    report = json.loads(report_json.read_text())
    section = [SECTION_START, ""]
    if "sample_quality" in report:
        section += sample_quality_markdown(report["sample_quality"])
    if "amortization" in report:
        section.append(amortization_markdown(report["amortization"]))
    report_md = report_dir / "report.md"
    text = report_md.read_text() if report_md.is_file() else ""
    text = text.split(SECTION_START)[0].rstrip("\n") + "\n\n" + "\n".join(section)
    report_md.write_text(text.rstrip("\n") + "\n")
    _rehash(directory, [report_json, report_md])


def _rehash(directory: Path, changed: list[Path]) -> None:
    """Bring the manifest's sha256 of the changed report files up to date (written atomically)."""
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    for file in changed:
        manifest["files"][str(file.relative_to(directory))] = sha256_file(file)
    _replace_manifest(directory, manifest)


def _replace_manifest(directory: Path, manifest: dict) -> None:
    """Write manifest.json atomically (a reader never sees half of it)."""
    tmp = directory / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(directory / "manifest.json")


def attach_report(directory: Path, report_dir: Path) -> None:
    """Replace an artifact's report/ with `report_dir` (e.g. after `ood-eval --report-md` added its table):
    the manifest's metrics follow report.json and its checksums the new files. The graphs and the
    calibration are not touched, so nothing is recomputed."""
    load_manifest(directory, "onnx")  # refuse to touch a corrupt artifact
    if not (report_dir / "report.json").is_file():
        raise ValueError(f"{report_dir} has no report.json (run `python -m training evaluate` first)")
    target = directory / "report"
    staging = directory / ".report.partial"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(report_dir, staging)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    report = json.loads((target / "report.json").read_text())
    manifest["metrics"] = manifest_metrics(report)
    files = {name: digest for name, digest in manifest["files"].items() if not name.startswith("report/")}
    files.update({str(p.relative_to(directory)): sha256_file(p)
                  for p in sorted(target.rglob("*")) if p.is_file()})
    manifest["files"] = dict(sorted(files.items()))
    _replace_manifest(directory, manifest)
    load_manifest(directory, "onnx")  # and verify the result as the service will
