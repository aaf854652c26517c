"""`sodtool downsample`'s options (the stage: sodtool.stages.downsample)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sodtool.options import option


@dataclass(frozen=True)
class DownsampleConfig:
    """src: HR store; out: LR store (default `<src stem>_lr.h5` beside src); scale: the factor
    (S must be divisible by it); batch: rows per step (a multiple of the chunk size is fastest);
    compression: of the LR crops, none by default: 32 px crops of noisy images do not compress
    (LZF kept 94% of the bytes) and an uncompressed twin costs the loader nothing to read."""

    src: Path = option(help="The HR ROI store, e.g. runs/quick/rois_train.h5.", argument=True)
    out: Path | None = option(None, help="The LR store (default: <src stem>_lr.h5 beside src).")
    scale: int = option(4, help="Downsampling factor (the HR size must be divisible by it).")
    batch: int = option(256, help="Rows read per step.")
    overwrite: bool = option(False, help="Replace an existing LR store (only once the new one is complete).")
    compression: str = option("none", help="HDF5 filter of the LR crops: none (default: 32 px crops barely "
                              "compress), lzf or gzip.")
    workers: int | None = option(None, help="Processes reading and downsampling (default: one per CPU core, at most "
                                 "4; 0 = this process). The output does not depend on it.")
