"""`sodtool crop-rois`: ROIs of a split (from a detector or its detections), sampled and cropped into an HR store.

Train mode (Fast R-CNN sampling, per image, seeded by (seed, image id) so shards reproduce an
unsharded run): the detector's ROIs (up to `max_rois`, default 300, at score >= `score_thresh`,
default 0.01) are matched to the ground truth with torchvision's box_iou. A ROI is positive
(label = class of its best-matching ground truth) at IoU >= fg_iou (0.5) and background (label
0) for IoU in [bg_low, fg_iou) (bg_low 0.1 default); ROIs below bg_low are not used. Every
ground-truth box is added `gt_jitters` times (default 2), jittered (centre shift N(0, 0.08) of
its size, log-scale N(0, 0.1)) and kept only at IoU >= `jitter_iou` (0.7) with it. Positives:
all jittered ground truth, plus detector positives up to round(fg_fraction * rois_per_image)
(16 of 64) in all. Backgrounds: up to max(rois_per_image - positives, 3 * positives) (for
fg_fraction 0.25), so an image yields at least rois_per_image rows when it has the ROIs, and one
positive in four once it has enough positives; images crowded with objects get more rows.

Test mode: the detector's top `max_rois` (100, the paper's protocol) detections per image at
score >= `score_thresh` (default 0.05), scores and classes kept, each matched to the ground
truth for analysis (label = class at IoU >= fg_iou, else 0).

Ground-truth-only mode (`gt_only`, train mode, no detector; e.g. SR training crops cut from
real photos): the ROIs are the jittered ground truth (as above, `gt_jitters` copies per box at
IoU >= `jitter_iou`) plus random background boxes, as many as train mode would take
(max(rois_per_image - positives, 3 * positives) for fg_fraction 0.25). A background box has the
size of a random ground-truth box of the image, each side scaled by exp(N(0, 0.5)) (capped at
the image's), at a uniform position inside the image, and is kept only at IoU < fg_iou with
every ground-truth box (label 0, target zeros); an image crowded so that few such boxes fit
gets fewer, an image without ground truth none (no rows). Backgrounds have `source` 2 (random
box); `score` and `det_label` are 0 on every row; the store's `detector` attribute is
{"family": "ground truth", "kind": "ground-truth", ...}.

In both modes: `iou` is the IoU with the best-overlapping ground truth and `gt_box` that box
(zeros when no ground truth overlaps), `target` = boxes.encode_target(roi, gt_box) for positives
(deltas relative to the ROI's square, the geometry the crop shows; computed in float64 from the
stored float32 boxes) and zeros for backgrounds.

Crop geometry: see `sodtool.rois`.

Outputs: the store (atomic: built under a hidden temp name and renamed) and a sidecar
`<store>.manifest.json` (stage, resolved config, inputs with identities, metrics) written
right after it: the RUN/ folder holds several stages' files, so a folder-level manifest.json
would claim the whole folder. The store itself also records everything needed to trust it
(attributes), so a store whose sidecar is missing is still complete.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from sodtool import boxes as B
from sodtool import rois
from sodtool import store as S
from sodtool.artefacts import Timer, check_output, config_dict, file_identity
from sodtool.coco import CategoryMap, load_split, resolve_split
from sodtool.configs.crop_rois import CropRoisConfig
from sodtool.console import log, summary_table, track
from sodtool.device import device_name, resolve_device
from sodtool.errors import InputError
from sodtool.models.detector_weights import FAMILIES
from sodtool.provenance import image_digest

MODES = ("train", "test")


def parse_shard(shard: str | None) -> tuple[int, int]:
    if shard is None:
        return 0, 1
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(shard))
    if not m or not (int(m.group(2)) >= 1 and 0 <= int(m.group(1)) < int(m.group(2))):
        raise InputError(f"--shard must be i/n with 0 <= i < n (e.g. 0/4), got '{shard}'")
    return int(m.group(1)), int(m.group(2))


def shard_path(out: Path, i: int, n: int) -> Path:
    """`rois_train.h5` -> `rois_train.shard-i-of-n.h5` beside it."""
    out = Path(out)
    suffix = out.suffix or ".h5"
    return out.with_name(f"{out.name[:-len(out.suffix)] if out.suffix else out.name}.shard-{i}-of-{n}{suffix}")

def resolve_config(cfg: CropRoisConfig) -> CropRoisConfig:
    """Fill mode defaults and check every option; InputError names the option at fault."""
    if cfg.mode not in MODES:
        raise InputError(f"--mode must be train or test, got '{cfg.mode}'")
    if cfg.detector not in FAMILIES:
        raise InputError(f"--detector '{cfg.detector}' is not a detector family ({', '.join(FAMILIES)})")
    if cfg.slice is not None and (0 < cfg.slice < 32 or cfg.slice < 0 or cfg.detector_weights is None):
        raise InputError("--slice takes a tile size of at least 32 px (0: whole images) and a detector to run "
                         "(--detector-weights)")
    if not 0.0 <= cfg.overlap < 1.0:
        raise InputError(f"--overlap must be in [0, 1), got {cfg.overlap}")
    if cfg.gt_only:
        if cfg.mode != "train":
            raise InputError(f"--gt-only samples training ROIs (--mode train); --mode {cfg.mode} needs a detector's "
                             "top detections (--detector-weights or --detections)")
        if cfg.detector_weights is not None or cfg.detections is not None:
            given = "--detector-weights" if cfg.detector_weights is not None else "--detections"
            raise InputError(f"--gt-only takes its ROIs from the ground truth: drop {given} (or drop --gt-only)")
    elif (cfg.detector_weights is None) == (cfg.detections is None):
        raise InputError("give exactly one of --detector-weights (a detector checkpoint) and --detections (a COCO "
                         "results JSON), or --gt-only (train mode: jittered ground truth and random backgrounds)")
    thresh, max_rois = rois.MODE_DEFAULTS[cfg.mode]
    thresh = thresh if cfg.score_thresh is None else cfg.score_thresh
    max_rois = max_rois if cfg.max_rois is None else cfg.max_rois
    checks = [
        (cfg.hr_size >= 4 and cfg.hr_size % 4 == 0, f"--hr-size must be a positive multiple of 4, got {cfg.hr_size}"),
        (cfg.context >= 1.0 and math.isfinite(cfg.context), f"--context must be a finite number >= 1, got {cfg.context}"),
        (0.0 <= thresh <= 1.0, f"--score-thresh must be in [0, 1], got {thresh}"),
        (max_rois >= 1, f"--max-rois must be >= 1, got {max_rois}"),
        (0.0 < cfg.fg_iou <= 1.0, f"--fg-iou must be in (0, 1], got {cfg.fg_iou}"),
        (0.0 <= cfg.bg_low < cfg.fg_iou, f"--bg-low must be in [0, fg_iou), got {cfg.bg_low}"),
        (0.0 < cfg.fg_fraction <= 1.0, f"--fg-fraction must be in (0, 1], got {cfg.fg_fraction}"),
        (cfg.rois_per_image >= 1, f"--rois-per-image must be >= 1, got {cfg.rois_per_image}"),
        (cfg.gt_jitters >= 0, f"--gt-jitters must be >= 0, got {cfg.gt_jitters}"),
        (0.0 < cfg.jitter_iou <= 1.0, f"--jitter-iou must be in (0, 1], got {cfg.jitter_iou}"),
        (cfg.seed >= 0, f"--seed must be non-negative, got {cfg.seed}"),
        (cfg.batch_images >= 1, f"--batch-images must be >= 1, got {cfg.batch_images}"),
        (cfg.compression in S.COMPRESSIONS, f"--compression must be one of {', '.join(S.COMPRESSIONS)}, got '{cfg.compression}'"),
    ]
    for ok, msg in checks:
        if not ok:
            raise InputError(msg)
    parse_shard(cfg.shard)
    # The files last: a bad value is refused whatever the inputs.
    if cfg.detections is not None and not Path(cfg.detections).is_file():
        raise InputError(f"--detections file not found: {cfg.detections}")
    weights = cfg.detector_weights
    if weights is not None:
        weights = Path(weights)
        if weights.is_dir():  # a run folder: its model.pt, as `sodtool detect` accepts
            found = [p for p in (weights / "model.pt", weights / "detector" / "model.pt") if p.is_file()]
            if not found:
                raise InputError(f"--detector-weights folder {weights} holds no model.pt (did `sodtool train detector` finish?)")
            weights = found[0]
        elif not weights.is_file():
            raise InputError(f"--detector-weights file not found: {weights}")
    return dataclasses.replace(cfg, out=Path(cfg.out), score_thresh=float(thresh), max_rois=int(max_rois),
                               detector_weights=weights)


def crop_rois(cfg: CropRoisConfig) -> dict:
    """Sample (train) or take (test) ROIs of every image of a split and crop them into an HR store.

    Writes `cfg.out` (or its shard file) and its sidecar manifest; returns the metrics.
    """
    timer = Timer()
    cfg = resolve_config(cfg)
    shard_i, shard_n = parse_shard(cfg.shard)
    out = shard_path(cfg.out, shard_i, shard_n) if cfg.shard is not None else cfg.out
    check_output(out, "file", overwrite=cfg.overwrite)
    paths = resolve_split(cfg.data, cfg.split, cfg.ann, cfg.images)
    split = load_split(paths, skip_invalid=cfg.skip_invalid)
    dev = resolve_device(cfg.device)
    if cfg.gt_only:
        source = rois.GroundTruthOnly(paths.ann)
    elif cfg.detections is not None:
        source = rois.JsonDetections(Path(cfg.detections), split)
    else:
        slicing = (cfg.slice, cfg.overlap, cfg.slice_full)
        source = rois.ModelDetections(Path(cfg.detector_weights), dev, split.categories, slicing)
        if source.det.family != cfg.detector:
            raise InputError(f"{cfg.detector_weights} holds a {source.det.family} detector, not --detector {cfg.detector}")
    image_ids = split.image_ids[shard_i::shard_n]
    attrs = {
        "categories": split.categories.to_json(),
        "hr_size": cfg.hr_size,
        "context": cfg.context,
        "mode": cfg.mode,
        "split": cfg.split,
        "detector": source.identity,
        "annotations": file_identity(paths.ann),
        "image_dir": str(paths.images),
        "padding": "zero",
        "crop_method": "bilinear grid_sample; windows > hr_size: area pyramid + 2x2 supersampling",
        "config": config_dict(cfg),
        "num_images": len(image_ids),
    }
    if cfg.shard is not None:
        attrs["shard"] = f"{shard_i}/{shard_n}"
    log(f"crop-rois: {len(image_ids)} images of {paths.ann} ({cfg.mode} mode{', ground truth only' if cfg.gt_only else ''})"
        f" -> {out}")
    counts = {"rows": 0, "positives": 0, "backgrounds": 0, "gt_rows": 0, "images_without_rows": 0}
    iou_pos_sum = 0.0
    crop_s = detect_s = 0.0
    cropped: dict[int, str] = {}
    with S.StoreWriter(out, schema=S.SCHEMA, fields=S.hr_fields(cfg.hr_size), attrs=attrs,
                       compression=cfg.compression) as writer:
        batches = [image_ids[i:i + cfg.batch_images] for i in range(0, len(image_ids), cfg.batch_images)]
        for batch_ids in track(batches, "crop-rois", total=len(batches)):
            images = [split.load_image(i) for i in batch_ids]
            t0 = Timer()
            dets = source(batch_ids, images, cfg.score_thresh, cfg.max_rois)
            detect_s += t0.elapsed
            for iid, img, d in zip(batch_ids, images, dets):
                h, w = img.shape[:2]
                t = split.targets(iid)
                gt = {"boxes": t["boxes"], "labels": t["labels"]}
                if cfg.gt_only:
                    rows = rois.sample_gt_only(gt, w, h, cfg, rois.image_rng(cfg.seed, iid))
                else:
                    det = rois.prepare_detections(d["boxes"], d["scores"], d["labels"], w, h, cfg.score_thresh, cfg.max_rois)
                    if cfg.mode == "train":
                        rows = rois.sample_train(det, gt, w, h, cfg, rois.image_rng(cfg.seed, iid))
                    else:
                        rows = rois.rows_test(det, gt, cfg)
                n = len(rows["roi"])
                if n == 0:
                    counts["images_without_rows"] += 1
                    continue
                t1 = Timer()
                windows = B.square_windows(torch.from_numpy(rows["roi"]), cfg.context)
                crops = rois.crop_windows(img, windows, cfg.hr_size, device=dev).cpu()
                crop_s += t1.elapsed
                writer.append(hr=crops, window=windows.numpy().astype(np.float32),
                              image_id=np.full(n, iid, np.int64), **rows)
                counts["rows"] += n
                pos = rows["label"] > 0
                counts["positives"] += int(pos.sum())
                counts["backgrounds"] += int((~pos).sum())
                counts["gt_rows"] += int((rows["source"] == 1).sum())
                iou_pos_sum += float(rows["iou"][pos].sum())
            # The identity of every image cropped, rows or not: what eval checks models against.
            cropped.update({i: image_digest(split.image_path(i)) for i in batch_ids})
        writer.record_images(cropped)
        digest = writer.content_sha256()
    # The new store is in place: a sidecar left beside it describes the old one (should writing the
    # new sidecar fail, on a full disk, the store stands alone: it records everything to trust it).
    S.manifest_path(out).unlink(missing_ok=True)
    metrics = {
        "images": len(image_ids),
        **counts,
        "rows_per_image": counts["rows"] / max(1, len(image_ids)),
        "positive_fraction": counts["positives"] / max(1, counts["rows"]),
        "mean_iou_positives": iou_pos_sum / max(1, counts["positives"]),
        "crop_s": round(crop_s, 3),
        "crops_per_s": counts["rows"] / crop_s if crop_s > 0 else None,
        "detector_s": round(detect_s, 3),
        "store_bytes": out.stat().st_size,
        "content_sha256": digest,
        "wall_time_s": round(timer.elapsed, 3),
        "skipped_annotations": split.skipped_report(),
    }
    inputs = {"annotations": attrs["annotations"], "images": paths.images}
    if cfg.gt_only:
        inputs["detector"] = {k: v for k, v in source.identity.items() if k != "file"}  # "ground truth"
    else:
        det_key = "detections" if cfg.detections is not None else "detector_weights"
        inputs[det_key] = source.identity["file"]
    S.write_store_manifest(out, "crop-rois", cfg, inputs, metrics, seed=cfg.seed, device=device_name(dev),
                         wall_time_s=timer.elapsed)
    summary_table(f"crop-rois -> {out}", {k: v for k, v in metrics.items() if k != "content_sha256"})
    return metrics


# --------------------------------------------------------------------------------------------
# Merging shards


# Attributes that legitimately differ between the shards of one run.
_SHARD_ATTRS = {"shard", "rows", "content_sha256", "num_images", "config", "content_digest_version",
                "metadata_sha256"}


def merge_shards(out: str | Path, shards: Sequence[str | Path], *, overwrite: bool = False) -> dict:
    """Concatenate the shard stores of one crop-rois run into one store, in image-id order.

    The shards must be exactly 0/n .. n-1/n of one run (same schema, categories and every other
    attribute); the result equals the store an unsharded run writes (same rows, same order, same
    content_sha256). Writes `out` atomically and its sidecar manifest; returns metrics.
    """
    timer = Timer()
    out = Path(out)
    shards = [Path(p) for p in shards]
    if not shards:
        raise InputError("give the shard stores to merge")
    if any(p.resolve() == out.resolve() for p in shards if p.exists()):
        raise InputError(f"the output {out} is also one of the shards")
    check_output(out, "file", overwrite=overwrite)
    files = [S.open_store(p) for p in shards]
    try:
        infos = []
        for p, f in zip(shards, files):
            a = {k: S.attr_str(f, k) if isinstance(f.attrs[k], (str, bytes)) else f.attrs[k] for k in f.attrs}
            if "shard" not in a:
                raise InputError(f"{p} is not a shard (no 'shard' attribute): nothing to merge")
            infos.append(a)
        ref_path, ref = shards[0], infos[0]
        for p, a in zip(shards[1:], infos[1:]):
            if a.get("categories") != ref.get("categories"):
                CategoryMap.from_json(json.loads(ref["categories"])).check_same(
                    CategoryMap.from_json(json.loads(a["categories"])), f"shard {p} vs shard {ref_path}")
            for k in sorted((set(a) | set(ref)) - _SHARD_ATTRS):
                if _attr_differs(a.get(k), ref.get(k)):
                    raise InputError(f"shard {p} differs from shard {ref_path} in '{k}': not shards of one run")
            c1 = {k: v for k, v in json.loads(a["config"]).items() if k != "shard"}
            c0 = {k: v for k, v in json.loads(ref["config"]).items() if k != "shard"}
            if c1 != c0:
                diff = sorted(k for k in set(c0) | set(c1) if c0.get(k) != c1.get(k))
                raise InputError(f"shard {p} was made with other options than {ref_path} ({', '.join(diff)})")
        parsed = [parse_shard(a["shard"]) for a in infos]
        n = parsed[0][1]
        got = sorted(i for i, _ in parsed)
        if any(m != n for _, m in parsed) or got != list(range(n)):
            raise InputError(f"shards {[a['shard'] for a in infos]} are not exactly 0/{n} .. {n - 1}/{n}, each once")
        # Every image's rows are contiguous in its shard; merged order is by image id (the split's order).
        runs = []
        for s, f in enumerate(files):
            ids = f["image_id"][:]
            if len(ids) == 0:
                continue
            starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
            ends = np.r_[starts[1:], len(ids)]
            runs += [(int(ids[a]), s, int(a), int(b)) for a, b in zip(starts, ends)]
        runs.sort()
        dup = [r for r, q in zip(runs[1:], runs[:-1]) if r[0] == q[0]]
        if dup:
            raise InputError(f"image {dup[0][0]} has rows in two shards ({shards[dup[0][1]]}): not shards of one run")
        ref_file = files[0]
        attrs = {k: v for k, v in ref.items() if k not in _SHARD_ATTRS and k not in ("schema", "chunk_rows", "compression")}
        config = {k: v for k, v in json.loads(ref["config"]).items()}
        config["shard"] = None
        attrs["config"] = config
        attrs["num_images"] = int(sum(int(a["num_images"]) for a in infos))
        for k in ("categories", "detector", "annotations"):
            attrs[k] = json.loads(attrs[k])
        hr_size = int(ref_file["hr"].shape[-1])
        compression = ref.get("compression", S.COMPRESSION)
        fields = S.hr_fields(hr_size)
        with S.StoreWriter(out, schema=S.SCHEMA, fields=fields, attrs=attrs, compression=compression) as w:
            for _, s, a, b in track(runs, "merge", total=len(runs)):
                f = files[s]
                w.append(**{k: f[k][a:b] for k in fields})
            recorded = [S.image_digests(p) for p in shards]  # the images each shard cropped
            if all(r is not None for r in recorded):
                w.record_images({i: sha for r in recorded for i, sha in r.items()})
            digest = w.content_sha256()
            rows = w.rows
    finally:
        for f in files:
            f.close()
    S.manifest_path(out).unlink(missing_ok=True)  # the old store's sidecar (see crop_rois)
    metrics = {"shards": len(shards), "rows": rows, "images": attrs["num_images"], "content_sha256": digest,
               "store_bytes": out.stat().st_size, "wall_time_s": round(timer.elapsed, 3)}
    S.write_store_manifest(out, "crop-rois-merge", {"out": str(out), "shards": [str(p) for p in shards]},
                         {f"shard_{i}": p for i, p in enumerate(shards)}, metrics, seed=config.get("seed"),
                         device="cpu", wall_time_s=timer.elapsed)
    summary_table(f"crop-rois merge -> {out}", {k: v for k, v in metrics.items() if k != "content_sha256"})
    return metrics


def _attr_differs(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return not np.array_equal(np.asarray(a), np.asarray(b))
    return a != b

