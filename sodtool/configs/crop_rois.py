"""`sodtool crop-rois`'s options and the crop defaults it shares with the ROI store (the stage:
sodtool.stages.crop_rois)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from sodtool.options import option

# Crop geometry defaults: HR side in px (LR = HR / 4) and window side / ROI's longer side.
# sodtool.rois and the stages that crop at test time (eval, predict) read them from here.
DEFAULT_HR_SIZE = 128
DEFAULT_CONTEXT = 1.5
# HDF5 filter of the HR crops (sodtool.store's default for every store it writes).
COMPRESSION = "lzf"


@dataclass(frozen=True)
class CropRoisConfig:
    """Options of `sodtool crop-rois` (see sodtool.stages.crop_rois for the sampling rules).

    Exactly one of detector_weights (a RUN/detector/model.pt checkpoint, run on `device`) and
    detections (a COCO results JSON, e.g. from `sodtool detect`) gives the ROIs, or neither with
    gt_only (train mode: jittered ground truth plus random backgrounds, no detector). score_thresh /
    max_rois None take the mode's default (train 0.01 / 300, test 0.05 / 100). shard "i/n"
    processes every n-th image from the i-th and writes `<out stem>.shard-i-of-n.h5`.
    """

    # Optional on the command line: crop-rois is a group callback (so that `crop-rois merge` can
    # sit beside it), so --out cannot be a required option; the callback asks for it.
    out: Path = option(help="The HR ROI store to write, e.g. RUN/rois_train.h5 (with --shard: "
                       "RUN/rois_train.shard-i-of-n.h5).", cli_default=None)
    data: Path | None = option(None, help="Dataset folder (sodtool or COCO 2017 layout).")
    split: str = option("train", help="Split to crop.")
    ann: Path | None = option(None, help="Annotation file (overrides --data/--split).")
    images: Path | None = option(None, help="Image folder (overrides --data/--split).")
    mode: str = option("train", help="train: Fast R-CNN sampling (1 positive in 4, jittered ground truth added); "
                       "test: the baseline's top detections, scores kept.")
    detector: str = option("frcnn", help="Detector family of --detector-weights: frcnn, ssd or mdssd.")
    detector_weights: Path | None = option(None, help="Detector checkpoint RUN/detector/model.pt (run on --device).")
    detections: Path | None = option(None, help="Or: its detections, a COCO results JSON (from `sodtool detect`).")
    hr_size: int = option(DEFAULT_HR_SIZE, help="Side S of the HR crops in px (LR = S/4).")
    context: float = option(DEFAULT_CONTEXT, help="Crop window side = context x max(ROI w, h), square, centred on "
                            "the ROI.")
    score_thresh: float | None = option(None, help="Lowest detector score used (default: 0.01 train, 0.05 test).")
    max_rois: int | None = option(None, help="Top detections per image used (default: 300 train, 100 test).")
    fg_iou: float = option(0.5, help="IoU with a ground truth from which a ROI is positive.")
    bg_low: float = option(0.1, help="Train: ROIs with IoU in [bg-low, fg-iou) are background; below are unused.")
    fg_fraction: float = option(0.25, help="Train: share of positives among an image's ROIs.")
    rois_per_image: int = option(64, help="Train: ROIs per image (more for images with many objects).")
    gt_jitters: int = option(2, help="Train: jittered copies of each ground-truth box added as positives.")
    jitter_iou: float = option(0.7, help="Train: least IoU of a jittered copy with its ground truth.")
    shard: str | None = option(None, help="i/n: crop every n-th image from the i-th (merge with `sodtool crop-rois "
                               "merge`).")
    seed: int = option(0, help="Seed of the sampling (per image, so shards agree with an unsharded run).")
    device: str = option("auto", help="Device of the detector and the cropping: auto, cpu, cuda[:N].")
    batch_images: int = option(4, help="Images per detector call.")
    compression: str = option(COMPRESSION, help="HDF5 filter of the crops: lzf (fast), gzip (level 1, smaller, "
                              "slower) or none.")
    skip_invalid: bool = option(False, help="Drop annotations with zero-size or out-of-image boxes instead of "
                                "failing.")
    overwrite: bool = option(False, help="Replace an existing store (only once the new one is complete).")
    # Sliced inference of the detector (`models.detectors.predict_sliced`): tile px, overlap, whole image too.
    # None: whole images, or the tile size a detector trained on tiles records; 0: whole images always.
    slice: Optional[int] = option(None, help="Sliced inference of the detector: overlapping tiles of this many px, "
                                  "merged by greedy non-maximum merging (as `sodtool predict --slice`). Tiles are "
                                  "resized by the scale the detector was trained at (recorded in its model.pt); a "
                                  "detector trained on tiles (`data slice`) slices at its tile size by default; 0: "
                                  "whole images.")
    overlap: float = option(0.2, help="With --slice: overlap of neighbouring tiles, as a fraction of the tile side.")
    slice_full: bool = option(False, help="With --slice: also run the detector on the whole image and merge it in.")
    gt_only: bool = option(False, help="Train mode without a detector: ROIs are the jittered ground truth plus "
                           "random background boxes (IoU < --fg-iou), e.g. SR training crops of real photos.")
