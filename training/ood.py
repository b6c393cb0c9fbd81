"""Out-of-distribution evaluation: a shift suite built from what is on disk, AUROC and calibrated alarms.

`python -m training ood-eval models/NAME/VERSION` scores normal held-out digits and every shift of the
suite with every anomaly method of the artifact (service/anomaly.py), running the exported ONNX graphs
as the service does (training/scoring.py), and reports per shift and method:

* AUROC of the score, shift vs normal digits (threshold-free; 0.5 = chance);
* the false-alarm rate on the normal digits at level alpha (conformal p-value <= alpha, with the
  manifest's calibration, which never saw these digits): at most ~alpha by construction;
* the detection rate at alpha on the shift (the fraction flagged).

The suite (nothing downloaded): constant grey images, uniform noise, inverted, rotated and flipped
digits, the right half erased, centre crops zoomed in, digits scaled down or shifted, scikit-learn's
8x8 digits upscaled into MNIST's 20x20 box, capital letters drawn with Pillow's font, random pen
strokes and textures (gratings and checkerboards). Nalisnick et al. 2019 is the reason it contains
"simple" inputs (constant images, erased halves) that likelihoods rank as *more* likely than digits.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from service import anomaly

log = logging.getLogger(__name__)

Shift = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]


# -- the shift suite -------------------------------------------------------------------------------------
# Each shift maps the normal digits (N, 1, H, W) in [0, 1] and a count n to n images (n, 1, H, W).
def source_indices(n_digits: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """Which normal digits a digit-based shift transforms: (n,) indices. `_pick` is its only user in the
    shifts, and build_suite replays it with the same generator to know each image's source digit."""
    return rng.choice(n_digits, size=n, replace=n > n_digits)


def _pick(digits: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return digits[source_indices(len(digits), n, rng)]


def _resize(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w) float in [0, 1] -> (size[1], size[0]) with Pillow's bilinear filter."""
    im = Image.fromarray(np.clip(img * 255, 0, 255).astype(np.uint8))
    return np.asarray(im.resize(size, Image.Resampling.BILINEAR), dtype=np.float32) / 255.0


def _paste_centre(img: np.ndarray, h: int, w: int, dy: int = 0, dx: int = 0) -> np.ndarray:
    out = np.zeros((h, w), dtype=np.float32)
    top, left = (h - img.shape[0]) // 2 + dy, (w - img.shape[1]) // 2 + dx
    out[top:top + img.shape[0], left:left + img.shape[1]] = img
    return out


def constant(digits: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    levels = np.linspace(0.0, 1.0, n, dtype=np.float32)
    return np.broadcast_to(levels[:, None, None, None], (n, *digits.shape[1:])).copy()


def noise(digits: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.random((n, *digits.shape[1:]), dtype=np.float32)


def inverted(digits: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return 1.0 - _pick(digits, n, rng)


def rotated90(digits: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return np.ascontiguousarray(np.rot90(_pick(digits, n, rng), k=1, axes=(2, 3)))


def hflipped(digits: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return np.ascontiguousarray(_pick(digits, n, rng)[..., ::-1])


def vflipped(digits: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return np.ascontiguousarray(_pick(digits, n, rng)[..., ::-1, :])


def right_half_erased(digits: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    x = _pick(digits, n, rng).copy()
    x[..., x.shape[-1] // 2:] = 0.0
    return x


def centre_crop_zoomed(digits: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    x = _pick(digits, n, rng)
    h, w = x.shape[2:]
    t, l_ = h // 4, w // 4  # the central half, blown up to full size
    return np.stack([_resize(img[0, t:h - t, l_:w - l_], (w, h))[None] for img in x])


def scaled_down(digits: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    x = _pick(digits, n, rng)
    h, w = x.shape[2:]
    return np.stack([_paste_centre(_resize(img[0], (w // 2, h // 2)), h, w)[None] for img in x])


def shifted(digits: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Moved 6 to 8 pixels in a random direction (zero fill, no wrap-around)."""
    x = _pick(digits, n, rng)
    out = np.zeros_like(x)
    for i, img in enumerate(x):
        angle = rng.uniform(0, 2 * math.pi)
        dist = rng.uniform(6, 8)
        dy, dx = round(dist * math.sin(angle)), round(dist * math.cos(angle))
        src = img[0, max(0, -dy):img.shape[1] - max(0, dy), max(0, -dx):img.shape[2] - max(0, dx)]
        out[i, 0, max(0, dy):max(0, dy) + src.shape[0], max(0, dx):max(0, dx) + src.shape[1]] = src
    return out


def sklearn_digits(digits: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """scikit-learn's 8x8 digits (0..16), upscaled to 20x20 and padded like MNIST to the input size."""
    from sklearn.datasets import load_digits

    small = load_digits().images / 16.0  # (1797, 8, 8)
    h, w = digits.shape[2:]
    box = (round(w * 20 / 28), round(h * 20 / 28))
    pick = small[rng.choice(len(small), size=n, replace=n > len(small))]
    return np.stack([_paste_centre(_resize(img, box), h, w)[None] for img in pick])


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: a scalable font
    except (TypeError, OSError, ImportError):  # pragma: no cover - old Pillow
        return ImageFont.load_default()


def letters(digits: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Capital letters A-Z in Pillow's default font, white on black, size and position jittered."""
    h, w = digits.shape[2:]
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
    return out


def pen_strokes(digits: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """1 to 3 random polylines of 3 to 6 points, 2 to 3 pixels wide, inside MNIST's central box."""
    h, w = digits.shape[2:]
    out = np.zeros((n, 1, h, w), dtype=np.float32)
    for i in range(n):
        im = Image.new("L", (w, h), 0)
        draw = ImageDraw.Draw(im)
        for _ in range(int(rng.integers(1, 4))):
            points = [(float(rng.uniform(4, w - 4)), float(rng.uniform(4, h - 4)))
                      for _ in range(int(rng.integers(3, 7)))]
            draw.line(points, fill=255, width=int(rng.integers(2, 4)), joint="curve")
        out[i, 0] = np.asarray(im, dtype=np.float32) / 255.0
    return out


def textures(digits: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Half sinusoidal gratings (random frequency, orientation, phase), half checkerboards."""
    h, w = digits.shape[2:]
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
    return out


SHIFTS: dict[str, tuple[Shift, str]] = {
    "constant": (constant, "constant grey images, black to white"),
    "noise": (noise, "uniform noise per pixel"),
    "inverted": (inverted, "digits with black and white swapped"),
    "rotated90": (rotated90, "digits rotated by 90 degrees"),
    "hflip": (hflipped, "digits mirrored left-right"),
    "vflip": (vflipped, "digits mirrored top-bottom"),
    "right_half_erased": (right_half_erased, "digits with the right half erased"),
    "crop_zoom": (centre_crop_zoomed, "the central half of a digit, zoomed to full size"),
    "scaled_down": (scaled_down, "digits shrunk to half size, centred"),
    "shifted": (shifted, "digits moved 6-8 pixels"),
    "sklearn_digits": (sklearn_digits, "scikit-learn 8x8 digits upscaled to 20x20 and padded"),
    "letters": (letters, "capital letters in Pillow's default font"),
    "pen_strokes": (pen_strokes, "random pen strokes"),
    "textures": (textures, "sinusoidal gratings and checkerboards"),
}


# The shifts that transform normal digits (through _pick): their images have a source digit.
DIGIT_SHIFTS = ("inverted", "rotated90", "hflip", "vflip", "right_half_erased", "crop_zoom", "scaled_down",
                "shifted")
# Shifts whose detection depends on the digit's symmetry: ood-eval breaks their AUROC down by source class.
SYMMETRY_SHIFTS = ("rotated90", "hflip", "vflip")


def _shift_rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, list(SHIFTS).index(name)])


def build_suite(digits: np.ndarray, per_shift: int, seed: int = 0,
                names: list[str] | None = None) -> dict[str, np.ndarray]:
    """{shift: (per_shift, C, H, W) float32 in [0, 1]} from normal digits (N, C, H, W); deterministic.

    Each shift draws from its own generator (seed, its index in SHIFTS), so a subset gives the same
    images as the full suite.
    """
    suite = {}
    for name in names or list(SHIFTS):
        images = SHIFTS[name][0](digits, per_shift, _shift_rng(seed, name))
        suite[name] = np.clip(images, 0, 1).astype(np.float32)
    return suite


def suite_sources(n_digits: int, per_shift: int, seed: int = 0,
                  names: list[str] | None = None) -> dict[str, np.ndarray]:
    """{digit shift: (per_shift,) index of each image's source digit} for the suite build_suite makes."""
    return {name: source_indices(n_digits, per_shift, _shift_rng(seed, name))
            for name in names or list(SHIFTS) if name in DIGIT_SHIFTS}


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


def choose_default(per_method: dict[str, dict]) -> str:
    """The method with the best worst-case AUROC over the suite; ties broken by the mean AUROC."""
    return max(per_method, key=lambda m: (round(per_method[m]["min_auroc"], 4), per_method[m]["mean_auroc"]))


def evaluate_suite(scores_normal: dict[str, np.ndarray], scores_shift: dict[str, dict[str, np.ndarray]],
                   calibration: dict[str, np.ndarray], alpha: float) -> dict:
    """Per shift and method: AUROC and detection rate at alpha; per method: false alarms on normal data.

    scores_normal: {method: (N,)}; scores_shift: {shift: {method: (n,)}}; calibration: {method: (n_cal,)}
    sorted or not (methods without calibration get no rates).
    """
    methods = list(scores_normal)
    shifts: dict[str, dict] = {}
    for shift, per_method in scores_shift.items():
        shifts[shift] = {"n": len(next(iter(per_method.values()))),
                         "description": SHIFTS.get(shift, (None, ""))[1], "methods": {}}
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
    return {"alpha": alpha, "shifts": shifts, "methods": summary, "best_method": choose_default(summary)}


# -- the command ---------------------------------------------------------------------------------------
def normal_digits(data: str, split: str, calibration_fraction: float, val_fraction: float,
                  seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The held-out normal images (N, C, H, W) of the artifact's data set (its test or validation split)
    and their labels (N,) (all 0 for unlabelled data)."""
    from training.data import load_dataset

    splits = load_dataset(data, val_fraction=val_fraction, seed=seed,
                          calibration_fraction=calibration_fraction)
    images, labels = {"test": (splits.test_images, splits.test_labels),
                      "validation": (splits.val_images, splits.val_labels)}[split]
    return images.numpy(), labels.numpy()


def run_ood_eval(artifact: Path, out_dir: Path, *, split: str = "test", per_shift: int = 200,
                 k: int | None = None, seed: int = 0, alpha: float | None = None, threads: int = 1,
                 max_normal: int | None = None, shifts: list[str] | None = None) -> dict:
    """Score normal digits and the shift suite with every calibrated method; write ood.json, ood.md, figures.

    k and alpha default to the manifest's calibration; split: the normal digits, "test" (reported) or
    "validation" (for choosing the default method without looking at the test split).
    """
    from service.artifacts import load_manifest
    from training.scoring import GraphScorer, ScoreReferences

    m = load_manifest(Path(artifact), "onnx")
    if m.conditional:
        raise ValueError("ood-eval scores unconditional models only")
    cal = m.anomaly
    k = k or (cal.k if cal else 256)
    alpha = alpha or (cal.alpha if cal else 0.01)
    cfg = (m.raw.get("training") or {}).get("config") or {}
    data = (m.raw.get("data") or {}).get("name", "mnist5k")
    digits, labels = normal_digits(data, split, cfg.get("calibration_fraction", 0.0),
                                   cfg.get("val_fraction", 0.1), cfg.get("seed", 0))
    if max_normal:
        digits, labels = digits[:max_normal], labels[:max_normal]
    suite = build_suite(digits, per_shift, seed, shifts)
    sources = suite_sources(len(digits), per_shift, seed, shifts)
    scorer = GraphScorer(m.directory, m.latent_dim, m.preprocessing, m.likelihood, threads=threads,
                         input_shape=m.input_shape)
    references = ScoreReferences.from_calibration(cal)
    methods = tuple(cal.methods) if cal else ("nll",)
    started = time.perf_counter()
    # A seed different from the calibration's, as a fresh request would have.
    normal_scores = scorer.all_scores(digits, k, seed + 1000, methods, references)
    shift_scores = {}
    for i, (name, images) in enumerate(suite.items()):
        shift_scores[name] = scorer.all_scores(images, k, seed + 2000 + i, methods, references)
        log.info("ood-eval: %s done (%.0f s)", name, time.perf_counter() - started)
    calibration = {name: np.asarray(c.scores) for name, c in cal.methods.items()} if cal else {}
    result = evaluate_suite(normal_scores, shift_scores, calibration, alpha)
    if len(np.unique(labels)) > 1:  # which source digits the symmetry shifts fail on, per method
        for name in SYMMETRY_SHIFTS:
            if name in shift_scores:
                classes = labels[sources[name]]
                result["shifts"][name]["auroc_by_source_digit"] = {
                    m: auroc_by_class(normal_scores[m], shift_scores[name][m], classes)
                    for m in shift_scores[name]}
    result.update(model=m.name, version=m.version, k=k, seed=seed, normal_split=split, n_normal=len(digits),
                  per_shift=per_shift, manifest_default_method=cal.default_method if cal else None,
                  seconds=time.perf_counter() - started,
                  command=f"python -m training ood-eval {artifact} --split {split} --per-shift {per_shift}")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "ood.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "ood.md").write_text(markdown_table(result))
    _figure(result, out_dir / "figures" / "ood_auroc.png")
    _examples_figure(suite, out_dir / "figures" / "ood_examples.png")
    return result


def markdown_table(result: dict) -> str:
    """AUROC (detection rate at alpha) per shift and method, then false alarms on the normal digits."""
    methods = list(result["methods"])
    a = result["alpha"]
    lines = [f"# OOD evaluation: {result['model']}/{result['version']}", "",
             f"Normal: {result['n_normal']} {result['normal_split']} digits; {result['per_shift']} images "
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
    lines.append("| mean AUROC | " + " | ".join(f"{result['methods'][m]['mean_auroc']:.3f}"
                                                 for m in methods) + " |")
    if all("false_alarm_rate" in result["methods"][m] for m in methods):
        lines.append(f"| false alarms on normal digits at alpha = {a:g} | " + " | ".join(
            f"{result['methods'][m]['false_alarm_rate']:.3f}" for m in methods) + " |")
    lines += ["", f"Best worst-case AUROC: **{result['best_method']}**.", ""]
    by_digit = {shift: e["auroc_by_source_digit"] for shift, e in result["shifts"].items()
                if "auroc_by_source_digit" in e}
    if by_digit:
        best = result["best_method"]
        classes = sorted({c for d in by_digit.values() for c in d[best]}, key=int)
        lines += [f"AUROC of **{best}** by the source digit of the transformed image (a mirrored 0, 1 or 8 "
                  "is still a digit):", "",
                  "| shift | " + " | ".join(classes) + " |", "|---|" + "---|" * len(classes)]
        for shift, d in by_digit.items():
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
    ax.set_title(f"AUROC vs {result['n_normal']} {result['normal_split']} digits "
                 f"({result['model']}/{result['version']}, k={result['k']})")
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _examples_figure(suite: dict[str, np.ndarray], path: Path, per_row: int = 8) -> None:
    """One row of examples per shift, as one grey PNG."""
    rows = []
    for images in suite.values():
        pick = images[:per_row, 0]
        pick = np.concatenate([pick, np.zeros((per_row - len(pick), *pick.shape[1:]), np.float32)])
        rows.append(np.concatenate([np.pad(img, 1, constant_values=0.5) for img in pick], axis=1))
    grid = np.concatenate(rows, axis=0)
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
                   help="normal digits: test (report) or validation (choose the default method)")
    p.add_argument("--per-shift", type=int, default=200, help="images per shift (default 200)")
    p.add_argument("--k", type=int, help="importance samples (default: the calibration's k)")
    p.add_argument("--alpha", type=float, help="level of is_anomaly (default: the manifest's alpha)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads")
    p.add_argument("--max-normal", type=int, help="use only the first N normal digits (quick runs)")
    p.add_argument("--shifts", default="", help=f"comma-separated subset of: {', '.join(SHIFTS)}")
    p.add_argument("--report-md", type=Path,
                   help="also put the table into this report.md (e.g. RUN/report/report.md, with --out "
                        "RUN/report/ood), replacing an earlier ood-eval section")


def main_from_args(args: argparse.Namespace) -> None:
    shifts = [s.strip() for s in args.shifts.split(",") if s.strip()] or None
    unknown = sorted(set(shifts or []) - set(SHIFTS))
    if unknown:
        raise ValueError(f"unknown shifts {unknown} (known: {', '.join(SHIFTS)})")
    result = run_ood_eval(args.artifact, args.out, split=args.split, per_shift=args.per_shift, k=args.k,
                          seed=args.seed, alpha=args.alpha, threads=args.threads, max_normal=args.max_normal,
                          shifts=shifts)
    if args.report_md:
        relative = Path(os.path.relpath(args.out, args.report_md.parent)).as_posix()
        add_to_report(args.report_md, result, relative + "/figures")
    print(markdown_table(result))
