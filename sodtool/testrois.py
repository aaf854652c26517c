"""The baseline's test ROIs of a split, image by image, with their HR crops (and LR, when stored).

Two sources give the same crops: a test-mode ROI store written by `sodtool crop-rois --mode
test` (`store_rois`), or the detector run here through the same functions (`detector_rois`).
`batch_images` groups consecutive images so that a forward pass holds the ROIs of several.
`detector_detections` runs another detector (a `train fsr` model, say) through the same steps
without crops, so that its detections and the baseline's ROIs are kept alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

from sodtool import boxes as B
from sodtool import rois, store
from sodtool.artefacts import file_identity
from sodtool.coco import CategoryMap
from sodtool.console import make_progress, warn
from sodtool.errors import InputError


@dataclass
class ImageRois:
    """The test ROIs of one image: rois float32 [R, 4] xyxy, scores float32 [R], labels int64 [R]
    (baseline class 1..K), hr uint8 [R, 3, S, S], lr uint8 [R, 3, S/4, S/4] or None (made later)."""

    image_id: int
    width: int
    height: int
    rois: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    hr: np.ndarray
    lr: Optional[np.ndarray] = None


@dataclass
class SourceInfo:
    """Where the ROIs come from; detail["score_thresh"] is the lowest baseline score they were kept at."""

    kind: str  # "detector" | "rois"
    path: Path
    lr_path: Optional[Path]
    categories: Any
    hr_size: int
    context: float
    detail: dict = field(default_factory=dict)


def store_rois(path: Path, split_name: str, split) -> tuple[SourceInfo, Iterator[ImageRois]]:
    """ROIs and crops read from a test-mode store (and its LR twin when present), image by image
    in the order of `split` (a CocoSplit named `split_name`)."""
    path = Path(path)
    info = store.store_info(path)
    mode = info.get("mode")
    if mode != "test":
        raise InputError(f"{path} is a {mode!r}-mode ROI store (sampled training crops); eval needs the baseline's "
                         f"top-100 detections: make one with `sodtool crop-rois --mode test --split {split_name}`")
    # Another split's store is an error, checked before anything is said about the store.
    with store.open_store(path) as fh:
        unknown = sorted(set(np.unique(fh["image_id"][:]).tolist()) - set(split.image_ids))
    if unknown:
        raise InputError(f"{path} has ROIs of {len(unknown)} image ids not in {split.ann_path} "
                         f"(e.g. {unknown[:3]}): a store of another split?")
    cats = CategoryMap.from_json(info["categories"])
    cats.check_same(split.categories, f"ROI store {path} vs dataset {split.ann_path}")
    lr_path = path.with_name(path.stem + "_lr.h5")
    if lr_path.is_file():
        linfo = store.store_info(lr_path, store.LR_SCHEMA)
        src = linfo.get("source_content_sha256")
        if linfo["num_rows"] != info["num_rows"] or (src is not None and src != info.get("content_sha256")):
            raise InputError(f"{lr_path} was not made from {path} (rows or content digest differ): "
                             f"run `sodtool downsample {path}` again")
        if CategoryMap.from_json(linfo["categories"]) != cats:
            raise InputError(f"{lr_path}: categories disagree with {path}")
    else:
        lr_path = None
    _check_annotations(path, info.get("annotations"), split, split_name)
    hr_size = int(info["image_size"])
    config = info.get("config") if isinstance(info.get("config"), dict) else {}
    if config.get("score_thresh") is not None:
        score_thresh = float(config["score_thresh"])
    else:  # not recorded: the lowest score stored, below which the store holds nothing
        with store.open_store(path) as fh:
            stored = fh["score"][:]
        score_thresh = float(stored.min()) if len(stored) else 0.0
        warn(f"{path} does not record the score threshold its ROIs were taken at; taking its lowest score, "
             f"{score_thresh:g}")
    source = SourceInfo(kind="rois", path=path, lr_path=lr_path, categories=cats, hr_size=hr_size,
                        context=float(info.get("context", float("nan"))),
                        detail={"rows": info["num_rows"], "store_split": info.get("split"), "score_thresh": score_thresh,
                                "max_rois": config.get("max_rois"),
                                "arch": (info.get("detector") or {}).get("arch")
                                if isinstance(info.get("detector"), dict) else None})

    def rows_iter() -> Iterator[ImageRois]:
        with store.open_store(path) as fh:
            image_id = fh["image_id"][:]
            # Rows of one image are consecutive (crop-rois writes image by image).
            change = np.flatnonzero(np.diff(image_id)) + 1
            starts = np.r_[0, change] if len(image_id) else np.zeros(0, np.int64)
            ends = np.r_[change, len(image_id)] if len(image_id) else np.zeros(0, np.int64)
            span = {}
            for s, e in zip(starts.tolist(), ends.tolist()):
                iid = int(image_id[s])
                if iid in span:
                    raise InputError(f"{path}: the rows of image {iid} are not consecutive (not written by crop-rois?)")
                span[iid] = (s, e)
            roi, score, det_label = fh["roi"][:], fh["score"][:], fh["det_label"][:]
            lh = store.open_store(lr_path, store.LR_SCHEMA) if lr_path is not None else None
            try:
                for iid in split.image_ids:
                    if iid not in span:
                        continue
                    s, e = span[iid]
                    im = split.image_info(iid)
                    yield ImageRois(image_id=iid, width=int(im["width"]), height=int(im["height"]),
                                    rois=roi[s:e].astype(np.float32), scores=score[s:e].astype(np.float32),
                                    labels=det_label[s:e].astype(np.int64), hr=fh["hr"][s:e],
                                    lr=lh["lr"][s:e] if lh is not None else None)
            finally:
                if lh is not None:
                    lh.close()

    return source, rows_iter()


def _check_annotations(path: Path, recorded: Any, split, split_name: str) -> None:
    """A store cropped from another version of the annotations (same image ids, other file
    bytes) is refused: its ROIs were labelled and matched against other ground truth. Decided
    by the file digests when both are known, else by the file sizes (large files record size
    and mtime only, and an mtime changes with a copy)."""
    if not isinstance(recorded, dict):
        return
    actual = file_identity(split.ann_path)
    if recorded.get("sha256") and actual.get("sha256"):
        if recorded["sha256"] == actual["sha256"]:
            return
        what = f"sha256 {recorded['sha256'][:12]}... vs {actual['sha256'][:12]}..."
    elif recorded.get("size") is not None and actual.get("size") is not None and recorded["size"] != actual["size"]:
        what = f"{recorded['size']} vs {actual['size']} bytes"
    else:
        return
    raise InputError(f"{path} was cropped from another version of the annotations: it records {recorded.get('path')}, "
                     f"the dataset's is {split.ann_path} ({what}); crop the test ROIs again with `sodtool crop-rois "
                     f"--mode test --split {split_name}`, or evaluate against the annotations it was cropped from")


def detector_rois(detector: Path, device: torch.device, split, *, hr_size: int, context: float, score_thresh: float,
                  max_rois: int, batch_images: int, slicing: Optional[tuple[int, float, bool]] = None,
                  ) -> tuple[SourceInfo, Iterator[ImageRois]]:
    """ROIs from running the detector on the split's images, exactly as `crop-rois --mode test`.

    The same steps and functions as `sodtool crop-rois` in test mode: `rois.ModelDetections` on
    `batch_images` images at a time (crop-rois' --batch-images, default 4), then per image
    `rois.prepare_detections` (clip, drop empty boxes, threshold, top 100), the square context
    windows (`boxes.square_windows`) and `rois.crop_windows` on the same device. A test-mode
    store made with the same detector, context, HR size and batch therefore holds the same crops.
    """
    source_fn = rois.ModelDetections(Path(detector), device, split.categories, slicing)
    det = source_fn.det
    source = SourceInfo(kind="detector", path=Path(detector), lr_path=None, categories=det.categories,
                        hr_size=hr_size, context=context,
                        detail={"arch": det.arch, "score_thresh": score_thresh, "max_rois": max_rois,
                                "identity": det.identity})

    def rows_iter() -> Iterator[ImageRois]:
        ids = list(split.image_ids)
        for i in range(0, len(ids), batch_images):
            batch = ids[i:i + batch_images]
            images = [split.load_image(iid) for iid in batch]
            preds = source_fn(batch, images, score_thresh, max_rois)
            for iid, img, p in zip(batch, images, preds):
                h, w = img.shape[:2]
                d = rois.prepare_detections(p["boxes"], p["scores"], p["labels"], w, h, score_thresh, max_rois)
                if len(d["boxes"]) == 0:
                    continue
                windows = B.square_windows(torch.from_numpy(d["boxes"]), context)
                img_t = torch.from_numpy(img).to(device) if device.type != "cpu" else torch.from_numpy(img)
                crops = rois.crop_windows(img_t, windows, hr_size).cpu().numpy()
                yield ImageRois(image_id=iid, width=int(w), height=int(h), rois=d["boxes"].astype(np.float32),
                                scores=d["scores"].astype(np.float32), labels=d["labels"].astype(np.int64),
                                hr=crops, lr=None)

    return source, rows_iter()


def detector_detections(detector: Path, device: torch.device, split, *, score_thresh: float, max_rois: int,
                        batch_images: int, slicing: Optional[tuple[int, float, bool]] = None,
                        description: str = "detect") -> tuple["rois.ModelDetections", dict[int, dict]]:
    """A detector's detections on every image of the split, by the steps `detector_rois` takes
    for the baseline's ROIs (`rois.ModelDetections` on `batch_images` images at a time, then
    `rois.prepare_detections`: clip, drop empty boxes, threshold, top `max_rois`), without crops.

    Returns the loaded detector and {image_id: {"boxes" float32 [N, 4] xyxy image px, "scores"
    float32 [N], "labels" int64 [N] 1..K}}, images without a detection left out.
    """
    source_fn = rois.ModelDetections(Path(detector), device, split.categories, slicing)
    found: dict[int, dict] = {}
    ids = list(split.image_ids)
    with make_progress() as progress:
        task = progress.add_task(description, total=len(ids), info="")
        for i in range(0, len(ids), batch_images):
            batch = ids[i:i + batch_images]
            images = [split.load_image(iid) for iid in batch]
            for iid, img, p in zip(batch, images, source_fn(batch, images, score_thresh, max_rois)):
                h, w = img.shape[:2]
                d = rois.prepare_detections(p["boxes"], p["scores"], p["labels"], w, h, score_thresh, max_rois)
                if len(d["boxes"]):
                    found[iid] = {"boxes": d["boxes"].astype(np.float32), "scores": d["scores"].astype(np.float32),
                                  "labels": d["labels"].astype(np.int64)}
            progress.advance(task, len(batch))
    return source_fn, found


def batch_images(items: Iterator[ImageRois], batch_size: int) -> Iterator[list[ImageRois]]:
    """Group consecutive images until their ROIs fill at least `batch_size` rows."""
    group: list[ImageRois] = []
    rows = 0
    for it in items:
        group.append(it)
        rows += len(it.rois)
        if rows >= batch_size:
            yield group
            group, rows = [], 0
    if group:
        yield group
