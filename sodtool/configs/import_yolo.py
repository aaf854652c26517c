"""`sodtool data import-yolo`'s options (the stage: sodtool.stages.import_yolo)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sodtool.options import option


@dataclass(frozen=True)
class ImportYoloConfig:
    """Options of `sodtool data import-yolo`.

    src: the YOLO dataset folder. out: output dataset folder (default `data/<src name>`).
    classes: classes file (default SRC/classes.txt, then SRC/labels/classes.txt).
    images / labels: folder names under src. val_fraction: share of images put in `minival`
    (seeded shuffle) unless train_list / minival_list name the images (one file name or
    path per line; with one list the other split is the rest). holdout_fraction: share of
    all images put in `val` (0 = no val split), a seeded draw from the images that would
    otherwise be train: minival is unchanged. val_list: the `val` images by name instead;
    alone, minival is drawn by val_fraction from the images it does not list; with
    train_list / minival_list, the unlisted rest goes to train if train_list is absent, else
    to minival if minival_list is absent, else is left out. link: how images reach the
    output (copy, hardlink or symlink to the absolute source path). skip_orphan_labels: drop
    label files that have no image instead of failing.
    """

    src: Path = option(help="YOLO dataset folder: images/, labels/ (one `class xc yc w h` .txt per image), "
                       "classes.txt.", argument=True)
    out: Path | None = option(None, help="Output dataset folder (default: data/<SRC folder name>).")
    classes: Path | None = option(None, help="Classes file: `name` per line (ids 1..K) or `ID name` per line (ids "
                                  "kept). Default: SRC/classes.txt.")
    images: str = option("images", help="Image folder under SRC.")
    labels: str = option("labels", help="Label folder under SRC.")
    val_fraction: float = option(0.2, help="Share of images put in minival (seeded shuffle); not the val split, see "
                                 "--holdout-fraction.")
    train_list: Path | None = option(None, help="File listing the train images, one per line (overrides "
                                     "--val-fraction).")
    minival_list: Path | None = option(None, help="File listing the minival images (with one list only, the other "
                                       "split is the rest).")
    holdout_fraction: float = option(0.0, help="Share of all images put in the val split (where settings are "
                                     "chosen), drawn from what would be train; minival stays what --val-fraction "
                                     "gives. 0: no val split.")
    val_list: Path | None = option(None, help="File listing the val-split images (not minival). Alone: minival is "
                                   "drawn by --val-fraction from the other images. With --train-list/--minival-list: "
                                   "the unlisted rest goes to train, else minival.")
    seed: int = option(0, help="Seed of the train/val/minival shuffle.")
    link: str = option("copy", help="How images reach the output: copy, hardlink or symlink.")
    overwrite: bool = option(False, help="Replace a non-empty output folder (only once the new one is complete).")
    skip_orphan_labels: bool = option(False, help="Drop label files that have no image instead of failing.")
