"""`sodtool data synth`'s options (the stage: sodtool.stages.synth, which holds the presets)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from sodtool.options import option


@dataclass(frozen=True)
class SynthConfig:
    """Options of `sodtool data synth`. None means "take it from the preset".

    out: output folder (default `data/synth-<preset>`); objects_per_image / distractors_per_image
    are inclusive (min, max) ranges drawn uniformly per image.
    """

    out: Optional[Path] = option(None, help="Output dataset folder (default: data/synth-<preset>).")
    preset: str = option("quick", help="quick: 500 train + 100 val + 100 minival images (the quickstart); bench: "
                         "4000 + 500 + 500 (measurements), 320x320 both; large: 400 + 50 + 50 images of 2048x2048 "
                         "holding the bench's objects at their pixel sizes, about 50 each (sliced inference).")
    train_images: Optional[int] = option(None, help="Number of train images (overrides the preset).")
    val_images: Optional[int] = option(None, help="Number of val images, where settings are chosen (overrides the "
                                       "preset).")
    minival_images: Optional[int] = option(None, help="Number of minival images (overrides the preset).")
    image_size: Optional[int] = option(None, help="Side of the square images in px, >= 192 (overrides the preset).")
    classes: int = option(10, help="Number of classes K (1..12), each an internal pattern: stripes-h, stripes-v, "
                          "stripes-d, ...")
    seed: int = option(0, help="Seed: the same seed gives byte-identical images and annotations.")
    workers: int = option(1, help="Processes drawing images (the output does not depend on it).")
    overwrite: bool = option(False, help="Replace a non-empty folder that is not a previous synth output.")
    objects_per_image: Optional[tuple[int, int]] = None
    distractors_per_image: Optional[tuple[int, int]] = None
    max_object_side: Optional[int] = None
