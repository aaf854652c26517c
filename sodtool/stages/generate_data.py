"""`sodtool data generate`: training images with extra objects inserted (DetectorGAN's generated
data, Liu et al. ICCV 2019; copy-paste is the baseline any generative method must beat).

Each of the `count` images is a real image of the split, taken in a seeded order (cycled when
`count` exceeds the split), with up to `per_image` objects inserted at places chosen by
`sodtool.insertion.sample_insertion_boxes` (the rule is in that module's docstring). The objects
come from the split's own whole objects (the pool); `insert_objects` puts them in the image by
the chosen method: `copy-paste` blends the real object's pixels in with a feathered edge;
`detgan` has a trained DetectorGAN generator (`--detgan RUN/detgan`, `sodtool train detgan`)
paint each object from noise into the patch around its box, at the patch size it was trained at.
An image where the rule finds no place is still written, with its real boxes only.

Output, in sodtool's layout: `images/train/<NNNNNN>_<source stem>.png`,
`annotations/instances_train.json` (the source categories; each image entry is marked
`"generated": true` with `source_image_id`, `source_file_name` and `method`; each annotation
records `inserted` and `source_annotation_id`: the real box it is, or the object it copies; an
inserted one also its `source_image_id`, `anchor_annotation_id` and `transform`) and
`manifest.json` naming the source; `preview.png`: the first images beside their sources, the
inserted boxes drawn. Same seed and inputs, same bytes.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sodtool.artefacts import Timer, check_output, staged_dir, write_json, write_manifest
from sodtool.coco import CocoSplit, load_split, resolve_split
from sodtool.configs.generate_data import GenerateDataConfig
from sodtool.console import log, summary_table, track
from sodtool.errors import InputError
from sodtool.figures import inserted_objects_grid
from sodtool.insertion import CONTEXT_PX, FEATHER_PX, REJECT_REASONS, ObjectPool, crop_window, object_crop, \
    paste_objects, paste_window, sample_insertion_boxes, window_around
from sodtool.models import detgan

STAGE = "data-generate"
METHODS = ("copy-paste", "detgan")
# Decoded source images kept at once: a generated image copies objects of up to per_image others.
IMAGE_CACHE = 32
PREVIEW_IMAGES = 4


def check_config(cfg: GenerateDataConfig) -> None:
    """Every option's value (InputError naming it), before any file is read."""
    if cfg.count < 1:
        raise InputError(f"--count must be at least 1, got {cfg.count}")
    if cfg.per_image < 1:
        raise InputError(f"--per-image must be at least 1, got {cfg.per_image}")
    if cfg.method not in METHODS:
        raise InputError(f"--method must be one of {', '.join(METHODS)}, got {cfg.method!r}")
    if cfg.method == "detgan" and cfg.detgan is None:
        raise InputError("--method detgan needs --detgan RUN/detgan (a trained DetectorGAN)")
    if cfg.method != "detgan" and cfg.detgan is not None:
        raise InputError(f"--detgan is for --method detgan, not {cfg.method}")
    if cfg.data is not None and Path(cfg.out).resolve() == Path(cfg.data).resolve():
        raise InputError(f"--out {cfg.out} is the source dataset; choose another folder")


def object_pool(split: CocoSplit) -> ObjectPool:
    """The split's objects that insertion may copy: not crowd, and whole (at least 1 px from the
    image border: a car cut by the border would be pasted as half a car)."""
    boxes, labels, image_ids, ann_ids = [], [], [], []
    for iid in split.image_ids:
        info = split.coco.imgs[iid]
        t = split.targets(iid)
        b = t["boxes"].astype(np.float64)
        whole = ((b[:, 0] >= 1) & (b[:, 1] >= 1) & (b[:, 2] <= info["width"] - 1) & (b[:, 3] <= info["height"] - 1))
        boxes.append(b[whole])
        labels.append(t["labels"][whole])
        ann_ids.append(t["ann_ids"][whole])
        image_ids.append(np.full(int(whole.sum()), iid, np.int64))
    return ObjectPool(boxes=np.concatenate(boxes or [np.zeros((0, 4))]).reshape(-1, 4),
                      labels=np.concatenate(labels or [np.zeros(0, np.int64)]).astype(np.int64),
                      image_ids=np.concatenate(image_ids or [np.zeros(0, np.int64)]).astype(np.int64),
                      ann_ids=np.concatenate(ann_ids or [np.zeros(0, np.int64)]).astype(np.int64))


def insert_objects(method: str, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, crops: list[np.ndarray],
                   real_boxes: np.ndarray, generator=None) -> np.ndarray:
    """The generated image: image uint8 [H, W, 3] with the objects put at boxes [k, 4] xyxy px.

    labels int64 [k] in 1..K; crops[i] uint8: the source object i with CONTEXT_PX px of context,
    turned and flipped like its box (`insertion.object_crop`); real_boxes [N, 4] xyxy: the
    image's objects, left as they are; generator: the method's model (none for copy-paste).
    One call per image: the seam where each method plugs in."""
    if method == "copy-paste":
        return paste_objects(image, boxes, crops, feather=FEATHER_PX, margin=CONTEXT_PX, keep=real_boxes)
    # detgan: generator = (G, its model.pt info, the image's noise generator). One object at a
    # time, each in the patch around its box as G was trained, so a later patch sees the objects
    # painted before it.
    g, info, noise = generator
    size = int(info["patch"])
    out = image.copy()
    for box, label in zip(boxes, labels):
        x0, y0 = window_around(box, out.shape[:2], size)
        patch = torch.from_numpy(np.ascontiguousarray(crop_window(out, x0, y0, size))).permute(2, 0, 1)[None]
        local = torch.from_numpy((box - np.array([x0, y0, x0, y0])).astype(np.float32))[None]
        painted = detgan.insert_objects(g, patch, local, torch.tensor([int(label)]), noise, int(info["margin"]))
        out = paste_window(out, painted[0].permute(1, 2, 0).numpy(), x0, y0)
    return out


def generate_data(cfg: GenerateDataConfig) -> dict:
    """Write the generated dataset (module docstring); return the metrics (also in the manifest)."""
    timer = Timer()
    check_config(cfg)
    out = check_output(cfg.out, "folder", overwrite=cfg.overwrite)
    source = resolve_split(cfg.data, cfg.split)
    split = load_split(source, skip_invalid=cfg.skip_invalid)
    if not split.image_ids:
        raise InputError(f"{source.ann}: no images to generate from")
    pool = object_pool(split)
    model = None
    if cfg.method == "detgan":
        model = detgan.load_model(cfg.detgan)
        names = [(int(c["id"]), c["name"]) for c in model[1]["categories"]]
        if names != list(zip(split.categories.ids, split.categories.names)):
            raise InputError(f"--detgan {cfg.detgan} was trained on other categories than {source.ann}")
    load_image = functools.lru_cache(maxsize=IMAGE_CACHE)(split.load_image)
    order = np.random.default_rng(cfg.seed).permutation(len(split.image_ids))
    images, annotations = [], []
    preview: list = []  # (source, generated, inserted boxes) of the first images, for preview.png
    n_inserted = n_tried = n_empty = 0
    rejected = dict.fromkeys(REJECT_REASONS, 0)
    with staged_dir(out) as work:
        (work / "annotations").mkdir()
        img_dir = work / "images" / "train"
        img_dir.mkdir(parents=True)
        for i in track(range(cfg.count), f"generate {cfg.method}"):
            iid = split.image_ids[int(order[i % len(order)])]
            src = split.coco.imgs[iid]
            image = load_image(iid)
            real = split.targets(iid)
            crowd = split.targets(iid, include_crowd=True)
            crowd_boxes = crowd["boxes"][crowd["iscrowd"] == 1]
            # Each image draws from its own stream: image i is the same whatever came before it.
            rng = np.random.default_rng([cfg.seed, i])
            found = sample_insertion_boxes(image, real["boxes"], pool, cfg.per_image, rng, avoid=crowd_boxes)
            crops = [object_crop(load_image(int(pool.image_ids[s])), pool.boxes[s], CONTEXT_PX, t, hf, vf)
                     for s, t, hf, vf in zip(found["source"], found["turns"], found["hflip"], found["vflip"])]
            generator = None if model is None else (*model, torch.Generator().manual_seed(int(rng.integers(2**62))))
            new = insert_objects(cfg.method, image, found["boxes"], found["labels"], crops, crowd["boxes"], generator)
            if len(preview) < PREVIEW_IMAGES:
                preview.append((image, new, found["boxes"]))
            image_id = i + 1
            name = f"{image_id:06d}_{Path(src['file_name']).stem}.png"
            Image.fromarray(new).save(img_dir / name)
            images.append({"id": image_id, "file_name": name, "width": src["width"], "height": src["height"],
                           "generated": True, "source_image_id": iid, "source_file_name": src["file_name"],
                           "method": cfg.method})
            for a in split.annotations(iid):
                w, h = float(a["bbox"][2]), float(a["bbox"][3])
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": a["category_id"],
                                    "bbox": list(a["bbox"]), "area": a.get("area", round(w * h, 4)),
                                    "iscrowd": a.get("iscrowd", 0), "inserted": False, "source_annotation_id": a["id"]})
            anchor_ids = real["ann_ids"]
            for box, label, s, a_idx, t, hf, vf in zip(found["boxes"], found["labels"], found["source"], found["anchor"],
                                                        found["turns"], found["hflip"], found["vflip"]):
                w, h = float(box[2] - box[0]), float(box[3] - box[1])
                annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                    "category_id": split.categories.to_category_id(int(label)),
                                    "bbox": [float(box[0]), float(box[1]), w, h], "area": round(w * h, 4),
                                    "iscrowd": 0, "inserted": True, "source_annotation_id": int(pool.ann_ids[s]),
                                    "source_image_id": int(pool.image_ids[s]),
                                    "anchor_annotation_id": int(anchor_ids[a_idx]),
                                    "transform": {"turns": int(t), "hflip": bool(hf), "vflip": bool(vf)}})
            n_inserted += len(found["boxes"])
            n_empty += int(len(found["boxes"]) == 0)
            n_tried += found["tried"]
            for k, v in found["rejected"].items():
                rejected[k] += v
        write_json(work / "annotations" / "instances_train.json", {
            "info": {"description": f"{cfg.method}: up to {cfg.per_image} objects inserted into images of {source.ann}",
                     "version": "1.0"},
            "licenses": [], "images": images, "annotations": annotations,
            "categories": split.coco.dataset["categories"]}, indent=None)
        metrics = {"source_images": len(split.image_ids), "pool_objects": len(pool), "images": cfg.count,
                   "inserted": n_inserted, "requested": cfg.count * cfg.per_image,
                   "images_without_insertions": n_empty, "candidates_tried": n_tried,
                   "rejected_candidates": sum(rejected.values()),
                   **{f"rejected_{k}": v for k, v in rejected.items()}}
        inserted_objects_grid(preview, work / "preview.png")
        write_manifest(work, STAGE, cfg, {f"{cfg.split}_annotations": source.ann, "detgan": cfg.detgan}, metrics,
                       seed=cfg.seed, device="cpu", wall_time_s=timer.elapsed)
    log(f"wrote {out}")
    if n_empty:
        log(f"{n_empty} of {cfg.count} images had no place the insertion rule accepts: written with their real boxes only")
    summary_table("data generate", metrics)
    return metrics
