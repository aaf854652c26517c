"""`sodtool detect`: run a detector over a split and write COCO results JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sodtool.artefacts import Timer, atomic_path, check_output, sidecar_manifest_path, write_json, write_manifest
from sodtool.coco import load_split, resolve_split
from sodtool.configs.detect import DetectConfig
from sodtool.console import summary_table
from sodtool.device import device_name, resolve_device, seed_everything
from sodtool.errors import InputError
from sodtool.evaluate import coco_evaluate
from sodtool.models.detector_weights import FAMILIES, detector_file
from sodtool.models.detectors import detect_split, load_detector

# ----------------------------------------------------------------------------------------------
# Detection on a split
# ----------------------------------------------------------------------------------------------


def _detector_file(cfg: DetectConfig) -> Path:
    if cfg.weights is not None:
        if cfg.detector not in FAMILIES:
            raise InputError(f"unknown detector '{cfg.detector}' with --weights (a family: {', '.join(FAMILIES)})")
        return Path(cfg.weights)
    if cfg.detector in FAMILIES:
        raise InputError(f"--detector {cfg.detector} needs --weights FILE (or pass the checkpoint itself as --detector)")
    p = Path(cfg.detector)
    if not p.exists():
        raise InputError(f"detector not found: {p} (give RUN/detector/model.pt, a torchvision state dict, "
                         f"or --detector frcnn --weights FILE)")
    return detector_file(p)


def check_config(cfg: DetectConfig) -> None:
    """Check every option's value (InputError naming it), before any file is looked at."""
    checks = [
        (0.0 <= cfg.score_thresh <= 1.0, f"--score-thresh must be a score in [0, 1], got {cfg.score_thresh}"),
        (cfg.max_per_image >= 1, f"--max-per-image must be at least 1, got {cfg.max_per_image}"),
        (cfg.batch_size >= 1, f"--batch-size must be at least 1, got {cfg.batch_size}"),
        (cfg.min_size is None or cfg.min_size >= 1, f"--min-size must be at least 1, got {cfg.min_size}"),
        (cfg.max_size is None or cfg.max_size >= 1, f"--max-size must be at least 1, got {cfg.max_size}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise InputError(msg)


def manifest_path_for(results_path: Path) -> Path:
    """detections_minival.json -> detections_minival.manifest.json (the file's own manifest)."""
    return sidecar_manifest_path(results_path)


def detect(cfg: DetectConfig) -> dict:
    """Run a detector over a split; write COCO results JSON (top `max_per_image` per image).

    Results use the dataset's category ids and bbox [x, y, w, h] image pixels. The file is
    written atomically, then its manifest (`<out stem>.manifest.json`) last. With `evaluate`
    and a split that has annotations, the metrics include COCO AP.
    """
    timer = Timer()
    check_config(cfg)
    dev = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    ckpt = _detector_file(cfg)
    paths = resolve_split(cfg.data, cfg.split, cfg.ann, cfg.images)
    split = load_split(paths, skip_invalid=cfg.skip_invalid)
    det = load_detector(ckpt, dev, split.categories, min_size=cfg.min_size, max_size=cfg.max_size)
    if cfg.weights is not None and det.family != cfg.detector:
        raise InputError(f"{ckpt} holds a {det.family} detector, not --detector {cfg.detector}")
    if cfg.out is not None:
        out = Path(cfg.out)
    elif ckpt.name == "model.pt" and det.identity.get("format") == "sodtool":
        out = ckpt.parent.parent / f"detections_{cfg.split}.json"
    else:
        out = Path(f"detections_{cfg.split}.json")
    check_output(out, "file", overwrite=cfg.overwrite)
    run_timer = Timer()
    results = detect_split(det, split, score_thresh=cfg.score_thresh, max_per_image=cfg.max_per_image,
                           batch_size=cfg.batch_size, description=f"detect {cfg.split}", amp=cfg.amp)
    elapsed = run_timer.elapsed
    with atomic_path(out) as tmp:
        write_json(tmp, results, indent=None)
        # The sidecar manifest marks the results finished: the old one goes once the new file is
        # complete, just before it replaces the old one.
        manifest_path_for(out).unlink(missing_ok=True)
    metrics: dict[str, Any] = {"images": len(split.image_ids), "detections": len(results),
                               "images_per_s": round(len(split.image_ids) / max(elapsed, 1e-9), 3),
                               "skipped_annotations": split.skipped_report()}
    if cfg.evaluate and split.coco.anns:
        metrics.update(coco_evaluate(split.coco, results))
    write_manifest(out.parent, "detect", cfg, {"detector": det.identity, "annotations": paths.ann}, metrics,
                   seed=cfg.seed, device=device_name(dev), wall_time_s=timer.elapsed, outputs=[out.name],
                   path=manifest_path_for(out))
    shown = {"results": str(out), **{k: metrics[k] for k in ("images", "detections", "images_per_s")}}
    shown.update({k: metrics[k] for k in ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large") if k in metrics})
    summary_table(f"detect {cfg.split}", shown)
    metrics["results_path"] = str(out)
    return metrics

