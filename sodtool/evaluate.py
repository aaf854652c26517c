"""COCO evaluation of a detection results file: pycocotools' COCOeval, quiet, with checked input.

Results are COCO results JSON: a list of `{"image_id", "category_id", "bbox": [x, y, w, h],
"score"}` in image pixels, with the dataset's own category ids (COCO's run 1..90 with gaps).
Every image of the ground truth is evaluated (as the COCO API does by default), so an image
without detections counts as missed objects, not as skipped.

Numbers are COCOeval's own: the 12 values of `COCOeval.stats` unrounded. Where the ground truth
has no object of a size (say no large objects), COCOeval reports -1 for that entry and so do we.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from sodtool.coco import coco_from_dict, resolve_split
from sodtool.errors import InputError

# COCOeval.stats order (bbox / segm).
STAT_NAMES = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
              "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large")
STAT_TITLES = {
    "AP": "AP @[IoU=0.50:0.95 | all | 100]", "AP50": "AP @[IoU=0.50 | all | 100]",
    "AP75": "AP @[IoU=0.75 | all | 100]", "AP_small": "AP @[IoU=0.50:0.95 | small | 100]",
    "AP_medium": "AP @[IoU=0.50:0.95 | medium | 100]", "AP_large": "AP @[IoU=0.50:0.95 | large | 100]",
    "AR1": "AR @[IoU=0.50:0.95 | all | 1]", "AR10": "AR @[IoU=0.50:0.95 | all | 10]",
    "AR100": "AR @[IoU=0.50:0.95 | all | 100]", "AR_small": "AR @[IoU=0.50:0.95 | small | 100]",
    "AR_medium": "AR @[IoU=0.50:0.95 | medium | 100]", "AR_large": "AR @[IoU=0.50:0.95 | large | 100]",
}
# How many offending ids an error message shows.
_SHOW = 5


def _quiet():
    """pycocotools prints progress to stdout; stdout is sodtool's machine-readable channel."""
    return contextlib.redirect_stdout(io.StringIO())


def _as_coco(coco_gt: Any):
    # Accept a CocoSplit as well as the pycocotools object it wraps.
    return getattr(coco_gt, "coco", coco_gt) if not hasattr(coco_gt, "loadRes") else coco_gt


def coco_evaluate(coco_gt: Any, results: list[dict], *, iou_type: str = "bbox") -> dict:
    """Run COCOeval on a results list against a pycocotools COCO ground truth.

    `results`: COCO results dicts (bbox xywh image pixels, dataset category ids); not modified
    (pycocotools' loadRes adds keys in place, so it gets a deep copy). Run `check_results` first
    on anything read from a file: pycocotools asserts rather than explaining bad input.

    Returns the 12 `COCOeval.stats` as floats under STAT_NAMES, and "per_class_AP":
    {category name: AP at IoU .50:.95, all areas, 100 detections}, None for a class without
    ground truth. An empty results list gives 0 for every entry that has ground truth.
    """
    from pycocotools.cocoeval import COCOeval

    gt = _as_coco(coco_gt)
    with _quiet():
        if results:
            dt = gt.loadRes(copy.deepcopy(list(results)))
        else:
            # loadRes cannot take an empty list (it reads results[0]); an empty results set
            # through COCOeval gives the true answer: nothing found.
            dt = coco_from_dict({"images": list(gt.dataset["images"]),
                                 "categories": copy.deepcopy(gt.dataset["categories"]), "annotations": []})
        ev = COCOeval(gt, dt, iouType=iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    out: dict[str, Any] = {name: float(v) for name, v in zip(STAT_NAMES, ev.stats)}
    out["per_class_AP"] = _per_class_ap(gt, ev)
    return out


def _per_class_ap(gt, ev) -> dict[str, float | None]:
    # precision: [T iou thresholds, R recall thresholds, K classes, A areas, M maxDets]; -1 marks
    # "no ground truth", which is left out of the mean (as COCOeval.summarize does).
    precision = ev.eval["precision"]
    area_all = ev.params.areaRngLbl.index("all")
    max_dets = len(ev.params.maxDets) - 1
    names = [gt.cats[c]["name"] for c in ev.params.catIds]
    out: dict[str, float | None] = {}
    for k, cid in enumerate(ev.params.catIds):
        name = names[k] if names.count(names[k]) == 1 else f"{names[k]} ({cid})"
        p = precision[:, :, k, area_all, max_dets]
        p = p[p > -1]
        out[name] = float(np.mean(p)) if p.size else None
    return out


def _describe_ids(ids: list[int], what: str) -> str:
    ids = sorted(ids)
    if not ids:
        return f"no {what}"
    contiguous = ids[-1] - ids[0] + 1 == len(ids)
    return f"{ids[0]}..{ids[-1]}{'' if contiguous else ' with gaps'}: {len(ids)} {what}"


def _int_id(v: Any) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return None


def _finite_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _entry_problem(r: Any) -> str | None:
    """Why one results entry is malformed, or None."""
    if not isinstance(r, dict):
        return f"is not an object ({type(r).__name__})"
    for key in ("image_id", "category_id", "bbox", "score"):
        if key not in r:
            return f"has no '{key}'"
    for key in ("image_id", "category_id"):
        if _int_id(r[key]) is None:
            return f"has a non-integer {key} {r[key]!r}"
    b = r["bbox"]
    if not (isinstance(b, (list, tuple)) and len(b) == 4 and all(_finite_number(v) for v in b)):
        return f"has bbox {b!r}, expected [x, y, w, h] of 4 finite numbers"
    if b[2] < 0 or b[3] < 0:
        return f"has bbox {list(b)} with negative width or height"
    if not _finite_number(r["score"]):
        return f"has score {r['score']!r}, expected a finite number"
    return None


def check_results(coco_gt: Any, results: Any, source: str | os.PathLike) -> list[dict]:
    """Validate a COCO results list against the ground truth; return normalised copies.

    Each entry needs image_id and category_id (integers known to the ground truth), bbox
    [x, y, w, h] (4 finite numbers, w, h >= 0) and a finite score. Anything else is an
    InputError naming `source`, how many entries are at fault and a few of them.
    """
    src = str(source)
    if not isinstance(results, list):
        kind = "a JSON object" if isinstance(results, dict) else type(results).__name__
        hint = " (a COCO annotation file? results are a list of detections)" if isinstance(results, dict) else ""
        raise InputError(f"{src}: results must be a JSON list of detections, found {kind}{hint}")
    bad = [(i, p) for i, r in enumerate(results) if (p := _entry_problem(r)) is not None]
    if bad:
        i, p = bad[0]
        more = f" ({len(bad)} malformed detections in all)" if len(bad) > 1 else ""
        raise InputError(f"{src}: detection {i} {p}{more}")
    gt = _as_coco(coco_gt)
    out = [{**r, "image_id": _int_id(r["image_id"]), "category_id": _int_id(r["category_id"]),
            "bbox": [float(v) for v in r["bbox"]], "score": float(r["score"])} for r in results]
    gt_cats, gt_imgs = set(gt.cats), set(gt.imgs)
    unknown_cat = [r["category_id"] for r in out if r["category_id"] not in gt_cats]
    if unknown_cat:
        shown = ", ".join(str(c) for c in sorted(set(unknown_cat))[:_SHOW])
        more = ", ..." if len(set(unknown_cat)) > _SHOW else ""
        raise InputError(f"{src}: {len(unknown_cat)} detections have category ids not in the ground truth: "
                         f"{shown}{more} (ground truth has {_describe_ids(list(gt_cats), 'categories')})")
    unknown_img = [r["image_id"] for r in out if r["image_id"] not in gt_imgs]
    if unknown_img:
        shown = ", ".join(str(c) for c in sorted(set(unknown_img))[:_SHOW])
        more = ", ..." if len(set(unknown_img)) > _SHOW else ""
        raise InputError(f"{src}: {len(unknown_img)} detections on {len(set(unknown_img))} image ids not in the "
                         f"ground truth: {shown}{more} (ground truth has {_describe_ids(list(gt_imgs), 'images')}; "
                         "results for another split?)")
    return out


def resolve_ground_truth(data: str | os.PathLike | None, split: str, ann: str | os.PathLike | None = None,
                         images: str | os.PathLike | None = None) -> tuple[Path, Path | None]:
    """(annotation file, image folder or None) for a split, as `coco.resolve_split` finds them.

    Unlike `resolve_split` the image folder may be absent: evaluation and statistics read only
    the annotations, so `--ann` alone is enough.
    """
    if data is None and ann is None:
        raise InputError("give a dataset folder (--data) or an annotation file (--ann)")
    if data is None:
        ann_path = Path(ann)
        if not ann_path.is_file():
            raise InputError(f"annotation file not found: {ann_path}")
        if images is None:
            return ann_path, None
        p = resolve_split(None, split, ann_path, images)
        return p.ann, p.images
    try:
        p = resolve_split(data, split, ann, images)
        return p.ann, p.images
    except InputError:
        if images is not None:
            raise
        # Retry with an image folder that exists: if the annotation file was what failed this
        # raises that error again; otherwise only the (unneeded) image folder is missing.
        p = resolve_split(data, split, ann, images=Path(data))
        return p.ann, None
