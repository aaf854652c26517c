"""`sodtool crop-rois`: ROIs of a split (from a detector or its detections), sampled and cropped into an HR store.

Train mode (Fast R-CNN sampling, per image, seeded by (seed, image id) so shards reproduce an
unsharded run): the detector's ROIs (up to `max_rois`, default 300, at score >= `score_thresh`,
default 0.01) are matched to the ground truth with torchvision's box_iou. A ROI is positive
(label = class of its best-matching ground truth) at IoU >= fg_iou (0.5) and background (label
0) for IoU in [bg_low, fg_iou) (bg_low 0.1 default); ROIs below bg_low are not used. Every
ground-truth box is added `gt_jitters` times (default 2), jittered (centre shift N(0, 0.08) of
its size, log-scale N(0, 0.1)) and kept only at IoU >= `jitter_iou` (0.7) with it. Positives:
all jittered ground truth, plus detector positives up to round(fg_fraction * rois_per_image)
(16 of 64) in all. Backgrounds: up to max(rois_per_image - positives, 3 * positives) (for
fg_fraction 0.25), so an image yields at least rois_per_image rows when it has the ROIs, and one
positive in four once it has enough positives; images crowded with objects get more rows.

Test mode: the detector's top `max_rois` (100, the paper's protocol) detections per image at
score >= `score_thresh` (default 0.05), scores and classes kept, each matched to the ground
truth for analysis (label = class at IoU >= fg_iou, else 0).

Ground-truth-only mode (`gt_only`, train mode, no detector; e.g. SR training crops cut from
real photos): the ROIs are the jittered ground truth (as above, `gt_jitters` copies per box at
IoU >= `jitter_iou`) plus random background boxes, as many as train mode would take
(max(rois_per_image - positives, 3 * positives) for fg_fraction 0.25). A background box has the
size of a random ground-truth box of the image, each side scaled by exp(N(0, 0.5)) (capped at
the image's), at a uniform position inside the image, and is kept only at IoU < fg_iou with
every ground-truth box (label 0, target zeros); an image crowded so that few such boxes fit
gets fewer, an image without ground truth none (no rows). Backgrounds have `source` 2 (random
box); `score` and `det_label` are 0 on every row; the store's `detector` attribute is
{"family": "ground truth", "kind": "ground-truth", ...}.

In both modes: `iou` is the IoU with the best-overlapping ground truth and `gt_box` that box
(zeros when no ground truth overlaps), `target` = boxes.encode(roi, gt_box) for positives
(computed in float64 from the stored float32 boxes) and zeros for backgrounds.

Crop geometry: `boxes.square_windows(roi, context)` (side = context * max(w, h), context 1.5),
resampled to S x S (S = hr_size, 128) by `crop_windows`. Outside the image the picture is
extended with ZEROS (black): the network sees where the image ends, as Fast R-CNN's padded
batches do. Resampling is bilinear at each output pixel's centre (grid_sample, all ROIs of an
image in a few batched calls); a window larger than S is first taken from an area-averaged
2^L pyramid level (so it is at most 2x the output there) and sampled at 2S then averaged 2x2,
i.e. an area filter: large objects are antialiased, not aliased as plain bilinear would do.
A window of exactly S px at integer coordinates is copied pixel for pixel. On the benchmark's
window mix (benchmarks/bench_rois.py, one thread) this ran ~2x faster than
roi_align(sampling_ratio=2, aligned=True) and ~1.4x faster than roi_align's adaptive sampling
(sampling_ratio=0, whose cost grows with the window), with the same kind of area filtering. The
filter between pyramid levels is a 2-sample box on bilinear samples: at the worst case (stripes
at the pixel period, 1.5x to 1.9x downscale) it leaves 1/2 to 1/8 of the aliasing of plain
bilinear sampling (F.interpolate's antialiased bilinear, one call per crop, does better still);
at power-of-two factors the pyramid level is the exact block mean.

Outputs: the store (atomic: built under a hidden temp name and renamed) and a sidecar
`<store>.manifest.json` (stage, resolved config, inputs with identities, metrics) written
right after it: the RUN/ folder holds several stages' files, so a folder-level manifest.json
would claim the whole folder. The store itself also records everything needed to trust it
(attributes), so a store whose sidecar is missing is still complete.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from sodtool import boxes as B
from sodtool import store as S
from sodtool.errors import InputError

MODES = ("train", "test")
FAMILIES = ("frcnn",)
# Per-mode defaults: (score_thresh, max_rois).
MODE_DEFAULTS = {"train": (0.01, 300), "test": (0.05, 100)}
# Jitter of the added ground-truth boxes: centre shift (fraction of the box side) and log-scale sigmas.
JITTER_SHIFT = 0.08
JITTER_LOG_SCALE = 0.1
JITTER_TRIES = 16
# gt_only backgrounds: candidates drawn per wanted box, and the log-scale sigma of their sides.
BG_TRIES = 8
BG_LOG_SCALE = 0.5
# Row `source` values: detector ROI, jittered ground truth, random background box (gt_only).
SOURCE_DETECTOR, SOURCE_GT, SOURCE_RANDOM = 0, 1, 2
# grid_sample calls are made over at most this many crops: small batches stay in cache (64 crops
# at 2S were 5x slower per crop than 8, from page faults on the big temporaries).
CROP_BATCH = 8


@dataclass(frozen=True)
class CropRoisConfig:
    """Options of `sodtool crop-rois` (see the module docstring for the sampling rules).

    Exactly one of detector_weights (a RUN/detector/model.pt checkpoint, run on `device`) and
    detections (a COCO results JSON, e.g. from `sodtool detect`) gives the ROIs, or neither with
    gt_only (train mode: jittered ground truth plus random backgrounds, no detector). score_thresh /
    max_rois None take the mode's default (train 0.01 / 300, test 0.05 / 100). shard "i/n"
    processes every n-th image from the i-th and writes `<out stem>.shard-i-of-n.h5`.
    """

    out: Path
    data: Path | None = None
    split: str = "train"
    ann: Path | None = None
    images: Path | None = None
    mode: str = "train"
    detector: str = "frcnn"
    detector_weights: Path | None = None
    detections: Path | None = None
    hr_size: int = 128
    context: float = 1.5
    score_thresh: float | None = None
    max_rois: int | None = None
    fg_iou: float = 0.5
    bg_low: float = 0.1
    fg_fraction: float = 0.25
    rois_per_image: int = 64
    gt_jitters: int = 2
    jitter_iou: float = 0.7
    shard: str | None = None
    seed: int = 0
    device: str = "auto"
    batch_images: int = 4
    compression: str = S.COMPRESSION
    skip_invalid: bool = False
    overwrite: bool = False
    gt_only: bool = False


# --------------------------------------------------------------------------------------------
# Crop geometry


def crop_windows(image: np.ndarray | torch.Tensor, windows: torch.Tensor, size: int,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """Resample square `windows` [N, 4] (xyxy image pixels, may leave the image) of `image` to uint8 [N, 3, size, size].

    `image` is RGB uint8 [H, W, 3] (numpy or tensor) or a float/uint8 tensor [3, H, W]; the work
    happens on `device` (default: the image tensor's), and so does the result. Pixel i spans [i, i+1) (its centre is i + 0.5). The
    image is extended with zeros outside. Windows up to `size` px: bilinear at each output
    pixel's centre (exact copy for a size-px window at integer coordinates). Larger windows:
    the 2^L area-averaged pyramid level where the window is in [size, 2 size) px, sampled at
    2 size and averaged 2x2 (an area filter, no aliasing); a 2^L * size window at multiples of
    2^L is the exact 2^L x 2^L block mean.
    """
    if isinstance(image, np.ndarray):
        if not (image.flags.writeable and image.flags.c_contiguous):
            image = image.copy()  # PIL's arrays are read-only; torch wants a writable buffer
        image = torch.from_numpy(image)
    if image.ndim == 3 and image.shape[-1] == 3 and image.shape[0] != 3:
        image = image.permute(2, 0, 1)
    x = image.to(device=device, dtype=torch.float32)[None]  # [1, 3, H, W]
    dev = x.device
    n = windows.shape[0]
    out = torch.empty((n, 3, size, size), dtype=torch.uint8, device=dev)
    if n == 0:
        return out
    win = windows.to(torch.float64).cpu()
    side = torch.maximum(win[:, 2] - win[:, 0], win[:, 3] - win[:, 1])
    # Level L: the window is in [size, 2 size) px on the 2^L pyramid level (L = 0 when smaller).
    level = torch.floor(torch.log2((side / size).clamp(min=1.0)) + 1e-9).long().clamp(min=0)
    scaled_side = side / torch.pow(2.0, level.double())
    supersample = scaled_side > size * (1 + 1e-6)
    pyramid = [x]
    for lv in range(int(level.max()) + 1):
        while len(pyramid) <= lv:
            prev = pyramid[-1]
            h, w = prev.shape[-2:]
            # Zero-pad odd sides: the level then is the area average of the zero-extended image.
            pyramid.append(F.avg_pool2d(F.pad(prev, (0, w % 2, 0, h % 2)), 2))
        for ss in (False, True):
            idx = torch.nonzero((level == lv) & (supersample == ss)).flatten()
            for start in range(0, len(idx), CROP_BATCH):
                part = idx[start:start + CROP_BATCH]
                crops = _sample(pyramid[lv], win[part] / 2.0**lv, size * 2 if ss else size)
                if ss:  # 2x2 mean; strided adds beat avg_pool2d on CPU
                    crops = (crops[:, :, 0::2, 0::2] + crops[:, :, 1::2, 0::2] + crops[:, :, 0::2, 1::2]
                             + crops[:, :, 1::2, 1::2]).mul_(0.25)
                out[part.to(dev)] = crops.round_().clamp_(0, 255).to(torch.uint8)
    return out


def _sample(img: torch.Tensor, win: torch.Tensor, n: int) -> torch.Tensor:
    """Bilinear samples of `img` [1, 3, H, W] at the n x n pixel centres of each window [K, 4] (float64)."""
    h, w = img.shape[-2:]
    t = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    # align_corners=False: -1 / +1 are the outer edges of the image, pixel i's centre is i + 0.5.
    gx = ((win[:, 0:1] + t[None] * (win[:, 2:3] - win[:, 0:1])) * (2.0 / w) - 1.0).to(torch.float32)
    gy = ((win[:, 1:2] + t[None] * (win[:, 3:4] - win[:, 1:2])) * (2.0 / h) - 1.0).to(torch.float32)
    k = win.shape[0]
    grid = torch.empty((k, n, n, 2), dtype=torch.float32)
    grid[..., 0] = gx[:, None, :]
    grid[..., 1] = gy[:, :, None]
    return F.grid_sample(img.expand(k, -1, -1, -1), grid.to(img.device), mode="bilinear", padding_mode="zeros",
                         align_corners=False)


# --------------------------------------------------------------------------------------------
# Matching and sampling


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix [len(a), len(b)] of xyxy boxes (torchvision.ops.box_iou, float64)."""
    from torchvision.ops import box_iou as tv_box_iou

    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)), dtype=np.float64)
    return tv_box_iou(torch.from_numpy(np.asarray(a, np.float64)), torch.from_numpy(np.asarray(b, np.float64))).numpy()


def match(rois: np.ndarray, gt_boxes: np.ndarray, gt_labels: np.ndarray, fg_iou: float) -> dict[str, np.ndarray]:
    """Match float32 ROIs [R, 4] to ground truth [G, 4] (xyxy): iou [R], gt_box [R, 4], label [R], target [R, 4].

    label = class of the best-overlapping ground truth where iou >= fg_iou, else 0; gt_box is
    that ground truth wherever iou > 0; target = encode(roi, gt_box) for label > 0, else zeros.
    """
    r = len(rois)
    rois = np.asarray(rois, np.float32)
    iou_m = box_iou(rois, gt_boxes)
    if iou_m.shape[1]:
        best = iou_m.argmax(axis=1)
        iou = iou_m[np.arange(r), best]
    else:
        best = np.zeros(r, dtype=np.int64)
        iou = np.zeros(r, dtype=np.float64)
    has_gt = iou > 0
    gt_box = np.zeros((r, 4), np.float32)
    if iou_m.shape[1]:
        gt_box[has_gt] = gt_boxes[best[has_gt]]
    label = np.zeros(r, np.int64)
    pos = iou >= fg_iou
    if iou_m.shape[1]:
        label[pos] = gt_labels[best[pos]]
    target = np.zeros((r, 4), np.float32)
    if pos.any():
        # float64 from the stored float32 boxes: decoding the stored target gives the stored gt_box.
        target[pos] = B.encode(torch.from_numpy(rois[pos].astype(np.float64)),
                               torch.from_numpy(gt_box[pos].astype(np.float64))).numpy()
    return {"iou": iou.astype(np.float32), "gt_box": gt_box, "label": label, "target": target}


def jitter_boxes(gt: np.ndarray, n: int, rng: np.random.Generator, width: int, height: int,
                 min_iou: float = 0.7) -> np.ndarray:
    """`n` jittered copies of each ground-truth box [G, 4] -> [G * n, 4] (GT-major), clipped to the image.

    Each copy has IoU >= min_iou with its box; where max(JITTER_TRIES, 4n) draws give fewer than
    n such copies, the box itself (clipped) fills in.
    """
    g = len(gt)
    if g == 0 or n == 0:
        return np.zeros((0, 4), np.float32)
    gt = np.asarray(gt, np.float64)
    w = gt[:, 2] - gt[:, 0]
    h = gt[:, 3] - gt[:, 1]
    cx = gt[:, 0] + 0.5 * w
    cy = gt[:, 1] + 0.5 * h
    t = max(JITTER_TRIES, 4 * n)
    d = rng.standard_normal((g, t, 4))
    ncx = cx[:, None] + d[..., 0] * JITTER_SHIFT * w[:, None]
    ncy = cy[:, None] + d[..., 1] * JITTER_SHIFT * h[:, None]
    nw = w[:, None] * np.exp(d[..., 2] * JITTER_LOG_SCALE)
    nh = h[:, None] * np.exp(d[..., 3] * JITTER_LOG_SCALE)
    cand = np.stack([ncx - nw / 2, ncy - nh / 2, ncx + nw / 2, ncy + nh / 2], axis=-1)
    cand[..., 0::2] = cand[..., 0::2].clip(0, width)
    cand[..., 1::2] = cand[..., 1::2].clip(0, height)
    cand = cand.astype(np.float32).astype(np.float64)  # judge the boxes that will be stored
    ix = (np.minimum(cand[..., 2], gt[:, None, 2]) - np.maximum(cand[..., 0], gt[:, None, 0])).clip(min=0)
    iy = (np.minimum(cand[..., 3], gt[:, None, 3]) - np.maximum(cand[..., 1], gt[:, None, 1])).clip(min=0)
    inter = ix * iy
    area_c = (cand[..., 2] - cand[..., 0]) * (cand[..., 3] - cand[..., 1])
    iou = inter / (area_c + (w * h)[:, None] - inter)
    ok = iou >= min_iou
    # The first n acceptable draws of each box (stable order), the clipped box itself after them.
    fallback = np.stack([gt[:, 0].clip(0, width), gt[:, 1].clip(0, height),
                         gt[:, 2].clip(0, width), gt[:, 3].clip(0, height)], axis=1)
    order = np.argsort(~ok, axis=1, kind="stable")[:, :n]
    picked = np.take_along_axis(cand, order[..., None], axis=1)
    good = np.take_along_axis(ok, order, axis=1)
    picked = np.where(good[..., None], picked, fallback[:, None, :])
    return picked.reshape(g * n, 4).astype(np.float32)


def image_rng(seed: int, image_id: int) -> np.random.Generator:
    """The sampling generator of one image: a function of (seed, image id) only, so shards agree."""
    return np.random.default_rng([seed, image_id & 0xFFFFFFFF, image_id >> 32 & 0xFFFFFFFF])


def sample_train(det: dict, gt: dict, width: int, height: int, cfg: CropRoisConfig, rng: np.random.Generator) -> dict:
    """Fast R-CNN sampling of one image (rules in the module docstring).

    det: boxes float32 [D, 4] xyxy (clipped, score-descending), scores [D], labels [D];
    gt: boxes [G, 4], labels [G]. Returns per-row arrays roi, label, target, gt_box, iou,
    score, det_label, source: the kept detector ROIs in detector order, then the jittered
    ground truth in ground-truth order.
    """
    m = match(det["boxes"], gt["boxes"], gt["labels"], cfg.fg_iou)
    fg = np.flatnonzero(m["label"] > 0)
    bg = np.flatnonzero((m["label"] == 0) & (m["iou"] >= cfg.bg_low) & (m["iou"] < cfg.fg_iou))
    jit = jitter_boxes(gt["boxes"], cfg.gt_jitters, rng, width, height, cfg.jitter_iou)
    n_gt_rows = len(jit)
    quota = int(round(cfg.fg_fraction * cfg.rois_per_image))
    n_det_fg = min(len(fg), max(0, quota - n_gt_rows))
    n_fg = n_gt_rows + n_det_fg
    ratio_bg = int(round(n_fg * (1 - cfg.fg_fraction) / cfg.fg_fraction)) if cfg.fg_fraction > 0 else len(bg)
    n_bg = min(len(bg), max(cfg.rois_per_image - n_fg, ratio_bg))
    keep = np.sort(np.concatenate([rng.choice(fg, n_det_fg, replace=False) if n_det_fg else fg[:0],
                                   rng.choice(bg, n_bg, replace=False) if n_bg else bg[:0]]))
    gm = match(jit, gt["boxes"], gt["labels"], cfg.fg_iou)
    rows = {
        "roi": np.concatenate([det["boxes"][keep], jit]).astype(np.float32),
        "score": np.concatenate([det["scores"][keep], np.zeros(n_gt_rows, np.float32)]).astype(np.float32),
        "det_label": np.concatenate([det["labels"][keep], np.zeros(n_gt_rows, np.int64)]).astype(np.int64),
        "source": np.concatenate([np.zeros(len(keep), np.uint8), np.ones(n_gt_rows, np.uint8)]),
    }
    for k in ("label", "target", "gt_box", "iou"):
        rows[k] = np.concatenate([m[k][keep], gm[k]])
    return rows


def rows_test(det: dict, gt: dict, cfg: CropRoisConfig) -> dict:
    """Test mode: every given detection (already the top max_rois), matched for analysis."""
    m = match(det["boxes"], gt["boxes"], gt["labels"], cfg.fg_iou)
    return {"roi": det["boxes"].astype(np.float32), "score": det["scores"].astype(np.float32),
            "det_label": det["labels"].astype(np.int64), "source": np.zeros(len(det["boxes"]), np.uint8), **m}


def random_backgrounds(gt: np.ndarray, n: int, rng: np.random.Generator, width: int, height: int,
                       max_iou: float) -> np.ndarray:
    """Up to `n` random boxes [n', 4] (xyxy float32, inside the image) with IoU < max_iou with every
    ground-truth box [G, 4].

    Each has the size of a random ground-truth box, each side scaled by exp(N(0, BG_LOG_SCALE))
    and capped at the image's (at least 1 px), at a uniform position inside the image: the
    objects' scales, as a detector's ROIs have. BG_TRIES * n candidates are drawn at once and the
    first n acceptable ones kept, so a crowded image may get fewer; no ground truth, no boxes.
    """
    gt = np.asarray(gt, np.float64).reshape(-1, 4)
    if n <= 0 or len(gt) == 0:
        return np.zeros((0, 4), np.float32)
    t = BG_TRIES * n
    k = rng.integers(0, len(gt), t)
    scale = np.exp(rng.standard_normal((t, 2)) * BG_LOG_SCALE)
    bw = np.clip((gt[k, 2] - gt[k, 0]) * scale[:, 0], 1.0, width)
    bh = np.clip((gt[k, 3] - gt[k, 1]) * scale[:, 1], 1.0, height)
    x1 = rng.random(t) * (width - bw)
    y1 = rng.random(t) * (height - bh)
    cand = np.stack([x1, y1, x1 + bw, y1 + bh], axis=1).astype(np.float32)  # judge the boxes that will be stored
    ok = np.flatnonzero(box_iou(cand, gt).max(axis=1) < max_iou)[:n]
    return cand[ok]


def sample_gt_only(gt: dict, width: int, height: int, cfg: CropRoisConfig, rng: np.random.Generator) -> dict:
    """Ground-truth-only sampling of one image (gt_only; rules in the module docstring).

    gt: boxes float32 [G, 4] xyxy, labels [G]. Returns per-row arrays like `sample_train`: the
    jittered ground truth in ground-truth order (source 1), then the random backgrounds (source 2).
    """
    jit = jitter_boxes(gt["boxes"], cfg.gt_jitters, rng, width, height, cfg.jitter_iou)
    n_fg = len(jit)
    ratio_bg = int(round(n_fg * (1 - cfg.fg_fraction) / cfg.fg_fraction))
    bg = random_backgrounds(gt["boxes"], max(cfg.rois_per_image - n_fg, ratio_bg), rng, width, height, cfg.fg_iou)
    roi = np.concatenate([jit, bg]).astype(np.float32)
    n = len(roi)
    return {"roi": roi, "score": np.zeros(n, np.float32), "det_label": np.zeros(n, np.int64),
            "source": np.concatenate([np.full(n_fg, SOURCE_GT, np.uint8), np.full(len(bg), SOURCE_RANDOM, np.uint8)]),
            **match(roi, gt["boxes"], gt["labels"], cfg.fg_iou)}


def prepare_detections(boxes, scores, labels, width: int, height: int, score_thresh: float, max_rois: int) -> dict:
    """Clip to the image, drop zero-area boxes and scores below the threshold, keep the top max_rois by score."""
    boxes = torch.as_tensor(np.asarray(boxes, np.float32)).reshape(-1, 4)
    scores = np.asarray(scores, np.float32).reshape(-1)
    labels = np.asarray(labels, np.int64).reshape(-1)
    boxes = B.clip(boxes, width, height).numpy()
    ok = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]) & (scores >= score_thresh)
    boxes, scores, labels = boxes[ok], scores[ok], labels[ok]
    order = np.argsort(-scores, kind="stable")[:max_rois]
    return {"boxes": boxes[order], "scores": scores[order], "labels": labels[order]}


# --------------------------------------------------------------------------------------------
# The stage


def parse_shard(shard: str | None) -> tuple[int, int]:
    if shard is None:
        return 0, 1
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(shard))
    if not m or not (int(m.group(2)) >= 1 and 0 <= int(m.group(1)) < int(m.group(2))):
        raise InputError(f"--shard must be i/n with 0 <= i < n (e.g. 0/4), got '{shard}'")
    return int(m.group(1)), int(m.group(2))


def shard_path(out: Path, i: int, n: int) -> Path:
    """`rois_train.h5` -> `rois_train.shard-i-of-n.h5` beside it."""
    out = Path(out)
    suffix = out.suffix or ".h5"
    return out.with_name(f"{out.name[:-len(out.suffix)] if out.suffix else out.name}.shard-{i}-of-{n}{suffix}")


def manifest_path(store_path: Path) -> Path:
    """rois_train.h5 -> rois_train.h5.manifest.json."""
    from sodtool.artefacts import sidecar_manifest_path

    return sidecar_manifest_path(store_path)


def resolve_config(cfg: CropRoisConfig) -> CropRoisConfig:
    """Fill mode defaults and check every option; InputError names the option at fault."""
    if cfg.mode not in MODES:
        raise InputError(f"--mode must be train or test, got '{cfg.mode}'")
    if cfg.detector not in FAMILIES:
        raise InputError(f"--detector '{cfg.detector}' is not supported (the only family is: {', '.join(FAMILIES)})")
    if cfg.gt_only:
        if cfg.mode != "train":
            raise InputError(f"--gt-only samples training ROIs (--mode train); --mode {cfg.mode} needs a detector's "
                             "top detections (--detector-weights or --detections)")
        if cfg.detector_weights is not None or cfg.detections is not None:
            given = "--detector-weights" if cfg.detector_weights is not None else "--detections"
            raise InputError(f"--gt-only takes its ROIs from the ground truth: drop {given} (or drop --gt-only)")
    elif (cfg.detector_weights is None) == (cfg.detections is None):
        raise InputError("give exactly one of --detector-weights (a detector checkpoint) and --detections (a COCO "
                         "results JSON), or --gt-only (train mode: jittered ground truth and random backgrounds)")
    if cfg.detections is not None and not Path(cfg.detections).is_file():
        raise InputError(f"--detections file not found: {cfg.detections}")
    weights = cfg.detector_weights
    if weights is not None:
        weights = Path(weights)
        if weights.is_dir():  # a run folder: its model.pt, as `sodtool detect` accepts
            found = [p for p in (weights / "model.pt", weights / "detector" / "model.pt") if p.is_file()]
            if not found:
                raise InputError(f"--detector-weights folder {weights} holds no model.pt (did `sodtool train detector` finish?)")
            weights = found[0]
        elif not weights.is_file():
            raise InputError(f"--detector-weights file not found: {weights}")
    thresh, max_rois = MODE_DEFAULTS[cfg.mode]
    thresh = thresh if cfg.score_thresh is None else cfg.score_thresh
    max_rois = max_rois if cfg.max_rois is None else cfg.max_rois
    checks = [
        (cfg.hr_size >= 4 and cfg.hr_size % 4 == 0, f"--hr-size must be a positive multiple of 4, got {cfg.hr_size}"),
        (cfg.context >= 1.0 and math.isfinite(cfg.context), f"--context must be >= 1, got {cfg.context}"),
        (0.0 <= thresh <= 1.0, f"--score-thresh must be in [0, 1], got {thresh}"),
        (max_rois >= 1, f"--max-rois must be >= 1, got {max_rois}"),
        (0.0 < cfg.fg_iou <= 1.0, f"--fg-iou must be in (0, 1], got {cfg.fg_iou}"),
        (0.0 <= cfg.bg_low < cfg.fg_iou, f"--bg-low must be in [0, fg_iou), got {cfg.bg_low}"),
        (0.0 < cfg.fg_fraction <= 1.0, f"--fg-fraction must be in (0, 1], got {cfg.fg_fraction}"),
        (cfg.rois_per_image >= 1, f"--rois-per-image must be >= 1, got {cfg.rois_per_image}"),
        (cfg.gt_jitters >= 0, f"--gt-jitters must be >= 0, got {cfg.gt_jitters}"),
        (0.0 < cfg.jitter_iou <= 1.0, f"--jitter-iou must be in (0, 1], got {cfg.jitter_iou}"),
        (cfg.seed >= 0, f"--seed must be non-negative, got {cfg.seed}"),
        (cfg.batch_images >= 1, f"--batch-images must be >= 1, got {cfg.batch_images}"),
        (cfg.compression in S.COMPRESSIONS, f"--compression must be one of {', '.join(S.COMPRESSIONS)}, got '{cfg.compression}'"),
    ]
    for ok, msg in checks:
        if not ok:
            raise InputError(msg)
    parse_shard(cfg.shard)
    return dataclasses.replace(cfg, out=Path(cfg.out), score_thresh=float(thresh), max_rois=int(max_rois),
                               detector_weights=weights)


def _check_out(path: Path, overwrite: bool) -> None:
    if path.is_dir():
        raise InputError(f"output path {path} is a folder, expected a .h5 file name")
    if path.exists() and not overwrite:
        raise InputError(f"{path} already exists (pass --overwrite to replace it once the new store is complete)")


class _JsonDetections:
    """Detections read from a COCO results JSON, by image id."""

    def __init__(self, path: Path, split) -> None:
        from sodtool.artefacts import read_json
        from sodtool.evaluate import check_results

        results = check_results(split.coco, read_json(path, "detections file"), path)
        cats = split.categories
        by_image: dict[int, list[dict]] = {}
        for r in results:
            by_image.setdefault(r["image_id"], []).append(r)
        self.by_image = by_image
        self.cats = cats
        self.identity = {"family": "frcnn", "kind": "detections-json", "file": _identity(path)}

    def __call__(self, image_ids: list[int], images: list[np.ndarray], thresh: float, max_rois: int) -> list[dict]:
        out = []
        for iid in image_ids:
            rs = self.by_image.get(iid, [])
            boxes = np.array([[b[0], b[1], b[0] + b[2], b[1] + b[3]] for b in (r["bbox"] for r in rs)],
                             np.float32).reshape(-1, 4)
            out.append({"boxes": boxes, "scores": np.array([r["score"] for r in rs], np.float32),
                        "labels": np.array([self.cats.to_label(r["category_id"]) for r in rs], np.int64)})
        return out


class _GroundTruthOnly:
    """The ROI source of gt_only: no detector; `sample_gt_only` makes the rows from the ground truth."""

    def __init__(self, ann: Path) -> None:
        self.identity = {"family": "ground truth", "kind": "ground-truth",
                         "rois": "jittered ground truth + random backgrounds (IoU < fg_iou)", "file": _identity(ann)}

    def __call__(self, image_ids: list[int], images: list[np.ndarray], thresh: float, max_rois: int) -> list[None]:
        return [None] * len(image_ids)


class _ModelDetections:
    """Detections from a detector checkpoint, run with sodtool.detector.predict."""

    def __init__(self, path: Path, device, categories) -> None:
        from sodtool.detector import load_detector

        self.det = load_detector(path, device, categories=categories)
        self.det.categories.check_same(categories, f"detector {path} vs the dataset")
        self.identity = {"family": "frcnn", "kind": "checkpoint", "arch": self.det.arch,
                         "file": _identity(path), "identity": self.det.identity}

    def __call__(self, image_ids: list[int], images: list[np.ndarray], thresh: float, max_rois: int) -> list[dict]:
        from sodtool.detector import predict

        preds = predict(self.det, images, score_thresh=thresh, max_per_image=max_rois)
        return [{k: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)) for k, v in p.items()}
                for p in preds]


def _identity(path: Path) -> dict:
    from sodtool.artefacts import file_identity

    return file_identity(path)


def crop_rois(cfg: CropRoisConfig) -> dict:
    """Sample (train) or take (test) ROIs of every image of a split and crop them into an HR store.

    Writes `cfg.out` (or its shard file) and its sidecar manifest; returns the metrics.
    """
    from sodtool.artefacts import Timer, config_dict
    from sodtool.coco import load_split, resolve_split
    from sodtool.console import log, summary_table, track
    from sodtool.device import device_name, resolve_device

    timer = Timer()
    cfg = resolve_config(cfg)
    shard_i, shard_n = parse_shard(cfg.shard)
    out = shard_path(cfg.out, shard_i, shard_n) if cfg.shard is not None else cfg.out
    _check_out(out, cfg.overwrite)
    paths = resolve_split(cfg.data, cfg.split, cfg.ann, cfg.images)
    split = load_split(paths, skip_invalid=cfg.skip_invalid)
    dev = resolve_device(cfg.device)
    if cfg.gt_only:
        source = _GroundTruthOnly(paths.ann)
    elif cfg.detections is not None:
        source = _JsonDetections(Path(cfg.detections), split)
    else:
        source = _ModelDetections(Path(cfg.detector_weights), dev, split.categories)
    image_ids = split.image_ids[shard_i::shard_n]
    attrs = {
        "categories": split.categories.to_json(),
        "hr_size": cfg.hr_size,
        "context": cfg.context,
        "mode": cfg.mode,
        "split": cfg.split,
        "detector": source.identity,
        "annotations": _identity(paths.ann),
        "image_dir": str(paths.images),
        "padding": "zero",
        "crop_method": "bilinear grid_sample; windows > hr_size: area pyramid + 2x2 supersampling",
        "config": config_dict(cfg),
        "num_images": len(image_ids),
    }
    if cfg.shard is not None:
        attrs["shard"] = f"{shard_i}/{shard_n}"
    log(f"crop-rois: {len(image_ids)} images of {paths.ann} ({cfg.mode} mode{', ground truth only' if cfg.gt_only else ''})"
        f" -> {out}")
    counts = {"rows": 0, "positives": 0, "backgrounds": 0, "gt_rows": 0, "images_without_rows": 0}
    iou_pos_sum = 0.0
    crop_s = detect_s = 0.0
    with S.StoreWriter(out, schema=S.SCHEMA, fields=S.hr_fields(cfg.hr_size), attrs=attrs,
                       compression=cfg.compression) as writer:
        batches = [image_ids[i:i + cfg.batch_images] for i in range(0, len(image_ids), cfg.batch_images)]
        for batch_ids in track(batches, "crop-rois", total=len(batches)):
            images = [split.load_image(i) for i in batch_ids]
            t0 = Timer()
            dets = source(batch_ids, images, cfg.score_thresh, cfg.max_rois)
            detect_s += t0.elapsed
            for iid, img, d in zip(batch_ids, images, dets):
                h, w = img.shape[:2]
                t = split.targets(iid)
                gt = {"boxes": t["boxes"], "labels": t["labels"]}
                if cfg.gt_only:
                    rows = sample_gt_only(gt, w, h, cfg, image_rng(cfg.seed, iid))
                else:
                    det = prepare_detections(d["boxes"], d["scores"], d["labels"], w, h, cfg.score_thresh, cfg.max_rois)
                    if cfg.mode == "train":
                        rows = sample_train(det, gt, w, h, cfg, image_rng(cfg.seed, iid))
                    else:
                        rows = rows_test(det, gt, cfg)
                n = len(rows["roi"])
                if n == 0:
                    counts["images_without_rows"] += 1
                    continue
                t1 = Timer()
                windows = B.square_windows(torch.from_numpy(rows["roi"]), cfg.context)
                crops = crop_windows(img, windows, cfg.hr_size, device=dev).cpu()
                crop_s += t1.elapsed
                writer.append(hr=crops, window=windows.numpy().astype(np.float32),
                              image_id=np.full(n, iid, np.int64), **rows)
                counts["rows"] += n
                pos = rows["label"] > 0
                counts["positives"] += int(pos.sum())
                counts["backgrounds"] += int((~pos).sum())
                counts["gt_rows"] += int((rows["source"] == 1).sum())
                iou_pos_sum += float(rows["iou"][pos].sum())
        digest = writer.content_sha256()
    metrics = {
        "images": len(image_ids),
        **counts,
        "rows_per_image": counts["rows"] / max(1, len(image_ids)),
        "positive_fraction": counts["positives"] / max(1, counts["rows"]),
        "mean_iou_positives": iou_pos_sum / max(1, counts["positives"]),
        "crop_s": round(crop_s, 3),
        "crops_per_s": counts["rows"] / crop_s if crop_s > 0 else None,
        "detector_s": round(detect_s, 3),
        "store_bytes": out.stat().st_size,
        "content_sha256": digest,
        "wall_time_s": round(timer.elapsed, 3),
    }
    inputs = {"annotations": attrs["annotations"], "images": paths.images}
    if cfg.gt_only:
        inputs["detector"] = {k: v for k, v in source.identity.items() if k != "file"}  # "ground truth"
    else:
        det_key = "detections" if cfg.detections is not None else "detector_weights"
        inputs[det_key] = source.identity["file"]
    write_store_manifest(out, "crop-rois", cfg, inputs, metrics, seed=cfg.seed, device=device_name(dev),
                         wall_time_s=timer.elapsed)
    summary_table(f"crop-rois -> {out}", {k: v for k, v in metrics.items() if k != "content_sha256"})
    return metrics


def write_store_manifest(store_path: Path, stage: str, config: Any, inputs: dict, metrics: dict, *,
                         seed: int | None, device: str, wall_time_s: float) -> Path:
    """The sidecar `<store>.manifest.json` (artefacts.write_manifest for one file)."""
    from sodtool.artefacts import write_manifest

    store_path = Path(store_path)
    return write_manifest(store_path.parent, stage, config, inputs, metrics, seed=seed, device=device,
                          wall_time_s=wall_time_s, outputs=[store_path.name], path=manifest_path(store_path))


# --------------------------------------------------------------------------------------------
# Merging shards


# Attributes that legitimately differ between the shards of one run.
_SHARD_ATTRS = {"shard", "rows", "content_sha256", "num_images", "config"}


def merge_shards(out: str | Path, shards: Sequence[str | Path], *, overwrite: bool = False) -> dict:
    """Concatenate the shard stores of one crop-rois run into one store, in image-id order.

    The shards must be exactly 0/n .. n-1/n of one run (same schema, categories and every other
    attribute); the result equals the store an unsharded run writes (same rows, same order, same
    content_sha256). Writes `out` atomically and its sidecar manifest; returns metrics.
    """
    from sodtool.artefacts import Timer
    from sodtool.console import summary_table, track

    timer = Timer()
    out = Path(out)
    shards = [Path(p) for p in shards]
    if not shards:
        raise InputError("give the shard stores to merge")
    if any(p.resolve() == out.resolve() for p in shards if p.exists()):
        raise InputError(f"the output {out} is also one of the shards")
    _check_out(out, overwrite)
    files = [S.open_store(p) for p in shards]
    try:
        infos = []
        for p, f in zip(shards, files):
            a = {k: S.attr_str(f, k) if isinstance(f.attrs[k], (str, bytes)) else f.attrs[k] for k in f.attrs}
            if "shard" not in a:
                raise InputError(f"{p} is not a shard (no 'shard' attribute): nothing to merge")
            infos.append(a)
        ref_path, ref = shards[0], infos[0]
        for p, a in zip(shards[1:], infos[1:]):
            if a.get("categories") != ref.get("categories"):
                from sodtool.coco import CategoryMap

                CategoryMap.from_json(json.loads(ref["categories"])).check_same(
                    CategoryMap.from_json(json.loads(a["categories"])), f"shard {p} vs shard {ref_path}")
            for k in sorted((set(a) | set(ref)) - _SHARD_ATTRS):
                if _attr_differs(a.get(k), ref.get(k)):
                    raise InputError(f"shard {p} differs from shard {ref_path} in '{k}': not shards of one run")
            c1 = {k: v for k, v in json.loads(a["config"]).items() if k != "shard"}
            c0 = {k: v for k, v in json.loads(ref["config"]).items() if k != "shard"}
            if c1 != c0:
                diff = sorted(k for k in set(c0) | set(c1) if c0.get(k) != c1.get(k))
                raise InputError(f"shard {p} was made with other options than {ref_path} ({', '.join(diff)})")
        parsed = [parse_shard(a["shard"]) for a in infos]
        n = parsed[0][1]
        got = sorted(i for i, _ in parsed)
        if any(m != n for _, m in parsed) or got != list(range(n)):
            raise InputError(f"shards {[a['shard'] for a in infos]} are not exactly 0/{n} .. {n - 1}/{n}, each once")
        # Every image's rows are contiguous in its shard; merged order is by image id (the split's order).
        runs = []
        for s, f in enumerate(files):
            ids = f["image_id"][:]
            if len(ids) == 0:
                continue
            starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
            ends = np.r_[starts[1:], len(ids)]
            runs += [(int(ids[a]), s, int(a), int(b)) for a, b in zip(starts, ends)]
        runs.sort()
        dup = [r for r, q in zip(runs[1:], runs[:-1]) if r[0] == q[0]]
        if dup:
            raise InputError(f"image {dup[0][0]} has rows in two shards ({shards[dup[0][1]]}): not shards of one run")
        ref_file = files[0]
        attrs = {k: v for k, v in ref.items() if k not in _SHARD_ATTRS and k not in ("schema", "chunk_rows", "compression")}
        config = {k: v for k, v in json.loads(ref["config"]).items()}
        config["shard"] = None
        attrs["config"] = config
        attrs["num_images"] = int(sum(int(a["num_images"]) for a in infos))
        for k in ("categories", "detector", "annotations"):
            attrs[k] = json.loads(attrs[k])
        hr_size = int(ref_file["hr"].shape[-1])
        compression = ref.get("compression", S.COMPRESSION)
        fields = S.hr_fields(hr_size)
        with S.StoreWriter(out, schema=S.SCHEMA, fields=fields, attrs=attrs, compression=compression) as w:
            for _, s, a, b in track(runs, "merge", total=len(runs)):
                f = files[s]
                w.append(**{k: f[k][a:b] for k in fields})
            digest = w.content_sha256()
            rows = w.rows
    finally:
        for f in files:
            f.close()
    metrics = {"shards": len(shards), "rows": rows, "images": attrs["num_images"], "content_sha256": digest,
               "store_bytes": out.stat().st_size, "wall_time_s": round(timer.elapsed, 3)}
    write_store_manifest(out, "crop-rois-merge", {"out": str(out), "shards": [str(p) for p in shards]},
                         {f"shard_{i}": p for i, p in enumerate(shards)}, metrics, seed=config.get("seed"),
                         device="cpu", wall_time_s=timer.elapsed)
    summary_table(f"crop-rois merge -> {out}", {k: v for k, v in metrics.items() if k != "content_sha256"})
    return metrics


def _attr_differs(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return not np.array_equal(np.asarray(a), np.asarray(b))
    return a != b
