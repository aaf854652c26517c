"""`sodtool train fsr`'s options and presets (the stage: sodtool.stages.train_fsr)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from sodtool.configs.common import RESUME_HELP, TENSORBOARD_HELP, WORKERS_HELP
from sodtool.options import option

# Presets fill every config field left at None. The paper gives no schedule, widths or loss
# weights (its supplement is not in the material): these are sodtool's choices, to be chosen on val.
#
# `quick`: the quickstart on a 2-core CPU, where the whole feature stage must add at most 2 minutes
#   (issue 32). A GAN step runs the frozen MobileNetV3-FPN three times without gradient (the full
#   image, the 0.5x image, the atrous extractor) plus the small heads, G and D; a fine-tuning step
#   runs it once. 150 GAN + 50 fine-tuning steps of batch 4 (800 images, 1.6 passes over the
#   quick train split). G starts as the identity and the small head as a copy of the large one,
#   so the model starts where the base detector is. The small-proposal side is 32 px of the
#   320 px input (COCO's small objects); pairs are the RoIs of 16-64 px at full size.
# `bench`: the same on the bench data, 3x longer.
# `coco`: the ResNet-50-C4 base of the detector's coco preset at 800/1333 px, batch 8; 96 px
#   small proposals (the paper's VOC / COCO threshold); 40k GAN + 10k fine-tuning steps.
_QUICK = dict(iterations=200, finetune_iterations=50, batch_size=4, lr=0.002, weight_decay=1e-4, g_lr=2e-4,
              d_lr=2e-4, small_size=32, gen_blocks=2, disc_hidden=256, hflip=False, checkpoint_every=50)
PRESETS: dict[str, dict[str, Any]] = {
    "quick": _QUICK,
    "bench": {**_QUICK, "iterations": 600, "finetune_iterations": 150, "checkpoint_every": 100},
    "coco": dict(iterations=50_000, finetune_iterations=10_000, batch_size=8, lr=0.002, weight_decay=1e-4,
                 g_lr=1e-4, d_lr=1e-4, small_size=96, gen_blocks=4, disc_hidden=1024, hflip=True,
                 checkpoint_every=2000),
}


@dataclass(frozen=True)
class TrainFSRConfig:
    """`sodtool train fsr`. Fields left None take the preset's value (PRESETS); `pair_min_size`
    None is small_size // 2. Sizes are sides in model-input pixels (the image after the
    detector's resize), areas their squares."""

    detector: Path = option(help="The base Faster R-CNN: RUN/detector/model.pt from `train detector` (its trunk and "
                            "RPN stay frozen).")
    data: Optional[Path] = option(None, help="Dataset folder (sodtool or COCO 2017 layout).")
    out: Path = option(Path("runs/fsr"), help="Output folder, e.g. RUN/fsr. Rerunning into it resumes from its "
                       "checkpoint.pt.")
    control: str = option(
        "none", help="none: Noh et al. (generator supervised by the atrous SR target extractor); small-head: the small "
        "head and predictor on the small proposals' own features, no generator; unmatched-target: targets from the "
        "plain backbone on the full-size image (the paper's naive supervision).")
    preset: str = option(
        "quick", help="quick: 150 GAN + 50 fine-tuning steps of batch 4, small proposals below 32² px (2-core CPU, "
        "for the quickstart's MobileNetV3-FPN detector); bench: the same, 3x longer; coco: 40k + 10k steps of batch 8, "
        "below 96² px (the paper's COCO threshold; GPU).")
    train_split: str = option("train", help="Split to train on.")
    train_ann: Optional[Path] = option(None, help="Training annotation file (overrides --data/--train-split).")
    train_images: Optional[Path] = option(None, help="Training image folder (overrides --data/--train-split).")
    val_split: str = option("minival", help="Split evaluated at the end.")
    val_ann: Optional[Path] = option(None, help="Evaluation annotation file (overrides --data/--val-split).")
    val_images: Optional[Path] = option(None, help="Evaluation image folder (overrides --data/--val-split).")
    iterations: Optional[int] = option(None, help="All steps: the GAN's, then the last --finetune-iterations "
                                       "(overrides the preset).")
    finetune_iterations: Optional[int] = option(
        None, help="Final steps fine-tuning the small and large heads and predictors, all else frozen (default: the "
        "preset's share of --iterations).")
    batch_size: Optional[int] = option(None, help="Images per step.")
    lr: Optional[float] = option(None, help="SGD learning rate of the small and large heads and predictors (preset "
                                 "0.002).")
    momentum: float = option(0.9, help="SGD momentum of the heads.")
    weight_decay: Optional[float] = option(None, help="SGD weight decay of the heads (preset 1e-4).")
    g_lr: Optional[float] = option(None, help="Adam learning rate of the feature generator (betas 0.5, 0.999).")
    d_lr: Optional[float] = option(None, help="Adam learning rate of the feature discriminator (betas 0.5, 0.999).")
    content_weight: float = option(1.0, help="Weight of the content loss (Eq. 4, divided by the targets' mean "
                                   "square).")
    adv_weight: float = option(0.01, help="Weight of the generator's adversarial loss (Eq. 5).")
    det_weight: float = option(1.0, help="Weight of the small predictor's classification and box losses in the "
                               "generator's objective.")
    small_size: Optional[int] = option(
        None, help="Proposals of area below S² model-input px go through the generator and the small predictor "
        "(quick/bench 32, coco 96).")
    pair_min_size: Optional[int] = option(
        None, help="Training pairs: RoIs whose full-size side is in [this, 2 x --small-size) px (default: --small-size "
        "/ 2).")
    pool: str = option("avg", help="The extractor's pooling where the trunk strides: avg (chosen on val) or max (the "
                       "paper's Fig. 4c).")
    gen_blocks: Optional[int] = option(None, help="Residual blocks of the feature generator (quick 2, coco 4).")
    gen_width: Optional[int] = option(None, help="Inner width of the generator's blocks (default: base + sub-layer "
                                      "channels, at most 512).")
    disc_hidden: Optional[int] = option(None, help="Width of the discriminator's two hidden layers (quick 256, coco "
                                        "1024).")
    hflip: Optional[bool] = option(None, help="Random horizontal flips (preset: off for quick/bench, on for coco).")
    seed: int = option(0, help="Seed of the generator's and discriminator's initialisation, RoI sampling and data "
                       "order: same seed, same weights on CPU.")
    device: str = option("auto", help="auto, cpu, cuda or cuda:N.")
    workers: Optional[int] = option(None, help=WORKERS_HELP)
    checkpoint_every: Optional[int] = option(None, help="Write checkpoint.pt every N steps (and at the end).")
    log_every: int = option(10, help="Write the mean of every loss term to metrics.jsonl every N steps.")
    resume: bool = option(True, help=RESUME_HELP)
    eval: bool = option(True, help="COCO evaluation of the --val-split at the end.", flag="--eval/--no-eval")
    eval_score_thresh: float = option(0.001, help="Lowest score kept for the evaluation (100 detections per image).")
    eval_batch_size: int = option(4, help="Images per detector call in the evaluation.")
    amp: bool = option(False, help="bf16 autocast on CUDA (fp32 by default).", flag="--amp/--no-amp")
    skip_invalid: bool = option(False, help="Drop annotations with zero-size or out-of-image boxes instead of failing.")
    # Test hook: checkpoint and return after this step (a kill, simulated).
    stop_after: Optional[int] = option(None, help="Testing: checkpoint and stop after this step.", hidden=True)
    tensorboard: bool = option(False, help=TENSORBOARD_HELP, flag="--tensorboard")
