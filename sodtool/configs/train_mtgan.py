"""`sodtool train mtgan`'s options and presets (the stage: sodtool.stages.train_mtgan)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from sodtool.configs.common import RESUME_HELP, WORKERS_HELP
from sodtool.options import option

# "paper": Sec. 4.1 (D = ImageNet ResNet-50, SGD 0.01, /10 every 40k, 80k iterations). The paper's
# D starts from ImageNet weights and L_D weights its class and box terms by beta = gamma = 0.01,
# so SGD at 0.01 moves the class head at an effective 1e-4. The CPU presets train D from
# scratch (no weights can be downloaded), with Adam (as BasicSR trains its discriminators),
# whose steps do not shrink with the 0.01 loss weights, and first a D-only warm-up on HR and
# MSE-G crops (BasicSR's net_d_init_iters), which costs half an adversarial iteration: a D
# trained from scratch with SGD at these weights classified no held-out object crop, and a
# longer warm-up let D's fused score pass the baseline (docs/design_notes.md; the warm-up is
# re-checked on val in docs/choices_on_val.md).
PRESETS: dict[str, dict[str, Any]] = {
    "quick": dict(iterations=750, batch_size=32, disc_arch="resnet18", d_optimizer="adam", d_lr=1e-3, d_lr_step=600,
                  d_warmup=650, log_every=10, checkpoint_every=50, sample_every=250, val_every=250),
    "bench": dict(iterations=2000, batch_size=32, disc_arch="resnet18", d_optimizer="adam", d_lr=1e-3,
                  d_lr_step=1750, d_warmup=1500, log_every=25, checkpoint_every=250, sample_every=500, val_every=500),
    "paper": dict(iterations=80_000, batch_size=64, disc_arch="resnet50", d_optimizer="sgd", d_lr=0.01,
                  d_lr_step=40_000, d_warmup=0, log_every=100, checkpoint_every=2_000, sample_every=5_000,
                  val_every=5_000),
}


@dataclass(frozen=True)
class TrainMTGANConfig:
    """Options of `sodtool train mtgan`. None = take the value from `preset`."""

    hr: Path = option(help="HR ROI store rois_<split>.h5 (from crop-rois).")
    lr: Path = option(help="Its LR twin rois_<split>_lr.h5 (from downsample).")
    sr: Path = option(help="The `train sr` run folder whose generator.pt initialises G.")
    out: Path = option(help="Output folder, e.g. RUN/mtgan. Rerunning into it resumes from its checkpoint.pt.")
    preset: str = option(
        "quick", help="quick: ResNet-18 D from scratch (or the detector's trunk with --disc-init), batch 32, D trained "
        "with Adam at 1e-3, 650 D-only warm-up + 100 adversarial iterations, D lr /10 at 600; bench: the same, 1500 + "
        "500 iterations, /10 at 1750; paper: ResNet-50 D, 80k iterations, batch 64, D SGD 0.01 /10 every 40k, no "
        "warm-up.")
    iterations: Optional[int] = option(None, help="Training iterations, one D and one G step each (overrides the "
                                       "preset).")
    batch_size: Optional[int] = option(None, help="Crops per iteration and process (overrides the preset).")
    disc_arch: Optional[str] = option(None, help="Discriminator trunk: resnet18, resnet34, resnet50 (paper) or "
                                      "resnet101.")
    imagenet_weights: Optional[Path] = option(
        None, help="torchvision ImageNet state dict file for the D trunk (fetched by hand; nothing is downloaded).")
    # A detector weights file (RUN/detector/model.pt) whose trunk initialises D's; D's architecture
    # then follows the detector's trunk (ResNet or MobileNetV3), whatever disc_arch says.
    disc_init: Optional[Path] = option(
        None, help="A detector model.pt (e.g. RUN/detector/model.pt) whose trunk initialises D; D's architecture then "
        "follows the detector's trunk (MobileNetV3 or ResNet), the heads stay the paper's.")
    g_lr: float = option(1e-4, help="Adam learning rate of G.")
    # "sgd" (paper: momentum, weight decay) or "adam" (AdamW: decoupled decay).
    d_optimizer: Optional[str] = option(None, help="D's optimiser: sgd (paper, with --d-momentum) or adam (AdamW; the "
                                        "from-scratch CPU presets).")
    d_lr: Optional[float] = option(None, help="Learning rate of D (paper: SGD 0.01 for an ImageNet-initialised D; the "
                                   "from-scratch presets: Adam 1e-3).")
    d_momentum: float = option(0.9, help="SGD momentum of D (sgd only).")
    d_weight_decay: float = option(1e-4, help="Weight decay of D (decoupled, AdamW's, with adam).")
    d_lr_step: Optional[int] = option(None, help="Divide D's learning rate by 10 every N iterations (paper 40k).")
    d_lr_gamma: float = 0.1
    d_warmup: Optional[int] = option(None, help="First N iterations train D only, G fixed (BasicSR's net_d_init_iters; "
                                     "paper 0).")
    alpha: float = option(1e-3, help="Weight of the adversarial loss (Eq. 10/11).")
    beta: float = option(1e-2, help="Weight of the classification loss.")
    gamma: float = option(1e-2, help="Weight of the box regression loss.")
    tv_weight: float = option(0.0, help="Weight of a total-variation loss on G's output (Gu et al.; 0 = off).")
    adversarial: str = option("paper", help="G's adversarial term: paper = log(1 - D(G(x))), nonsaturating = "
                              "-log D(G(x)).")
    # Ablations (paper Table 3): the command line spells them --no-X; --X is the default.
    reg_branch: bool = option(True, help="Ablation: D without the box regression branch.",
                              flag="--reg-branch/--no-reg-branch")
    adv: bool = option(True, help="Ablation: no adversarial loss.", flag="--adv/--no-adv")
    cls: bool = option(True, help="Ablation: no classification loss in G's objective.", flag="--cls/--no-cls")
    reg: bool = option(True, help="Ablation: no regression loss in G's objective.", flag="--reg/--no-reg")
    val_fraction: float = option(0.05, help="Share of rows held out (the same rows as train sr with the same value).")
    val_max: int = option(256, help="At most this many held-out rows.")
    val_seed: int = 0
    val_every: Optional[int] = option(None, help="Evaluate the held-out rows every N iterations (and at the end).")
    log_every: Optional[int] = option(None, help="Write mean loss terms to metrics.jsonl every N iterations.")
    checkpoint_every: Optional[int] = option(None, help="Write checkpoint.pt every N iterations.")
    sample_every: Optional[int] = option(None, help="Save a sample grid PNG (LR, bicubic, SR, HR) every N iterations.")
    sample_count: int = 8
    seed: int = option(0, help="Seed of D's initialisation and the data order: same seed, same weights on CPU.")
    device: str = option("auto", help="auto, cpu, cuda or cuda:N (CUDA: bf16 autocast, channels_last; several GPUs: "
                         "torchrun).")
    num_workers: Optional[int] = option(None, help=WORKERS_HELP, flag="--workers")
    # Test hook: checkpoint and return after this iteration (as if killed right after it).
    stop_after: Optional[int] = option(None, help="Testing: checkpoint and stop after this iteration.", hidden=True)
    tensorboard: bool = option(
        False, help="Also write TensorBoard events to OUT/tensorboard (losses, lr, held-out metrics, sample crops); "
        "needs pip install 'sodtool[tensorboard]'. metrics.jsonl stays the record.", flag="--tensorboard")
    # False (--no-resume): start over; a previous run in `out` stays whole until the new one is complete.
    resume: bool = option(True, help=RESUME_HELP)
