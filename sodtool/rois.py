"""ROIs: crop geometry, matching to the ground truth, Fast R-CNN sampling, and the ROI sources.

Shared by `sodtool crop-rois` (which writes the sampled crops into an HR store) and `sodtool
eval` (which crops the baseline's test ROIs itself), so both cut the same crops. The sampling
rules are spelt out in `sodtool.stages.crop_rois`; `cfg` arguments below are that stage's
`CropRoisConfig` (any object with its fields).

Crop geometry: `boxes.square_windows(roi, context)` (side = context * max(w, h), context 1.5),
resampled to S x S (S = hr_size, 128) by `crop_windows`. Outside the image the picture is
extended with ZEROS (black): the network sees where the image ends, as Fast R-CNN's padded
batches do. Resampling is bilinear at each output pixel's centre (grid_sample, all ROIs of an
image in a few batched calls); a window larger than S is first taken from an area-averaged
2^L pyramid level (so it is at most 2x the output there) and sampled at 2S then averaged 2x2,
i.e. an area filter: large objects are antialiased, not aliased as plain bilinear would do.
A window of exactly S px at integer coordinates is copied pixel for pixel. It is faster than
torchvision's roi_align with the same kind of area filtering (benchmarks/bench_rois.py;
docs/design_notes.md). The filter between pyramid levels is a 2-sample box on bilinear samples:
it leaves part of the aliasing of plain bilinear sampling at the worst case (F.interpolate's
antialiased bilinear, one call per crop, does better still); at power-of-two factors the pyramid
level is the exact block mean.

ROI sources (`JsonDetections`, `ModelDetections`, `GroundTruthOnly`): callables taking
(image ids, RGB uint8 images [H, W, 3], score threshold, max ROIs) and returning per image a
dict of numpy boxes float32 [N, 4] xyxy pixels, scores [N], labels int64 [N] in 1..K (or None
for ground-truth-only sampling), with an `identity` dict for manifests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from sodtool import boxes as B
from sodtool.artefacts import file_identity, read_json
from sodtool.coco import xywh_to_xyxy
# Crop geometry defaults (HR side in px, LR = HR / 4; window side / ROI's longer side) live in the
# torch-free config module, so that `crop-rois --help` reads them without torch.
from sodtool.configs.crop_rois import DEFAULT_CONTEXT, DEFAULT_HR_SIZE  # noqa: F401 - eval, predict read rois.DEFAULT_*
from sodtool.evaluate import check_results
from sodtool.models.detectors import load_detector, predict, predict_sliced, resolve_slicing

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
    that ground truth wherever iou > 0; target = boxes.encode_target(roi, gt_box) (relative to the
    ROI's square, what the crop shows) for label > 0, else zeros.
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
        target[pos] = B.encode_target(torch.from_numpy(rois[pos].astype(np.float64)),
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


def sample_train(det: dict, gt: dict, width: int, height: int, cfg, rng: np.random.Generator) -> dict:
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


def rows_test(det: dict, gt: dict, cfg) -> dict:
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


def sample_gt_only(gt: dict, width: int, height: int, cfg, rng: np.random.Generator) -> dict:
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


class JsonDetections:
    """Detections read from a COCO results JSON, by image id."""

    def __init__(self, path: Path, split) -> None:
        results = check_results(split.coco, read_json(path, "detections file"), path)
        cats = split.categories
        by_image: dict[int, list[dict]] = {}
        for r in results:
            by_image.setdefault(r["image_id"], []).append(r)
        self.by_image = by_image
        self.cats = cats
        self.identity = {"family": "frcnn", "kind": "detections-json", "file": file_identity(path)}

    def __call__(self, image_ids: list[int], images: list[np.ndarray], thresh: float, max_rois: int) -> list[dict]:
        out = []
        for iid in image_ids:
            rs = self.by_image.get(iid, [])
            boxes = np.array([xywh_to_xyxy(r["bbox"]) for r in rs], np.float32).reshape(-1, 4)
            out.append({"boxes": boxes, "scores": np.array([r["score"] for r in rs], np.float32),
                        "labels": np.array([self.cats.to_label(r["category_id"]) for r in rs], np.int64)})
        return out


class GroundTruthOnly:
    """The ROI source of gt_only: no detector; `sample_gt_only` makes the rows from the ground truth."""

    def __init__(self, ann: Path) -> None:
        self.identity = {"family": "ground truth", "kind": "ground-truth",
                         "rois": "jittered ground truth + random backgrounds (IoU < fg_iou)", "file": file_identity(ann)}

    def __call__(self, image_ids: list[int], images: list[np.ndarray], thresh: float, max_rois: int) -> list[None]:
        return [None] * len(image_ids)


class ModelDetections:
    """Detections from a detector checkpoint, run through the predict contract (sodtool.models.detectors)."""

    def __init__(self, path: Path, device, categories, slicing: Optional[tuple[int, float, bool]] = None) -> None:
        """slicing: (tile px, overlap, whole image too) for sliced inference (`predict_sliced`), tile
        None when not asked (a detector trained on tiles then slices at its tile size) and 0 for
        whole images; None: not asked (`models.detectors.resolve_slicing`)."""
        self.det = load_detector(path, device, categories=categories)
        self.det.categories.check_same(categories, f"detector {path} vs the dataset")
        self.slicing = slicing = resolve_slicing(self.det, slicing, str(path))
        self.identity = {"family": self.det.family, "kind": "checkpoint", "arch": self.det.arch,
                         "file": file_identity(path), "identity": self.det.identity}
        if slicing is not None:
            self.identity["slicing"] = {"tile": slicing[0], "overlap": slicing[1], "full": slicing[2]}

    def __call__(self, image_ids: list[int], images: list[np.ndarray], thresh: float, max_rois: int) -> list[dict]:
        if self.slicing is not None:
            tile, overlap, full = self.slicing
            preds = predict_sliced(self.det, images, tile=tile, overlap=overlap, full=full, score_thresh=thresh,
                                   max_per_image=max_rois)
        else:
            preds = predict(self.det, images, score_thresh=thresh, max_per_image=max_rois)
        return [{k: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)) for k, v in p.items()}
                for p in preds]

