"""`sodtool train sr`'s options and presets (the stage: sodtool.stages.train_sr)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from sodtool.configs.common import RESUME_HELP, TENSORBOARD_HELP, WORKERS_HELP
from sodtool.options import one_or_many, option

# Widths: "quick" and "bench" are a light CPU configuration (minutes on 2 cores), "paper" Table 1.
# The paper gives no schedule for its MSE pretraining; 100k Adam iterations at batch 64 is our
# choice (SRGAN's SRResNet used 1e6 at batch 16 on ImageNet).
PRESETS: dict[str, dict[str, Any]] = {
    "quick": dict(iterations=300, batch_size=16, channels=32, up_channels=32, num_blocks=5, long_skip=True,
                  residual_bicubic=True, val_every=100, log_every=10, checkpoint_every=100),
    "bench": dict(iterations=1000, batch_size=16, channels=32, up_channels=32, num_blocks=5, long_skip=True,
                  residual_bicubic=True, val_every=250, log_every=25, checkpoint_every=250),
    # Exactly Table 1: no long skip, no bicubic residual (sodtool.models.networks.Generator).
    "paper": dict(iterations=100_000, batch_size=64, channels=64, up_channels=256, num_blocks=5, long_skip=False,
                  residual_bicubic=False, val_every=5_000, log_every=100, checkpoint_every=2_000),
}


@dataclass(frozen=True)
class TrainSRConfig:
    """Options of `sodtool train sr`. None = take the value from `preset`."""

    # One HR store, or several (each with its LR twin at the same place in `lr`).
    hr: Path | tuple[Path, ...] = option(
        help="HR ROI store rois_<split>.h5 (from crop-rois). Repeat --hr/--lr to train on several stores (e.g. "
             "two datasets; categories may differ).", cli_type=list[Path], parse=one_or_many)
    lr: Path | tuple[Path, ...] = option(
        help="Its LR twin rois_<split>_lr.h5 (from downsample); one per --hr, same order.",
        cli_type=list[Path], parse=one_or_many)
    out: Path = option(help="Output folder, e.g. RUN/sr. Rerunning into it resumes from its checkpoint.pt.")
    preset: str = option("quick", help="quick: light CPU widths (32/32), 300 iterations, batch 16; bench: the "
                         "same, 1000 iterations; paper: exactly Table 1's generator (64/256 maps, no long skip, "
                         "no bicubic residual), 100k iterations, batch 64.")
    iterations: Optional[int] = option(None, help="Training iterations (overrides the preset).")
    batch_size: Optional[int] = option(None, help="Crops per iteration and process (overrides the preset).")
    learning_rate: float = option(1e-4, help="Adam learning rate (betas 0.9, 0.999).")
    channels: Optional[int] = option(None, help="Generator trunk maps (paper 64).")
    up_channels: Optional[int] = option(None, help="Generator up-sampling maps (paper 256).")
    num_blocks: Optional[int] = option(None, help="Generator residual blocks (paper 5).")
    long_skip: Optional[bool] = option(None, help="SRResNet's long skip, not in Table 1 (default: on in "
                                       "quick/bench, off in paper).")
    residual_bicubic: Optional[bool] = option(None, help="Predict a residual over bicubic upsampling, not in "
                                              "Table 1 (default: on in quick/bench, off in paper).")
    min_native_size: int = option(0, help="Train only on crops whose window in the source image is at least "
                                  "this many px wide (0 = all crops); smaller windows were upsampled into the store.")
    val_fraction: float = option(0.05, help="Share of the store's rows held out for PSNR/SSIM (same rows in "
                                 "train mtgan).")
    val_max: int = option(256, help="At most this many held-out rows.")
    val_seed: int = 0
    val_every: Optional[int] = option(None, help="Evaluate the held-out rows every N iterations (and at the end).")
    log_every: Optional[int] = option(None, help="Write the mean loss to metrics.jsonl every N iterations.")
    checkpoint_every: Optional[int] = option(None, help="Write checkpoint.pt every N iterations.")
    seed: int = option(0, help="Seed of initialisation and data order: same seed, same weights on CPU.")
    device: str = option("auto", help="auto, cpu, cuda or cuda:N (CUDA: bf16 autocast, channels_last).")
    num_workers: Optional[int] = option(None, help=WORKERS_HELP, flag="--workers")
    # Test hook: checkpoint and return after this iteration (as if killed right after it).
    stop_after: Optional[int] = option(None, help="Testing: checkpoint and stop after this iteration.", hidden=True)
    tensorboard: bool = option(False, help=TENSORBOARD_HELP, flag="--tensorboard")
    # False (--no-resume): start over; a previous run in `out` stays whole until the new one is complete.
    resume: bool = option(True, help=RESUME_HELP)
