"""The detector predict contract, and loading a trained detector for it.

A detector family implements one contract: `predict(det, images)` takes RGB uint8 images
[H, W, 3] and returns per image boxes float32 [N, 4] xyxy in image pixels, scores float32 [N]
in [0, 1] and labels int64 [N] in 1..K (the dataset's `CategoryMap` labels), sorted by score.
`LoadedDetector` holds a model ready for it; `load_detector` reads one from a weight file
(`sodtool.models.detector_weights`). Families: Faster R-CNN (`sodtool.models.frcnn`) and the
one-stage SSD / MDSSD (`sodtool.models.ssd`); both are torchvision detection models, whose
inference differs only in where the score threshold and the detection count are set (the
Faster R-CNN's `roi_heads`, the SSD itself). A new family adds its build module and its
branch in `detector_weights.build_from_file` and `_postprocess_owner`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from sodtool.artefacts import file_identity
from sodtool.console import log, make_progress, warn
from sodtool.coco import to_coco_results
from sodtool.device import autocast
from sodtool.models.detector_weights import build_from_file, read_detector_checkpoint
from sodtool.slicing import DEFAULT_MERGE_IOS, DEFAULT_OVERLAP, merge_detections, tile_grid

# ----------------------------------------------------------------------------------------------
# Loading a trained detector and predicting
# ----------------------------------------------------------------------------------------------

@dataclass
class LoadedDetector:
    """A detector ready for `predict`: model (eval mode, on its device) and its label space.

    `label_map` is None when model outputs are the dataset's labels 1..K; for a torchvision
    COCO checkpoint it maps output index (= COCO category id) -> label 1..K (0: drop).
    """

    model: nn.Module
    categories: Any  # CategoryMap
    arch: str
    identity: dict
    label_map: np.ndarray | None = None
    build: dict = field(default_factory=dict)
    family: str = "frcnn"
    # How its training images were resized ({"scale", "tile"}; {} when the file does not say):
    # sliced inference feeds tiles at that scale and slices at that tile size by default.
    trained_at: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def load_detector(path: str | os.PathLike, device: torch.device | str = "cpu", categories=None, *,
                  min_size: int | None = None, max_size: int | None = None) -> LoadedDetector:
    """Load `RUN/detector/model.pt` (or a torchvision detection state dict) for `predict`.

    `categories` (the dataset's CategoryMap) is checked against the file's; a 91-class
    torchvision COCO model gets a label map onto it. `min_size`/`max_size` override the image
    size the model resizes to.
    """
    f = read_detector_checkpoint(path, categories, min_size=min_size, max_size=max_size)
    model = build_from_file(f)
    model.eval().to(torch.device(device))
    ident = {**file_identity(f.path), "format": f.format, "family": f.family, "arch": f.arch,
             "num_classes": f.num_classes}
    return LoadedDetector(model=model, categories=f.categories, arch=f.arch, identity=ident, label_map=f.label_map,
                          build=f.build, family=f.family, trained_at=f.trained_at)


def _postprocess_owner(model: nn.Module) -> nn.Module:
    """The module whose `score_thresh` / `detections_per_img` steer inference: a Faster R-CNN's
    roi_heads, an SSD itself."""
    return model.roi_heads if hasattr(model, "roi_heads") else model


def _to_tensor(img: np.ndarray, dev: torch.device) -> torch.Tensor:
    if not (isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3):
        got = f"{img.dtype} {img.shape}" if isinstance(img, np.ndarray) else type(img).__name__
        raise ValueError(f"predict wants RGB uint8 [H, W, 3] arrays, got {got}")
    if not img.flags.writeable:
        img = img.copy()  # torch warns about read-only arrays (PIL's are)
    t = torch.from_numpy(np.ascontiguousarray(img)).to(dev, non_blocking=True)
    return t.permute(2, 0, 1).float().div_(255.0)


def predict(det: LoadedDetector, images: list[np.ndarray], *, score_thresh: float = 0.05,
            max_per_image: int = 100, batch_size: int = 4, amp: bool = False) -> list[dict]:
    """Detect objects in RGB uint8 images [H, W, 3].

    Returns one dict per image: boxes float32 [N, 4] xyxy image pixels, scores float32 [N] in
    [0, 1], labels int64 [N] in 1..K (the dataset's CategoryMap labels), sorted by score,
    descending, N <= max_per_image. Per-class NMS at IoU 0.5 (torchvision's default).
    """
    model, dev = det.model, det.device
    rh = _postprocess_owner(model)
    saved = (rh.score_thresh, rh.detections_per_img)
    rh.score_thresh = float(score_thresh)
    # With a label map some outputs are dropped afterwards: keep them all until then.
    rh.detections_per_img = int(max_per_image) if det.label_map is None else 1_000_000
    results: list[dict] = []
    try:
        with torch.inference_mode(), autocast(dev, enabled=amp):
            for start in range(0, len(images), batch_size):
                batch = [_to_tensor(im, dev) for im in images[start:start + batch_size]]
                for out in model(batch):
                    boxes = out["boxes"].float().cpu().numpy().astype(np.float32)
                    scores = out["scores"].float().cpu().numpy().astype(np.float32)
                    labels = out["labels"].cpu().numpy().astype(np.int64)
                    if det.label_map is not None:
                        labels = det.label_map[labels]
                        keep = labels > 0
                        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
                    order = np.argsort(-scores, kind="stable")[:max_per_image]
                    results.append({"boxes": boxes[order].reshape(-1, 4), "scores": scores[order],
                                    "labels": labels[order]})
    finally:
        rh.score_thresh, rh.detections_per_img = saved
    return results


def predict_sliced(det: LoadedDetector, images: list[np.ndarray], *, tile: int, overlap: float, full: bool = False,
                   score_thresh: float = 0.05, max_per_image: int = 100, batch_size: int = 4,
                   merge_ios: float = DEFAULT_MERGE_IOS, amp: bool = False) -> list[dict]:
    """`predict` with sliced inference: each image cut into overlapping `tile` px tiles
    (`slicing.tile_grid`; `full` adds the whole image), the tiles of all `images` batched
    together, their detections shifted into image pixels and merged across tiles
    (`slicing.merge_detections`; only boxes of different tiles merge), the top `max_per_image` kept. Same output as `predict`.

    Tiles are resized by the scale the detector's training images were (`tile_scale`: a
    detector trained at native size sees native-size tiles, whatever its input size for whole
    images); without that record, and for the whole-image pass, by the detector's own sizes."""
    crops, owners, offsets, whole = [], [], [], []
    for k, img in enumerate(images):
        h, w = img.shape[:2]
        grid = tile_grid(w, h, tile, overlap)
        n_tiles = len(grid)
        if full and n_tiles > 1:
            grid = np.concatenate([grid, np.array([[0, 0, w, h]], np.float32)])
        for j, t in enumerate(grid.astype(int)):
            crops.append(img[t[1]:t[3], t[0]:t[2]])
            owners.append(k)
            offsets.append(np.array([t[0], t[1], t[0], t[1]], np.float32))
            whole.append(j >= n_tiles)
    scale = tile_scale(det)
    preds: list = [None] * len(crops)
    # Tiles at the scale the detector was trained at (one pass per tile shape), the whole-image
    # pass and detectors that do not record a scale at the detector's own input size.
    groups: dict = {}
    for i, c in enumerate(crops):
        groups.setdefault(None if scale is None or whole[i] else c.shape[:2], []).append(i)
    for shape, idx in groups.items():
        with _input_scale(det, shape, scale):
            got = predict(det, [crops[i] for i in idx], score_thresh=score_thresh, max_per_image=max_per_image,
                          batch_size=batch_size, amp=amp)
        for i, p in zip(idx, got):
            preds[i] = p
    results = []
    for k in range(len(images)):
        mine = [i for i, o in enumerate(owners) if o == k]
        boxes = np.concatenate([preds[i]["boxes"] + offsets[i] for i in mine])
        scores = np.concatenate([preds[i]["scores"] for i in mine])
        labels = np.concatenate([preds[i]["labels"] for i in mine])
        tiles = np.concatenate([np.full(len(preds[i]["scores"]), i) for i in mine])  # boxes of one tile never merge
        merged = merge_detections(boxes, scores, labels, merge_ios, tiles) if len(mine) > 1 else \
            {"boxes": boxes, "scores": scores, "labels": labels}
        results.append({key: v[:max_per_image] for key, v in merged.items()})
    return results


def tile_scale(det: LoadedDetector) -> float | None:
    """The factor the detector's training images were resized by, which sliced inference resizes
    tiles by; None for a family whose input size is fixed (SSD) or a file that does not record it."""
    scale = det.trained_at.get("scale")
    return float(scale) if scale and det.family != "ssd" and det.family != "mdssd" else None


class _input_scale:
    """Within it, a Faster R-CNN resizes images of `shape` (h, w) by `scale` (its transform's sizes
    set to the tile's own sides times scale); a no-op for shape None."""

    def __init__(self, det: LoadedDetector, shape, scale: float | None) -> None:
        self.t = det.model.transform if shape is not None and scale is not None else None
        self.shape, self.scale = shape, scale

    def __enter__(self):
        if self.t is not None:
            self.saved = (self.t.min_size, self.t.max_size)
            h, w = self.shape
            self.t.min_size = (max(1, round(min(h, w) * self.scale)),)
            self.t.max_size = max(1, round(max(h, w) * self.scale))

    def __exit__(self, *exc):
        if self.t is not None:
            self.t.min_size, self.t.max_size = self.saved


def resolve_slicing(det: LoadedDetector, asked: tuple | None, name: str) -> tuple[int, float, bool] | None:
    """The sliced inference to run `det` with: (tile px, overlap, whole image too) or None (whole
    images). `asked`: (tile px or None when not given, overlap, whole image too) from the command
    line, or None (not given). A detector trained on tiles slices at its tile size unless asked
    otherwise; --slice 0 asks for whole images (with a warning for such a detector)."""
    tile, overlap, full = asked if asked is not None else (None, DEFAULT_OVERLAP, False)
    trained = det.trained_at.get("tile")
    if tile is None:
        if trained:
            log(f"{name} was trained on {trained} px tiles: sliced inference at {trained} px, overlap {overlap:g} "
                "(--slice 0: whole images)")
            return int(trained), overlap, full
        return None
    if tile == 0:
        if trained:
            warn(f"{name} was trained on {trained} px tiles; --slice 0 runs it on whole images, whose objects it "
                 "then sees at another scale")
        return None
    return int(tile), overlap, full


def detect_split(det: LoadedDetector, split, *, score_thresh: float, max_per_image: int, batch_size: int,
                 description: str = "detect", amp: bool = False) -> list[dict]:
    """Run `predict` over every image of a CocoSplit -> COCO results list (with a progress bar)."""
    results: list[dict] = []
    ids = split.image_ids
    with make_progress() as progress:
        task = progress.add_task(description, total=len(ids), info="")
        for start in range(0, len(ids), batch_size):
            chunk = ids[start:start + batch_size]
            outs = predict(det, [split.load_image(i) for i in chunk], score_thresh=score_thresh,
                           max_per_image=max_per_image, batch_size=batch_size, amp=amp)
            for iid, out in zip(chunk, outs):
                results.extend(to_coco_results(iid, out, det.categories))
            progress.advance(task, len(chunk))
    return results


