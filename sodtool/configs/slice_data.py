"""`sodtool data slice`'s options (the stage: sodtool.stages.slice_data)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from sodtool.options import option

DEFAULT_SPLITS = ("train",)


def splits_or_default(value: Optional[list[str]], option: str) -> tuple[str, ...]:
    """The repeatable --split (a list, or None when not given) -> a tuple; none given -> DEFAULT_SPLITS.

    The option's own default stays None, so that --help shows no `[default: ...]` beside the
    help text, which already names it.
    """
    return tuple(value or DEFAULT_SPLITS)


@dataclass(frozen=True)
class SliceDataConfig:
    """`sodtool data slice`. size: tile side in px; overlap: share of a tile shared with its
    neighbour, [0, 1); min_visibility: share of a box's area that must lie inside a tile for the
    box to be kept there, (0, 1]; empty_ratio: tiles without objects kept per tile with objects."""

    out: Path = option(help="Output dataset folder (sodtool's layout).")
    data: Optional[Path] = option(None, help="Source dataset folder (sodtool or COCO 2017 layout).")
    size: int = option(512, help="Tile side in px (the grid predict --slice uses).")
    splits: tuple[str, ...] = option(DEFAULT_SPLITS, help="Split to slice; repeatable (default: train).",
                                     flag="--split", cli_type=Optional[list[str]], parse=splits_or_default,
                                     cli_default=None)
    overlap: float = option(0.2, help="Share of a tile shared with its neighbour, in [0, 1).")
    min_visibility: float = option(0.5, help="A box is kept in a tile when at least this share of its area lies "
                                   "inside (clipped to the tile), in (0, 1].")
    empty_ratio: float = option(0.1, help="Tiles without objects kept per tile with objects (a seeded draw); 0 "
                                "keeps none.")
    ann: Optional[Path] = option(None, help="Annotation file (overrides --data; one --split).")
    images: Optional[Path] = option(None, help="Image folder (overrides --data; one --split).")
    seed: int = option(0, help="Seed of the draw of empty tiles.")
    skip_invalid: bool = option(False, help="Drop boxes of zero size or outside their image instead of failing.")
    overwrite: bool = option(False, help="Replace a finished --out folder (only once the new one is complete).")
