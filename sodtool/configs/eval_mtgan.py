"""`sodtool eval --mtgan ...`'s options: rescoring (the stage: sodtool.stages.eval_mtgan).

The options shared with `sodtool eval --results FILE` (data, split, ann, images, out, overwrite)
take their help from sodtool.configs.eval_results: the two configs feed one command.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from sodtool.configs.eval_results import ANN_HELP, DATA_HELP, IMAGES_HELP, OUT_HELP, OVERWRITE_HELP, SPLIT_HELP
from sodtool.configs.slicing import DEFAULT_OVERLAP
from sodtool.options import option, paths_tuple


@dataclass(frozen=True)
class RescoreConfig:
    """Options of `sodtool eval --mtgan ...` (rescoring). Exactly one of `detector` / `rois`.

    data/split or ann/images: the dataset split (ground truth and images);
    detector: a detector checkpoint (RUN/detector/model.pt) run on the split's images;
    rois: a test-mode HR ROI store of the split (`rois_<split>.h5`; its `_lr.h5` twin is used
      when present, else the LR crops are made here the same way);
    mtgan: the MTGAN run folder (RUN/mtgan) or its model.pt; None: no rescoring, `compare` rows only;
    ablations: "NAME=PATH" pairs, each another MTGAN folder / model.pt evaluated the same way;
    compare: "NAME=PATH" pairs, each another detector's model.pt (module docstring);
    pretrained_g: a `train sr` run folder (RUN/sr) or its generator.pt: adds the pretrained-G
      control rows (module docstring); None: none;
    out: output folder (default: RUN/eval_<split>, RUN being the MTGAN folder's parent; required
      without an MTGAN);
    score: "disc" | "fused": the MTGAN row the detections figure draws beside the baseline's
      (`mtgan` or `mtgan_fused`; every row is written and evaluated either way);
    nms_iou / max_per_image / min_score: step 4, for every row, the baseline's included
      (min_score None: the ROIs' own score threshold; never below it, which the baseline row
      could not follow);
    small_area: also write size-gated rows (step 4), ROIs below this area (image px^2) rescored
      (None or 0: no gated rows);
    sr_gate: also write SR-gated rows (step 4): only the ROIs that go through G rescored;
    sr_only: every ROI through G (or bicubic), even those whose window is wider than the LR crop (step 3);
    batch_size: ROIs per forward pass; context / roi_score_thresh / rois_per_image: crop
      context factor, detector score threshold and ROIs per image of the direct path (None: as
      the MTGAN's training store / as crop-rois test mode: 0.05 and 100, the paper's protocol);
      detector_batch: images per detector call (as crop-rois' --batch-images);
    figures: write figures; fig_triplets / fig_images: how many SR examples / images to draw (the
      detections figure draws each row's top k per image, k = the image's ground-truth count);
    allow_trained_images: evaluate even where a model (MTGAN, ablation, pretrained G, detector) was
      trained on images being evaluated (sodtool.provenance: by image file digest); refused otherwise.
      For debugging: metrics.json records the overlap ("trained_overlap") and table.md says so.
    """

    mtgan: Optional[Path] = option(None, help="Rescoring mode: the MTGAN run folder (RUN/mtgan) or its model.pt.")
    data: Optional[Path] = option(None, help=DATA_HELP)
    split: str = option("minival", help=SPLIT_HELP)
    ann: Optional[Path] = option(None, help=ANN_HELP)
    images: Optional[Path] = option(None, help=IMAGES_HELP)
    detector: Optional[Path] = option(None, help="Rescoring: the baseline detector (RUN/detector/model.pt), run on "
                                      "the split to get its top-100 ROIs.")
    rois: Optional[Path] = option(None, help="Rescoring, instead of --detector: a test-mode ROI store "
                                  "(RUN/rois_<split>.h5; its _lr.h5 twin is used when present).")
    ablations: tuple[str, ...] = option(
        (), help="NAME=PATH of another MTGAN (e.g. trained with --no-adv) to evaluate the same way; repeatable.",
        flag="--ablation", cli_type=Optional[list[str]], parse=paths_tuple)
    compare: tuple[str, ...] = option(
        (), help="NAME=PATH of another detector's model.pt (a `train fsr` model or control, another `train "
                 "detector` run) whose own detections, taken and selected as the baseline's, make a row beside it; "
                 "repeatable; without --mtgan the table holds only these rows and the baseline's (--out required).",
        cli_type=Optional[list[str]], parse=paths_tuple)
    pretrained_g: Optional[Path] = option(
        None, help="Rescoring: the `train sr` run (RUN/sr or its generator.pt) the MTGAN started from; adds the "
                   "pretrained-G control rows (the MTGAN's D fed that generator's output), which separate what "
                   "the adversarial stage did to G.")
    out: Optional[Path] = option(None, help=OUT_HELP)
    score: str = option(
        "fused", help="The MTGAN row the detections figure draws beside the baseline's, over every ROI: fused "
                      "(mtgan_fused: geometric mean of D's class probability and the baseline's score) or disc "
                      "(mtgan: D's class probability, the paper's). Each column shows an image's top k detections, "
                      "k = its ground-truth count. The table and results files hold both, from one pass.")
    nms_iou: float = option(0.5, help="Rescoring: IoU of the per-class NMS.")
    max_per_image: int = option(100, help="Rescoring: detections kept per image.")
    min_score: Optional[float] = option(
        None, help="Rescoring: lowest score kept in every row, the baseline's included (default: the score "
                   "threshold the ROIs were taken at, 0.05 in test mode; never below it).")
    small_area: Optional[float] = option(
        None, help="Rescoring: also write size-gated rows (NAME_small.json), in which only ROIs of area below this "
                   "many px² are rescored and larger ones keep the baseline's detection, as Noh et al. (2019) route "
                   "only small proposals through super-resolution (1024 = 32², COCO's small; the pipelines pass "
                   "it). Default: no gated rows, every ROI rescored as the paper.")
    sr_gate: bool = option(
        False, help="Rescoring: also write SR-gated rows (NAME_srgate.json), in which only the ROIs that go through "
                    "G are rescored (crop window no wider than the LR crop) and those D reads from their HR crop "
                    "keep the baseline's detection: the rows show what super-resolution does and nothing else. Not "
                    "with --sr-only.")
    sr_only: bool = option(
        False, help="Rescoring: send every ROI through G (or bicubic) from its LR crop. By default D reads the HR "
                    "crop of a ROI whose crop window in the image is wider than the LR crop, whose shrinking would "
                    "lose detail the image has (the paper's G upsamples ROIs as the image holds them).")
    batch_size: int = option(256, help="Rescoring: ROIs per forward pass (the ROIs of several images).")
    device: str = option("auto", help="Rescoring: auto, cpu, cuda or cuda:N (bf16 autocast on CUDA).")
    seed: int = option(0, help="Seed (rescoring is deterministic; recorded in the manifest).")
    context: Optional[float] = option(
        None, help="Rescoring with --detector: crop window side = context x max(ROI w, h), as crop-rois --context "
                   "(default: the context of the store the MTGAN was trained on, read through its run manifest; "
                   "--rois stores carry their own).")
    # No options (tests/test_cli.py NOT_OPTIONS): the command line keeps the paper's protocol for the
    # ROIs of --detector, as a --rois store from crop-rois test mode holds them, and fixed figure sizes.
    roi_score_thresh: Optional[float] = None
    rois_per_image: Optional[int] = None
    detector_batch: int = 4
    figures: bool = option(True, help="Rescoring: write figures/ (SR triplets, detections, loss curves).")
    fig_triplets: int = 16
    fig_images: int = 4
    overwrite: bool = option(False, help=OVERWRITE_HELP)
    # With --detector: sliced inference (tile px, overlap, whole image too), as crop-rois --slice
    # (None: whole images or a tile-trained detector's own tile size; 0: whole images always).
    slice: Optional[int] = option(
        None, help="Sliced inference of the detector: overlapping tiles of this many px, merged by greedy "
                   "non-maximum merging (as `sodtool predict --slice`). Tiles are resized by the scale the detector "
                   "was trained at (recorded in its model.pt); a detector trained on tiles (`data slice`) slices at "
                   "its tile size by default; 0: whole images.")
    overlap: float = option(DEFAULT_OVERLAP, help="With --slice: overlap of neighbouring tiles, as a fraction of the "
                            "tile side.")
    slice_full: bool = option(False, help="With --slice: also run the detector on the whole image and merge it in.")
    allow_trained_images: bool = option(
        False, help="Rescoring, for debugging: evaluate even though a model (--mtgan, an --ablation, --pretrained-g, "
                    "the detector) was trained on images of the split (same image file digests, whatever their "
                    "names); refused otherwise. metrics.json and table.md then say how many.")
