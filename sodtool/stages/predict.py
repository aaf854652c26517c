"""`sodtool predict`: the trained system on a user's own images, with optional sliced inference.

For every input image (files, folders searched recursively, globs; any size; the formats
`coco.read_image_rgb` reads):

1. the detector runs on the whole image, or with `slice` on overlapping `slice` x `slice` tiles
   (`slicing.tile_grid`, `overlap` of the tile side; `slice_full` adds the whole image), the
   image's own tiles `TILES_PER_CALL` at a time; tile detections are shifted into image pixels and merged
   across tiles by greedy non-maximum merging (`slicing.merge_detections`, SAHI's GREEDYNMM:
   an object cut by a tile border comes out once, whole);
2. its top `max_rois` boxes at score >= `score_thresh` (the paper's protocol: 100 at 0.05) are
   the ROIs; with `mtgan` they are rescored as `eval` does (square context windows, HR crops,
   4x bicubic LR, D(G(x)) or D on the HR crop where the window is wider than the LR crop unless
   `sr_only`, `score` "disc" or "fused", D's box deltas, per-class NMS, top `max_per_image`),
   those of area >= `small_area` (default 32²; 0: none) keeping the detector's detection;
   without it they are the detections;
3. `out/parts/<n>.json` (that image's detections, with the identity of the image, of the models
   and the settings they come from) and `out/drawn/<name>.jpg` (boxes, class names and scores
   at >= `draw_threshold`) are written atomically (a full disk leaves no truncated file).

Then `out/predictions.json`: a COCO object with `images` (id, file_name relative to its input,
width, height), `categories` (the detector's dataset ids and names) and `annotations` (the
detections: id, image_id, category_id, bbox [x, y, w, h] pixels, area, score, iscrowd 0), which
pycocotools loads as a dataset and whose `annotations` serve as a results list; and
`out/manifest.json` (written last).

`out` is a new or empty folder or one predict wrote (its manifest says so, or, unfinished, it
holds parts/); any other is refused unless `overwrite`, which builds the new output beside the
old one and swaps it in once complete. A rerun into the same `out` skips an image only where its
part is whole and was made from the same image bytes, the same models (their digests, not their
paths) and the same settings; any other image is redone. What lies in `out` is never an input.
Each image goes through the detector alone, its tiles in calls of a fixed size (one on CPU):
batching pads images to a common size and batched kernels round differently, so results would
otherwise depend on `batch_size` (here only how many images are read per group) and on a kill
and rerun. An unreadable input (or a folder
entry with an image's name that is no file: a dangling symlink, a FIFO) is named on stderr and
skipped; the command ends with exit code 2 and the count once every other image is written.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import io
import math
import os
import re
import shutil
import stat
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from sodtool.artefacts import (
    MANIFEST,
    OVERWRITE_HINT,
    Timer,
    atomic_path,
    check_output,
    config_dict,
    file_identity,
    read_json,
    remove_stale_manifest,
    swap_into,
    temp_path,
    write_json,
    write_manifest,
)
from sodtool.boxes import square_windows
from sodtool.coco import read_image_rgb, to_coco_results
from sodtool.configs.predict import PredictConfig
from sodtool.console import log, make_progress, summary_table, warn
from sodtool.device import device_name, resolve_device
from sodtool.errors import InputError
from sodtool.figures import DET_COLOUR, draw_detections
from sodtool.models.detectors import load_detector, predict as detector_predict, predict_sliced, resolve_slicing
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
from sodtool.slicing import tile_grid

STAGE = "predict"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".gif"}
# Settings whose change makes earlier parts stale (a rerun with other ones redoes every image); the
# models are identified by their bytes, not their paths (`models` in predict_images).
PART_KEYS = ("score", "small_area", "sr_only", "slice", "overlap", "slice_full", "context", "score_thresh",
             "max_rois", "max_per_image", "merge_ios", "nms_iou", "min_score", "draw_threshold")
# Tiles of one image per detector call, by device type: fixed, never --batch-size, so that an
# image's detections depend on that image only. On CPU one per call cost nothing measurable
# (docs/design_notes.md); a GPU gains from batches.
TILES_PER_CALL = {"cpu": 1, "cuda": 8}
# Parts of another format (those written before images and models were identified) are redone.
PART_FORMAT = 2
# The name of a part file (`_part_path`).
_PART_NAME = re.compile(r"^[0-9a-f]{16}\.json$")
# The temporaries this tool writes (`artefacts.temp_path`).
_TEMP = re.compile(r"^\..+\.\d+\.tmp$")


@dataclass(frozen=True)
class InputImage:
    path: Path
    name: str  # file_name: relative to the folder it was found in, else the file's name


def expand_inputs(inputs: tuple[str, ...], out: Optional[Path] = None,
                  unreadable: Optional[list[str]] = None) -> list[InputImage]:
    """Files, folders (recursive, image suffixes only) and globs -> images in a stable order.

    A missing path or a glob matching nothing is an InputError; a name found twice is an
    InputError too (two images would share one file_name). An explicit input that is not a
    regular file or a folder (a FIFO, a socket, a dangling symlink) is an InputError saying what
    it is. Outputs are never inputs: folders and globs skip what lies in `out` (the output
    folder) or in its temporaries, and an explicit file there is an InputError. An entry of a
    folder or glob with an image's name that is not a file (a dangling symlink, a FIFO) is named
    on stderr and added to `unreadable`."""
    inside = _inside(out) if out is not None else (lambda f: False)
    found: list[InputImage] = []
    odd: list[str] = []
    empty: list[str] = []  # folders given that hold no image

    def skip(f: Path) -> None:
        warn(f"skipped {f}: {_what_is(f)}")
        odd.append(str(f))

    for spec in inputs:
        p = Path(spec)
        if p.is_dir():
            entries = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and not inside(f))
            files = [f for f in entries if f.is_file()]
            for f in entries:
                if not f.is_file() and not f.is_dir():
                    skip(f)
            if not entries and not inside(p):
                empty.append(str(spec))
            found += [InputImage(f, f.relative_to(p).as_posix()) for f in files]
        elif p.is_file():
            if inside(p):
                raise InputError(f"input {spec} lies in the output folder {out}: outputs are never inputs")
            found.append(InputImage(p, p.name))
        elif p.is_symlink() or p.exists():
            raise InputError(f"input {spec} is {_what_is(p)}")
        elif glob.has_magic(str(spec)):
            before = len(odd)
            matches = sorted(Path(f) for f in glob.glob(str(spec), recursive=True))
            if not matches:
                raise InputError(f"no file matches {spec}")
            files = [f for f in matches if f.is_file() and not inside(f)]
            for f in matches:
                if not f.is_file() and not f.is_dir() and not inside(f):
                    skip(f)
            if not files and len(odd) == before:
                raise InputError(f"{spec} matches no image file outside the output folder, only "
                                 f"{', '.join(f'{f} ({_what_is(f)})' for f in matches[:3])}"
                                 f"{' ...' if len(matches) > 3 else ''}")
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
    searched = f"searched recursively for {', '.join(sorted(IMAGE_SUFFIXES))} files"
    if not unique:
        if odd:
            raise InputError(f"no readable image in {', '.join(inputs)}: {len(odd)} skipped (named above)")
        if empty:
            raise InputError(f"no image found: {', '.join(empty)} {'is a folder' if len(empty) == 1 else 'are folders'}"
                             f" without image files ({searched})")
        raise InputError(f"no image found in {', '.join(inputs)}")
    for folder in empty:
        warn(f"no image in the folder {folder} ({searched})")
    if unreadable is not None:
        unreadable.extend(odd)
    return unique


def _what_is(p: Path) -> str:
    """What a path that is not an image file is, in words: "a FIFO (named pipe), not an image
    file", "a dangling symlink to x.jpg (no such file)", "a folder"."""
    try:
        st = p.lstat()
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    if stat.S_ISLNK(st.st_mode):
        target = os.readlink(p)
        return f"a dangling symlink to {target} (no such file)" if not p.exists() else \
            f"a symlink to {target}, " + _what_is(p.resolve())
    for test, what in ((stat.S_ISREG, "a file"), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(st.st_mode):
            return what if test in (stat.S_ISREG, stat.S_ISDIR) else f"{what}, not an image file"
    return "not a regular file"


def _inside(out: Path):
    """A test: does a path lie in the output folder `out` or in one of its temporaries
    (`.OUT.PID.tmp`, `.OUT.old.PID.tmp` beside it), by its own path or its real one?"""
    places = {Path(os.path.abspath(out)), Path(os.path.realpath(out))}
    temp = re.compile(rf"^\.{re.escape(Path(os.path.abspath(out)).name)}(\.old)?\.\d+\.tmp$")

    def inside(f: Path) -> bool:
        for q in {Path(os.path.abspath(f)), Path(os.path.realpath(f))}:
            for parent in [q, *q.parents]:
                if parent in places or (temp.match(parent.name) and any(parent.parent == o.parent for o in places)):
                    return True
        return False

    return inside


def _check_fraction(option: str, value, *, above_zero: bool = False) -> None:
    """A float option in [0, 1] (or (0, 1]): NaN, infinities and values outside are InputErrors."""
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and (value > 0 if above_zero else value >= 0) and value <= 1)
    if not ok:
        raise InputError(f"{option} must be a number in {'(0, 1]' if above_zero else '[0, 1]'}, got {value}")


def _check_floats(cfg: PredictConfig) -> None:
    """Every float option of predict: finite and in its range (one line, exit 2)."""
    check_small_area(cfg.small_area)
    if not (isinstance(cfg.overlap, (int, float)) and 0.0 <= cfg.overlap < 1.0):
        raise InputError(f"--overlap must be in [0, 1), got {cfg.overlap}")
    for option, value in (("--score-thresh", cfg.score_thresh), ("--min-score", cfg.min_score),
                          ("--draw-threshold", cfg.draw_threshold), ("--nms-iou", cfg.nms_iou)):
        _check_fraction(option, value)
    _check_fraction("--merge-ios", cfg.merge_ios, above_zero=True)


def _check(cfg: PredictConfig) -> None:
    if cfg.score not in SCORE_MODES:
        raise InputError(f"--score must be one of {', '.join(SCORE_MODES)}, got '{cfg.score}'")
    _check_floats(cfg)
    if cfg.slice is not None and (cfg.slice < 0 or 0 < cfg.slice < 32):
        raise InputError(f"--slice must be at least 32 px (0: whole images), got {cfg.slice}")
    if cfg.slice_full and not cfg.slice:
        raise InputError("--slice-full adds a whole-image pass to sliced inference: give --slice too")
    if cfg.context is not None and not (cfg.context >= 1.0 and math.isfinite(cfg.context)):
        raise InputError(f"--context must be a finite number >= 1, got {cfg.context}")
    for name in ("max_rois", "max_per_image", "batch_size"):
        if getattr(cfg, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")


def _part_path(out: Path, name: str) -> Path:
    return out / "parts" / (hashlib.sha1(name.encode("utf-8")).hexdigest()[:16] + ".json")


def _drawn_path(out: Path, name: str) -> Path:
    # NAME.jpg even for a.jpg (a.jpg.jpg): a.png and a.jpg, both inputs, get distinct drawings.
    return out / "drawn" / (name + ".jpg")


def _open_output(cfg: PredictConfig) -> tuple[Path, bool]:
    """Check `cfg.out` before any work: (out, staged). staged: build the output beside it and swap
    it in at the end (`--overwrite` of a folder holding anything); else write into `out` itself
    (a new or empty folder, or a predict output to resume). A folder holding anything but a
    predict output is refused without `--overwrite`."""
    out = check_output(cfg.out, "folder", finished=False)  # kind, permissions; leftovers of killed runs go
    entries = [e for e in out.iterdir() if not _TEMP.match(e.name)] if out.is_dir() else []
    if not entries:
        return out, False
    if cfg.overwrite:
        return out, True
    foreign = _not_predict(out, entries)
    if foreign is not None:
        raise InputError(f"{out} holds {foreign}, not a predict output: give another --out, or {OVERWRITE_HINT}")
    return out, False


def _not_predict(out: Path, entries: list[Path]) -> Optional[str]:
    """None for a folder predict wrote, else what it holds, in words. Predict's: its manifest says
    so; unfinished (killed, or a rerun that failed: no manifest), a parts/ folder of part files
    only, beside nothing but drawn/ and predictions.json unless it holds parts."""
    names = {e.name for e in entries}
    if MANIFEST in names:
        try:
            manifest = read_json(out / MANIFEST, "manifest")
        except InputError:
            return f"a {MANIFEST} that is not valid JSON"
        stage = manifest.get("stage") if isinstance(manifest, dict) else None
        return None if stage == STAGE else f"the output of stage '{stage}'"
    parts = out / "parts"
    own = [e.name for e in parts.iterdir()] if parts.is_dir() and not parts.is_symlink() else None
    if own is not None and all(_PART_NAME.match(n) or _TEMP.match(n) for n in own):
        if own or names <= {"parts", "drawn", "predictions.json"}:
            return None
    others = sorted(names - {"parts", "drawn", "predictions.json"})
    if others:
        return ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
    return " and ".join(sorted(names)) + " without predict's parts/"


def _load_detector(path: Path, device):
    """load_detector, with a message naming predict's own option for a state dict without class names."""
    try:
        return load_detector(path, device)
    except InputError as e:
        msg = str(e)
        if "no category names" not in msg:
            raise
        raise InputError(msg.split(": give the dataset")[0] + ", and predict takes the class names from --detector: "
                         "give a sodtool model.pt (`sodtool train detector --weights` starts one from this file) "
                         "or a 91-class COCO state dict") from None


def _identity(ident: dict) -> dict:
    """An input's identity without its path: the same bytes moved elsewhere are the same input."""
    return {k: v for k, v in ident.items() if k != "path"}


def predict_images(cfg: PredictConfig) -> dict:
    """Run the detector (and the MTGAN) over the inputs; write `cfg.out` (module docstring).
    Returns the metrics; raises InputError at the end if some inputs could not be read."""
    timer = Timer()
    _check(cfg)
    out, staged = _open_output(cfg)
    bad: list[str] = []
    images = expand_inputs(tuple(str(i) for i in cfg.inputs), out=out, unreadable=bad)
    device = resolve_device(cfg.device)
    det = _load_detector(cfg.detector, device)
    # The tiles actually run (a detector trained on tiles slices by default; --slice 0: whole images).
    slicing = resolve_slicing(det, (cfg.slice, cfg.overlap, cfg.slice_full), str(cfg.detector))
    cfg = replace(cfg, slice=None if slicing is None else slicing[0], slice_full=slicing is not None and cfg.slice_full)
    mt = None
    if cfg.mtgan is not None:
        mt = load_mtgan(cfg.mtgan, device)
        mt.categories.check_same(det.categories, f"MTGAN {mt.path} vs detector {cfg.detector}")
        context = cfg.context if cfg.context is not None else float(training_context(mt, DEFAULT_CONTEXT))
        hr_size = mt.hr_size or DEFAULT_HR_SIZE
        scorer = MtganScorer("mtgan", mt.generator, mt.discriminator)
    # What a part must record to be reused: the models (their bytes, not their paths), the
    # settings, and (per image, below) the image's own identity.
    models = {"detector": _identity(det.identity),
              "mtgan": None if mt is None else {**_identity(file_identity(mt.path)), "context": context,
                                                "hr_size": hr_size}}
    key = {"format": PART_FORMAT, "models": models,
           "settings": {k: v for k, v in config_dict(cfg).items() if k in PART_KEYS}}
    names = list(det.categories.names)
    tiles_per_call = TILES_PER_CALL.get(device.type, 1)
    if staged:  # --overwrite: the old output stays whole until the new one is complete
        work = temp_path(out)
        if work.exists():
            shutil.rmtree(work)
    else:
        work = out
    work.mkdir(parents=True, exist_ok=True)
    try:
        remove_stale_manifest(work)  # a folder being written is not finished
        (work / "parts").mkdir(exist_ok=True)  # what marks an unfinished folder as predict's
        wants: dict[str, dict] = {}
        for im in list(images):
            try:
                wants[im.name] = {"file_name": im.name, "image": _identity(file_identity(im.path)), **key}
            except OSError as e:
                warn(f"skipped {im.path}: {e.strerror or e}")
                bad.append(str(im.path))
                images.remove(im)
        todo = [im for im in images if _read_part(work, im, wants[im.name], len(names)) is None]
        log(f"predict: {len(images)} images ({len(images) - len(todo)} already done) with the {det.family} "
            f"{det.arch}{' + MTGAN (' + cfg.score + ' score)' if mt else ''}"
            f"{f', {cfg.slice} px tiles at {cfg.overlap:.0%} overlap' if cfg.slice else ''}, "
            f"device {device_name(device)}")
        unreadable_now = len(bad)
        tiles_run = detections = 0
        t_images = 0.0
        with make_progress() as progress:
            task = progress.add_task("predict", total=len(todo), info="")
            tile_task = progress.add_task("tiles", total=None, info="")
            for start in range(0, len(todo), cfg.batch_size):
                group = todo[start:start + cfg.batch_size]
                t0 = Timer()
                for im in group:
                    try:
                        img = read_image_rgb(im.path)
                    except (InputError, OSError) as e:
                        warn(f"skipped {im.path}: {str(e).splitlines()[0]}")
                        bad.append(str(im.path))
                        continue
                    # One image per detector call, and its own tiles in calls of a fixed size: a
                    # batch pads its images to a common size and batched kernels round
                    # differently, so results would depend on which images share a batch
                    # (--batch-size, a kill and rerun).
                    if cfg.slice:
                        (p,) = predict_sliced(det, [img], tile=cfg.slice, overlap=cfg.overlap, full=cfg.slice_full,
                                              score_thresh=cfg.score_thresh, max_per_image=cfg.max_rois,
                                              batch_size=tiles_per_call, merge_ios=cfg.merge_ios)
                        n_tiles = len(tile_grid(img.shape[1], img.shape[0], cfg.slice, cfg.overlap)) + (
                            1 if cfg.slice_full and max(img.shape[:2]) > cfg.slice else 0)
                    else:
                        (p,) = detector_predict(det, [img], score_thresh=cfg.score_thresh,
                                                max_per_image=cfg.max_rois, batch_size=1)
                        n_tiles = 1
                    tiles_run += n_tiles
                    progress.update(tile_task, advance=n_tiles, info=f"{tiles_run} tiles")
                    h, w = img.shape[:2]
                    rois = prepare_detections(p["boxes"], p["scores"], p["labels"], w, h, cfg.score_thresh,
                                              cfg.max_rois)
                    if mt is not None and len(rois["boxes"]):
                        result = _rescore(rois, img, scorer, device, context, hr_size, len(names), cfg)
                    else:
                        keep = slice(0, cfg.max_per_image)
                        result = {k2: v[keep] for k2, v in rois.items()}
                    detections += len(result["boxes"])
                    _write_image_outputs(work, im, img, result, names, cfg, wants[im.name])
                t_images += t0.elapsed
                progress.update(task, advance=len(group), info=f"{detections} detections")

        parts = [(im, _read_part(work, im, wants[im.name], len(names))) for im in images]
        coco = _predictions([part for _, part in parts if part is not None], det.categories)
        write_json(work / "predictions.json", coco, indent=None)
        processed = len(todo) - (len(bad) - unreadable_now)
        metrics = {"images": len(coco["images"]), "processed_now": processed,
                   "skipped_done": len(images) - len(todo), "unreadable": len(bad), "tiles": tiles_run,
                   "detections": len(coco["annotations"]),
                   "s_per_image": round(t_images / processed, 4) if processed else None,
                   "family": det.family, "arch": det.arch, "mtgan": mt is not None}
        write_manifest(work, STAGE, cfg, {"detector": det.identity, "mtgan": mt.path if mt else None}, metrics,
                       seed=None, device=device_name(device), wall_time_s=timer.elapsed)
        if staged:
            swap_into(work, out)
    finally:
        if staged and work.exists():
            shutil.rmtree(work, ignore_errors=True)
    summary_table(f"predict -> {out}", {"images": metrics["images"], "processed now": processed,
                                        "already done": metrics["skipped_done"], "unreadable": len(bad),
                                        "tiles": tiles_run, "detections": metrics["detections"],
                                        "s per image": metrics["s_per_image"]})
    if bad:
        total = len(images) + unreadable_now
        raise InputError(f"{len(bad)} of {total} inputs could not be read (named above); the other "
                         f"{total - len(bad)} are in {out / 'predictions.json'}")
    return metrics


def _read_part(out: Path, im: InputImage, want: dict, num_classes: int) -> Optional[dict]:
    """The part of `im` in `out` if it is whole and was made from the same image bytes, models and
    settings (`want`), as {"file_name", "width", "height", "boxes" [N, 4], "scores" [N],
    "labels" [N]}; None means: redo the image (no part, another image, model or setting, or a
    part that is not what predict writes: wrong types, a malformed box, a label outside 1..K)."""
    path = _part_path(out, im.name)
    if not path.is_file():
        return None
    try:
        part = read_json(path, "prediction part")
    except InputError:
        return None
    if not isinstance(part, dict) or any(part.get(k) != v for k, v in want.items()):
        return None
    try:
        w, h = part["width"], part["height"]
        raw_boxes, raw_scores, raw_labels = part["boxes"], part["scores"], part["labels"]
        if not all(isinstance(v, list) for v in (raw_boxes, raw_scores, raw_labels)):
            return None
        if not all(isinstance(b, list) and len(b) == 4 for b in raw_boxes):
            return None
        if not all(_is_number(v) for v in [*raw_scores, *(c for b in raw_boxes for c in b)]):
            return None
        if not all(type(v) is int for v in raw_labels):
            return None
        boxes = np.asarray(raw_boxes, np.float64).reshape(-1, 4)
        scores = np.asarray(raw_scores, np.float64)
        labels = np.asarray(raw_labels, np.int64)
    except (KeyError, TypeError, ValueError, OverflowError):
        return None
    n = len(boxes)
    ok = (type(w) is int and type(h) is int and w > 0 and h > 0 and len(scores) == n and len(labels) == n
          and bool(np.isfinite(boxes).all()) and bool(np.isfinite(scores).all())
          and bool(((scores >= 0) & (scores <= 1)).all()) and bool(((labels >= 1) & (labels <= num_classes)).all())
          and bool((boxes[:, 0] <= boxes[:, 2]).all()) and bool((boxes[:, 1] <= boxes[:, 3]).all())
          and bool((boxes[:, :2] >= -0.01).all()) and bool((boxes[:, 2] <= w + 0.01).all())
          and bool((boxes[:, 3] <= h + 0.01).all()))
    if not ok:
        return None
    return {"file_name": im.name, "width": w, "height": h, "boxes": boxes, "scores": scores, "labels": labels}


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


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
                         cfg: PredictConfig, want: dict) -> None:
    """The drawn image first, then the part (what marks the image done), which records `want`:
    the image's identity, the models' and the settings."""
    h, w = img.shape[:2]
    keep = det["scores"] >= cfg.draw_threshold
    captions = [f"{names[int(lab) - 1]} {float(sc):.2f}" for lab, sc in zip(det["labels"][keep], det["scores"][keep])]
    # Line width and label size grow with the image, so that they stay legible on large photos.
    drawn = draw_detections(img, det["boxes"][keep], DET_COLOUR, labels=captions,
                            width=max(1, int(math.ceil(min(w, h) / 400))), font_size=max(10, min(w, h) // 60))
    _write_jpeg(_drawn_path(out, im.name), Image.fromarray(drawn))
    write_json(_part_path(out, im.name), {
        **want, "width": int(w), "height": int(h),
        "boxes": det["boxes"].round(3).tolist(), "scores": det["scores"].round(6).tolist(),
        "labels": det["labels"].tolist()}, indent=None)


def _write_jpeg(path: Path, pil: Image.Image) -> None:
    """Save a JPEG atomically, whole or not at all: under a temporary name, removed on any failure,
    renamed into place once every byte is written. Not with `pil.save(path)`: PIL writes a file
    with write(2) calls whose short writes it does not check, so on a full disk it can end
    without an error and leave a truncated image. Encoded in memory, then written here until
    every byte is down; a full disk is an OSError naming `path`."""
    buf = io.BytesIO()
    pil.save(buf, format="JPEG", quality=90)
    data = memoryview(buf.getvalue())
    with atomic_path(path) as tmp:
        try:
            with open(tmp, "wb", buffering=0) as f:
                left = data
                while len(left):
                    n = f.write(left)
                    if not n:
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                    left = left[n:]
            if tmp.stat().st_size != len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as e:
            raise OSError(e.errno, e.strerror or str(e), str(path)) from None


def _predictions(parts: list[dict], categories) -> dict:
    """predictions.json from the images' parts (`_read_part`; ids 1..N in input order)."""
    coco_images, anns = [], []
    for iid, part in enumerate(parts, start=1):
        coco_images.append({"id": iid, "file_name": part["file_name"], "width": part["width"],
                            "height": part["height"]})
        det = {"boxes": part["boxes"], "scores": part["scores"], "labels": part["labels"]}
        for r in to_coco_results(iid, det, categories):  # the results rounding every sodtool file uses
            bw, bh = r["bbox"][2], r["bbox"][3]
            anns.append({"id": len(anns) + 1, **r, "area": round(bw * bh, 3), "iscrowd": 0})
    cats = [{"id": int(i), "name": n} for i, n in zip(categories.ids, categories.names)]
    return {"info": {"description": "sodtool predict"}, "images": coco_images, "categories": cats,
            "annotations": anns}
