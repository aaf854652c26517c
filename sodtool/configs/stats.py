"""`sodtool data stats`'s options (the stage: sodtool.stages.stats)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sodtool.options import option


@dataclass(frozen=True)
class StatsConfig:
    """`sodtool data stats`: describe one split of a COCO-format dataset."""

    data: Path | None = option(None, help="Dataset folder (sodtool or COCO 2017 layout).")
    split: str = option("train", help="Split to describe.")
    ann: Path | None = option(None, help="Annotation file (overrides --data/--split).")
    images: Path | None = option(None, help="Image folder (optional: counts missing image files).")
    out: Path | None = option(None, help="Output folder (default: runs/stats/<dataset>_<split>).")
    overwrite: bool = option(False, help="Replace a finished --out folder (only once the new one is complete).")
