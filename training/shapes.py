"""A small image folder to try the own-data workflow on: coloured shapes in class sub-folders.

    python -m training make-shapes data/shapes [--per-class 200] [--size 32] [--seed 0]

writes DIR/circle/*.png, DIR/square/*.png and DIR/triangle/*.png: one shape per image in a random
bright colour on a dark background, at a random position and size; triangles point in a random
direction. The folder is what `train --data folder:DIR --color-mode RGB` expects (sub-folder names
become labels), so the README's "your own data" section and the end-to-end test run on real PNG files.
The data is invariant under mirror images and quarter turns, which the OOD suite must notice.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("circle", "square", "triangle")


def draw_shape(kind: str, size: int, rng: np.random.Generator) -> Image.Image:
    """One RGB image (size x size) of `kind`, drawn 4x larger and downsampled for smooth edges."""
    scale = 4
    big = size * scale
    background = tuple(int(v) for v in rng.integers(0, 40, size=3))
    colour = rng.random(3)
    colour[rng.integers(3)] = 1.0  # bright: one channel at full
    fill = tuple(int(v) for v in (colour * 255).round())
    im = Image.new("RGB", (big, big), background)
    draw = ImageDraw.Draw(im)
    radius = rng.uniform(0.18, 0.32) * big
    cx, cy = (rng.uniform(radius + 2, big - radius - 2) for _ in range(2))
    if kind == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
    elif kind == "square":
        half = radius / math.sqrt(2) * 1.2
        draw.rectangle((cx - half, cy - half, cx + half, cy + half), fill=fill)
    elif kind == "triangle":
        turn = rng.uniform(0, 2 * math.pi)
        points = [(cx + radius * math.cos(turn + i * 2 * math.pi / 3),
                   cy + radius * math.sin(turn + i * 2 * math.pi / 3)) for i in range(3)]
        draw.polygon(points, fill=fill)
    else:
        raise ValueError(f"unknown shape {kind!r} (known: {', '.join(CLASSES)})")
    return im.resize((size, size), Image.Resampling.LANCZOS)


def write_shapes(out: Path, per_class: int = 200, size: int = 32, seed: int = 0) -> int:
    """Write per_class PNGs of each shape under out/<shape>/; returns the number of files written."""
    if per_class < 1 or size < 8:
        raise ValueError(f"need per_class >= 1 and size >= 8, got {per_class} and {size}")
    rng = np.random.default_rng(seed)
    for kind in CLASSES:
        folder = Path(out) / kind
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            draw_shape(kind, size, rng).save(folder / f"{kind}_{i:04d}.png")
    return per_class * len(CLASSES)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-shapes", help="write a small folder of coloured shapes (circle/square/triangle) "
                                           "to try training on your own image folder")
    p.add_argument("out", type=Path, help="folder to write (class sub-folders are created)")
    p.add_argument("--per-class", type=int, default=200, help="images per shape (default 200)")
    p.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    p.add_argument("--seed", type=int, default=0)


def main_from_args(args: argparse.Namespace) -> None:
    n = write_shapes(args.out, args.per_class, args.size, args.seed)
    print(f"{args.out}: {n} images in {', '.join(CLASSES)}")
