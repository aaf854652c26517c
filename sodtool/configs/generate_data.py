"""`sodtool data generate`'s options (the stage: sodtool.stages.generate_data)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from sodtool.options import option


@dataclass(frozen=True)
class GenerateDataConfig:
    """`sodtool data generate`. count: images written; per_image: objects inserted at most in
    each; method: one of the stage's METHODS; detgan: the `train detgan` run folder (method detgan)."""

    out: Path = option(help="Output dataset folder (sodtool's layout, split train).")
    data: Optional[Path] = option(None, help="Source dataset folder (sodtool or COCO 2017 layout).")
    split: str = option("train", help="Split whose images and objects are used.")
    method: str = option("copy-paste", help="How objects are inserted: copy-paste (the real object, feathered in) "
                         "or detgan (a trained DetectorGAN generator, with --detgan).")
    count: int = option(100, help="Images written (the split's images in a seeded order, cycled).")
    per_image: int = option(4, help="Objects inserted at most per image (fewer where the insertion rule finds no "
                            "place).")
    detgan: Optional[Path] = option(None, help="With --method detgan: the DetectorGAN run folder (RUN/detgan).")
    seed: int = option(0, help="Seed of the image order, the places and the objects drawn.")
    skip_invalid: bool = option(False, help="Drop boxes of zero size or outside their image instead of failing.")
    overwrite: bool = option(False, help="Replace a finished --out folder (only once the new one is complete).")
