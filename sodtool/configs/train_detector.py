"""`sodtool train detector`'s options and presets (the stage: sodtool.stages.train_detector)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from sodtool.configs.common import RESUME_HELP, TENSORBOARD_HELP, WORKERS_HELP
from sodtool.options import csv_ints, csv_ints_or_empty, option, paths_tuple

# Presets fill every config field left at None.
#
# `quick`: the synthetic quickstart on a 2-core CPU. MobileNetV3-Large trained from scratch: it
#   learns the classes' patterns in fewer CPU-seconds than ResNet-18 (docs/design_notes.md). The FPN takes the
#   stride-8/16/32 stages (torchvision's mobilenet layout takes only stride-32 ones, blind to
#   8 px objects); anchors 16-128 px on P3-P6 for objects of 8-190 px in 320 px images
#   (torchvision's are 32-512 px for 800 px images). A narrow FPN (64), 64 sampled RoIs per image
#   of which up to half positive (RoIAlign's backward dominates a CPU iteration otherwise) and
#   fewer proposals keep a CPU iteration short. No flips: the synthetic stripes-d and stripes-a
#   classes are mirror images of each other. 800 iterations (3200 images): the class patterns
#   start being learnt only after a few passes (docs/design_notes.md).
# `bench`: the same network on the synthetic bench data (4000 images), 3x longer (9600 images seen).
# `coco`: the paper's COCO 2017 baseline, Detectron's e2e_faster_rcnn_R-50-C4_1x (which the paper
#   takes from Mask R-CNN [10]): ResNet-50-C4, 800/1333 px, batch 16 (8 GPUs x 2 there, one
#   process here), lr 0.02, 90k iterations, lr /10 at 60k and 80k, 500 warm-up iterations from
#   1/3, weight decay 1e-4, 512 RoIs per image (1/4 positive), flips; ImageNet trunk via
#   --backbone-weights (BatchNorm frozen, conv1 and layer1 frozen, as Detectron).
_QUICK = dict(
    arch="mobilenet_v3_fpn", iterations=800, batch_size=4, lr=0.02, weight_decay=1e-4,
    warmup_iters=100, milestones=(640,), min_size=320, max_size=533,
    fpn_channels=64, returned_layers=(2, 3, 4), anchor_sizes=(16, 32, 64, 128),
    roi_batch_size=64, roi_positive_fraction=0.5, representation_size=256,
    rpn_pre_nms_train=1000, rpn_post_nms_train=500, rpn_post_nms_test=300,
    hflip=False, checkpoint_every=100,
)
# SSD and MDSSD (`--detector ssd|mdssd`). `quick` / `bench`: the light MobileNetV3 trunk at 320 px
#   with the Faster R-CNN presets' schedule (the same images seen, so that the Fusion Blocks'
#   gain is measured on one budget). `paper`: VGG16 at 300 px with SSD's COCO schedule (batch 32,
#   lr 1e-3, /10 at 280k and 360k of 400k iterations, weight decay 5e-4, flips); the MDSSD seed
#   leaves its schedule to an appendix it does not include. lr 0.005, not the Faster R-CNN's 0.02:
#   SSD's losses sum over every matched and hard-negative default box, and the light SSD
#   diverged at 0.02 (docs/design_notes.md).
_SSD_QUICK = dict(arch="mobilenet_v3", size=320, iterations=800, batch_size=4, lr=0.005, weight_decay=1e-4,
                  warmup_iters=100, milestones=(640,), hflip=False, checkpoint_every=100)
# `bench` also clips the gradient's global norm at 10 (as Ultralytics' YOLO trainers do): without
#   it, MDSSD's bench loss jumped by orders of magnitude at the peak lr and never recovered
#   (docs/design_notes.md). `quick` is left unclipped: its runs did not jump.
SSD_PRESETS: dict[str, dict[str, Any]] = {
    "quick": _SSD_QUICK,
    "bench": {**_SSD_QUICK, "iterations": 2400, "milestones": (1900, 2200), "checkpoint_every": 200,
              "clip_grad_norm": 10.0},
    "paper": dict(arch="vgg16", size=300, iterations=400_000, batch_size=32, lr=1e-3, weight_decay=5e-4,
                  warmup_iters=500, milestones=(280_000, 360_000), hflip=True, checkpoint_every=5000),
}
PRESETS: dict[str, dict[str, Any]] = {
    "quick": _QUICK,
    "bench": {**_QUICK, "iterations": 2400, "milestones": (1900, 2200), "checkpoint_every": 200},
    "coco": dict(
        arch="resnet50_c4", iterations=90_000, batch_size=16, lr=0.02, weight_decay=1e-4,
        warmup_iters=500, warmup_factor=1 / 3, milestones=(60_000, 80_000), min_size=800, max_size=1333,
        fpn_channels=None, returned_layers=None, anchor_sizes=None, roi_batch_size=512,
        representation_size=None, rpn_pre_nms_train=None, rpn_post_nms_train=None, rpn_post_nms_test=None,
        roi_positive_fraction=None, hflip=True, checkpoint_every=5000,
    ),
}


@dataclass(frozen=True)
class TrainDetectorConfig:
    """`sodtool train detector`. Fields left None take the preset's value (PRESETS)."""

    data: Optional[Path] = option(None, help="Dataset folder (sodtool or COCO 2017 layout).")
    out: Path = option(Path("runs/detector"), help="Output folder, e.g. RUN/detector. Rerunning into it resumes from "
                       "its checkpoint.pt.")
    detector: str = option(
        "frcnn", help="Detector family: frcnn (torchvision Faster R-CNN), ssd or mdssd (one-stage; MDSSD adds the seed "
        "paper's three Fusion Blocks to the same SSD). ssd/mdssd presets: quick and bench (MobileNetV3 trunk, 320 px, the "
        "frcnn presets' schedule), paper (VGG16, 300 px, SSD's COCO schedule: the MDSSD paper gives none; deconvolution "
        "output resized to the shallow map, L2 scale 20 and default boxes from 0.04 of the side are sodtool's choices).")
    preset: str = option(
        "quick", help="quick: MobileNetV3-FPN from scratch, 320 px, batch 4, 800 iterations (minutes on a 2-core CPU); "
        "bench: the same network, 2400 iterations (3x quick's); coco: the paper's ResNet-50-C4, "
        "800/1333 px, batch 16, lr 0.02, 90k iterations, lr /10 at 60k and 80k (GPU, with --backbone-weights). With "
        "--detector ssd/mdssd: quick, bench (MobileNetV3 at 320 px, same schedules) and paper (VGG16 at 300 px, SSD's "
        "COCO schedule).")
    train_split: str = option("train", help="Split to train on.")
    train_ann: Optional[Path] = option(None, help="Training annotation file (overrides --data/--train-split).")
    train_images: Optional[Path] = option(None, help="Training image folder (overrides --data/--train-split).")
    val_split: str = option("minival", help="Split evaluated at the end.")
    val_ann: Optional[Path] = option(None, help="Evaluation annotation file (overrides --data/--val-split).")
    val_images: Optional[Path] = option(None, help="Evaluation image folder (overrides --data/--val-split).")
    arch: Optional[str] = option(
        None, help="frcnn: resnet50_fpn, resnet101_fpn, resnet50_c4, resnet18_fpn or mobilenet_v3_fpn; ssd/mdssd: "
        "vgg16 or mobilenet_v3 (default: the preset's, or the --weights file's).")
    iterations: Optional[int] = option(None, help="Training iterations (overrides the preset; the lr steps move with "
                                       "it).")
    epochs: Optional[float] = option(None, help="Or: passes over the training images (iterations = epochs x images / "
                                     "batch).")
    batch_size: Optional[int] = option(None, help="Images per iteration.")
    lr: Optional[float] = option(None, help="SGD base learning rate.")
    momentum: float = option(0.9, help="SGD momentum.")
    weight_decay: Optional[float] = option(None, help="SGD weight decay (preset: 1e-4).")
    warmup_iters: Optional[int] = option(None, help="Iterations of linear lr warm-up.")
    warmup_factor: Optional[float] = option(None, help="lr multiplier at iteration 0 of the warm-up (0.001; coco: 1/3 "
                                            "as Detectron).")
    milestones: Optional[tuple[int, ...]] = option(
        None, help="Iterations at which lr is multiplied by --gamma, comma-separated, e.g. 60000,80000.",
        cli_type=Optional[str], parse=csv_ints)
    gamma: float = option(0.1, help="lr decay factor at each milestone.")
    clip_grad_norm: Optional[float] = option(
        None, help="Clip the gradient's global L2 norm at this before each step; metrics.jsonl then logs the largest "
        "norm of each window (grad_norm_max). Preset: 10 for --detector ssd/mdssd --preset bench, off otherwise; 0: "
        "off.")
    min_size: Optional[int] = option(None, help="Short image side the model resizes to (quick/bench 320, coco 800).")
    max_size: Optional[int] = option(None, help="Longest image side allowed after resizing (coco 1333).")
    size: Optional[int] = option(None, help="--detector ssd/mdssd: the square input size (quick/bench 320 with the "
                                 "MobileNetV3 trunk; VGG16: 300 or 512).")
    train_sizes: tuple[int, ...] = option(
        (), help="Multi-scale training: short sides drawn per image, comma-separated (e.g. 256,288,320,352).",
        cli_type=Optional[str], parse=csv_ints_or_empty)
    # Preset: off on the synthetic data (a flip turns "/" stripes into "\\").
    hflip: Optional[bool] = option(None, help="Random horizontal flips in training (preset: off for quick/bench, whose "
                                   "stripes-d/stripes-a classes are mirror images; on for coco).")
    # Overhead imagery has no "up".
    vflip: bool = option(False, help="Random vertical flips in training (overhead imagery).", flag="--vflip/--no-vflip")
    rot90: bool = option(False, help="Random quarter turns in training (overhead imagery).", flag="--rot90/--no-rot90")
    fpn_channels: Optional[int] = option(None, help="FPN width (torchvision 256; quick and bench 64).")
    returned_layers: Optional[tuple[int, ...]] = option(
        None, help="Trunk stages feeding the FPN, comma-separated (ResNet: 1..4 = strides 4..32, torchvision 1,2,3,4; "
        "MobileNetV3: 0..5, 2,3,4 = strides 8..32, torchvision 4,5; quick 2,3,4).",
        cli_type=Optional[str], parse=csv_ints)
    anchor_sizes: Optional[tuple[int, ...]] = option(
        None, help="Anchor size (px) per feature level, comma-separated, e.g. 16,32,64,128 (quick).",
        cli_type=Optional[str], parse=csv_ints)
    roi_batch_size: Optional[int] = option(None, help="RoIs sampled per image for the box head (torchvision 512; quick "
                                           "64, up to half of them positive).")
    roi_positive_fraction: Optional[float] = None  # at most this share of them positive
    representation_size: Optional[int] = None
    rpn_pre_nms_train: Optional[int] = None  # proposals per level before NMS in training
    rpn_post_nms_train: Optional[int] = None  # proposals kept per image in training
    rpn_post_nms_test: Optional[int] = None  # ... and at test time
    weights: Optional[Path] = option(
        None, help="Start from a whole detector: sodtool's model.pt or a torchvision detection state dict (e.g. "
        "fasterrcnn_resnet50_fpn_coco-258fb6c6.pth, fetched by hand).")
    # With --weights: load only the trunk (backbone body, and FPN tensors of the same shape) and
    # leave the RPN and box heads new, so that a detector of another class count (or other anchors)
    # can start the training; the build options given here then shape the new model.
    reinit_heads: bool = option(
        False, help="With --weights: load only its trunk (backbone body and FPN; SSD/MDSSD: backbone) and start the "
        "RPN and box heads afresh, so a detector of another class count can start the training; build options given here "
        "(--anchor-sizes, --fpn-channels...) shape the new model.")
    backbone_weights: Optional[Path] = option(
        None, help="torchvision ImageNet classification state dict of the trunk (e.g. resnet50-0676ba61.pth); "
        "BatchNorm is then frozen.")
    # Generated datasets (sodtool layout, split "train") mixed into training, e.g. DetectorGAN's
    # images: one pool, their images in the order given. Stored as strings once resolved (the
    # checkpoint's config must load with weights_only).
    extra_data: tuple[Path | str, ...] = option(
        (), help="A generated dataset (sodtool layout, its train split) mixed into training; repeatable (one pool). "
        "Same categories as --data.", cli_type=Optional[list[Path]], parse=paths_tuple)
    # Expected share of extra images among those seen (each batch slot takes one with this
    # probability); None: 0.5 with --extra-data. The budget (--iterations) does not grow with it.
    extra_ratio: Optional[float] = option(
        None, help="Expected share of --extra-data images among those seen, in (0, 1) (default 0.5); each batch slot "
        "draws it. --iterations stays the budget.")
    seed: int = option(0, help="Seed of initialisation, data order and flips: same seed, same weights on CPU.")
    device: str = option("auto", help="auto, cpu, cuda or cuda:N.")
    workers: Optional[int] = option(None, help=WORKERS_HELP)
    checkpoint_every: Optional[int] = option(None, help="Write checkpoint.pt every N iterations (and at the end).")
    log_every: int = option(20, help="Write the mean of every loss term to metrics.jsonl every N iterations.")
    resume: bool = option(True, help=RESUME_HELP)
    eval: bool = option(True, help="COCO evaluation of the --val-split at the end.", flag="--eval/--no-eval")
    eval_score_thresh: float = option(0.001, help="Lowest score kept for the evaluation (100 detections per image).")
    eval_batch_size: int = 4
    amp: bool = option(False, help="bf16 autocast on CUDA (fp32 by default).", flag="--amp/--no-amp")
    skip_invalid: bool = option(False, help="Drop annotations with zero-size or out-of-image boxes instead of failing.")
    stop_after: Optional[int] = None  # tests: checkpoint and return after this iteration (a kill, simulated)
    tensorboard: bool = option(False, help=TENSORBOARD_HELP, flag="--tensorboard")
