"""Out-of-distribution evaluation: a shift suite built from what is on disk, AUROC and calibrated alarms.

`python -m training ood-eval models/NAME/VERSION` scores held-out normal images of the model's own data
and every shift of the suite with every anomaly method of the artifact (service/anomaly.py), running the
exported ONNX graphs as the service does (training/scoring.py), and reports per shift and method:

* AUROC of the score, shift vs normal images (threshold-free; 0.5 = chance);
* the false-alarm rate on the normal images at level alpha (conformal p-value <= alpha, with the
  manifest's calibration, which never saw these images): at most ~alpha by construction;
* the detection rate at alpha on the shift (the fraction flagged).

The suite is built at the model's shape and channels, from nothing downloaded: constant images, uniform
noise, inverted, rotated and mirrored normal images, the right half erased, centre crops zoomed in,
images scaled down, shifted, blurred or partly painted over, scikit-learn's 8x8 digits, capital letters
drawn with Pillow's font, random pen strokes and textures (gratings and checkerboards), and for RGB data
rotated colour channels and greyscale. Nalisnick et al. 2019 is the reason it contains "simple" inputs
(constant images, erased halves) that likelihoods rank as *more* likely than normal data.

A fixed transform (a mirror image, a quarter turn, swapped colours) is only an anomaly if the data is not
invariant under it: a folder of shapes in random orientations turned by 90 degrees is still a folder of
shapes. run_suite measures that on the pixels (invariances) and leaves such transforms out, and methods
that assume what the data breaks (fisher's orientation statistic) are not chosen as the default.
Export runs the same suite on the validation split to choose the default method (select_method).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from service import anomaly
from training.data import DataSplits
from training.scoring import GraphScorer, ScoreReferences

log = logging.getLogger(__name__)

Shift = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]


# -- the shift suite -------------------------------------------------------------------------------------
# Each shift maps the normal images (N, C, H, W) in [0, 1] and a count n to n images (n, C, H, W) of the same
# shape and channels. For the grey 28x28 digits the draws are exactly those of the digit-only suite before
# it, so published tables stay reproducible.
def source_indices(n_images: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """Which normal images a transforming shift uses: (n,) indices. `_pick` is its only user in the
    shifts, and build_suite replays it with the same generator to know each image's source (and label)."""
    return rng.choice(n_images, size=n, replace=n > n_images)


def _pick(images: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return images[source_indices(len(images), n, rng)]


def _to_pil(img: np.ndarray) -> Image.Image:
    """(C, h, w) float in [0, 1], C = 1 or 3 -> an L or RGB image."""
    pixels = np.clip(img * 255, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels[0]) if len(pixels) == 1 else Image.fromarray(pixels.transpose(1, 2, 0))


def _from_pil(im: Image.Image) -> np.ndarray:
    arr = np.asarray(im, dtype=np.float32) / 255.0
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _resize(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(C, h, w) float in [0, 1] -> (C, size[1], size[0]) with Pillow's bilinear filter."""
    return _from_pil(_to_pil(img).resize(size, Image.Resampling.BILINEAR))


def _paste_centre(img: np.ndarray, h: int, w: int, dy: int = 0, dx: int = 0) -> np.ndarray:
    out = np.zeros((len(img), h, w), dtype=np.float32)
    top, left = (h - img.shape[1]) // 2 + dy, (w - img.shape[2]) // 2 + dx
    out[:, top:top + img.shape[1], left:left + img.shape[2]] = img
    return out


def _in_colour(grey: np.ndarray, channels: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 1, H, W) white-on-black drawings -> (n, C, H, W): as they are for grey data, for RGB data each
    in a random bright colour (one channel at 1, the others uniform)."""
    if channels == 1:
        return grey
    colours = rng.random((len(grey), channels)).astype(np.float32)
    colours[np.arange(len(grey)), rng.integers(channels, size=len(grey))] = 1.0
    return grey * colours[:, :, None, None]


def constant(images: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Grey levels from black to white; for RGB data every other one a random colour."""
    levels = np.linspace(0.0, 1.0, n, dtype=np.float32)
    out = np.broadcast_to(levels[:, None, None, None], (n, *images.shape[1:])).copy()
    if images.shape[1] > 1:
        out[1::2] = rng.random((len(out[1::2]), images.shape[1], 1, 1), dtype=np.float32)
    return out


def noise(images: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.random((n, *images.shape[1:]), dtype=np.float32)


def inverted(images: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return 1.0 - _pick(images, n, rng)


# Symmetry transforms of a batch (N, C, H, W): permutations of pixels or channels (see ShiftSpec.transform).
def _rot90(x: np.ndarray) -> np.ndarray:
    return np.rot90(x, 1, axes=(2, 3))


def _hflip(x: np.ndarray) -> np.ndarray:
    return x[..., ::-1]


def _vflip(x: np.ndarray) -> np.ndarray:
    return x[..., ::-1, :]


def _rotate_channels(x: np.ndarray) -> np.ndarray:
    """RGB -> BRG: every colour changed, shapes and brightness kept."""
    return x[:, [2, 0, 1]]


def _transformed(transform: Callable[[np.ndarray], np.ndarray]) -> Shift:
    """The shift that applies `transform` to n normal images picked at random."""
    return lambda images, n, rng: np.ascontiguousarray(transform(_pick(images, n, rng)))


def right_half_erased(images: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    x = _pick(images, n, rng).copy()
    x[..., x.shape[-1] // 2:] = 0.0
    return x


def centre_crop_zoomed(images: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    x = _pick(images, n, rng)
    h, w = x.shape[2:]
    t, l_ = h // 4, w // 4  # the central half, blown up to full size
    return np.stack([_resize(img[:, t:h - t, l_:w - l_], (w, h)) for img in x])


def scaled_down(images: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    x = _pick(images, n, rng)
    h, w = x.shape[2:]
    return np.stack([_paste_centre(_resize(img, (w // 2, h // 2)), h, w) for img in x])


def shifted(images: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Moved by 6/28 to 8/28 of the image size (6-8 pixels at 28x28) in a random direction (zero fill)."""
    x = _pick(images, n, rng)
    scale = min(x.shape[2:]) / 28
    out = np.zeros_like(x)
    for i, img in enumerate(x):
        angle = rng.uniform(0, 2 * math.pi)
        dist = rng.uniform(6, 8) * scale
        dy, dx = round(dist * math.sin(angle)), round(dist * math.cos(angle))
        src = img[:, max(0, -dy):img.shape[1] - max(0, dy), max(0, -dx):img.shape[2] - max(0, dx)]
        out[i, :, max(0, dy):max(0, dy) + src.shape[1], max(0, dx):max(0, dx) + src.shape[2]] = src
    return out


def sklearn_digits(images: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """scikit-learn's 8x8 digits (0..16), upscaled into the central 20/28 box as MNIST pads them."""
    from sklearn.datasets import load_digits

    small = load_digits().images / 16.0  # (1797, 8, 8)
    h, w = images.shape[2:]
    box = (round(w * 20 / 28), round(h * 20 / 28))
    pick = small[rng.choice(len(small), size=n, replace=n > len(small))]
    grey = np.stack([_paste_centre(_resize(img[None], box), h, w) for img in pick])
    return _in_colour(grey, images.shape[1], rng)


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: a scalable font
    except (TypeError, OSError, ImportError):  # pragma: no cover - old Pillow
        return ImageFont.load_default()


def letters(images: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Capital letters A-Z in Pillow's default font, white (or a colour) on black, size and position
    jittered."""
    h, w = images.shape[2:]
    out = np.zeros((n, 1, h, w), dtype=np.float32)
    for i in range(n):
        size = int(rng.integers(round(h * 0.6), round(h * 0.85) + 1))
        im = Image.new("L", (w, h), 0)
        draw = ImageDraw.Draw(im)
        char = chr(ord("A") + int(rng.integers(26)))
        left, top, right, bottom = draw.textbbox((0, 0), char, font=_font(size))
        x0 = (w - (right - left)) / 2 - left + rng.uniform(-2, 2)
        y0 = (h - (bottom - top)) / 2 - top + rng.uniform(-2, 2)
        draw.text((x0, y0), char, fill=255, font=_font(size))
        out[i, 0] = np.asarray(im, dtype=np.float32) / 255.0
    return _in_colour(out, images.shape[1], rng)


def pen_strokes(images: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """1 to 3 random polylines of 3 to 6 points, 2 to 3 pixels wide, 4 pixels from the border."""
    h, w = images.shape[2:]
    out = np.zeros((n, 1, h, w), dtype=np.float32)
    for i in range(n):
        im = Image.new("L", (w, h), 0)
        draw = ImageDraw.Draw(im)
        for _ in range(int(rng.integers(1, 4))):
            points = [(float(rng.uniform(4, w - 4)), float(rng.uniform(4, h - 4)))
                      for _ in range(int(rng.integers(3, 7)))]
            draw.line(points, fill=255, width=int(rng.integers(2, 4)), joint="curve")
        out[i, 0] = np.asarray(im, dtype=np.float32) / 255.0
    return _in_colour(out, images.shape[1], rng)


def textures(images: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Half sinusoidal gratings (random frequency, orientation, phase), half checkerboards."""
    h, w = images.shape[2:]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = np.zeros((n, 1, h, w), dtype=np.float32)
    for i in range(n):
        if i % 2 == 0:
            f, theta, phase = rng.uniform(0.05, 0.3), rng.uniform(0, math.pi), rng.uniform(0, 2 * math.pi)
            along = xx * math.cos(theta) + yy * math.sin(theta)
            out[i, 0] = 0.5 + 0.5 * np.sin(2 * math.pi * f * along + phase)
        else:
            cell = int(rng.integers(2, 8))
            out[i, 0] = ((yy // cell + xx // cell) % 2).astype(np.float32)
    return _in_colour(out, images.shape[1], rng)


def blurred(images: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Gaussian blur of radius size/14 (2 pixels at 28x28)."""
    x = _pick(images, n, rng)
    radius = max(1.0, min(x.shape[2:]) / 14)
    return np.stack([_from_pil(_to_pil(img).filter(ImageFilter.GaussianBlur(radius))) for img in x])


def occluded(images: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """A random box of 40% of each side painted in one random grey level (or colour)."""
    x = _pick(images, n, rng).copy()
    c, h, w = x.shape[1:]
    bh, bw = max(1, round(0.4 * h)), max(1, round(0.4 * w))
    for img in x:
        top, left = int(rng.integers(h - bh + 1)), int(rng.integers(w - bw + 1))
        img[:, top:top + bh, left:left + bw] = rng.random((c, 1, 1), dtype=np.float32)
    return x


def greyscale(images: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """The ITU-R 601 luma in all three channels: the colour removed."""
    x = _pick(images, n, rng)
    luma = np.tensordot(np.array([0.299, 0.587, 0.114], np.float32), x, axes=([0], [1]))  # (n, H, W)
    return np.repeat(luma[:, None], 3, axis=1)


@dataclass(frozen=True)
class ShiftSpec:
    make: Shift
    description: str
    transforms_sources: bool = False  # made from normal images (through _pick): each has a source image
    # A permutation of pixels or channels (mirror, quarter turn, channel rotation), None for other shifts.
    # It keeps every value, so the pixel distance to the nearest training image compares transformed and
    # normal images fairly: when it cannot tell them apart, the data is invariant under the transform and
    # it is no shift for this data. (Shifts that change values cannot be judged so: blurred or shrunk
    # digits are *closer* to MNIST's training digits in pixels than real ones, and are anomalies.)
    transform: Callable[[np.ndarray], np.ndarray] | None = None
    needs_square: bool = False
    needs_rgb: bool = False


# Appended in order: each shift's generator is keyed by its position here (see _shift_rng).
SHIFTS: dict[str, ShiftSpec] = {
    "constant": ShiftSpec(constant, "constant images: grey levels black to white (and colours for RGB)"),
    "noise": ShiftSpec(noise, "uniform noise per pixel"),
    "inverted": ShiftSpec(inverted, "normal images with dark and light swapped", True),
    "rotated90": ShiftSpec(_transformed(_rot90), "normal images rotated by 90 degrees", True, _rot90,
                           needs_square=True),
    "hflip": ShiftSpec(_transformed(_hflip), "normal images mirrored left-right", True, _hflip),
    "vflip": ShiftSpec(_transformed(_vflip), "normal images mirrored top-bottom", True, _vflip),
    "right_half_erased": ShiftSpec(right_half_erased, "normal images with the right half erased", True),
    "crop_zoom": ShiftSpec(centre_crop_zoomed, "the central half of a normal image, zoomed to full size",
                           True),
    "scaled_down": ShiftSpec(scaled_down, "normal images shrunk to half size, centred", True),
    "shifted": ShiftSpec(shifted, "normal images moved by a quarter of their size", True),
    "sklearn_digits": ShiftSpec(sklearn_digits, "scikit-learn 8x8 digits upscaled into the central box"),
    "letters": ShiftSpec(letters, "capital letters in Pillow's default font"),
    "pen_strokes": ShiftSpec(pen_strokes, "random pen strokes"),
    "textures": ShiftSpec(textures, "sinusoidal gratings and checkerboards"),
    "blurred": ShiftSpec(blurred, "normal images blurred (Gaussian, radius size/14)", True),
    "occluded": ShiftSpec(occluded, "normal images with 40% x 40% of them painted over", True),
    "channels_rotated": ShiftSpec(_transformed(_rotate_channels), "RGB images with their channels rotated "
                                  "(BRG)", True, _rotate_channels, needs_rgb=True),
    "greyscale": ShiftSpec(greyscale, "RGB images turned grey", True, needs_rgb=True),
}
# Shifts whose detection depends on the source image's symmetry: ood-eval breaks their AUROC down by class.
SYMMETRY_SHIFTS = ("rotated90", "hflip", "vflip")
# A transform is taken as a symmetry of the data when the pixel nearest-neighbour distance to the training
# images tells transformed normal images from normal ones no better than this AUROC (0.5 = not at all).
# MNIST: flips and turns 0.85-0.97; the shapes of `make-shapes` (random orientation and colour): 0.40-0.62.
INVARIANCE_AUROC = 0.65


def shifts_for(shape: tuple[int, int, int]) -> list[str]:
    """The shifts that exist for images of this (C, H, W): quarter turns need square images, colour
    shifts need RGB."""
    c, h, w = shape
    return [name for name, spec in SHIFTS.items()
            if not (spec.needs_square and h != w) and not (spec.needs_rgb and c != 3)]


def _shift_rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, list(SHIFTS).index(name)])


def build_suite(images: np.ndarray, per_shift: int, seed: int = 0,
                names: list[str] | None = None) -> dict[str, np.ndarray]:
    """{shift: (per_shift, C, H, W) float32 in [0, 1]} from normal images (N, C, H, W); deterministic.

    Each shift draws from its own generator (seed, its index in SHIFTS), so a subset gives the same
    images as the full suite. names: default every shift that exists for the images' shape.
    """
    suite = {}
    for name in names or shifts_for(images.shape[1:]):
        made = SHIFTS[name].make(images, per_shift, _shift_rng(seed, name))
        suite[name] = np.clip(made, 0, 1).astype(np.float32)
    return suite


def suite_sources(n_images: int, per_shift: int, seed: int,
                  names: list[str]) -> dict[str, np.ndarray]:
    """{transforming shift: (per_shift,) index of each image's source} for the suite build_suite makes."""
    return {name: source_indices(n_images, per_shift, _shift_rng(seed, name))
            for name in names if SHIFTS[name].transforms_sources}


def suite_labels(labels: np.ndarray, per_shift: int, seed: int, names: list[str]) -> dict[str, np.ndarray]:
    """{shift: (per_shift,) int64} the label a caller would send with each shifted image, for conditional
    models: the source image's label, or a seeded random one of the labels seen for made-up images."""
    sources = suite_sources(len(labels), per_shift, seed, names)
    rng = np.random.default_rng([seed, 7919])
    classes = np.unique(labels)
    return {name: (labels[sources[name]] if name in sources else rng.choice(classes, per_shift))
            .astype(np.int64) for name in names}


def invariances(train: np.ndarray, normal: np.ndarray, names: list[str], max_train: int = 5000,
                max_normal: int = 500) -> dict[str, float]:
    """{shift with a symmetry transform: AUROC} of the pixel distance to the nearest training image,
    transformed normal images vs the normal images themselves. Near 0.5 (or below): the data looks the same
    transformed (a rotation-invariant data set turned by 90 degrees), so the transform makes no anomaly.

    train: (M, C, H, W) training images; normal: (N, C, H, W) held-out normal images (validation).
    """
    bank = train[:max_train].reshape(min(len(train), max_train), -1)
    normal = normal[:max_normal]

    def nearest(x: np.ndarray) -> np.ndarray:
        return anomaly.knn_distance(np.ascontiguousarray(x).reshape(len(x), -1), bank)

    base = nearest(normal)
    return {name: auroc(base, nearest(SHIFTS[name].transform(normal)))
            for name in names if SHIFTS[name].transform is not None}


def auroc_by_class(normal: np.ndarray, shifted_scores: np.ndarray, classes: np.ndarray) -> dict[str, float]:
    """AUROC of the shifted images of each source class against all normal scores: {class: auroc}."""
    return {str(c): auroc(normal, shifted_scores[classes == c]) for c in np.unique(classes)}


# -- metrics ---------------------------------------------------------------------------------------------
def auroc(normal: np.ndarray, shifted_scores: np.ndarray) -> float:
    """P(score of a shifted input > score of a normal one) + 0.5 P(equal): the Mann-Whitney AUROC."""
    a = np.asarray(normal, dtype=np.float64)
    b = np.asarray(shifted_scores, dtype=np.float64)
    both = np.concatenate([a, b])
    order = both.argsort(kind="mergesort")
    ranks = np.empty(len(both))
    sorted_vals = both[order]
    # average ranks over ties (1-based)
    _, first, counts = np.unique(sorted_vals, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[len(a):].sum() - len(b) * (len(b) + 1) / 2.0) / (len(a) * len(b)))


def choose_default(per_method: dict[str, dict], excluded: dict[str, str] | None = None) -> str:
    """The method with the best worst-case AUROC over the suite; ties broken by the mean AUROC. Methods in
    `excluded` (whose assumptions the data breaks) are chosen only when nothing else is left."""
    candidates = [m for m in per_method if m not in (excluded or {})] or list(per_method)
    return max(candidates, key=lambda m: (round(per_method[m]["min_auroc"], 4), per_method[m]["mean_auroc"]))


# Inputs every anomaly detector must flag: noise, and the blank images likelihoods famously rank as more
# normal than real data (Nalisnick et al. 2019). A method below this AUROC on them is not chosen while
# another method clears it on all of them.
FLOOR_SHIFTS = ("noise", "constant")
FLOOR_AUROC = 0.99


def missed_floor(shifts: dict[str, dict], methods: list[str]) -> dict[str, str]:
    """{method: why} for the methods below FLOOR_AUROC on a floor shift, when some method clears them all.

    shifts: evaluate_suite's per-shift entries, {shift: {"methods": {method: {"auroc": ...}}}}.
    """
    floor = [s for s in FLOOR_SHIFTS if s in shifts]
    misses = {m: [(s, shifts[s]["methods"][m]["auroc"]) for s in floor
                  if shifts[s]["methods"][m]["auroc"] < FLOOR_AUROC] for m in methods}
    if not floor or all(misses.values()):  # nobody clears the floor: it decides nothing
        return {}
    return {m: f"below AUROC {FLOOR_AUROC:g} on {', '.join(f'{s} ({a:.3f})' for s, a in miss)}, which other "
               f"methods flag" for m, miss in misses.items() if miss}


def method_assumptions(invariance: dict[str, float], shape: tuple[int, int, int]) -> dict[str, str]:
    """{method: why its assumptions do not hold for this data}. fisher's orientation gain assumes the data
    has one orientation: on data that looks the same mirrored or turned, a normal image is explained as
    well turned back, and the statistic only adds noise."""
    turned = {"rotated90": "rot90", "hflip": "hflip", "vflip": "vflip"}
    used = set(anomaly.transform_names(*shape[1:]))
    broken = {name: a for name, a in invariance.items()
              if name in turned and turned[name] in used and a < INVARIANCE_AUROC}
    if not broken:
        return {}
    which = ", ".join(f"{name} (AUROC {a:.2f})" for name, a in broken.items())
    return {"fisher": f"its orientation statistic assumes one orientation, but the data is invariant under "
                      f"{which}"}


def evaluate_suite(scores_normal: dict[str, np.ndarray], scores_shift: dict[str, dict[str, np.ndarray]],
                   calibration: dict[str, np.ndarray], alpha: float,
                   excluded_methods: dict[str, str] | None = None) -> dict:
    """Per shift and method: AUROC and detection rate at alpha; per method: false alarms on normal data.

    scores_normal: {method: (N,)}; scores_shift: {shift: {method: (n,)}}; calibration: {method: (n_cal,)}
    sorted or not (methods without calibration get no rates); excluded_methods: {method: reason} not to
    choose as the best.
    """
    methods = list(scores_normal)
    shifts: dict[str, dict] = {}
    for shift, per_method in scores_shift.items():
        spec = SHIFTS.get(shift)
        shifts[shift] = {"n": len(next(iter(per_method.values()))),
                         "description": spec.description if spec else "", "methods": {}}
        for m in methods:
            entry: dict = {"auroc": auroc(scores_normal[m], per_method[m])}
            if m in calibration:
                flagged = anomaly.is_anomaly(per_method[m], calibration[m], alpha)
                entry["detection_rate"] = float(flagged.mean())
            shifts[shift]["methods"][m] = entry
    summary = {}
    for m in methods:
        aurocs = [shifts[s]["methods"][m]["auroc"] for s in shifts]
        summary[m] = {"min_auroc": float(min(aurocs)), "mean_auroc": float(np.mean(aurocs)),
                      "worst_shift": list(shifts)[int(np.argmin(aurocs))]}
        if m in calibration:
            flags = anomaly.is_anomaly(scores_normal[m], calibration[m], alpha)
            summary[m]["false_alarm_rate"] = float(flags.mean())
            summary[m]["false_alarm_bound"] = anomaly.false_alarm_bound(alpha, len(calibration[m]))
            summary[m]["threshold"] = anomaly.conformal_threshold(calibration[m], alpha)
    excluded = {m: why for m, why in (excluded_methods or {}).items() if m in summary}
    excluded.update({m: why for m, why in missed_floor(shifts, methods).items() if m not in excluded})
    return {"alpha": alpha, "shifts": shifts, "methods": summary, "excluded_methods": excluded,
            "best_method": choose_default(summary, excluded)}


# -- running the suite through an artifact's graphs -----------------------------------------------------
@dataclass
class SuiteRun:
    """A shift suite built from normal images and scored with every method."""

    suite: dict[str, np.ndarray]  # {shift: (n, C, H, W)}
    sources: dict[str, np.ndarray]  # {transforming shift: (n,) index of the source normal image}
    normal_scores: dict[str, np.ndarray]  # {method: (N,)}
    shift_scores: dict[str, dict[str, np.ndarray]]  # {shift: {method: (n,)}}
    invariance: dict[str, float]  # {transform shift: pixel nearest-neighbour AUROC}
    excluded_shifts: dict[str, str]  # {shift: why it is no shift for this data}
    excluded_methods: dict[str, str]  # {method: why its assumptions do not hold}


def run_suite(scorer: GraphScorer, normal: np.ndarray, normal_labels: np.ndarray | None, train: np.ndarray, *,
              per_shift: int, k: int, seed: int, methods: tuple[str, ...], references: ScoreReferences,
              shifts: list[str] | None = None) -> SuiteRun:
    """Build the suite at the images' own shape and channels, drop the transforms the data is invariant
    under (unless `shifts` names them), and score normal and shifted images with every method.

    normal: (N, C, H, W) held-out normal images; normal_labels: (N,) for conditional models, else None;
    train: (M, C, H, W) training images (the reference of the invariance check).
    """
    names = shifts or shifts_for(normal.shape[1:])
    invariance = invariances(train, normal, names)
    excluded = {} if shifts else {
        name: f"the data is invariant under it (pixel nearest-neighbour AUROC {a:.2f} < {INVARIANCE_AUROC})"
        for name, a in invariance.items() if a < INVARIANCE_AUROC}
    names = [n for n in names if n not in excluded]
    suite = build_suite(normal, per_shift, seed, names)
    sources = suite_sources(len(normal), per_shift, seed, names)
    labels = suite_labels(normal_labels, per_shift, seed, names) if normal_labels is not None else {}
    started = time.perf_counter()
    # A seed different from the calibration's, as a fresh request would have.
    normal_scores = scorer.all_scores(normal, k, seed + 1000, methods, references, normal_labels)
    shift_scores = {}
    for i, (name, images) in enumerate(suite.items()):
        shift_scores[name] = scorer.all_scores(images, k, seed + 2000 + list(SHIFTS).index(name), methods,
                                               references, labels.get(name))
        log.info("ood suite: %s done (%d of %d, %.0f s)", name, i + 1, len(suite),
                 time.perf_counter() - started)
    return SuiteRun(suite, sources, normal_scores, shift_scores, invariance, excluded,
                    method_assumptions(invariance, normal.shape[1:]))


def select_method(scorer: GraphScorer, splits: DataSplits, references: ScoreReferences, k: int, seed: int,
                  per_shift: int = 100) -> dict:
    """Choose the default anomaly method on the validation split (never the calibration or test split):
    the best worst-case AUROC over the suite, skipping methods whose assumptions the data breaks.

    Returns the manifest's `anomaly.selection` record: the choice, each method's AUROCs and the reasons
    for every shift and method left out.
    """
    conditional = scorer.family.conditional
    labels = splits.val_labels.numpy() if conditional else None
    run = run_suite(scorer, splits.val_images.numpy(), labels, splits.train_images.numpy(),
                    per_shift=per_shift, k=k, seed=seed, methods=anomaly.METHODS, references=references)
    result = evaluate_suite(run.normal_scores, run.shift_scores, {}, 0.01, run.excluded_methods)
    return {
        "method": result["best_method"],
        "rule": "best worst-case AUROC over the shift suite on the validation split, ties by the mean, among "
                "the methods that flag noise and constant images (AUROC >= 0.99) when any does",
        "normal_split": "validation", "n_normal": len(splits.val_images), "per_shift": per_shift, "k": k,
        "shifts": list(run.suite), "excluded_shifts": run.excluded_shifts,
        "excluded_methods": result["excluded_methods"],
        "invariance_auroc": {name: round(a, 4) for name, a in run.invariance.items()},
        "methods": {m: {key: v[key] for key in ("min_auroc", "mean_auroc", "worst_shift")}
                    for m, v in result["methods"].items()},
    }


# -- the command ---------------------------------------------------------------------------------------
def run_ood_eval(artifact: Path, out_dir: Path, *, split: str = "test", per_shift: int = 200,
                 k: int | None = None, seed: int = 0, alpha: float | None = None, threads: int = 1,
                 max_normal: int | None = None, shifts: list[str] | None = None,
                 data: str | None = None) -> dict:
    """Score normal images and the shift suite with every calibrated method; write ood.json, ood.md, figures.

    k and alpha default to the manifest's calibration; split: the normal images, "test" (reported) or
    "validation" (for choosing the default method without looking at the test split). data: where the
    model's data is now (default: the training config's spec, then the absolute path recorded at export).
    """
    from service.artifacts import load_manifest
    from training.train import load_dataset_for

    m = load_manifest(Path(artifact), "onnx")
    cal = m.anomaly
    k = k or (cal.k if cal else 256)
    alpha = alpha or (cal.alpha if cal else 0.01)
    cfg = (m.raw.get("training") or {}).get("config")
    if not cfg:
        raise ValueError(f"{artifact}: the manifest has no training config, so its data split is unknown")
    splits = load_dataset_for(cfg, data, (m.raw.get("data") or {}).get("spec"))
    if splits.input_shape != m.input_shape:
        raise ValueError(f"the data gives images of shape {splits.input_shape}, the model takes "
                         f"{m.input_shape}: pass the data the model was trained on (--data)")
    images, labels = {"test": (splits.test_images, splits.test_labels),
                      "validation": (splits.val_images, splits.val_labels)}[split]
    normal, normal_labels = images.numpy(), labels.numpy()
    if max_normal:
        normal, normal_labels = normal[:max_normal], normal_labels[:max_normal]
    scorer = GraphScorer.from_artifact(m.directory, threads=threads)
    methods = tuple(cal.methods) if cal else ("nll",)
    started = time.perf_counter()
    run = run_suite(scorer, normal, normal_labels if m.conditional else None, splits.train_images.numpy(),
                    per_shift=per_shift, k=k, seed=seed, methods=methods,
                    references=ScoreReferences.from_calibration(cal), shifts=shifts)
    calibration = {name: np.asarray(c.scores) for name, c in cal.methods.items()} if cal else {}
    result = evaluate_suite(run.normal_scores, run.shift_scores, calibration, alpha, run.excluded_methods)
    if len(np.unique(normal_labels)) > 1:  # which source classes the symmetry shifts fail on, per method
        for name in SYMMETRY_SHIFTS:
            if name in run.shift_scores:
                classes = normal_labels[run.sources[name]]
                result["shifts"][name]["auroc_by_source_class"] = {
                    meth: auroc_by_class(run.normal_scores[meth], run.shift_scores[name][meth], classes)
                    for meth in run.shift_scores[name]}
    command = f"python -m training ood-eval {artifact} --split {split} --per-shift {per_shift}"
    result.update(model=m.name, version=m.version, k=k, seed=seed, normal_split=split, n_normal=len(normal),
                  per_shift=per_shift, manifest_default_method=cal.default_method if cal else None,
                  excluded_shifts=run.excluded_shifts, invariance_auroc=run.invariance,
                  label_names=list(m.labels or []) or splits.label_names,
                  seconds=time.perf_counter() - started, command=command)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "ood.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "ood.md").write_text(markdown_table(result))
    _figure(result, out_dir / "figures" / "ood_auroc.png")
    _examples_figure(run.suite, out_dir / "figures" / "ood_examples.png")
    return result


def markdown_table(result: dict) -> str:
    """AUROC (detection rate at alpha) per shift and method, then false alarms on the normal images, and what
    was left out of the suite or the choice, and why."""
    methods = list(result["methods"])
    a = result["alpha"]
    lines = [f"# OOD evaluation: {result['model']}/{result['version']}", "",
             f"Normal: {result['n_normal']} {result['normal_split']} images; {result['per_shift']} images "
             f"per shift; k = {result['k']}; alpha = {a:g}. Cells: AUROC (detection rate at alpha). "
             f"Command: `{result['command']}`.", "",
             "| shift | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for shift, entry in result["shifts"].items():
        cells = []
        for m in methods:
            e = entry["methods"][m]
            det = f" ({e['detection_rate']:.2f})" if "detection_rate" in e else ""
            cells.append(f"{e['auroc']:.3f}{det}")
        lines.append(f"| {shift} | " + " | ".join(cells) + " |")
    lines.append("| **min AUROC** | " + " | ".join(f"**{result['methods'][m]['min_auroc']:.3f}**"
                                                   for m in methods) + " |")
    lines.append("| worst shift | " + " | ".join(result["methods"][m]["worst_shift"] for m in methods) + " |")
    lines.append("| mean AUROC | " + " | ".join(f"{result['methods'][m]['mean_auroc']:.3f}"
                                                 for m in methods) + " |")
    if all("false_alarm_rate" in result["methods"][m] for m in methods):
        lines.append(f"| false alarms on normal images at alpha = {a:g} | " + " | ".join(
            f"{result['methods'][m]['false_alarm_rate']:.3f}" for m in methods) + " |")
    lines += ["", f"Best worst-case AUROC: **{result['best_method']}**."]
    for title, reasons in (("Shifts left out of the suite", result.get("excluded_shifts") or {}),
                           ("Methods not chosen whatever their AUROC", result.get("excluded_methods") or {})):
        if reasons:
            lines += ["", f"{title}:"] + [f"- {name}: {why}" for name, why in reasons.items()]
    lines.append("")
    by_class = {shift: e["auroc_by_source_class"] for shift, e in result["shifts"].items()
                if "auroc_by_source_class" in e}
    if by_class:
        best = result["best_method"]
        classes = sorted({c for d in by_class.values() for c in d[best]}, key=int)
        names = result.get("label_names") or []
        header = [names[int(c)] if int(c) < len(names) else c for c in classes]
        lines += [f"AUROC of **{best}** by the class of the transformed image (a mirrored 0, 1 or 8 "
                  "is still a digit):", "",
                  "| shift | " + " | ".join(header) + " |", "|---|" + "---|" * len(classes)]
        for shift, d in by_class.items():
            lines.append(f"| {shift} | " + " | ".join(f"{d[best].get(c, float('nan')):.2f}" for c in classes)
                         + " |")
        lines.append("")
    return "\n".join(lines)


REPORT_MARKER = "<!-- ood-eval -->"


def add_to_report(report_md: Path, result: dict, figures_rel: str = "ood/figures") -> None:
    """Put the OOD table (and figures) into a model report, replacing an earlier ood-eval section."""
    text = report_md.read_text() if report_md.exists() else ""
    if REPORT_MARKER in text:
        text = text[:text.index(REPORT_MARKER)].rstrip() + "\n"
    table = markdown_table(result).split("\n", 2)[2]  # without the "# OOD evaluation" title
    section = (f"\n{REPORT_MARKER}\n## Out-of-distribution detection\n\n{table}\n"
               f"![AUROC per shift and method]({figures_rel}/ood_auroc.png)\n\n"
               f"Examples of each shift (one row per shift, in table order):\n\n"
               f"![shift examples]({figures_rel}/ood_examples.png)\n")
    report_md.write_text(text + section)


def _figure(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods, shifts = list(result["methods"]), list(result["shifts"])
    grid = np.array([[result["shifts"][s]["methods"][m]["auroc"] for m in methods] for s in shifts])
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(1.6 * len(methods) + 3, 0.42 * len(shifts) + 1.5))
    im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(methods)), methods, rotation=20)
    ax.set_yticks(range(len(shifts)), shifts)
    for i in range(len(shifts)):
        for j in range(len(methods)):
            ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_title(f"AUROC vs {result['n_normal']} {result['normal_split']} images "
                 f"({result['model']}/{result['version']}, k={result['k']})")
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _examples_figure(suite: dict[str, np.ndarray], path: Path, per_row: int = 8) -> None:
    """One row of examples per shift, as one PNG (grey or RGB, as the images)."""
    rows = []
    for images in suite.values():
        pick = images[:per_row].transpose(0, 2, 3, 1)  # (n, H, W, C)
        pick = np.concatenate([pick, np.zeros((per_row - len(pick), *pick.shape[1:]), np.float32)])
        rows.append(np.concatenate([np.pad(img, ((1, 1), (1, 1), (0, 0)), constant_values=0.5)
                                    for img in pick], axis=1))
    grid = np.concatenate(rows, axis=0)
    grid = grid[..., 0] if grid.shape[-1] == 1 else grid
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((grid * 255).astype(np.uint8)).resize((grid.shape[1] * 2, grid.shape[0] * 2),
                                                          Image.Resampling.NEAREST).save(path)


# -- command line (wired into `python -m training` by training/__main__.py) ----------------------------
def add_parser(sub: argparse._SubParsersAction) -> None:
    """The `ood-eval` subcommand."""
    p = sub.add_parser("ood-eval", help="AUROC, false alarms and detection rates of every anomaly method "
                                        "on a shift suite (JSON, markdown table, figures)")
    p.add_argument("artifact", type=Path, help="an exported version folder, e.g. models/mnist-vae/2")
    p.add_argument("--out", type=Path, required=True, help="folder for ood.json, ood.md and figures/")
    p.add_argument("--split", choices=["test", "validation"], default="test",
                   help="normal images: test (report) or validation (choose the default method)")
    p.add_argument("--per-shift", type=int, default=200, help="images per shift (default 200)")
    p.add_argument("--k", type=int, help="importance samples (default: the calibration's k)")
    p.add_argument("--alpha", type=float, help="level of is_anomaly (default: the manifest's alpha)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads")
    p.add_argument("--max-normal", type=int, help="use only the first N normal images (quick runs)")
    p.add_argument("--shifts", default="",
                   help=f"comma-separated subset of: {', '.join(SHIFTS)} (default: every shift that exists "
                        "for the model's shape and channels, less transforms the data is invariant under)")
    p.add_argument("--data", help="where the model's data is now, e.g. folder:/data/shapes (default: the "
                                  "training config's spec, then the absolute path recorded at export)")
    p.add_argument("--report-md", type=Path,
                   help="also put the table into this report.md (e.g. RUN/report/report.md, with --out "
                        "RUN/report/ood), replacing an earlier ood-eval section")


def main_from_args(args: argparse.Namespace) -> None:
    shifts = [s.strip() for s in args.shifts.split(",") if s.strip()] or None
    unknown = sorted(set(shifts or []) - set(SHIFTS))
    if unknown:  # (a shift that does not exist for the model's shape fails in run_ood_eval)
        raise ValueError(f"unknown shifts {unknown} (known: {', '.join(SHIFTS)})")
    result = run_ood_eval(args.artifact, args.out, split=args.split, per_shift=args.per_shift, k=args.k,
                          seed=args.seed, alpha=args.alpha, threads=args.threads, max_normal=args.max_normal,
                          shifts=shifts, data=args.data)
    if args.report_md:
        relative = Path(os.path.relpath(args.out, args.report_md.parent)).as_posix()
        add_to_report(args.report_md, result, relative + "/figures")
    print(markdown_table(result))
