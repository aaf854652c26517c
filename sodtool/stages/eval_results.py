"""`sodtool eval --results FILE`: COCOeval (bbox) of a results file against a split's ground truth."""

from __future__ import annotations

from pathlib import Path

from sodtool.artefacts import Timer, check_output, read_json, staged_dir, write_json, write_manifest, write_text
from sodtool.coco import SplitPaths, load_split
from sodtool.configs.eval_results import EvalResultsConfig
from sodtool.console import log, print_table, summary_table
from sodtool.evaluate import STAT_NAMES, STAT_TITLES, check_results, coco_evaluate, resolve_ground_truth


def default_eval_out(results: Path) -> Path:
    """`<results folder>/eval_<results stem>/`."""
    results = Path(results)
    return results.parent / f"eval_{results.stem}"


def evaluate_results(cfg: EvalResultsConfig) -> dict:
    """Evaluate `cfg.results` with COCOeval (bbox); write metrics.json, metrics.md, manifest.json.

    Returns the metrics: the 12 STAT_NAMES floats, "per_class_AP" and "counts" (images and
    non-crowd objects of the ground truth, detections, images with detections).
    """
    timer = Timer()
    ann, images = resolve_ground_truth(cfg.data, cfg.split, cfg.ann, cfg.images)
    out = check_output(Path(cfg.out) if cfg.out is not None else default_eval_out(cfg.results), "folder",
                       overwrite=cfg.overwrite)
    split = load_split(SplitPaths(ann=ann, images=images or ann.parent), check_files=False)
    raw = read_json(cfg.results, "results file")
    results = check_results(split.coco, raw, cfg.results)
    log(f"evaluating {len(results)} detections on {len(split.image_ids)} images of {ann}")
    metrics = coco_evaluate(split.coco, results)
    gt_anns = split.coco.dataset["annotations"]
    metrics["counts"] = {
        "images": len(split.image_ids),
        "categories": split.categories.num_classes,
        "gt_objects": sum(1 for a in gt_anns if not a.get("iscrowd", 0)),
        "gt_crowd": sum(1 for a in gt_anns if a.get("iscrowd", 0)),
        "detections": len(results),
        "images_with_detections": len({r["image_id"] for r in results}),
    }

    with staged_dir(out) as work:
        write_json(work / "metrics.json", metrics)
        write_text(work / "metrics.md",
                   metrics_markdown(metrics, title=f"COCO bbox evaluation of {Path(cfg.results).name}"))
        write_manifest(work, "eval-results", cfg, {"results": cfg.results, "annotations": ann}, metrics,
                       seed=None, device="cpu", wall_time_s=timer.elapsed)

    summary_table(f"COCO bbox evaluation ({metrics['counts']['detections']} detections, "
                  f"{metrics['counts']['images']} images)", {STAT_TITLES[k]: metrics[k] for k in STAT_NAMES},
                  columns=("metric", "value"))
    print_table("per-class AP @[IoU=0.50:0.95 | all | 100]", ["class", "AP"],
                [[name, "no GT" if ap is None else ap] for name, ap in metrics["per_class_AP"].items()])
    log(f"wrote {out}")
    return metrics


def metrics_markdown(metrics: dict, title: str) -> str:
    """The 12 stats and the per-class AP as Markdown tables (4 decimals, -1 = no ground truth)."""
    lines = [f"# {title}", "", "| metric | value |", "| --- | ---: |"]
    lines += [f"| {k} | {metrics[k]:.4f} |" for k in STAT_NAMES]
    per_class = metrics.get("per_class_AP") or {}
    if per_class:
        lines += ["", "| class | AP |", "| --- | ---: |"]
        lines += [f"| {n} | {'no GT' if ap is None else f'{ap:.4f}'} |" for n, ap in per_class.items()]
    counts = metrics.get("counts")
    if counts:
        lines += ["", ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in counts.items())]
    return "\n".join(lines) + "\n"
