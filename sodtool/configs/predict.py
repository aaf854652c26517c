"""`sodtool predict`'s options (the stage: sodtool.stages.predict)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from sodtool.configs.slicing import DEFAULT_MERGE_IOS, DEFAULT_OVERLAP
from sodtool.options import option, paths_tuple


@dataclass(frozen=True)
class PredictConfig:
    """Options of `sodtool predict` (sodtool.stages.predict's module docstring)."""

    inputs: tuple[str, ...] = option(
        help="Image files, folders (searched recursively) or globs (quoted), any size.", argument=True,
        cli_type=list[str], parse=paths_tuple)
    detector: Path = option(help="The detector: RUN/detector/model.pt (any family) or a torchvision detection state "
                            "dict.")
    out: Path = option(help="Output folder: predictions.json (COCO), drawn/, parts/, manifest.json. Rerunning skips "
                       "finished images.")
    mtgan: Optional[Path] = option(None, help="Rescore the detector's ROIs with this MTGAN (RUN/mtgan or its "
                                   "model.pt), as eval does.")
    score: str = option("fused", help="With --mtgan: disc (the paper: D's class probability) or fused (geometric "
                        "mean with the detector's score).")
    # Rescore only ROIs below this area (px², COCO's small: 32²), as eval's "ROIs < 32² only" rows,
    # Noh et al.'s routing of small proposals only (docs/choices_on_val.md checks the gate on val);
    # 0 or None: every ROI (the paper's protocol).
    small_area: Optional[float] = option(
        1024.0, help="With --mtgan: rescore only ROIs of area below this many px² (1024 = 32², COCO's small); larger "
                     "ones keep the detector's detection, as eval's 'ROIs < 32² only' rows. 0: every ROI, as the "
                     "paper.", cli_type=float)
    # Every ROI through G, none read from its HR crop (eval's --sr-only).
    sr_only: bool = option(False, help="With --mtgan: every rescored ROI through G from its LR crop (by default D "
                           "reads the HR crop of ROIs whose window is wider than the LR crop, as eval).")
    slice: Optional[int] = option(
        None, help="Sliced inference: tiles of this many px (square), merged across tiles by greedy non-maximum "
                   "merging (SAHI's GREEDYNMM: a box cut by a tile border comes out once, whole). Tiles are resized "
                   "by the scale the detector was trained at (recorded in its model.pt); a detector trained on "
                   "tiles (`data slice`) slices at its tile size by default; 0: whole images.")
    overlap: float = option(DEFAULT_OVERLAP, help="Overlap of neighbouring tiles, as a fraction of the tile side.")
    slice_full: bool = option(False, help="With --slice: also run the detector on the whole image and merge it in.")
    # With mtgan: the crop context factor (None: the one of the store the MTGAN was trained on).
    context: Optional[float] = option(
        None, help="With --mtgan: crop window side = context x max(ROI w, h), as crop-rois --context (default: the "
                   "context of the store the MTGAN was trained on, read through its run manifest).")
    score_thresh: float = option(0.05, help="Lowest detector score kept as a ROI (the paper's protocol: 0.05).")
    max_rois: int = option(100, help="ROIs per image (the paper's protocol: 100).")
    max_per_image: int = option(100, help="Detections kept per image.")
    merge_ios: float = option(DEFAULT_MERGE_IOS, help="Tile merging: intersection over the smaller box at which two "
                              "boxes of a class merge.")
    nms_iou: float = option(0.5, help="With --mtgan: IoU of the per-class NMS after rescoring.")
    min_score: float = option(1e-3, help="With --mtgan: lowest rescored score kept.")
    draw_threshold: float = option(0.5, help="Smallest score drawn on the images in OUT/drawn/.")
    batch_size: int = option(8, help="Images per group and tiles per detector call (tiles of several images go "
                             "together).")
    device: str = option("auto", help="auto, cpu, cuda or cuda:N.")
    overwrite: bool = option(False, help="Redo every image (by default a rerun skips those already in OUT).")
