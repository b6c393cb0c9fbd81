"""Sample quality: FID in the feature space of a small digit classifier, and class coverage of samples.

The Inception network of the usual FID (Heusel et al. 2017) cannot be downloaded here and knows
nothing of 28x28 digits, so the features come from a small CNN trained on the training split only
(never on the test digits the samples are compared with); its test accuracy is reported beside every
FID so a reader can judge the feature space. The classifier is trained deterministically (fixed seed,
one thread), so every model evaluated on the same split is measured in the very same feature space.

    FID = ||mu_s - mu_t||^2 + Tr(S_s + S_t - 2 (S_s S_t)^(1/2))     (features of samples s, test digits t)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import linalg
from torch import nn

from training.data import DataSplits

FEATURES = 128  # width of the penultimate layer, the FID feature space
CLASSIFIER_SEED = 0
SAMPLES = 1000  # samples per model, compared with (up to) this many test digits


class DigitClassifier(nn.Module):
    """Two conv blocks and a 128-unit feature layer: x (B, C, H, W) in [0, 1] -> logits (B, classes)."""

    def __init__(self, input_shape: tuple[int, int, int], classes: int) -> None:
        super().__init__()
        c, h, w = input_shape
        self.body = nn.Sequential(
            nn.Conv2d(c, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Dropout(0.25),
            nn.Linear(64 * (h // 4) * (w // 4), FEATURES), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Dropout(0.25), nn.Linear(FEATURES, classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@dataclass
class TrainedClassifier:
    model: DigitClassifier
    test_accuracy: float
    epochs: int

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> np.ndarray:
        """(N, C, H, W) -> (N, FEATURES) float64."""
        self.model.eval()
        parts = [self.model.features(images[i:i + 500]) for i in range(0, len(images), 500)]
        return torch.cat(parts).double().numpy()

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> np.ndarray:
        self.model.eval()
        parts = [self.model(images[i:i + 500]).argmax(-1) for i in range(0, len(images), 500)]
        return torch.cat(parts).numpy()


def train_classifier(splits: DataSplits, epochs: int = 30, patience: int = 5,
                     cache: Path | None = None) -> TrainedClassifier:
    """Train on the training split, early-stopped on validation accuracy; cache: a .pt file to reuse."""
    classes = len(splits.label_names)
    if classes < 2:
        raise ValueError("sample quality needs labelled data with at least two classes")
    model = DigitClassifier(splits.input_shape, classes)
    if cache is not None and cache.is_file():
        saved = torch.load(cache, weights_only=True)
        model.load_state_dict(saved["state"])
        return TrainedClassifier(model.eval(), saved["test_accuracy"], saved["epochs"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bitwise reproducible: the same split gives the same feature space
    try:
        torch.manual_seed(CLASSIFIER_SEED)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        best, best_state, since, epoch = -1.0, None, 0, 0
        x, y = splits.train_images, splits.train_labels
        for epoch in range(epochs):
            model.train()
            perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(CLASSIFIER_SEED + epoch))
            for i in range(0, len(x), 64):
                idx = perm[i:i + 64]
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            trained = TrainedClassifier(model, 0.0, epoch + 1)
            accuracy = float((trained.predict(splits.val_images) == splits.val_labels.numpy()).mean())
            if accuracy > best:
                best, since = accuracy, 0
                best_state = {k: v.clone() for k, v in model.state_dict().items()}
            else:
                since += 1
                if since >= patience:
                    break
        assert best_state is not None
        model.load_state_dict(best_state)
    finally:
        torch.set_num_threads(threads)
    trained = TrainedClassifier(model.eval(), 0.0, epoch + 1)
    trained.test_accuracy = float((trained.predict(splits.test_images) == splits.test_labels.numpy()).mean())
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state": model.state_dict(), "test_accuracy": trained.test_accuracy,
                    "epochs": trained.epochs}, cache)
    return trained


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FID between two feature sets (N, F) and (M, F), each summarised by its mean and covariance.

    Tr((S_a S_b)^(1/2)) = Tr((S_a^(1/2) S_b S_a^(1/2))^(1/2)), a symmetric positive semi-definite matrix,
    so the trace comes from eigenvalues: exact, and stable for the singular covariances that ReLU features
    (some never active) give.
    """
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    values, vectors = linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    middle = linalg.eigvalsh(root_a @ cov_b @ root_a)
    trace_root = float(np.sqrt(np.clip(middle, 0, None)).sum())
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_root)


def sample_quality(samples: torch.Tensor, splits: DataSplits, classifier: TrainedClassifier) -> dict:
    """FID of samples (N, C, H, W) in [0, 1] against the test digits, and the classes the samples get."""
    test = splits.test_images[:SAMPLES]
    predicted = classifier.predict(samples)
    counts = np.bincount(predicted, minlength=len(splits.label_names))
    fractions = counts / counts.sum()
    # The test digits against themselves, split into even and odd positions (test splits may be sorted by
    # class): the FID of two samples of the true distribution at half this size, a floor to read the
    # samples' FID against (FID is biased upwards for small N).
    features = classifier.features(test)
    return {
        "fid": frechet_distance(classifier.features(samples), features),
        "fid_test_halves": frechet_distance(features[0::2], features[1::2]),
        "samples": len(samples),
        "test_images": len(test),
        "classifier_test_accuracy": classifier.test_accuracy,
        "classifier_epochs": classifier.epochs,
        "class_fractions": {name: float(f) for name, f in zip(splits.label_names, fractions, strict=True)},
        "min_class_fraction": float(fractions.min()),
    }
