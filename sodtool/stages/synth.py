"""The built-in synthetic small-object benchmark (`sodtool data synth`, DESIGN.md section 2).

A COCO-format stand-in for COCO's small-object problem that needs no download:

- object sizes follow COCO's buckets on the annotation `area` (= box w*h): about 40% small
  (< 32²), 35% medium (< 96²) and 25% large; sqrt(area) is log-uniform within each bucket
  (small: 8..32 px), aspect ratios 1:2..2:1, sides >= 6 px and <= 60% of the image side;
- K classes (10 by default) share silhouettes and colours (both drawn from pools common to all
  classes) and differ only in an internal pattern (stripes-h/-v, stripes-d "/" and stripes-a
  "\\" diagonals, checker, dots, rings, cross-hatch, zigzag, diamonds, waves, bricks) whose
  period is a fixed fraction of the object size (4 to 6 periods across sqrt(w*h)). At 10-20
  px the detail is 1-2 px wide and a 4x downsampling erases it (< 16% of the pattern's energy
  survives a 4x bicubic down-and-up at 16 px; at 128 px > 75% for the 10 default classes,
  > 60% for all 12): resolution, not colour, decides the class of a small object;
- cluttered textured backgrounds, unlabelled distractors (same silhouettes and colours, non-class
  textures: plain, speckle, blotches, split), partial occlusion between objects (at most 40% of
  an annotated box hidden by boxes drawn on top of it; the full box is annotated), and per-image
  blur (Gaussian, sigma up to 1.5 px), noise, contrast change and JPEG artefacts (quality drawn
  per image). Blur is in pixels, so it takes the detail of small objects and leaves that of
  large ones.

The two detail settings (CYCLES, BLUR_SIGMA) make the benchmark as hard on small objects as
COCO: a Faster R-CNN trained on the bench preset reaches an AP_S of 0.33 of its AP_L (the COCO
baselines of the paper's Table 2: 0.36 and 0.44). With 3-4.5 periods and sigma <= 1 px it
reached 0.59: at 16 px a pattern of 4-5 px period stays legible at native resolution.

Splits: `train` for training, `val` for every choice made by looking at results (schedules,
thresholds, gates, checkpoints), `minival` for the figures that are reported and for nothing else.

Determinism: each image draws from its own `numpy.random.Generator` seeded by
(seed, split, index), so the output does not depend on `--workers` or on the order in which
images are made, and no two splits share an image. Adding `val` left `train` and `minival`
byte-identical to the two-split benchmark: each split's images come from its own seeds. Boxes are integer pixels,
xywh in the JSON, always inside the image with positive size.

Layout written (atomically: built in `.<out>.<pid>.tmp` beside it and renamed into place at the end):
`images/<split>/*.jpg` and `annotations/instances_<split>.json` for `train`, `val` and
`minival`, and `manifest.json`.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from sodtool import __version__
from sodtool.artefacts import MANIFEST, Timer, check_output, read_json, swap_into, temp_path, write_json, write_manifest
from sodtool.coco import size_bucket
from sodtool.configs.synth import SynthConfig
from sodtool.console import log, make_progress, print_table
from sodtool.errors import InputError

STAGE = "data-synth"
SPLITS = ("train", "val", "minival")
# Image ids of a split start after this offset, so that a results file evaluated against the
# wrong split fails on unknown ids instead of giving silently wrong numbers.
SPLIT_ID_OFFSET = {"train": 0, "val": 5_000_000, "minival": 10_000_000}

# Class patterns, in category-id order (class k uses PATTERNS[k-1]); names describe the pattern.
PATTERNS = (
    "stripes-h", "stripes-v", "stripes-d", "stripes-a", "checker", "dots",
    "rings", "crosshatch", "zigzag", "diamonds", "waves", "bricks",
)
# Textures of unlabelled distractors: none of them is a class pattern, and at low resolution
# each looks like an object of any class (a blob of the mixed colour).
DISTRACTOR_TEXTURES = ("plain", "speckle", "blotches", "split")
SHAPES = ("ellipse", "rectangle", "rounded", "hexagon", "diamond")

# Colours common to every class (RGB). A pattern's ink colour is another palette colour that
# differs from the body in luminance, so that 4:2:0 JPEG chroma subsampling cannot erase it.
PALETTE = np.array([
    (214, 48, 42), (40, 110, 200), (60, 150, 60), (236, 200, 48), (200, 60, 150), (40, 170, 165),
    (240, 238, 230), (28, 28, 34), (245, 140, 40), (110, 72, 44), (150, 150, 150), (96, 64, 170),
    (150, 210, 100), (120, 190, 240),
], dtype=np.float32)
_LUMA = PALETTE @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
MIN_INK_LUMA_DIFF = 60.0

SIZE_BUCKETS = ("small", "medium", "large")
SIZE_MIX = (0.40, 0.35, 0.25)
MIN_SIDE = 6  # px; even COCO has hardly any object below this
SMALL_RANGE = (8.0, 32.0)  # sqrt(area) range of small objects
MEDIUM_RANGE = (32.0, 96.0)
LARGE_MIN = 96.0
MAX_SIDE_FRACTION = 0.6  # largest object side / image side
MAX_OCCLUSION = 0.4  # fraction of an annotated box that later boxes may hide
CYCLES = (4.0, 6.0)  # pattern periods across sqrt(w*h)
BLUR_SIGMA = (0.0, 1.5)  # per-image Gaussian blur sigma, px (drawn below 0.3: no blur)
MIN_IMAGE_SIZE = 192  # large objects (>= 96² px, sides <= 60% of the image) must fit
MAX_IMAGE_SIZE = 4096


@dataclass(frozen=True)
class Preset:
    train_images: int
    val_images: int
    minival_images: int
    image_size: int
    objects_per_image: tuple[int, int] = (6, 10)
    distractors_per_image: tuple[int, int] = (1, 3)
    # Largest object side in px (None: MAX_SIDE_FRACTION of the image side).
    max_object_side: Optional[int] = None


PRESETS = {
    # The quickstart: the whole pipeline on a 2-core CPU in minutes.
    "quick": Preset(train_images=500, val_images=100, minival_images=100, image_size=320),
    # For measurements: thousands of images, same geometry.
    "bench": Preset(train_images=4000, val_images=500, minival_images=500, image_size=320),
    # Large images (sliced inference's regime): 2048 px images holding the bench's objects at the
    # bench's pixel sizes (sides capped at 192 px, 60% of 320), at about a sixth of its density per
    # pixel (50 objects, not 8 x 41), under the 100 detections COCO counts per image. A detector
    # reading the whole image at the bench's 320 px input sees them 6.4 times smaller.
    "large": Preset(train_images=400, val_images=50, minival_images=50, image_size=2048, objects_per_image=(40, 60),
                    distractors_per_image=(8, 16), max_object_side=192),
}


def resolve_config(cfg: SynthConfig) -> SynthConfig:
    """Fill preset values and check every option; InputError names the option at fault."""
    if cfg.preset not in PRESETS:
        raise InputError(f"unknown preset '{cfg.preset}' for --preset (choose from {', '.join(PRESETS)})")
    p = PRESETS[cfg.preset]
    train = p.train_images if cfg.train_images is None else cfg.train_images
    val = p.val_images if cfg.val_images is None else cfg.val_images
    minival = p.minival_images if cfg.minival_images is None else cfg.minival_images
    size = p.image_size if cfg.image_size is None else cfg.image_size
    objects = p.objects_per_image if cfg.objects_per_image is None else cfg.objects_per_image
    distractors = p.distractors_per_image if cfg.distractors_per_image is None else cfg.distractors_per_image
    max_side = p.max_object_side if cfg.max_object_side is None else cfg.max_object_side
    if max_side is not None and max_side < LARGE_MIN:
        raise InputError(f"max_object_side must be at least {LARGE_MIN:.0f} px (large objects must fit), got {max_side}")
    if train < 1:
        raise InputError(f"--train-images must be at least 1, got {train}")
    if val < 1:
        raise InputError(f"--val-images must be at least 1, got {val}")
    if minival < 1:
        raise InputError(f"--minival-images must be at least 1, got {minival}")
    if not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        raise InputError(f"--image-size must be between {MIN_IMAGE_SIZE} and {MAX_IMAGE_SIZE} px "
                         f"(large objects of at least 96x96 px must fit), got {size}")
    if not 1 <= cfg.classes <= len(PATTERNS):
        raise InputError(f"--classes must be between 1 and {len(PATTERNS)} (one class per pattern), got {cfg.classes}")
    if cfg.seed < 0:
        raise InputError(f"--seed must be non-negative, got {cfg.seed}")
    if cfg.workers < 1:
        raise InputError(f"--workers must be at least 1, got {cfg.workers}")
    for name, (lo, hi) in (("objects_per_image", objects), ("distractors_per_image", distractors)):
        if not 0 <= lo <= hi or (name == "objects_per_image" and lo < 1):
            raise InputError(f"{name} must be a range (min, max) with 0 <= min <= max (objects: min >= 1), got {(lo, hi)}")
    out = Path(cfg.out) if cfg.out is not None else Path("data") / f"synth-{cfg.preset}"
    return dataclasses.replace(cfg, out=out, train_images=train, val_images=val, minival_images=minival,
                               image_size=size, objects_per_image=tuple(objects),
                               distractors_per_image=tuple(distractors), max_object_side=max_side)


def categories(num_classes: int) -> list[dict]:
    """The COCO category list: ids 1..K named after their pattern."""
    return [{"id": k + 1, "name": PATTERNS[k], "supercategory": "pattern"} for k in range(num_classes)]


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of one image: a function of (seed, split, index) only."""
    return np.random.default_rng([seed, zlib.crc32(split.encode()), index])


# ---------------------------------------------------------------------------------------------
# Drawing


def _ink_colour(rng: np.random.Generator, body_index: int) -> np.ndarray:
    choices = np.flatnonzero(np.abs(_LUMA - _LUMA[body_index]) >= MIN_INK_LUMA_DIFF)
    return PALETTE[choices[rng.integers(len(choices))]]


def _silhouette(shape: str, X: np.ndarray, Y: np.ndarray, a: float, b: float) -> np.ndarray:
    """Inside-mask of a silhouette touching all four sides of a box of half-sizes (a, b)."""
    ax, ay = np.abs(X) / a, np.abs(Y) / b
    if shape == "rectangle":
        return np.ones_like(X, dtype=bool)
    if shape == "ellipse":
        return ax * ax + ay * ay <= 1.0
    if shape == "diamond":
        return ax + ay <= 1.0
    if shape == "hexagon":  # vertices (±a, 0) and (±a/2, ±b)
        return ax + 0.5 * ay <= 1.0
    if shape == "rounded":
        r = 0.3 * min(a, b)
        dx = np.maximum(np.abs(X) - (a - r), 0.0)
        dy = np.maximum(np.abs(Y) - (b - r), 0.0)
        return dx * dx + dy * dy <= r * r
    raise ValueError(f"unknown shape {shape}")


def _frac(v: np.ndarray) -> np.ndarray:
    return v - np.floor(v)


def _pattern(kind: str, X: np.ndarray, Y: np.ndarray, period: float, rng: np.random.Generator) -> np.ndarray:
    """Ink mask (bool) of a class pattern or distractor texture at pixel coordinates (X, Y).

    X, Y are pixel offsets from the object centre (already rotated by a small jitter); `period`
    is in pixels. Ink covers about 40-50% of every class pattern, so the mean colour carries no
    class.
    """
    P = period
    px, py = rng.uniform(0, P, size=2)
    if kind == "stripes-h":
        return _frac((Y + py) / P) < 0.5
    if kind == "stripes-v":
        return _frac((X + px) / P) < 0.5
    if kind == "stripes-d":
        return _frac(((X + Y) / math.sqrt(2) + px) / P) < 0.5
    if kind == "stripes-a":
        return _frac(((X - Y) / math.sqrt(2) + px) / P) < 0.5
    if kind == "checker":
        return (np.floor((X + px) / (P / 2)) + np.floor((Y + py) / (P / 2))) % 2 == 0
    if kind == "diamonds":
        U, V = (X + Y) / math.sqrt(2), (X - Y) / math.sqrt(2)
        return (np.floor((U + px) / (P / 2)) + np.floor((V + py) / (P / 2))) % 2 == 0
    if kind == "dots":
        du, dv = _frac((X + px) / P) - 0.5, _frac((Y + py) / P) - 0.5
        return du * du + dv * dv < 0.37**2
    if kind == "rings":
        return _frac((np.hypot(X, Y) + px) / P) < 0.5
    if kind == "crosshatch":
        return (_frac((X + px) / P) < 0.25) | (_frac((Y + py) / P) < 0.25)
    if kind == "zigzag":  # horizontal stripes bent into chevrons
        tri = np.abs(2.0 * _frac((X + px) / P) - 1.0)
        return _frac((Y + 0.6 * P * tri + py) / P) < 0.5
    if kind == "waves":  # vertical stripes bent into sine waves
        return _frac((X + 0.25 * P * np.sin(2 * np.pi * (Y + py) / P) + px) / P) < 0.5
    if kind == "bricks":
        row = np.floor((Y + py) / (P / 2))
        mortar_h = _frac((Y + py) / (P / 2)) < 0.3
        mortar_v = _frac((X + px + 0.5 * P * (row % 2)) / P) < 0.15
        return mortar_h | mortar_v
    if kind == "plain":
        return np.zeros_like(X, dtype=bool)
    if kind == "speckle":  # random cells at the class patterns' scale: structure-free
        cell = P / 2
        ix = np.floor((X - X.min()) / cell).astype(np.int64)
        iy = np.floor((Y - Y.min()) / cell).astype(np.int64)
        grid = rng.random((iy.max() + 1, ix.max() + 1)) < 0.45
        return grid[iy, ix]
    if kind == "blotches":  # a few large soft blobs
        g = rng.random((3, 3)).astype(np.float32)
        h, w = X.shape
        up = np.asarray(Image.fromarray(g, mode="F").resize((w, h), Image.BICUBIC))
        return up > np.median(up)
    if kind == "split":
        t = rng.uniform(0, 2 * np.pi)
        return X * math.cos(t) + Y * math.sin(t) > 0
    raise ValueError(f"unknown pattern {kind}")


def render_object(kind: str, shape: str, w: int, h: int, rng: np.random.Generator,
                  body: np.ndarray | None = None, ink: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Draw one object (class pattern or distractor texture) into its w x h box.

    Rendered with supersampling (so that 1-2 px detail is area-averaged, not aliased) and
    box-filtered down. Returns (premultiplied colour float32 [h, w, 3] in 0..255, alpha float32
    [h, w] in 0..1); composite as `canvas * (1 - alpha) + premultiplied`. `body` / `ink` (RGB
    float32 [3]) fix the colours (ink defaults to body: no visible pattern); otherwise both are
    drawn from the shared palette, whatever the class.
    """
    if body is not None and ink is None:
        ink = body
    if body is None:
        bi = int(rng.integers(len(PALETTE)))
        body = PALETTE[bi] + rng.normal(0.0, 8.0, 3).astype(np.float32)
        ink = _ink_colour(rng, bi) + rng.normal(0.0, 8.0, 3).astype(np.float32)
        ink = body + (ink - body) * np.float32(rng.uniform(0.65, 1.0))
    ss = int(min(4, max(1, math.ceil(96 / max(w, h)))))
    xs = (np.arange(w * ss, dtype=np.float32) + 0.5) / ss - w / 2
    ys = (np.arange(h * ss, dtype=np.float32) + 0.5) / ss - h / 2
    X, Y = np.meshgrid(xs, ys)
    alpha = _silhouette(shape, X, Y, w / 2, h / 2).astype(np.float32)
    theta = np.deg2rad(rng.uniform(-8.0, 8.0))  # slight rotation: orientation stays the class cue
    c, s = math.cos(theta), math.sin(theta)
    Xr, Yr = c * X - s * Y, s * X + c * Y
    period = math.sqrt(w * h) / rng.uniform(*CYCLES)
    gx, gy = rng.uniform(-0.3, 0.3, size=2)
    ink_mask = _pattern(kind, Xr, Yr, period, rng).astype(np.float32)[..., None]
    shade = (1.0 + gx * X / w + gy * Y / h)[..., None]
    colour = (body * (1.0 - ink_mask) + ink * ink_mask) * shade
    premult = colour * alpha[..., None]
    if ss > 1:
        premult = premult.reshape(h, ss, w, ss, 3).mean(axis=(1, 3))
        alpha = alpha.reshape(h, ss, w, ss).mean(axis=(1, 3))
    return premult.astype(np.float32), alpha.astype(np.float32)


def _fractal_noise(rng: np.random.Generator, size: int, cells: tuple[int, ...], weights: tuple[float, ...]) -> np.ndarray:
    """Value noise in [0, 1], [size, size] float32: random grids upsampled bicubically and summed."""
    acc = np.zeros((size, size), dtype=np.float32)
    for c, wgt in zip(cells, weights):
        g = rng.random((c + 1, c + 1)).astype(np.float32)
        acc += wgt * np.asarray(Image.fromarray(g, mode="F").resize((size, size), Image.BICUBIC))
    lo, hi = float(acc.min()), float(acc.max())
    return (acc - lo) / max(hi - lo, 1e-6)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A cluttered textured background, float32 [size, size, 3] in 0..255."""
    grey = np.float32(128.0)
    c1, c2 = (PALETTE[rng.integers(len(PALETTE))] * np.float32(1 - t) + grey * np.float32(t)
              for t in rng.uniform(0.2, 0.7, size=2))
    mix = _fractal_noise(rng, size, (2, 4, 8, 16), (1.0, 0.6, 0.35, 0.2))[..., None]
    lum = _fractal_noise(rng, size, (3, 6, 12), (1.0, 0.5, 0.25))[..., None]
    # Mid-to-fine grain (grass, gravel, fabric): a few pixels wide, low amplitude.
    detail = (_fractal_noise(rng, size, (size // 8, size // 4), (1.0, 0.7)) - 0.5) * np.float32(rng.uniform(15.0, 45.0))
    # Textured regions (fences, blinds, foliage): low-contrast hatching or grain inside random
    # polygons; none is object-shaped or as contrasted as a class pattern.
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for _ in range(int(rng.integers(1, 5))):
        mask = Image.new("L", (size, size), 0)
        ImageDraw.Draw(mask).polygon(_random_polygon(rng, size, 0.1 * size, 0.35 * size), fill=255)
        m = np.asarray(mask, dtype=np.float32) * np.float32(rng.uniform(15.0, 45.0) / 255.0)
        if rng.random() < 0.6:
            t, period = rng.uniform(0, np.pi), rng.uniform(3.0, 14.0)
            tex = (_frac((xx * np.float32(math.cos(t)) + yy * np.float32(math.sin(t))) / np.float32(period))
                   < rng.uniform(0.2, 0.5)).astype(np.float32) - np.float32(0.5)
        else:
            tex = _fractal_noise(rng, size, (size // 3,), (1.0,)) - np.float32(0.5)
        detail += m * tex
    bg = (c1 * (1 - mix) + c2 * mix) * (0.7 + 0.6 * lum) + detail[..., None]
    im = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(im)
    # Clutter: lines (wires, edges) and blobs and polygons of any palette colour, mostly muted.
    for _ in range(int(rng.integers(10, 30))):
        x0, y0 = rng.uniform(-0.1, 1.1, size=2) * size
        ang, length = rng.uniform(0, 2 * np.pi), rng.uniform(0.1, 0.8) * size
        col = _muted(rng, bg[int(np.clip(y0, 0, size - 1)), int(np.clip(x0, 0, size - 1))])
        draw.line([(x0, y0), (x0 + length * math.cos(ang), y0 + length * math.sin(ang))], fill=col,
                  width=int(rng.integers(1, 4)))
    for _ in range(int(rng.integers(6, 16))):
        cx, cy = rng.uniform(0, size, size=2)
        r = rng.uniform(6, 0.18 * size)
        col = _muted(rng, bg[int(cy), int(cx)])
        if rng.random() < 0.5:
            rx, ry = r * rng.uniform(0.4, 1.0, size=2)
            draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=col)
        else:
            draw.polygon(_random_polygon(rng, size, 6, 0.18 * size, centre=(cx, cy)), fill=col)
    return np.asarray(im, dtype=np.float32)


def _random_polygon(rng: np.random.Generator, size: int, r_min: float, r_max: float,
                    centre: tuple[float, float] | None = None) -> list[tuple[float, float]]:
    cx, cy = centre if centre is not None else tuple(rng.uniform(0, size, size=2))
    r = rng.uniform(r_min, r_max)
    n = int(rng.integers(3, 8))
    angs = np.sort(rng.uniform(0, 2 * np.pi, n))
    rads = r * rng.uniform(0.4, 1.0, n)
    return [(float(cx + q * math.cos(a)), float(cy + q * math.sin(a))) for a, q in zip(angs, rads)]


def _muted(rng: np.random.Generator, local: np.ndarray) -> tuple[int, int, int]:
    """A palette colour pulled towards the local background (clutter stays low-contrast)."""
    t = rng.uniform(0.15, 0.7)
    c = PALETTE[rng.integers(len(PALETTE))] * (1 - t) + local * t
    return tuple(int(v) for v in np.clip(c, 0, 255))


def sample_box_size(rng: np.random.Generator, bucket: str, image_size: int,
                    max_object_side: Optional[int] = None) -> tuple[int, int]:
    """Integer (w, h) whose area w*h falls in COCO's `bucket`; sides >= MIN_SIDE and <= 60% of the
    image (and <= max_object_side px when given).

    sqrt(area) is log-uniform within the bucket (small 8..32, medium 32..96, large 96..max side)
    and the aspect ratio w/h log-uniform in [1/2, 2].
    """
    max_side = int(MAX_SIDE_FRACTION * image_size)
    if max_object_side is not None:
        max_side = min(max_side, int(max_object_side))
    lo, hi = {"small": SMALL_RANGE, "medium": MEDIUM_RANGE, "large": (LARGE_MIN, float(max_side))}[bucket]
    while True:
        s = math.exp(rng.uniform(math.log(lo), math.log(hi)))
        r = math.sqrt(math.exp(rng.uniform(math.log(0.5), math.log(2.0))))
        w, h = int(round(s * r)), int(round(s / r))
        if MIN_SIDE <= min(w, h) and max(w, h) <= max_side and size_bucket(w * h) == bucket:
            return w, h


def make_image(rng: np.random.Generator, image_size: int, num_classes: int,
               objects_per_image: tuple[int, int] = (6, 10), distractors_per_image: tuple[int, int] = (1, 3),
               max_object_side: Optional[int] = None) -> tuple[np.ndarray, list[dict], dict]:
    """Draw one image.

    Returns (image uint8 [S, S, 3] RGB before JPEG coding, objects, info). Each object is a dict
    with `bbox` [x, y, w, h] integer pixels, `label` 1..K, `area` w*h, `occlusion` (fraction of
    the box hidden by boxes drawn later), `shape`. `info` holds the degradations (blur sigma,
    noise sigma, contrast, jpeg_quality) and the number of distractors and dropped placements.
    """
    S = image_size
    n_obj = int(rng.integers(objects_per_image[0], objects_per_image[1] + 1))
    n_dis = int(rng.integers(distractors_per_image[0], distractors_per_image[1] + 1))
    items = [("object", int(rng.integers(1, num_classes + 1))) for _ in range(n_obj)]
    items += [("distractor", DISTRACTOR_TEXTURES[int(rng.integers(len(DISTRACTOR_TEXTURES)))]) for _ in range(n_dis)]
    items = [items[i] for i in rng.permutation(len(items))]

    # Placement. `idmap` holds the top-most box at each pixel. A new box goes on top if every
    # annotated box below stays >= 60% visible, else under everything if it stays >= 60%
    # visible itself; a new size of the same bucket is drawn every few failed positions, so
    # crowded images do not bias the size mix against large objects.
    idmap = np.full((S, S), -1, dtype=np.int32)
    placed: list[dict] = []
    visible: list[int] = []
    depth: list[int] = []  # indices into `placed`, bottom first
    dropped = 0
    keep = 1.0 - MAX_OCCLUSION
    for what, cls in items:
        bucket = SIZE_BUCKETS[int(rng.choice(3, p=SIZE_MIX))]
        where = None
        for attempt in range(60):
            if attempt % 15 == 0:
                w, h = sample_box_size(rng, bucket, S, max_object_side)
            x, y = int(rng.integers(0, S - w + 1)), int(rng.integers(0, S - h + 1))
            region = idmap[y:y + h, x:x + w]
            lost = np.bincount(region[region >= 0].ravel(), minlength=len(placed))
            if all(p["kind"] != "object" or visible[j] - lost[j] >= keep * p["w"] * p["h"]
                   for j, p in enumerate(placed)):
                where = "top"
                break
            free = region < 0
            if int(free.sum()) >= keep * w * h:
                where = "bottom"
                break
        if where is None:
            dropped += 1
            continue
        k = len(placed)
        if where == "top":
            for j in np.flatnonzero(lost):
                visible[j] -= int(lost[j])
            region[...] = k
            visible.append(w * h)
            depth.append(k)
        else:
            region[free] = k
            visible.append(int(free.sum()))
            depth.insert(0, k)
        placed.append({"kind": what, "cls": cls, "x": x, "y": y, "w": w, "h": h,
                       "shape": SHAPES[int(rng.integers(len(SHAPES)))]})

    canvas = _background(rng, S)
    for p in (placed[j] for j in depth):
        kind = PATTERNS[p["cls"] - 1] if p["kind"] == "object" else p["cls"]
        premult, alpha = render_object(kind, p["shape"], p["w"], p["h"], rng)
        sl = canvas[p["y"]:p["y"] + p["h"], p["x"]:p["x"] + p["w"]]
        sl *= 1.0 - alpha[..., None]
        sl += premult

    # Degradations: global contrast/brightness, blur, sensor noise (JPEG happens on saving).
    contrast, brightness = rng.uniform(0.75, 1.1), rng.uniform(-20, 20)
    canvas = (canvas - 128.0) * contrast + 128.0 + brightness
    img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), mode="RGB")
    blur = float(rng.uniform(*BLUR_SIGMA))
    if blur >= 0.3:
        img = img.filter(ImageFilter.GaussianBlur(blur))
    noise = float(rng.uniform(1.0, 6.0))
    arr = np.asarray(img, dtype=np.float32) + rng.standard_normal((S, S, 3), dtype=np.float32) * np.float32(noise)
    arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    quality = int(rng.integers(55, 96))

    objects = []
    for j, p in enumerate(placed):
        if p["kind"] != "object":
            continue
        area = p["w"] * p["h"]
        objects.append({"bbox": [p["x"], p["y"], p["w"], p["h"]], "label": p["cls"], "area": float(area),
                        "occlusion": round(1.0 - visible[j] / area, 4), "shape": p["shape"]})
    info = {"blur_sigma": round(blur if blur >= 0.3 else 0.0, 4), "noise_sigma": round(noise, 4),
            "contrast": round(float(contrast), 4), "jpeg_quality": quality,
            "distractors": sum(p["kind"] == "distractor" for p in placed), "dropped": dropped}
    return arr, objects, info


def _make_one(job: tuple) -> tuple[list[dict], dict]:
    """Worker: draw image `index` of `split` and save it as JPEG. Module-level so it pickles."""
    seed, split, index, image_dir, file_name, size, num_classes, obj_range, dis_range, max_side = job
    arr, objects, info = make_image(image_rng(seed, split, index), size, num_classes, obj_range, dis_range, max_side)
    Image.fromarray(arr, mode="RGB").save(Path(image_dir) / file_name, format="JPEG", quality=info["jpeg_quality"])
    return objects, info


# ---------------------------------------------------------------------------------------------
# The stage


def _check_out(out: Path, overwrite: bool) -> bool:
    """Refuse to clobber a folder that is neither empty nor a previous synth output. True if `out` exists."""
    if out.exists() and not out.is_dir():
        raise InputError(f"output path {out} exists and is not a folder")
    if not out.is_dir():
        return False
    resolved = out.resolve()
    for keep in (Path.cwd().resolve(), Path.home().resolve()):
        if resolved == keep or resolved in keep.parents:
            raise InputError(f"refusing to replace {out}: it holds the current or home folder; choose a new --out")
    if not any(out.iterdir()) or overwrite:
        return True
    manifest = out / MANIFEST
    if manifest.is_file():
        try:
            if read_json(manifest, "manifest").get("stage") == STAGE:
                return True
        except (InputError, AttributeError):
            pass
    raise InputError(f"output folder {out} is not empty and is not a previous `sodtool data synth` output; "
                     f"pass --overwrite to replace it")


def _split_metrics(objects: list[dict], infos: list[dict], names: list[str]) -> dict:
    sizes = {b: 0 for b in SIZE_BUCKETS}
    per_class = {n: 0 for n in names}
    for o in objects:
        sizes[size_bucket(o["area"])] += 1
        per_class[names[o["label"] - 1]] += 1
    n = max(len(objects), 1)
    return {
        "images": len(infos),
        "objects": len(objects),
        "objects_per_image": round(len(objects) / max(len(infos), 1), 3),
        "distractors": sum(i["distractors"] for i in infos),
        "dropped_placements": sum(i["dropped"] for i in infos),
        "sizes": sizes,
        "size_fractions": {b: round(c / n, 4) for b, c in sizes.items()},
        "occluded_objects": sum(o["occlusion"] > 0 for o in objects),
        "mean_occlusion_of_occluded": round(float(np.mean([o["occlusion"] for o in objects if o["occlusion"] > 0]))
                                            if any(o["occlusion"] > 0 for o in objects) else 0.0, 4),
        "per_class": per_class,
    }


def synthesize(cfg: SynthConfig) -> dict:
    """Write the synthetic benchmark (layout in the module docstring) and return its metrics.

    Metrics: per split (`train`, `val`, `minival`) images, objects, distractors, size-bucket counts and
    fractions, per-class counts, occlusion; plus `wall_time_s` and `images_per_s`.
    """
    timer = Timer()
    cfg = resolve_config(cfg)
    out = Path(cfg.out)
    _check_out(out, cfg.overwrite)
    check_output(out, "folder", finished=False)  # path kind, permissions; leftovers of killed runs go
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(out)
    if tmp.exists():
        shutil.rmtree(tmp)
    cats = categories(cfg.classes)
    names = [c["name"] for c in cats]
    counts = {"train": cfg.train_images, "val": cfg.val_images, "minival": cfg.minival_images}
    total = sum(counts.values())
    log(f"synthesising {total} images ({cfg.train_images} train, {cfg.val_images} val, {cfg.minival_images} minival, "
        f"{cfg.image_size}x{cfg.image_size}, {cfg.classes} classes, seed {cfg.seed}) into {out}")
    metrics: dict = {"splits": {}}
    pool = None
    try:
        if cfg.workers > 1:
            import multiprocessing

            pool = multiprocessing.get_context().Pool(cfg.workers)
        with make_progress() as progress:
            task = progress.add_task("synth", total=total, info="")
            for split in SPLITS:
                image_dir = tmp / "images" / split
                image_dir.mkdir(parents=True)
                jobs = []
                images = []
                for i in range(counts[split]):
                    image_id = SPLIT_ID_OFFSET[split] + i + 1
                    file_name = f"{image_id:08d}.jpg"
                    images.append({"id": image_id, "file_name": file_name, "width": cfg.image_size,
                                   "height": cfg.image_size})
                    jobs.append((cfg.seed, split, i, str(image_dir), file_name, cfg.image_size, cfg.classes,
                                 cfg.objects_per_image, cfg.distractors_per_image, cfg.max_object_side))
                results = pool.imap(_make_one, jobs, chunksize=4) if pool else map(_make_one, jobs)
                annotations, all_objects, infos = [], [], []
                for image, (objects, info) in zip(images, results):
                    image.update({k: info[k] for k in ("blur_sigma", "noise_sigma", "contrast", "jpeg_quality")})
                    for o in objects:
                        annotations.append({"id": len(annotations) + 1, "image_id": image["id"],
                                            "category_id": o["label"], "bbox": o["bbox"], "area": o["area"],
                                            "iscrowd": 0, "occlusion": o["occlusion"], "shape": o["shape"]})
                    all_objects += objects
                    infos.append(info)
                    progress.update(task, advance=1, info=split)
                coco = {
                    "info": {"description": "sodtool synthetic small-object benchmark", "version": __version__,
                             "split": split, "seed": cfg.seed, "preset": cfg.preset},
                    "licenses": [],
                    "images": images,
                    "annotations": annotations,
                    "categories": cats,
                }
                write_json(tmp / "annotations" / f"instances_{split}.json", coco, indent=None)
                metrics["splits"][split] = _split_metrics(all_objects, infos, names)
        metrics["wall_time_s"] = round(timer.elapsed, 3)
        metrics["images_per_s"] = round(total / max(timer.elapsed, 1e-9), 2)
        write_manifest(tmp, STAGE, cfg, inputs={}, metrics=metrics, seed=cfg.seed, device="cpu",
                       wall_time_s=timer.elapsed)
        swap_into(tmp, out)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)

    rows = []
    for split, m in metrics["splits"].items():
        f = m["size_fractions"]
        rows.append([split, m["images"], m["objects"], f"{f['small']:.1%}", f"{f['medium']:.1%}", f"{f['large']:.1%}",
                     m["distractors"], m["occluded_objects"]])
    print_table(f"synthetic benchmark {out} ({metrics['wall_time_s']:.1f}s)",
                ["split", "images", "objects", "small", "medium", "large", "distractors", "occluded"], rows)
    print_table("objects per class", ["class"] + list(SPLITS),
                [[n] + [metrics["splits"][s]["per_class"][n] for s in SPLITS] for n in names])
    return metrics


__all__ = ["SynthConfig", "synthesize", "resolve_config", "make_image", "render_object", "sample_box_size",
           "image_rng", "categories", "PATTERNS", "PRESETS", "STAGE"]
