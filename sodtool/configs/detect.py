"""`sodtool detect`'s options (the stage: sodtool.stages.detect)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sodtool.options import option


@dataclass(frozen=True)
class DetectConfig:
    """`sodtool detect`: run a detector over a split and write COCO results JSON.

    `detector`: a checkpoint (RUN/detector/model.pt, its folder, or a torchvision detection
    state dict) or the family name "frcnn" together with `weights`.
    `out` defaults to RUN/detections_<split>.json for RUN/detector/model.pt, else
    ./detections_<split>.json; its manifest is written beside it as <out stem>.manifest.json.
    """

    detector: str = option("frcnn", help="The detector: RUN/detector/model.pt (or its folder), a torchvision "
                           "detection state dict (Faster R-CNN, ssd300_vgg16), or a family name (frcnn, ssd, mdssd) "
                           "with --weights.")
    weights: Path | None = option(None, help="With --detector frcnn: the checkpoint file.",
                                  flag=("--weights", "--detector-weights"))
    data: Path | None = option(None, help="Dataset folder (sodtool or COCO 2017 layout).")
    split: str = option("minival", help="Split to run on.")
    ann: Path | None = option(None, help="Annotation file (overrides --data/--split).")
    images: Path | None = option(None, help="Image folder (overrides --data/--split).")
    out: Path | None = option(None, help="COCO results JSON to write (default: RUN/detections_<split>.json beside "
                              "RUN/detector, else ./detections_<split>.json). Its manifest goes beside it: "
                              "<name>.manifest.json.")
    score_thresh: float = option(0.001, help="Lowest score kept.")
    max_per_image: int = option(100, help="Detections kept per image (top scores; the paper's protocol: 100).")
    batch_size: int = option(4, help="Images per forward pass.")
    min_size: int | None = option(None, help="Override the short side the model resizes to (default: the "
                                  "checkpoint's; torchvision files: 800).")
    max_size: int | None = option(None, help="Override the longest side allowed (default: the checkpoint's; "
                                  "torchvision files: 1333).")
    device: str = option("auto", help="auto, cpu, cuda or cuda:N.")
    seed: int = option(0, help="Seed (detection is deterministic; recorded in the manifest).")
    evaluate: bool = option(True, help="Also report COCO AP against the split's annotations (in the manifest).",
                            flag="--eval/--no-eval")
    amp: bool = option(False, help="bf16 autocast on CUDA.", flag="--amp/--no-amp")
    skip_invalid: bool = option(False, help="Drop annotations with zero-size or out-of-image boxes instead of "
                                "failing.")
    overwrite: bool = option(False, help="Replace an existing results file (only once the new one is complete).")
