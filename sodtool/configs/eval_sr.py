"""`sodtool eval sr`'s options (the stage: sodtool.stages.eval_sr)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from sodtool.options import option


@dataclass(frozen=True)
class EvalSRConfig:
    """generator: a checkpoint (RUN/sr/generator.pt, RUN/mtgan/model.pt, or a folder holding
    one of them); None = bicubic only. data: folder with HR/ and LR/. out: output folder
    (None = write nothing). border: px cropped from each side before measuring."""

    # Required of callers (generator=None says "bicubic only" explicitly); the command line's default is None.
    generator: Optional[Path] = option(
        help="Generator checkpoint: RUN/sr/generator.pt or RUN/mtgan/model.pt (a run folder works too). Without "
             "it: bicubic only.", cli_default=None)
    data: Path = option(help="Folder with HR/ and LR/ of same-named images (e.g. ../shared/data/sr/Set5).")
    out: Optional[Path] = option(None, help="Output folder for metrics.json, metrics.md, manifest.json (default: "
                                 "write nothing).")
    scale: int = option(4, help="Upscaling factor between LR and HR (the generator's is 4).")
    border: int = option(4, help="Pixels cropped from each side before measuring (convention: the scale).")
    device: str = option("auto", help="auto, cpu, cuda or cuda:N.")
    save_images: bool = option(False, help="Also write the generator's outputs as OUT/images/<name>_sr.png.")
    overwrite: bool = option(False, help="Replace a finished --out folder (only once the new one is complete).")
