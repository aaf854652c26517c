"""`sodtool train detgan`'s options (the stage: sodtool.stages.train_detgan)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from sodtool.options import option


@dataclass(frozen=True)
class TrainDetGANConfig:
    """Options of `sodtool train detgan` (defaults: the light CPU configuration)."""

    detector: Path = option(
        help="The detector in the loop: a `train detector` Faster R-CNN run (or its model.pt) trained on the same "
        "split; its trunk and RPN stay frozen, its RoI heads train and are unrolled.")
    data: Optional[Path] = option(None, help="Dataset root (COCO layout).")
    out: Path = option(Path("runs/detgan"), help="Output folder, e.g. RUN/detgan. Rerunning into it resumes from its "
                       "checkpoint.pt.")
    split: str = option("train", help="The split whose objects are learnt.")
    # At least 4 x the largest object trained on.
    patch: int = option(128, help="Patch side in px (a multiple of 4) around each object.")
    iterations: int = option(1500, help="Training iterations, both phases.")
    pretrain_iterations: int = option(500, help="Phase 1: G and the discriminators alone, before the detector joins.")
    batch_size: int = option(4, help="Objects (patches) per iteration.")
    channels: int = option(32, help="G's base width (CycleGAN 64).")
    blocks: int = option(4, help="G's residual blocks (the paper's 9).")
    d_channels: int = option(32, help="The PatchGAN discriminators' base width.")
    local_size: int = option(32, help="px the object crop is resampled to for the local discriminator.")
    lr: float = option(2e-4, help="Adam learning rate of G and the discriminators (beta1 0.5).")  # as CycleGAN
    det_lr: float = option(0.005, help="The in-loop detector's SGD step (the one Eq. 3 unrolls).")
    adv_weight: float = option(1.0, help="Weight of the global adversarial loss.")
    local_weight: float = option(1.0, help="Weight of the local (object crop) adversarial loss.")
    l1_weight: float = option(10.0, help="Weight of BboxLoss, the L1 between synthetic and real object crops.")
    syn_weight: float = option(0.1, help="Weight of the detection loss on synthetic patches, which G maximises (the "
                               "paper's sign).")
    unroll_weight: float = option(1.0, help="Weight of the detection loss on real patches after the unrolled detector "
                                  "step (Eq. 3).")
    unroll: bool = option(True, help="Eq. 3's unrolled step; --no-unroll is the paper's 'DetectorGAN - unrolling'.")
    pool_size: int = option(50, help="History of synthetic patches the discriminators see.")
    # So that the object's border is repainted too.
    margin: int = option(2, help="px the noised box is grown by.")
    # The box is kept, clipped.
    min_visibility: float = option(0.5, help="A box cut by the patch border stays a target from this share of its "
                                   "area inside.")
    log_every: int = option(10, help="Write the mean losses to metrics.jsonl every N iterations.")
    checkpoint_every: int = option(100, help="Write checkpoint.pt every N iterations.")
    sample_every: int = option(250, help="Write samples/iter_N.png every N iterations.")
    seed: int = option(0, help="Seed of initialisation, patches and noise: same seed, same weights on CPU.")
    device: str = option("auto", help="auto, cpu, cuda or cuda:N.")
    resume: bool = option(True, help="Continue from OUT/checkpoint.pt when it exists (the default), or start over.")
    # Test hook: checkpoint and return after this iteration (a kill, simulated).
    stop_after: Optional[int] = option(None, help="Testing: checkpoint and stop after this iteration.", hidden=True)
    tensorboard: bool = option(
        False, help="Also write TensorBoard events to OUT/tensorboard (losses, lr, held-out metrics, sample patches); "
        "needs pip install 'sodtool[tensorboard]'. metrics.jsonl stays the record.", flag="--tensorboard")
