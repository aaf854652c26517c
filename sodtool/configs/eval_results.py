"""`sodtool eval --results FILE`'s options (the stage: sodtool.stages.eval_results).

The options it shares with rescoring (`sodtool eval --mtgan ...`, sodtool.configs.eval_mtgan) are
one option of the one `eval` command: their help texts are defined here, for both configs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from sodtool.options import option

DATA_HELP = "Dataset folder (sodtool or COCO 2017 layout)."
SPLIT_HELP = "Split whose ground truth to evaluate against."
ANN_HELP = "Ground-truth annotation file (overrides --data/--split)."
IMAGES_HELP = "Image folder (not needed to evaluate --results; --detector runs on it)."
OUT_HELP = ("Output folder (default: <results folder>/eval_<results name>; with --mtgan: RUN/eval_<split> beside "
            "RUN/mtgan).")
OVERWRITE_HELP = "Replace a finished --out folder (only once the new one is complete)."


@dataclass(frozen=True)
class EvalResultsConfig:
    """`sodtool eval --results FILE`: evaluate a COCO results file against a split's ground truth."""

    # Required here, optional on the command line: without it `sodtool eval` rescores (or says what is missing).
    results: Path = option(help="COCO results JSON: a list of {image_id, category_id, bbox (x, y, w, h), score}.",
                           cli_type=Optional[Path], cli_default=None)
    ann: Optional[Path] = option(None, help=ANN_HELP)
    images: Optional[Path] = option(None, help=IMAGES_HELP)
    data: Optional[Path] = option(None, help=DATA_HELP)
    split: str = option("minival", help=SPLIT_HELP)
    out: Optional[Path] = option(None, help=OUT_HELP)
    overwrite: bool = option(False, help=OVERWRITE_HELP)
