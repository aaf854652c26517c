"""Import a YOLO-labelled dataset as a sodtool COCO dataset (`sodtool data import-yolo`).

Input layout (Ultralytics / darknet convention)::

    SRC/images/**/<name>.<jpg|png|...>    images (sub-folders allowed)
    SRC/labels/**/<name>.txt              one file per image, same relative path and stem;
                                          lines `class xc yc w h`, normalised to [0, 1],
                                          class = 0-based line index of the classes file
    SRC/classes.txt                       `name` per line (category ids become 1..K), or
                                          `ID name` per line (real dataset ids, e.g. COCO's
                                          1..90 with gaps, as in coco128); also looked for
                                          as SRC/labels/classes.txt (LabelImg puts it there)

An image without a label file, or with an empty one, is an image without objects (kept).
The normalised coordinates refer to the image as displayed, i.e. after its EXIF orientation
(as Ultralytics reads them), so the recorded width/height are those of the array that
`sodtool.coco.read_image_rgb` / `CocoSplit.load_image` return.

Output (DESIGN.md section 2)::

    OUT/annotations/instances_train.json, instances_minival.json
    OUT/images/train/<file>, images/minival/<file>
    OUT/annotations/instances_val.json, images/val/<file>
                                          only with a val share (holdout_fraction) or val_list
    OUT/manifest.json                     written last

Splits: `train` (training), `val` (where every setting is chosen by looking at results) and
`minival` (results reported only). `val_fraction` is minival's share, as it always was;
`holdout_fraction` is val's share, carved out of what would otherwise be train, so minival is
exactly the images the same seed and `val_fraction` give without a val split. Without a val
share or list no val split is written and the output is byte-identical to earlier versions.

Image `file_name`s are the images' base names, or their paths relative to SRC/images when two
images share a base name. Image ids are 1..N over all images in sorted path order (unique
across splits); annotation ids are 1..n per split, in image order then label-line order. The
JSON holds no time stamps or absolute paths, so the same input and seed give byte-identical
annotation files. The output is built in a hidden folder beside OUT and renamed into place.
"""

from __future__ import annotations

import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sodtool.artefacts import Timer, check_output, swap_into, temp_path, write_json, write_manifest
from sodtool.coco import read_image_rgb, size_bucket
from sodtool.configs.import_yolo import ImportYoloConfig
from sodtool.console import log, summary_table, track, warn
from sodtool.errors import InputError

IMAGE_SUFFIXES = {".bmp", ".jpeg", ".jpg", ".mpo", ".png", ".tif", ".tiff", ".webp"}
LINK_MODES = ("copy", "hardlink", "symlink")
SPLITS = ("train", "minival")  # always written; "val" too when there is a val share or list
# Normalised coordinates may overshoot [0, 1] by this much (labelling tools round, and boxes
# touching the border come out as 1.0004); such boxes are clipped. More than this is an error.
COORD_TOLERANCE = 0.01
_ID_LINE = re.compile(r"^(\d+)\s+(\S.*)$")


@dataclass
class _Image:
    rel: str  # path relative to the images folder, posix
    path: Path
    label: Path | None
    rows: list[tuple[int, float, float, float, float]]  # (class index, xc, yc, w, h) normalised


def default_out(src: Path) -> Path:
    """`data/<src folder name>` (relative to the working directory)."""
    return Path("data") / Path(src).resolve().name


def read_classes(path: Path) -> tuple[list[int], list[str]]:
    """Parse a classes file -> (category ids, names), in YOLO class-index order.

    Either every line is `ID name` (ID a positive integer: real dataset ids, kept) or every
    line is a name (ids become 1..K). Trailing blank lines are ignored; blank lines in between
    would shift the class indices and are an error.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"classes file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(f"classes file {path} is not UTF-8 text") from None
    lines = [ln.strip() for ln in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise InputError(f"classes file {path} is empty")
    for i, ln in enumerate(lines, 1):
        if not ln:
            raise InputError(f"classes file {path} line {i} is empty (class indices are line numbers)")
    matches = [_ID_LINE.match(ln) for ln in lines]
    if all(matches):
        ids = [int(m.group(1)) for m in matches]
        names = [m.group(2).strip() for m in matches]
        for i, cid in enumerate(ids, 1):
            if cid < 1:
                raise InputError(f"classes file {path} line {i}: category id {cid} must be >= 1 "
                                 f"(list plain names to number the classes 1..K)")
        dup = _first_duplicate(ids)
        if dup is not None:
            raise InputError(f"classes file {path}: duplicate category id {dup}")
    else:
        ids = list(range(1, len(lines) + 1))
        names = lines
    dup = _first_duplicate(names)
    if dup is not None:
        raise InputError(f"classes file {path}: duplicate class name '{dup}'")
    return ids, names


def _first_duplicate(values):
    seen = set()
    for v in values:
        if v in seen:
            return v
        seen.add(v)
    return None


def parse_label_file(path: Path, num_classes: int) -> tuple[list[tuple[int, float, float, float, float]], int]:
    """Parse one YOLO label file -> ([(class index, xc, yc, w, h)], number of boxes clipped).

    Boxes reaching outside [0, 1] by at most COORD_TOLERANCE are clipped; anything else odd
    (wrong field count, non-numbers, class out of range, real overshoot, zero size) fails.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(f"label file {path} is not UTF-8 text") from None
    rows = []
    clipped = 0
    tol = COORD_TOLERANCE
    for n, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        where = f"label file {path} line {n}"
        if len(fields) != 5:
            raise InputError(f"{where}: expected 5 fields 'class xc yc w h', got {len(fields)}: '{line.strip()[:80]}'")
        try:
            cls_f = float(fields[0])
            xc, yc, w, h = (float(v) for v in fields[1:])
        except ValueError:
            raise InputError(f"{where}: non-numeric field in '{line.strip()[:80]}'") from None
        if not cls_f.is_integer():
            raise InputError(f"{where}: class '{fields[0]}' is not an integer")
        cls = int(cls_f)
        if not 0 <= cls < num_classes:
            raise InputError(f"{where}: class index {cls} outside 0..{num_classes - 1} "
                             f"(the classes file lists {num_classes} classes)")
        if not all(math.isfinite(v) for v in (xc, yc, w, h)):
            raise InputError(f"{where}: non-finite coordinate in '{line.strip()[:80]}'")
        if w <= 0 or h <= 0:
            raise InputError(f"{where}: box of zero or negative size (w={fields[3]}, h={fields[4]})")
        x1, y1, x2, y2 = xc - w / 2, yc - h / 2, xc + w / 2, yc + h / 2
        if min(x1, y1) < -tol or max(x2, y2) > 1 + tol:
            raise InputError(f"{where}: box reaches outside the image (corners {x1:.4g},{y1:.4g} to {x2:.4g},{y2:.4g}; "
                             f"YOLO coordinates are normalised to [0, 1])")
        if min(x1, y1) < 0 or max(x2, y2) > 1:
            clipped += 1
            x1, y1, x2, y2 = max(x1, 0.0), max(y1, 0.0), min(x2, 1.0), min(y2, 1.0)
            if x2 <= x1 or y2 <= y1:
                raise InputError(f"{where}: box lies outside the image")
            xc, yc, w, h = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
        rows.append((cls, xc, yc, w, h))
    return rows, clipped


def _to_pixels(row: tuple[int, float, float, float, float], width: int, height: int) -> list[float]:
    """Normalised (xc, yc, w, h) -> COCO xywh in pixels, rounded to 0.01 px, inside the image."""
    _, xc, yc, w, h = row
    x1 = round(min(max((xc - w / 2) * width, 0.0), width), 2)
    y1 = round(min(max((yc - h / 2) * height, 0.0), height), 2)
    x2 = round(min(max((xc + w / 2) * width, 0.0), width), 2)
    y2 = round(min(max((yc + h / 2) * height, 0.0), height), 2)
    return [x1, y1, round(x2 - x1, 2), round(y2 - y1, 2)]


def _scan(src: Path, cfg: ImportYoloConfig, classes_path: Path) -> tuple[list[_Image], list[Path]]:
    """Pair images with label files -> (images sorted by relative path, orphan label files)."""
    img_root, lab_root = src / cfg.images, src / cfg.labels
    if not img_root.is_dir():
        raise InputError(f"image folder not found: {img_root} (give --images NAME if it is named otherwise)")
    if not lab_root.is_dir():
        raise InputError(f"label folder not found: {lab_root} (give --labels NAME if it is named otherwise)")
    image_paths = sorted(p for p in img_root.rglob("*")
                         if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file())
    if not image_paths:
        raise InputError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {img_root}")
    classes_resolved = classes_path.resolve()
    labels = {}
    for p in lab_root.rglob("*.txt"):
        if p.name.startswith(".") or not p.is_file() or p.resolve() == classes_resolved:
            continue
        labels[p.relative_to(lab_root).with_suffix("").as_posix()] = p
    images = []
    stems: dict[str, Path] = {}
    for p in image_paths:
        rel = p.relative_to(img_root)
        stem = rel.with_suffix("").as_posix()
        if stem in stems:
            raise InputError(f"two images share the label name {stem}.txt: {stems[stem]} and {p}")
        stems[stem] = p
        images.append(_Image(rel=rel.as_posix(), path=p, label=labels.get(stem), rows=[]))
    orphans = sorted(p for s, p in labels.items() if s not in stems)
    return images, orphans


def _read_list(path: Path, images: list[_Image], src: Path, img_root: Path) -> list[_Image]:
    """Images named in a list file: one path per line, relative to the images folder, to SRC,
    to the list's folder or to the working directory, absolute, or a base name that is unique.
    Blank lines and lines starting with # are skipped."""
    if not Path(path).is_file():
        raise InputError(f"image list not found: {path}")
    by_rel = {im.rel: im for im in images}
    by_abs = {str(im.path.resolve()): im for im in images}
    by_name: dict[str, list[_Image]] = {}
    for im in images:
        by_name.setdefault(Path(im.rel).name, []).append(im)
    img_r = img_root.resolve()
    bases = [src.resolve(), Path(path).resolve().parent, Path.cwd()]
    out, seen = [], set()
    for n, line in enumerate(Path(path).read_text(encoding="utf-8-sig").splitlines(), 1):
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        p = Path(name)
        im = by_rel.get(p.as_posix())
        for base in bases:
            if im is not None:
                break
            full = (p if p.is_absolute() else base / p).resolve()
            im = by_abs.get(str(full))
            if im is None and full.is_relative_to(img_r):
                im = by_rel.get(full.relative_to(img_r).as_posix())
        if im is None and len(by_name.get(p.name, [])) == 1 and p.name == name:
            im = by_name[p.name][0]
        if im is None:
            raise InputError(f"image list {path} line {n}: '{name}' is not an image under {img_root}")
        if im.rel in seen:
            raise InputError(f"image list {path} line {n}: '{name}' is listed twice")
        seen.add(im.rel)
        out.append(im)
    return out


_LIST_OPTION = {"train": "--train-list", "minival": "--minival-list", "val": "--val-list"}


def _split(images: list[_Image], cfg: ImportYoloConfig, src: Path) -> tuple[dict[str, list[_Image]], int]:
    """-> ({"train": [...], "val": [...] (only with a val share or list), "minival": [...]} each in
    path order, number of images left out).

    Minival is chosen first and exactly as without a val split (lists, or `val_fraction` over
    the images --val-list does not name); a `holdout_fraction` val share is then drawn from
    train, with its own seeded stream, so train, val and minival are disjoint."""
    img_root = src / cfg.images
    hold = cfg.holdout_fraction  # in [0, 1): check_config
    if hold > 0 and cfg.val_list is not None:
        raise InputError("give --holdout-fraction or --val-list, not both (each fills the val split)")
    lists: dict[str, list[_Image]] = {}
    for split, lp in (("train", cfg.train_list), ("minival", cfg.minival_list), ("val", cfg.val_list)):
        if lp is not None:
            lists[split] = _read_list(Path(lp), images, src, img_root)
    names = {s: {im.rel for im in listed} for s, listed in lists.items()}
    for a, b in (("train", "minival"), ("train", "val"), ("minival", "val")):
        both = names.get(a, set()) & names.get(b, set())
        if both:
            raise InputError(f"image {sorted(both)[0]} is in both {_LIST_OPTION[a]} and {_LIST_OPTION[b]}"
                             f"{f' ({len(both)} such images)' if len(both) > 1 else ''}")
    listed_any = set().union(*names.values())
    rest = [im for im in images if im.rel not in listed_any]
    if cfg.train_list is not None or cfg.minival_list is not None:
        # The unlisted rest goes to train if it has no list, else to minival, else nowhere.
        for split in ("train", "minival"):
            if split not in lists:
                lists[split], rest = rest, []
                break
        left_out = len(rest)
    else:
        if hold > 0 and cfg.val_fraction + hold >= 1.0:
            raise InputError(f"--val-fraction + --holdout-fraction must be below 1 (train needs images), "
                             f"got {cfg.val_fraction} + {hold}")
        pool = rest  # every image, unless --val-list took some
        n = len(pool)
        n_val = int(round(cfg.val_fraction * n))
        if cfg.val_fraction > 0 and n >= 2:
            n_val = min(max(n_val, 1), n - 1)  # a nonzero fraction gives both splits an image
        order = np.random.default_rng(cfg.seed).permutation(n)
        val_idx = set(order[:n_val].tolist())
        lists["train"] = [im for i, im in enumerate(pool) if i not in val_idx]
        lists["minival"] = [im for i, im in enumerate(pool) if i in val_idx]
        left_out = 0
    if hold > 0:
        train = lists["train"]
        total = len(train) + len(lists["minival"])
        n_hold = min(max(int(round(hold * total)), 1), len(train) - 1)
        if n_hold < 1:
            raise InputError(f"--holdout-fraction {hold}: the train split has {len(train)} image(s), "
                             f"too few to carve a val split from")
        # Own stream: minival's draw above stays exactly what it is without a val split.
        order = np.random.default_rng([cfg.seed, 1]).permutation(len(train))
        hold_idx = set(order[:n_hold].tolist())
        lists["val"] = [im for i, im in enumerate(train) if i in hold_idx]
        lists["train"] = [im for i, im in enumerate(train) if i not in hold_idx]
    splits = {s: sorted(lists[s], key=lambda im: im.rel) for s in ("train", "val", "minival") if s in lists}
    if not splits["train"]:
        raise InputError("the train split would be empty")
    return splits, left_out


def _place(src_file: Path, dst: Path, link: str) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if link == "copy":
        shutil.copyfile(src_file, dst)
    elif link == "hardlink":
        try:
            os.link(src_file, dst)
        except OSError as e:
            raise InputError(f"cannot hard-link {src_file} into {dst.parent} ({e.strerror}; "
                             f"use --link copy or symlink across file systems)") from None
    else:
        os.symlink(src_file.resolve(), dst)


def check_config(cfg: ImportYoloConfig) -> None:
    """Check every option's value (InputError naming it), before any file is looked at."""
    for option, v in (("--val-fraction", cfg.val_fraction), ("--holdout-fraction", cfg.holdout_fraction)):
        if not 0.0 <= v < 1.0:
            raise InputError(f"{option} must be in [0, 1), got {v}")
    if cfg.link not in LINK_MODES:
        raise InputError(f"--link must be one of {', '.join(LINK_MODES)}, got '{cfg.link}'")


def _check_out(src: Path, out: Path, overwrite: bool) -> None:
    src_r, out_r = src.resolve(), out.resolve()
    if out_r == src_r or out_r in src_r.parents:
        raise InputError(f"output folder {out} would contain the source {src}; choose another --out")
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise InputError(f"output path exists and is not a folder: {out}")
        if any(out.iterdir()) and not overwrite:
            raise InputError(f"output folder {out} exists and is not empty (--overwrite replaces it)")


def import_yolo(cfg: ImportYoloConfig) -> dict:
    """Convert a YOLO dataset to sodtool's COCO layout; return the metrics (also in the manifest).

    Metrics: images, train_images, minival_images, boxes, train_boxes, minival_boxes (and
    val_images, val_boxes when a val split is written), categories,
    images_without_objects, clipped_boxes (overshoot within tolerance, clipped), orphan_labels
    (label files without an image, dropped with skip_orphan_labels), unlisted_images (in
    neither list), and COCO size buckets small / medium / large of the boxes.
    """
    timer = Timer()
    check_config(cfg)
    src = Path(cfg.src)
    if not src.is_dir():
        raise InputError(f"YOLO dataset folder not found: {src}")
    out = Path(cfg.out) if cfg.out is not None else default_out(src)
    _check_out(src, out, cfg.overwrite)
    check_output(out, "folder", finished=False)  # path kind, permissions; leftovers of killed runs go

    if cfg.classes is not None:
        classes_path = Path(cfg.classes)
    else:
        candidates = [src / "classes.txt", src / cfg.labels / "classes.txt"]
        classes_path = next((c for c in candidates if c.is_file()), None)
        if classes_path is None:
            raise InputError(f"no classes file: looked for {' and '.join(map(str, candidates))} (give --classes FILE)")
    cat_ids, cat_names = read_classes(classes_path)

    images, orphans = _scan(src, cfg, classes_path)
    if orphans:
        if not cfg.skip_orphan_labels:
            more = f" and {len(orphans) - 1} more" if len(orphans) > 1 else ""
            raise InputError(f"label file without an image: {orphans[0]}{more} "
                             f"(--skip-orphan-labels drops such files)")
        warn(f"dropped {len(orphans)} label file(s) without an image, e.g. {orphans[0]}")

    # Labels first (cheap): bad input fails before any image is decoded or written.
    clipped = 0
    for im in images:
        if im.label is not None:
            im.rows, c = parse_label_file(im.label, len(cat_ids))
            clipped += c
    splits, left_out = _split(images, cfg, src)
    if left_out:
        warn(f"{left_out} image(s) are in neither list and were left out")
    selected = sorted((im for s in splits for im in splits[s]), key=lambda im: im.rel)
    image_id = {im.rel: i for i, im in enumerate(selected, 1)}
    base_names = [Path(im.rel).name for im in selected]
    flat = len(set(base_names)) == len(base_names)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(out)
    if tmp.exists():
        shutil.rmtree(tmp)
    metrics: dict = {}
    try:
        (tmp / "annotations").mkdir(parents=True)
        buckets = {"small": 0, "medium": 0, "large": 0}
        split_boxes = {}
        empty = 0
        for split in splits:
            coco_images, coco_anns = [], []
            for im in track(splits[split], f"import {split}"):
                arr = read_image_rgb(im.path)  # EXIF orientation applied, as load_image does
                height, width = int(arr.shape[0]), int(arr.shape[1])
                file_name = Path(im.rel).name if flat else im.rel
                iid = image_id[im.rel]
                coco_images.append({"id": iid, "file_name": file_name, "width": width, "height": height})
                if not im.rows:
                    empty += 1
                for n, row in enumerate(im.rows, 1):
                    bbox = _to_pixels(row, width, height)
                    if bbox[2] <= 0 or bbox[3] <= 0:
                        raise InputError(f"label file {im.label}: box {n} is under 0.01 px wide or high "
                                         f"in its {width}x{height} image")
                    area = round(bbox[2] * bbox[3], 4)
                    buckets[size_bucket(area)] += 1
                    coco_anns.append({"id": len(coco_anns) + 1, "image_id": iid, "category_id": cat_ids[row[0]],
                                      "bbox": bbox, "area": area, "iscrowd": 0})
                _place(im.path, tmp / "images" / split / file_name, cfg.link)
            (tmp / "images" / split).mkdir(parents=True, exist_ok=True)
            split_boxes[split] = len(coco_anns)
            write_json(tmp / "annotations" / f"instances_{split}.json", {
                "info": {"description": f"imported from YOLO labels ({src.resolve().name})", "version": "1.0"},
                "licenses": [],
                "images": coco_images,
                "annotations": coco_anns,
                "categories": [{"id": i, "name": n, "supercategory": ""} for i, n in zip(cat_ids, cat_names)],
            }, indent=None)
        val = "val" in splits
        metrics = {
            "images": len(selected),
            "train_images": len(splits["train"]),
            **({"val_images": len(splits["val"])} if val else {}),
            "minival_images": len(splits["minival"]),
            "boxes": sum(split_boxes.values()),
            "train_boxes": split_boxes["train"],
            **({"val_boxes": split_boxes["val"]} if val else {}),
            "minival_boxes": split_boxes["minival"],
            "categories": len(cat_ids),
            "images_without_objects": empty,
            "clipped_boxes": clipped,
            "orphan_labels": len(orphans),
            "unlisted_images": left_out,
            **buckets,
        }
        write_manifest(tmp, "import-yolo", cfg, {"src": src, "classes": classes_path,
                                                 "train_list": cfg.train_list, "minival_list": cfg.minival_list,
                                                 **({"val_list": cfg.val_list} if cfg.val_list is not None else {})},
                       metrics, seed=cfg.seed, device="cpu", wall_time_s=timer.elapsed)
        swap_into(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {out}")
    summary_table(f"import-yolo {src.name}", metrics)
    return metrics
