"""Dataset statistics: objects per class and per COCO size bucket, a box-size histogram.

Sizes use the annotation's `area` (as COCOeval does), bucketed with `coco.size_bucket`:
small < 32², medium < 96², large otherwise. Crowd regions (iscrowd=1) are counted apart and
left out of every object count, because COCOeval ignores them. The histogram bins sqrt(area)
in pixels; its 32 and 96 edges are the COCO thresholds, so bins never straddle a bucket.
`sizes_<split>.png` draws it (`figures.draw_size_histogram`).
"""

from __future__ import annotations

from pathlib import Path

from sodtool.artefacts import Timer, check_output, staged_dir, write_json, write_manifest
from sodtool.coco import SplitPaths, load_split, size_bucket
from sodtool.configs.stats import StatsConfig
from sodtool.console import log, print_table, summary_table, warn
from sodtool.evaluate import resolve_ground_truth
from sodtool.figures import draw_size_histogram

# sqrt(area) bin edges in pixels; the last bin is open ("256+").
HIST_EDGES = (0, 8, 16, 24, 32, 48, 64, 96, 128, 256)
BUCKETS = ("small", "medium", "large")


def bin_labels(edges: tuple[int, ...] = HIST_EDGES) -> list[str]:
    """'0-8', '8-16', ..., '256+'."""
    return [f"{a}-{b}" for a, b in zip(edges[:-1], edges[1:])] + [f"{edges[-1]}+"]


def size_histogram(areas, edges: tuple[int, ...] = HIST_EDGES) -> list[int]:
    """Counts of sqrt(area) in [edge_i, edge_i+1) (last bin open).

    Compared on area against squared edges, so a box falls in the bin that agrees exactly with
    its COCO bucket (no square-root rounding at 32 or 96).
    """
    sq = [e * e for e in edges]
    counts = [0] * len(edges)
    for a in areas:
        i = len(sq) - 1
        while i > 0 and a < sq[i]:
            i -= 1
        counts[i] += 1
    return counts


def _default_out(data: Path | None, ann: Path, split: str) -> Path:
    name = Path(data).resolve().name if data is not None else ann.stem
    return Path("runs") / "stats" / f"{name}_{split}"


def compute_stats(coco, images_dir: Path | None = None) -> dict:
    """Statistics of a pycocotools COCO object (see the module docstring for what is counted)."""
    anns = coco.dataset["annotations"]
    crowd = [a for a in anns if a.get("iscrowd", 0)]
    objects = [a for a in anns if not a.get("iscrowd", 0)]
    cat_ids = sorted(coco.cats)
    per_class = {cid: {"id": cid, "name": coco.cats[cid]["name"], "objects": 0, **{b: 0 for b in BUCKETS},
                       "images": 0} for cid in cat_ids}
    buckets = {b: 0 for b in BUCKETS}
    images_with = {cid: set() for cid in cat_ids}
    per_image: dict[int, int] = {iid: 0 for iid in coco.imgs}
    for a in objects:
        b = size_bucket(float(a["area"]))
        buckets[b] += 1
        c = per_class[a["category_id"]]
        c["objects"] += 1
        c[b] += 1
        images_with[a["category_id"]].add(a["image_id"])
        per_image[a["image_id"]] += 1
    for cid in cat_ids:
        per_class[cid]["images"] = len(images_with[cid])
    n = len(objects)
    counts_per_image = list(per_image.values())
    hist = size_histogram([float(a["area"]) for a in objects])
    out = {
        "images": len(coco.imgs),
        "categories": len(cat_ids),
        "objects": n,
        "crowd": len(crowd),
        "images_without_objects": sum(1 for v in counts_per_image if v == 0),
        "objects_per_image": {"mean": n / len(coco.imgs) if coco.imgs else 0.0, "max": max(counts_per_image, default=0)},
        "sizes": {b: {"count": buckets[b], "fraction": buckets[b] / n if n else 0.0} for b in BUCKETS},
        "histogram": {"edges_sqrt_area_px": list(HIST_EDGES), "labels": bin_labels(), "counts": hist},
        "per_class": list(per_class.values()),
    }
    if images_dir is not None:
        out["missing_image_files"] = sum(1 for im in coco.imgs.values() if not (images_dir / im["file_name"]).is_file())
    return out


def dataset_stats(cfg: StatsConfig) -> dict:
    """Describe a split; write stats_<split>.json, sizes_<split>.png and manifest.json into cfg.out.

    Returns the statistics dict (the content of stats_<split>.json).
    """
    timer = Timer()
    ann, images = resolve_ground_truth(cfg.data, cfg.split, cfg.ann, cfg.images)
    out = check_output(Path(cfg.out) if cfg.out is not None else _default_out(cfg.data, ann, cfg.split), "folder",
                       overwrite=cfg.overwrite)
    split = load_split(SplitPaths(ann=ann, images=images or ann.parent), check_files=False)
    stats = compute_stats(split.coco, images)
    stats = {"annotations": str(ann), "image_dir": str(images) if images else None, "split": cfg.split, **stats}
    if stats.get("missing_image_files"):
        warn(f"{stats['missing_image_files']} of {stats['images']} image files are missing under {images}")

    with staged_dir(out) as work:
        write_json(work / f"stats_{cfg.split}.json", stats)
        title = f"{(Path(cfg.data).resolve().name if cfg.data else ann.name)} {cfg.split}: {stats['objects']} objects"
        draw_size_histogram(stats["histogram"]["counts"], HIST_EDGES, work / f"sizes_{cfg.split}.png", title=title)
        write_manifest(work, "data-stats", cfg, {"annotations": ann}, {k: stats[k] for k in (
            "images", "categories", "objects", "crowd", "images_without_objects", "sizes")},
            seed=None, device="cpu", wall_time_s=timer.elapsed)

    summary_table(f"{ann.name} ({cfg.split})", {
        "images": stats["images"], "categories": stats["categories"], "objects (non-crowd)": stats["objects"],
        "crowd regions": stats["crowd"], "images without objects": stats["images_without_objects"],
        "objects per image (mean)": stats["objects_per_image"]["mean"],
        "objects per image (max)": stats["objects_per_image"]["max"],
    })
    print_table("COCO sizes (annotation area)", ["size", "objects", "fraction"],
                [[f"{b} ({r})", stats["sizes"][b]["count"], stats["sizes"][b]["fraction"]]
                 for b, r in zip(BUCKETS, ("< 32²", "32²-96²", ">= 96²"))])
    log(histogram_text(stats["histogram"]["counts"]))
    print_table("objects per class", ["class (id)", "objects", "small", "medium", "large", "images"],
                [[f"{c['name']} ({c['id']})", c["objects"], c["small"], c["medium"], c["large"], c["images"]]
                 for c in stats["per_class"]])
    log(f"wrote {out}")
    return stats


def histogram_text(counts: list[int], width: int = 40) -> str:
    """The size histogram as text bars (one line per sqrt(area) bin)."""
    labels = bin_labels()
    top = max(counts, default=0) or 1
    total = sum(counts) or 1
    lines = ["box sizes, sqrt(area) in px (COCO: small < 32, medium < 96):"]
    for lab, c in zip(labels, counts):
        lines.append(f"  {lab:>8s} | {'#' * round(width * c / top):<{width}s} {c} ({100 * c / total:.1f}%)")
    return "\n".join(lines)
