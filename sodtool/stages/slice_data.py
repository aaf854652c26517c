"""`sodtool data slice`: a dataset cut into overlapping square tiles (SAHI's `sahi coco slice`),
for training a detector on tiles at their native scale.

For each image of each split, the tiles of `slicing.tile_grid(width, height, size, overlap)`
(the grid sliced inference uses). Each annotated box (xyxy, image pixels) is clipped to each
tile it meets; it is kept in that tile when the clipped part holds at least `min_visibility` of
its area (a sliver of a car at a tile's edge is no car to learn from), shifted to tile pixels.
A tile with a kept box is written; tiles without one are kept up to `empty_ratio` times the
number of tiles with objects of that split (a seeded draw), so that the detector also sees
background. Tiles are PNG (lossless: a tile's pixels are its source image's).

Output, in sodtool's layout: `images/<split>/<stem>_x<X>_y<Y>.png`,
`annotations/instances_<split>.json` (the source categories; each image entry records
`"tile": {"source_image_id", "source_file_name", "offset": [X, Y]}`, each annotation its
`source_annotation_id` and whether it was clipped) and `manifest.json` naming the source. A box
mapped back with its tile's offset is its source box whenever it was kept whole.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from sodtool.artefacts import Timer, check_output, staged_dir, write_json, write_manifest
from sodtool.coco import load_split, resolve_split, xywh_to_xyxy
from sodtool.configs.slice_data import SliceDataConfig
from sodtool.console import log, summary_table, track
from sodtool.errors import InputError
from sodtool.slicing import tile_grid

STAGE = "data-slice"


def check_config(cfg: SliceDataConfig) -> None:
    """Every option's value (InputError naming it), before any file is read."""
    if cfg.size < 16:
        raise InputError(f"--size must be at least 16 px, got {cfg.size}")
    if not 0.0 <= cfg.overlap < 1.0:
        raise InputError(f"--overlap must be in [0, 1), got {cfg.overlap}")
    if not 0.0 < cfg.min_visibility <= 1.0:
        raise InputError(f"--min-visibility must be in (0, 1], got {cfg.min_visibility}")
    if not (cfg.empty_ratio >= 0.0 and math.isfinite(cfg.empty_ratio)):
        raise InputError(f"--empty-ratio must be a number >= 0, got {cfg.empty_ratio}")
    if not cfg.splits:
        raise InputError("give at least one --split")
    if len(set(cfg.splits)) != len(cfg.splits):
        raise InputError(f"--split given twice: {', '.join(cfg.splits)}")
    if (cfg.ann is not None or cfg.images is not None) and len(cfg.splits) > 1:
        raise InputError("--ann/--images name one split's files: give one --split with them")
    if cfg.data is not None and Path(cfg.out).resolve() == Path(cfg.data).resolve():
        raise InputError(f"--out {cfg.out} is the source dataset; choose another folder")


def tile_boxes(boxes: np.ndarray, tile: np.ndarray, min_visibility: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The boxes [N, 4] (xyxy, image px) a tile [4] (xyxy, image px) keeps.

    Returns (index [M] into boxes, clipped boxes [M, 4] xyxy in tile px, clipped [M] bool: the
    box was cut by the tile's border). Kept: clipped area >= min_visibility * the box's area,
    and the clipped box at least 1 px wide and high."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    lo = np.maximum(boxes[:, :2], tile[:2])
    hi = np.minimum(boxes[:, 2:], tile[2:])
    wh = np.clip(hi - lo, 0.0, None)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    inside = wh[:, 0] * wh[:, 1]
    keep = (inside >= min_visibility * area - 1e-9) & (wh >= 1.0).all(axis=1)
    idx = np.flatnonzero(keep)
    clipped_boxes = np.concatenate([lo[idx], hi[idx]], axis=1) - np.concatenate([tile[:2], tile[:2]])
    was_clipped = ~np.isclose(inside[idx], area[idx])
    return idx, clipped_boxes, was_clipped


def slice_dataset(cfg: SliceDataConfig) -> dict:
    """Write the tiled dataset (module docstring); return the metrics (also in the manifest)."""
    timer = Timer()
    check_config(cfg)
    out = check_output(cfg.out, "folder", overwrite=cfg.overwrite)
    sources = {s: resolve_split(cfg.data, s, cfg.ann, cfg.images) for s in cfg.splits}
    loaded = {s: load_split(p, skip_invalid=cfg.skip_invalid) for s, p in sources.items()}
    rng = np.random.default_rng(cfg.seed)
    metrics: dict = {}  # per split; the settings are in the manifest's config
    with staged_dir(out) as work:
        (work / "annotations").mkdir()
        for split_name, split in loaded.items():
            img_dir = work / "images" / split_name
            img_dir.mkdir(parents=True)
            with_objects, empty = [], []  # (image id, tile [4], kept annotations)
            n_boxes = n_kept = n_clipped = 0
            for iid in split.image_ids:
                info = split.coco.imgs[iid]
                anns = split.annotations(iid)
                n_boxes += len(anns)
                xyxy = np.array([xywh_to_xyxy(a["bbox"]) for a in anns], np.float64).reshape(-1, 4)
                for tile in tile_grid(info["width"], info["height"], cfg.size, cfg.overlap).astype(np.float64):
                    idx, boxes, clipped = tile_boxes(xyxy, tile, cfg.min_visibility)
                    kept = [(anns[i], b, c) for i, b, c in zip(idx, boxes, clipped)]
                    (with_objects if kept else empty).append((iid, tile, kept))
            n_empty = min(len(empty), int(math.floor(cfg.empty_ratio * len(with_objects))))
            chosen = sorted(rng.choice(len(empty), size=n_empty, replace=False).tolist()) if n_empty else []
            tiles = sorted(with_objects + [empty[i] for i in chosen], key=lambda t: (t[0], t[1][1], t[1][0]))
            images, annotations, cache = [], [], {}
            for tile_id, (iid, tile, kept) in enumerate(track(tiles, f"slice {split_name}"), 1):
                if cache.get("iid") != iid:  # tiles come grouped by image: decode each image once
                    cache = {"iid": iid, "pixels": split.load_image(iid)}
                x0, y0, x1, y1 = (int(v) for v in tile)
                src = split.coco.imgs[iid]
                name = f"{Path(src['file_name']).stem}_x{x0}_y{y0}.png"
                Image.fromarray(np.ascontiguousarray(cache["pixels"][y0:y1, x0:x1])).save(img_dir / name)
                images.append({"id": tile_id, "file_name": name, "width": x1 - x0, "height": y1 - y0,
                               "tile": {"source_image_id": iid, "source_file_name": src["file_name"],
                                        "offset": [x0, y0]}})
                for ann, box, was_clipped in kept:
                    w, h = float(box[2] - box[0]), float(box[3] - box[1])
                    annotations.append({"id": len(annotations) + 1, "image_id": tile_id,
                                        "category_id": ann["category_id"],
                                        "bbox": [round(float(box[0]), 4), round(float(box[1]), 4), round(w, 4), round(h, 4)],
                                        "area": round(w * h, 4), "iscrowd": 0,
                                        "source_annotation_id": ann["id"], "clipped": bool(was_clipped)})
                    n_kept += 1
                    n_clipped += int(was_clipped)
            write_json(work / "annotations" / f"instances_{split_name}.json", {
                "info": {"description": f"{cfg.size} px tiles, overlap {cfg.overlap:g}, of {sources[split_name].ann}",
                         "version": "1.0"},
                "licenses": [], "images": images, "annotations": annotations,
                "categories": split.coco.dataset["categories"]}, indent=None)
            metrics[split_name] = {"source_images": len(split.image_ids), "tiles": len(tiles),
                                   "tiles_with_objects": len(with_objects), "empty_tiles_kept": n_empty,
                                   "empty_tiles_dropped": len(empty) - n_empty, "source_boxes": n_boxes,
                                   "tile_boxes": n_kept, "clipped_boxes": n_clipped}
        inputs = {f"{s}_annotations": p.ann for s, p in sources.items()}
        write_manifest(work, STAGE, cfg, inputs, metrics, seed=cfg.seed,
                       device="cpu", wall_time_s=timer.elapsed)
    log(f"wrote {out}")
    summary_table("data slice", {f"{s} {k}": v for s in cfg.splits for k, v in metrics[s].items()})
    return metrics

