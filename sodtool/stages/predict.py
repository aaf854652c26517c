"""`sodtool predict`: the trained system on a user's own images, with optional sliced inference.

For every input image (files, folders searched recursively, globs; any size; the formats
`coco.read_image_rgb` reads):

1. the detector runs on the whole image, or with `slice` on overlapping `slice` x `slice` tiles
   (`slicing.tile_grid`, `overlap` of the tile side; `slice_full` adds the whole image), tiles
   of several images batched together; tile detections are shifted into image pixels and merged
   across tiles by greedy non-maximum merging (`slicing.merge_detections`, SAHI's GREEDYNMM:
   an object cut by a tile border comes out once, whole);
2. its top `max_rois` boxes at score >= `score_thresh` (the paper's protocol: 100 at 0.05) are
   the ROIs; with `mtgan` they are rescored as `eval` does (square context windows, HR crops,
   4x bicubic LR, D(G(x)) or D on the HR crop where the window is wider than the LR crop unless
   `sr_only`, `score` "disc" or "fused", D's box deltas, per-class NMS, top `max_per_image`),
   those of area >= `small_area` (default 32²; 0: none) keeping the detector's detection;
   without it they are the detections;
3. `out/parts/<n>.json` (that image's detections) and `out/drawn/<name>.jpg` (boxes, class names
   and scores at >= `draw_threshold`) are written atomically.

Then `out/predictions.json`: a COCO object with `images` (id, file_name relative to its input,
width, height), `categories` (the detector's dataset ids and names) and `annotations` (the
detections: id, image_id, category_id, bbox [x, y, w, h] pixels, area, score, iscrowd 0), which
pycocotools loads as a dataset and whose `annotations` serve as a results list; and
`out/manifest.json`. A rerun into the same `out` skips images whose part is written (same
settings; `overwrite` redoes all). An unreadable input is named on stderr and skipped; the
command ends with exit code 2 and the count once every other image is written.
"""

from __future__ import annotations

import glob
import hashlib
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageDraw

from sodtool.artefacts import Timer, atomic_path, check_output, config_dict, read_json, write_json, write_manifest
from sodtool.boxes import square_windows
from sodtool.coco import read_image_rgb, to_coco_results
from sodtool.console import log, make_progress, summary_table, warn
from sodtool.device import device_name, resolve_device
from sodtool.errors import InputError
from sodtool.figures import DET_COLOUR, draw_boxes, font
from sodtool.models.detectors import load_detector, predict as detector_predict, predict_sliced
from sodtool.models.mtgan import load_mtgan, training_context
from sodtool.resample import SCALE, bicubic_down
from sodtool.rescoring import (
    SCORE_MODES,
    MtganScorer,
    at_or_above,
    check_small_area,
    class_scores,
    keep_baseline_above,
    reads_hr,
    refine_boxes,
    score_rois,
    select_detections,
)
from sodtool.rois import DEFAULT_CONTEXT, DEFAULT_HR_SIZE, crop_windows, prepare_detections
from sodtool.slicing import DEFAULT_MERGE_IOS, tile_grid

STAGE = "predict"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".gif"}
# Settings whose change makes earlier parts stale (a rerun with other ones redoes every image).
PART_KEYS = ("detector", "mtgan", "score", "small_area", "sr_only", "slice", "overlap", "slice_full", "score_thresh",
             "max_rois", "max_per_image", "merge_ios", "nms_iou", "min_score")


@dataclass(frozen=True)
class PredictConfig:
    """Options of `sodtool predict` (module docstring)."""

    inputs: tuple[str, ...]
    detector: Path
    out: Path
    mtgan: Optional[Path] = None
    score: str = "fused"
    # Rescore only ROIs below this area (px², COCO's small: 32²), as eval's "ROIs < 32² only" rows,
    # the configuration measured best on bench; 0 or None: every ROI (the paper's protocol).
    small_area: Optional[float] = 1024.0
    sr_only: bool = False  # every ROI through G, none read from its HR crop (eval's --sr-only)
    slice: Optional[int] = None
    overlap: float = 0.2
    slice_full: bool = False
    score_thresh: float = 0.05
    max_rois: int = 100
    max_per_image: int = 100
    merge_ios: float = DEFAULT_MERGE_IOS
    nms_iou: float = 0.5
    min_score: float = 1e-3
    draw_threshold: float = 0.5
    batch_size: int = 8
    device: str = "auto"
    overwrite: bool = False


@dataclass(frozen=True)
class InputImage:
    path: Path
    name: str  # file_name: relative to the folder it was found in, else the file's name


def expand_inputs(inputs: tuple[str, ...]) -> list[InputImage]:
    """Files, folders (recursive, image suffixes only) and globs -> images in a stable order.

    A missing path or a glob matching nothing is an InputError; a name found twice is an
    InputError too (two images would share one file_name)."""
    found: list[InputImage] = []
    for spec in inputs:
        p = Path(spec)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            found += [InputImage(f, f.relative_to(p).as_posix()) for f in files]
        elif p.is_file():
            found.append(InputImage(p, p.name))
        elif glob.has_magic(str(spec)):
            files = sorted(Path(f) for f in glob.glob(str(spec), recursive=True) if Path(f).is_file())
            if not files:
                raise InputError(f"no file matches {spec}")
            found += [InputImage(f, f.name) for f in files]
        else:
            raise InputError(f"input not found: {spec}")
    seen: dict[str, Path] = {}
    for im in found:
        if im.name in seen and seen[im.name] != im.path:
            raise InputError(f"two inputs are both named {im.name} ({seen[im.name]} and {im.path}): "
                             "give their common folder instead")
        seen[im.name] = im.path
    unique = list({im.name: im for im in found}.values())
    if not unique:
        raise InputError(f"no image found in {', '.join(inputs)}")
    return unique


def _check(cfg: PredictConfig) -> None:
    if cfg.score not in SCORE_MODES:
        raise InputError(f"--score must be one of {', '.join(SCORE_MODES)}, got '{cfg.score}'")
    check_small_area(cfg.small_area)
    if cfg.slice is not None and cfg.slice < 32:
        raise InputError(f"--slice must be at least 32 px, got {cfg.slice}")
    if not 0.0 <= cfg.overlap < 1.0:
        raise InputError(f"--overlap must be in [0, 1), got {cfg.overlap}")
    if cfg.slice_full and cfg.slice is None:
        raise InputError("--slice-full adds a whole-image pass to sliced inference: give --slice too")
    for name in ("max_rois", "max_per_image", "batch_size"):
        if getattr(cfg, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")


def _part_path(out: Path, name: str) -> Path:
    return out / "parts" / (hashlib.sha1(name.encode("utf-8")).hexdigest()[:16] + ".json")


def _drawn_path(out: Path, name: str) -> Path:
    return out / "drawn" / (name + ".jpg")


def predict_images(cfg: PredictConfig) -> dict:
    """Run the detector (and the MTGAN) over the inputs; write `cfg.out` (module docstring).
    Returns the metrics; raises InputError at the end if some inputs could not be read."""
    timer = Timer()
    _check(cfg)
    out = check_output(cfg.out, "folder", finished=False)
    images = expand_inputs(tuple(str(i) for i in cfg.inputs))
    device = resolve_device(cfg.device)
    det = load_detector(cfg.detector, device)
    mt = None
    if cfg.mtgan is not None:
        mt = load_mtgan(cfg.mtgan, device)
        mt.categories.check_same(det.categories, f"MTGAN {mt.path} vs detector {cfg.detector}")
        context = float(training_context(mt, DEFAULT_CONTEXT, quiet=True))
        hr_size = mt.hr_size or DEFAULT_HR_SIZE
        scorer = MtganScorer("mtgan", mt.generator, mt.discriminator)
    settings = {k: v for k, v in config_dict(cfg).items() if k in PART_KEYS}
    if cfg.overwrite and (out / "parts").is_dir():
        shutil.rmtree(out / "parts")
    todo = [im for im in images if _stale(_part_path(out, im.name), settings)]
    log(f"predict: {len(images)} images ({len(images) - len(todo)} already done) with the {det.family} "
        f"{det.arch}{' + MTGAN (' + cfg.score + ' score)' if mt else ''}"
        f"{f', {cfg.slice} px tiles at {cfg.overlap:.0%} overlap' if cfg.slice else ''}, device {device_name(device)}")

    names = list(det.categories.names)
    bad: list[str] = []
    tiles_run = detections = 0
    t_images = 0.0
    with make_progress() as progress:
        task = progress.add_task("predict", total=len(todo), info="")
        tile_task = progress.add_task("tiles", total=None, info="")
        for start in range(0, len(todo), cfg.batch_size):
            group = todo[start:start + cfg.batch_size]
            t0 = Timer()
            loaded = []
            for im in group:
                try:
                    loaded.append((im, read_image_rgb(im.path)))
                except (InputError, OSError) as e:
                    warn(f"skipped {im.path}: {str(e).splitlines()[0]}")
                    bad.append(str(im.path))
            imgs = [img for _, img in loaded]
            if cfg.slice:
                preds = predict_sliced(det, imgs, tile=cfg.slice, overlap=cfg.overlap, full=cfg.slice_full,
                                       score_thresh=cfg.score_thresh, max_per_image=cfg.max_rois,
                                       batch_size=cfg.batch_size, merge_ios=cfg.merge_ios)
                n_tiles = sum(len(tile_grid(i.shape[1], i.shape[0], cfg.slice, cfg.overlap))
                              + (1 if cfg.slice_full and max(i.shape[:2]) > cfg.slice else 0) for i in imgs)
            else:
                preds = detector_predict(det, imgs, score_thresh=cfg.score_thresh, max_per_image=cfg.max_rois,
                                         batch_size=cfg.batch_size) if imgs else []
                n_tiles = len(imgs)
            tiles_run += n_tiles
            progress.update(tile_task, advance=n_tiles, info=f"{tiles_run} tiles")
            for (im, img), p in zip(loaded, preds):
                h, w = img.shape[:2]
                boxes, scores, labels = p["boxes"], p["scores"], p["labels"]
                rois = prepare_detections(boxes, scores, labels, w, h, cfg.score_thresh, cfg.max_rois)
                if mt is not None and len(rois["boxes"]):
                    result = _rescore(rois, img, scorer, device, context, hr_size, len(names), cfg)
                else:
                    keep = slice(0, cfg.max_per_image)
                    result = {k2: v[keep] for k2, v in rois.items()}
                detections += len(result["boxes"])
                _write_image_outputs(out, im, img, result, names, cfg, settings)
            t_images += t0.elapsed
            progress.update(task, advance=len(group), info=f"{detections} detections")

    done = [im for im in images if not _stale(_part_path(out, im.name), settings)]
    coco = _predictions(out, done, det.categories)
    write_json(out / "predictions.json", coco, indent=None)
    processed = len(todo) - len(bad)
    metrics = {"images": len(done), "processed_now": processed, "skipped_done": len(images) - len(todo),
               "unreadable": len(bad), "tiles": tiles_run, "detections": len(coco["annotations"]),
               "s_per_image": round(t_images / processed, 4) if processed else None,
               "family": det.family, "arch": det.arch, "mtgan": mt is not None}
    write_manifest(out, STAGE, cfg, {"detector": det.identity, "mtgan": mt.path if mt else None}, metrics,
                   seed=None, device=device_name(device), wall_time_s=timer.elapsed)
    summary_table(f"predict -> {out}", {"images": metrics["images"], "processed now": processed,
                                        "already done": metrics["skipped_done"], "unreadable": len(bad),
                                        "tiles": tiles_run, "detections": metrics["detections"],
                                        "s per image": metrics["s_per_image"]})
    if bad:
        raise InputError(f"{len(bad)} of {len(images)} inputs could not be read (named above); the other "
                         f"{len(images) - len(bad)} are in {out / 'predictions.json'}")
    return metrics


def _stale(part: Path, settings: dict) -> bool:
    if not part.is_file():
        return True
    try:
        return read_json(part, "prediction part").get("settings") != settings
    except InputError:
        return True


def _rescore(rois: dict, img: np.ndarray, scorer, device, context: float, hr_size: int, num_classes: int,
             cfg: PredictConfig) -> dict:
    """The MTGAN's detections from one image's ROIs, as `eval` computes them. With the size gate
    only the ROIs below `small_area` go through G and D: the others keep the detector's detection,
    so their rows of D's outputs stay zero and are never read."""
    h, w = img.shape[:2]
    r = torch.from_numpy(rois["boxes"]).float()
    base_s, base_l = torch.from_numpy(rois["scores"]), torch.from_numpy(rois["labels"])
    large = at_or_above(r, cfg.small_area) if cfg.small_area else torch.zeros(len(r), dtype=torch.bool)
    todo = torch.nonzero(~large).squeeze(1)
    probs = torch.zeros(len(r), num_classes + 1)
    reg: Optional[torch.Tensor] = torch.zeros(len(r), 4)
    if len(todo):
        hr = crop_windows(torch.from_numpy(img), square_windows(r[todo], context), hr_size)
        on_hr = None if cfg.sr_only else reads_hr(r[todo], context, hr_size // SCALE)
        o = score_rois([scorer], bicubic_down(hr, SCALE), device, 256, np.zeros(0, np.int64), hr, on_hr)[0]["mtgan"]
        probs[todo] = o["probs"]
        reg = None if o["reg"] is None else reg.index_copy(0, todo, o["reg"])
    boxes = refine_boxes(r, reg, w, h)
    cs = class_scores(probs, base_s, base_l, cfg.score)
    if cfg.small_area:
        boxes, cs = keep_baseline_above(r, boxes, cs, base_s, base_l, cfg.small_area)
    return select_detections(boxes, cs, nms_iou=cfg.nms_iou, max_per_image=cfg.max_per_image,
                             min_score=cfg.min_score)


def _write_image_outputs(out: Path, im: InputImage, img: np.ndarray, det: dict, names: list[str],
                         cfg: PredictConfig, settings: dict) -> None:
    """The drawn image first, then the part (what marks the image done)."""
    h, w = img.shape[:2]
    pil = Image.fromarray(img)
    draw = ImageDraw.Draw(pil)
    keep = det["scores"] >= cfg.draw_threshold
    captions = [f"{names[int(lab) - 1]} {float(sc):.2f}" for lab, sc in zip(det["labels"][keep], det["scores"][keep])]
    draw_boxes(draw, det["boxes"][keep], DET_COLOUR, 1.0, captions, max(1, int(math.ceil(min(w, h) / 400))),
               font(max(10, min(w, h) // 60)))
    drawn = _drawn_path(out, im.name)
    drawn.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(drawn) as tmp:
        pil.save(tmp, format="JPEG", quality=90)
    write_json(_part_path(out, im.name), {
        "file_name": im.name, "width": int(w), "height": int(h), "settings": settings,
        "boxes": det["boxes"].round(3).tolist(), "scores": det["scores"].round(6).tolist(),
        "labels": det["labels"].tolist()}, indent=None)


def _predictions(out: Path, images: list[InputImage], categories) -> dict:
    """predictions.json from the parts of `images` (ids 1..N in input order)."""
    coco_images, anns = [], []
    for iid, im in enumerate(images, start=1):
        part = read_json(_part_path(out, im.name), "prediction part")
        coco_images.append({"id": iid, "file_name": part["file_name"], "width": part["width"],
                            "height": part["height"]})
        det = {"boxes": np.asarray(part["boxes"], np.float64).reshape(-1, 4), "scores": part["scores"],
               "labels": np.asarray(part["labels"], np.int64)}
        for r in to_coco_results(iid, det, categories):  # the results rounding every sodtool file uses
            bw, bh = r["bbox"][2], r["bbox"][3]
            anns.append({"id": len(anns) + 1, **r, "area": round(bw * bh, 3), "iscrowd": 0})
    cats = [{"id": int(i), "name": n} for i, n in zip(categories.ids, categories.names)]
    return {"info": {"description": "sodtool predict"}, "images": coco_images, "categories": cats,
            "annotations": anns}
