"""Sliced inference: overlapping tiles of a large image, and merging their detections.

- `tile_grid(width, height, size, overlap)`: tiles [T, 4] xyxy pixels, each `size` px square
  (or the whole side when the image is smaller), stepping by size * (1 - overlap) and with the
  last row and column moved back to end at the border: every pixel is in at least one tile.
- `merge_detections(boxes, scores, labels, iou)`: greedy non-maximum merging (SAHI's GREEDYNMM)
  of per-tile detections already shifted into image pixels. Boxes are visited by descending
  score; each kept box absorbs every later box of its class that overlaps it by at least `iou`
  as intersection over the smaller box, and grows to their union; it keeps its own score.
  Merging rather than suppressing, and intersection over the smaller box rather than IoU: an
  object cut by a tile border is seen whole by one tile and truncated by its neighbour, and
  the truncated piece has a small IoU with the whole box (NMS would keep both) but lies inside
  it; pieces seen only truncated by two tiles join into the full box. With `groups` (the tile
  each box came from), a box absorbs only boxes of other tiles: within one tile the detector's
  own NMS has already decided, and merging there fuses neighbouring objects of a class (on the
  bench detector's whole-image detections, merging them all at IoS 0.5 took AP from 37.0 to 16.6:
  `benchmarks/merge_check.py`, docs/results.md).
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.ops import box_area

from sodtool.configs.slicing import DEFAULT_MERGE_IOS, DEFAULT_OVERLAP  # noqa: F401 (models.detectors imports both from here)


def tile_grid(width: int, height: int, size: int, overlap: float) -> np.ndarray:
    """Tiles of a width x height image: float32 [T, 4] xyxy pixels, row-major (module docstring)."""
    if size < 1:
        raise ValueError(f"tile size must be >= 1, got {size}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")

    def starts(length: int) -> list[int]:
        if length <= size:
            return [0]
        step = max(1, int(round(size * (1.0 - overlap))))
        out = list(range(0, length - size, step))
        out.append(length - size)  # the last tile ends at the border
        return sorted(set(out))

    xs, ys = starts(int(width)), starts(int(height))
    tw, th = min(size, int(width)), min(size, int(height))
    return np.array([[x, y, x + tw, y + th] for y in ys for x in xs], dtype=np.float32).reshape(-1, 4)


def merge_detections(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray,
                     ios: float = DEFAULT_MERGE_IOS, groups: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Greedy non-maximum merging per class (module docstring).

    boxes float [N, 4] xyxy pixels, scores [N], labels [N], groups int [N] or None (the tile of
    each box: only boxes of different tiles merge; None: any two may) -> {"boxes" float32
    [M, 4], "scores" float32 [M], "labels" int64 [M]}, sorted by score, descending.
    """
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    scores = np.asarray(scores, np.float32).reshape(-1)
    labels = np.asarray(labels, np.int64).reshape(-1)
    groups = np.arange(len(boxes)) if groups is None else np.asarray(groups, np.int64).reshape(-1)
    if len(groups) != len(boxes):
        raise ValueError(f"groups has {len(groups)} entries for {len(boxes)} boxes")
    order = np.argsort(-scores, kind="stable")
    boxes, scores, labels, groups = boxes[order], scores[order], labels[order], groups[order]
    t = torch.from_numpy(boxes)
    areas = box_area(t).numpy() if len(boxes) else np.zeros(0, np.float32)
    used = np.zeros(len(boxes), bool)
    out_b, out_s, out_l = [], [], []
    for i in range(len(boxes)):
        if used[i]:
            continue
        used[i] = True
        merged = boxes[i].copy()
        rest = np.flatnonzero(~used & (labels == labels[i]) & (groups != groups[i]))
        if len(rest):
            x1 = np.maximum(boxes[i, 0], boxes[rest, 0])
            y1 = np.maximum(boxes[i, 1], boxes[rest, 1])
            x2 = np.minimum(boxes[i, 2], boxes[rest, 2])
            y2 = np.minimum(boxes[i, 3], boxes[rest, 3])
            inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
            smaller = np.minimum(areas[i], areas[rest])
            hit = rest[inter >= ios * np.maximum(smaller, 1e-9)]
            if len(hit):
                used[hit] = True
                merged[:2] = np.minimum(merged[:2], boxes[hit, :2].min(axis=0))
                merged[2:] = np.maximum(merged[2:], boxes[hit, 2:].max(axis=0))
        out_b.append(merged)
        out_s.append(scores[i])
        out_l.append(labels[i])
    return {"boxes": np.array(out_b, np.float32).reshape(-1, 4), "scores": np.array(out_s, np.float32),
            "labels": np.array(out_l, np.int64)}
