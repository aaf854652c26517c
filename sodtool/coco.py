"""COCO-format data layer: split resolution, validated loading, category mapping, RGB images.

Boxes inside sodtool are xyxy in image pixels (float32); COCO JSON stores xywh. Dataset
category ids (COCO's are 1..90 with gaps) map to contiguous labels 1..K, 0 = background.

Validation policy (what a detectron2/torchvision user expects, and what `--help` says):
- fail (InputError, exit 2): malformed JSON, missing top-level keys, duplicate image /
  annotation / category ids, annotations naming an unknown image or category, missing image
  files, unreadable image files (when decoded), images whose size disagrees with the JSON;
- boxes of zero or negative size, or reaching outside the image by more than one pixel, fail
  too by default; `skip_invalid=True` (`--skip-invalid`) drops them and reports the count.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from sodtool.artefacts import read_json
from sodtool.console import log
from sodtool.errors import InputError

# COCO's own size thresholds on the annotation's `area` (pixels squared).
SMALL_MAX_AREA = 32**2
MEDIUM_MAX_AREA = 96**2
# Tolerance for boxes that leave the image: COCO's own boxes overshoot by rounding.
OUTSIDE_TOLERANCE_PX = 1.0

# COCO 2017 layout: split name -> annotation stem and image folder. No `val`: val2017 is minival
# (results reported only), and `val` (where settings are chosen) must be other images, a
# held-out subset of train2017 that the user supplies (resolve_split says how).
COCO2017_SPLITS = {"train": "train2017", "minival": "val2017"}
COCO2017_NO_VAL = ("COCO 2017 has no val split apart from val2017, which is minival here: give --ann/--images "
                   "for a held-out subset of train2017, or put annotations/instances_val.json + images/val/ in the "
                   "dataset folder (see README, COCO 2017)")


def size_bucket(area: float) -> str:
    """COCO's size bucket of an annotation area: 'small' (< 32²), 'medium' (< 96²) or 'large'."""
    if area < SMALL_MAX_AREA:
        return "small"
    if area < MEDIUM_MAX_AREA:
        return "medium"
    return "large"


@dataclass(frozen=True)
class SplitPaths:
    """Where a split lives: the annotation JSON and the folder its `file_name`s are relative to."""

    ann: Path
    images: Path


def resolve_split(dataset: str | os.PathLike | None, split: str, ann: str | os.PathLike | None = None,
                  images: str | os.PathLike | None = None) -> SplitPaths:
    """Resolve a split name to its annotation file and image folder.

    Tried in order, under `dataset`: `annotations/instances_<split>.json` + `images/<split>/`
    (sodtool's layout), then the COCO 2017 layout (`annotations/instances_train2017.json` +
    `train2017/` for `train`, `val2017` for `minival`). `ann` / `images` override.

    COCO 2017 has no `val` split of its own: val2017 is minival, where results are only
    reported, so `val` (where settings are chosen) never resolves to it. On a COCO 2017 layout
    without sodtool's `annotations/instances_val.json` + `images/val/`, split `val` is an
    InputError unless `ann` and `images` name it (a held-out subset of train2017).
    """
    ann_path = Path(ann) if ann is not None else None
    img_dir = Path(images) if images is not None else None
    if ann_path is None or img_dir is None:
        if dataset is None:
            raise InputError("give a dataset folder (--data) or both --ann and --images")
        root = Path(dataset)
        if not root.is_dir():
            raise InputError(f"dataset folder not found: {root}")
        candidates = [(root / "annotations" / f"instances_{split}.json", root / "images" / split)]
        own_layout = candidates[0][1] if ann_path is not None else candidates[0][0]  # what is still missing
        if split == "val" and not own_layout.exists() and _is_coco2017(root):
            raise InputError(f"split 'val' not found in {root}: {COCO2017_NO_VAL}")
        if split in COCO2017_SPLITS:
            stem = COCO2017_SPLITS[split]
            candidates.append((root / "annotations" / f"instances_{stem}.json", root / stem))
        if ann_path is not None:
            # Only the image folder is missing: take the layout whose folder exists
            # (`--ann .../instances_val2017.json --data coco` means coco/val2017/).
            img_dir = next((img for _, img in candidates if img.is_dir()), candidates[0][1])
        else:
            for cand_ann, cand_img in candidates:
                if cand_ann.is_file():
                    ann_path = cand_ann
                    img_dir = img_dir or cand_img
                    break
            else:
                tried = ", ".join(str(a) for a, _ in candidates)
                raise InputError(f"split '{split}' not found in {root} (looked for {tried})")
    if not ann_path.is_file():
        raise InputError(f"annotation file not found: {ann_path}")
    if not img_dir.is_dir():
        raise InputError(f"image folder not found: {img_dir}")
    return SplitPaths(ann=ann_path, images=img_dir)


def _is_coco2017(root: Path) -> bool:
    """Whether `root` holds (part of) the COCO 2017 layout."""
    return any((root / "annotations" / f"instances_{stem}.json").is_file() or (root / stem).is_dir()
               for stem in COCO2017_SPLITS.values())


@dataclass(frozen=True)
class CategoryMap:
    """Dataset category ids <-> contiguous labels 1..K (0 = background), in ascending id order."""

    ids: tuple[int, ...]
    names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        """K, the number of object classes (background not counted)."""
        return len(self.ids)

    def to_label(self, category_id: int) -> int:
        try:
            return self._index[category_id] + 1
        except KeyError:
            raise InputError(f"unknown category id {category_id} (known: {list(self.ids)})") from None

    def to_category_id(self, label: int) -> int:
        if not 1 <= label <= len(self.ids):
            raise ValueError(f"label {label} outside 1..{len(self.ids)}")
        return self.ids[label - 1]

    def labels_to_ids(self, labels: np.ndarray) -> np.ndarray:
        """Vectorised 1..K -> dataset ids (int64 array)."""
        return np.asarray(self.ids, dtype=np.int64)[np.asarray(labels, dtype=np.int64) - 1]

    @functools.cached_property
    def _index(self) -> dict[int, int]:
        return {cid: i for i, cid in enumerate(self.ids)}

    def to_json(self) -> list[dict]:
        return [{"id": i, "name": n} for i, n in zip(self.ids, self.names)]

    @classmethod
    def from_json(cls, cats: Sequence[dict]) -> "CategoryMap":
        pairs = sorted((int(c["id"]), str(c["name"])) for c in cats)
        return cls(ids=tuple(p[0] for p in pairs), names=tuple(p[1] for p in pairs))

    def check_same(self, other: "CategoryMap", what: str) -> None:
        """Refuse artefacts made with another category list."""
        if self.ids != other.ids or self.names != other.names:
            raise InputError(
                f"{what}: categories disagree ({len(other.ids)} categories {list(other.names)[:5]}... "
                f"vs {len(self.ids)} categories {list(self.names)[:5]}...)"
            )


@dataclass
class CocoSplit:
    """A loaded, validated COCO split. `coco` is the pycocotools object (for COCOeval)."""

    coco: Any  # pycocotools.coco.COCO
    ann_path: Path
    image_dir: Path
    categories: CategoryMap
    image_ids: list[int]
    # --skip-invalid: boxes dropped and images they were in, by reason ({} when none).
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_images: dict[str, int] = field(default_factory=dict)

    def skipped_report(self) -> dict:
        """What --skip-invalid dropped, for a manifest: {"boxes": {reason: n}, "images": {reason: n}}."""
        return {"boxes": dict(self.skipped), "images": dict(self.skipped_images)}

    def image_info(self, image_id: int) -> dict:
        return self.coco.imgs[image_id]

    def image_path(self, image_id: int) -> Path:
        return self.image_dir / self.coco.imgs[image_id]["file_name"]

    def load_image(self, image_id: int) -> np.ndarray:
        """The image as RGB uint8, shape [H, W, 3], checked against the JSON's width/height."""
        info = self.coco.imgs[image_id]
        return read_image_rgb(self.image_path(image_id), expect_size=(info["width"], info["height"]))

    def annotations(self, image_id: int) -> list[dict]:
        return [self.coco.anns[a] for a in self.coco.getAnnIds(imgIds=[image_id])]

    def targets(self, image_id: int, include_crowd: bool = False) -> dict[str, np.ndarray]:
        """Ground truth of one image.

        Returns boxes float32 [N, 4] xyxy pixels, labels int64 [N] in 1..K, areas float32 [N]
        (the annotation's `area`), iscrowd uint8 [N], ann_ids int64 [N]. Crowd regions are
        left out unless asked for (as in torchvision's detection references).
        """
        anns = [a for a in self.annotations(image_id) if include_crowd or not a.get("iscrowd", 0)]
        boxes = np.array([xywh_to_xyxy(a["bbox"]) for a in anns], dtype=np.float32).reshape(-1, 4)
        return {
            "boxes": boxes,
            "labels": np.array([self.categories.to_label(a["category_id"]) for a in anns], dtype=np.int64),
            "areas": np.array([a.get("area", a["bbox"][2] * a["bbox"][3]) for a in anns], dtype=np.float32),
            "iscrowd": np.array([a.get("iscrowd", 0) for a in anns], dtype=np.uint8),
            "ann_ids": np.array([a["id"] for a in anns], dtype=np.int64),
        }


def xywh_to_xyxy(b: Sequence[float]) -> list[float]:
    x, y, w, h = (float(v) for v in b)
    return [x, y, x + w, y + h]


def xyxy_to_xywh(b: Sequence[float]) -> list[float]:
    x1, y1, x2, y2 = (float(v) for v in b)
    return [x1, y1, x2 - x1, y2 - y1]


def to_coco_results(image_id: int, det: dict, categories: CategoryMap) -> list[dict]:
    """One image's detections -> COCO results entries.

    det: boxes [N, 4] xyxy image pixels, scores [N], labels [N] in 1..K. Entries carry the
    dataset's category ids and bbox [x, y, w, h] rounded to 3 decimals (1/1000 px), score to 6:
    finer than COCOeval can tell apart, and the same rounding for every results file sodtool writes.
    """
    boxes = np.asarray(det["boxes"], dtype=np.float64).reshape(-1, 4)
    if len(boxes) == 0:
        return []
    cat_ids = categories.labels_to_ids(det["labels"])
    xywh = np.stack([boxes[:, 0], boxes[:, 1], np.maximum(boxes[:, 2] - boxes[:, 0], 0.0),
                     np.maximum(boxes[:, 3] - boxes[:, 1], 0.0)], axis=1)
    return [{"image_id": int(image_id), "category_id": int(c), "bbox": [round(float(v), 3) for v in b],
             "score": round(float(s), 6)} for b, c, s in zip(xywh, cat_ids, det["scores"])]


def load_split(paths: SplitPaths, *, skip_invalid: bool = False, check_files: bool = True) -> CocoSplit:
    """Load and validate a COCO annotation file with pycocotools (policy in the module docstring)."""
    data = read_json(paths.ann, "annotation file")
    data = validate_coco_dict(data, paths.ann, skip_invalid=skip_invalid)
    skipped = data.pop("_skipped", {})
    skipped_images = data.pop("_skipped_images", {})
    if skipped:
        reasons = ", ".join(f"{k}: {v} boxes in {skipped_images.get(k, 0)} images" for k, v in sorted(skipped.items()))
        log(f"--skip-invalid: dropped {sum(skipped.values())} boxes of {paths.ann} ({reasons})")
    coco = coco_from_dict(data)
    cats = CategoryMap.from_json(data["categories"])
    image_ids = sorted(coco.imgs)
    if check_files:
        missing = [coco.imgs[i]["file_name"] for i in image_ids if not (paths.images / coco.imgs[i]["file_name"]).is_file()]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise InputError(f"image file missing: {paths.images / missing[0]}{more}")
    return CocoSplit(coco=coco, ann_path=paths.ann, image_dir=paths.images, categories=cats, image_ids=image_ids,
                     skipped=skipped, skipped_images=skipped_images)


def coco_from_dict(data: dict):
    """A pycocotools COCO object from an in-memory dict, without its console chatter."""
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def validate_coco_dict(data: Any, source: str | os.PathLike, *, skip_invalid: bool = False) -> dict:
    """Check a COCO detection dict; return it (bad boxes dropped when `skip_invalid`).

    The returned dict carries `_skipped` (boxes dropped, by reason) and `_skipped_images` (the
    images they were in, by reason) for the caller to report.
    """
    src = str(source)
    if not isinstance(data, dict):
        raise InputError(f"{src}: top level is not a JSON object")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise InputError(f"{src}: missing '{key}' list (not a COCO detection file?)")
        if not isinstance(data[key], list):
            raise InputError(f"{src}: '{key}' is not a list")
    images: dict[int, dict] = {}
    for im in data["images"]:
        try:
            iid, w, h, fn = _json_int(im["id"]), im["width"], im["height"], im["file_name"]
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{src}: image entry needs an integer id, width, height and file_name: {str(im)[:120]}") from None
        if iid in images:
            raise InputError(f"{src}: duplicate image id {iid}")
        for side, v in (("width", w), ("height", h)):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise InputError(f"{src}: image {iid} ({fn}) has {side} {v!r}, expected a number of pixels")
        if not (w > 0 and h > 0):
            raise InputError(f"{src}: image {iid} ({fn}) has invalid size {w}x{h}")
        images[iid] = im
    cat_ids: set[int] = set()
    for c in data["categories"]:
        try:
            cid = _json_int(c["id"])
            str(c["name"])
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{src}: category entry needs an integer id and a name: {str(c)[:120]}") from None
        if cid in cat_ids:
            raise InputError(f"{src}: duplicate category id {cid}")
        cat_ids.add(cid)
    if not cat_ids:
        raise InputError(f"{src}: no categories")
    ann_ids: set[int] = set()
    kept = []
    skipped = {"zero_or_negative_size": 0, "outside_image": 0}
    skipped_in: dict[str, set[int]] = {k: set() for k in skipped}
    for a in data["annotations"]:
        try:
            aid, iid, cid, bbox = _json_int(a["id"]), _json_int(a["image_id"]), _json_int(a["category_id"]), a["bbox"]
            if not isinstance(bbox, (list, tuple)):
                raise TypeError("bbox is not a list")
            x, y, w, h = (_json_number(v) for v in bbox)
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{src}: annotation needs integer id/image_id/category_id and bbox [x,y,w,h] "
                             f"of 4 numbers: {str(a)[:120]}") from None
        if aid in ann_ids:
            raise InputError(f"{src}: duplicate annotation id {aid}")
        ann_ids.add(aid)
        if iid not in images:
            raise InputError(f"{src}: annotation {aid} refers to unknown image id {iid}")
        if cid not in cat_ids:
            raise InputError(f"{src}: annotation {aid} has unknown category id {cid} (known: {sorted(cat_ids)})")
        im = images[iid]
        problem = None
        if not (w > 0 and h > 0) or not np.isfinite([x, y, w, h]).all():
            problem = "zero_or_negative_size"
        elif (x < -OUTSIDE_TOLERANCE_PX or y < -OUTSIDE_TOLERANCE_PX or x + w > im["width"] + OUTSIDE_TOLERANCE_PX
              or y + h > im["height"] + OUTSIDE_TOLERANCE_PX):
            problem = "outside_image"
        if problem is not None:
            if not skip_invalid:
                what = ("is not finite" if not np.isfinite([x, y, w, h]).all() else "has zero or negative size"
                        ) if problem == "zero_or_negative_size" else f"reaches outside its {im['width']}x{im['height']} image"
                raise InputError(f"{src}: annotation {aid} box {[x, y, w, h]} {what} (--skip-invalid drops such boxes)")
            skipped[problem] += 1
            skipped_in[problem].add(iid)
            continue
        if "area" not in a:
            a = {**a, "area": w * h}
        kept.append(a)
    out = dict(data)
    out["annotations"] = kept
    out["_skipped"] = {k: v for k, v in skipped.items() if v}
    out["_skipped_images"] = {k: len(v) for k, v in skipped_in.items() if v}
    return out


def _json_int(v: Any) -> int:
    """A JSON integer id. pycocotools indexes by the raw value, so an id written as "1" or 1.5
    would silently match no annotation: refuse anything but an integer."""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"id {v!r} is not an integer")
    return int(v)


def _json_number(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.number)):
        raise TypeError(f"{v!r} is not a number")
    return float(v)


def read_image_rgb(path: str | os.PathLike, expect_size: tuple[int, int] | None = None) -> np.ndarray:
    """Read any PIL-readable image as RGB uint8 [H, W, 3].

    Greyscale, palette, RGBA (alpha dropped), CMYK and 16-bit files are converted. The EXIF
    orientation is applied (as detectron2 does) unless `expect_size` (width, height) matches the
    stored pixels but not the rotated ones: then the annotations were made on the stored pixels.
    A size that matches neither is an InputError.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            raw_size = im.size
            rotated = ImageOps.exif_transpose(im)
            if expect_size is not None and tuple(rotated.size) != tuple(expect_size) and tuple(raw_size) == tuple(expect_size):
                rotated = im
            if rotated.mode.startswith("I;16") or rotated.mode == "I":  # I;16, I;16B, I;16L, I;16N, I
                arr16 = np.asarray(rotated, dtype=np.float32)
                rotated = Image.fromarray((arr16 / max(arr16.max(), 1.0) * 255).astype(np.uint8))
            rgb = rotated.convert("RGB")
            arr = np.array(rgb, dtype=np.uint8)  # a writable copy: torch.from_numpy warns on read-only arrays
    except FileNotFoundError:
        raise InputError(f"image file missing: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(f"image file unreadable: {path} ({type(e).__name__}: {e})") from None
    if expect_size is not None and (arr.shape[1], arr.shape[0]) != tuple(expect_size):
        raise InputError(
            f"image {path} is {arr.shape[1]}x{arr.shape[0]} but its annotation says {expect_size[0]}x{expect_size[1]}"
        )
    return arr
