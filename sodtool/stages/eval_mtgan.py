"""`sodtool eval` with an MTGAN: test-time ROI rescoring (paper Sec. 3.3 / 4.2, DESIGN.md section 6).

For every image of a split:

1. ROIs: the baseline detector's top 100 detections (boxes xyxy, scores, classes 1..K), either
   from running the detector (`detector`, through the same code as `sodtool crop-rois --mode
   test`) or read from a test-mode ROI store (`rois`, `rois_<split>.h5`, with its LR twin
   `rois_<split>_lr.h5` when present). Both give the same crops, so the same detections.
2. Crops: the HR-size square context window of each ROI (`sodtool.rois.crop_windows`), and its
   LR version by the same 4x bicubic antialiased downsampling as `sodtool downsample`, so that
   the LR crops at test time are made exactly as the training ones.
3. The second stages (`sodtool.rescoring`): G(LR) -> D gives class probabilities p [R, K+1]
   and box deltas; the refined box is `boxes.decode_target(roi, reg / BOX_WEIGHTS)` clipped to the
   image (the ROI itself when D has no regression branch). D sees G's output unclamped, as
   during training. A ROI whose crop window in the image is wider than the LR crop is read
   from its HR crop by D alone (`rescoring.reads_hr`: its LR crop lost detail the image has);
   `sr_only` sends every ROI through G.
4. Candidates: one per ROI and class with the score `score` ("disc", the paper's: D's
   probability; "fused": its geometric mean with the baseline's; see `sodtool.rescoring`);
   those below `min_score` dropped, per-class NMS at IoU `nms_iou` (0.5), top `max_per_image`.
   `min_score` defaults to the score threshold the ROIs were taken at (0.05 in test mode), and
   the baseline row is selected the same way from its own detections: every row of the table
   keeps detections down to the same score, so none is rewarded for a longer list.
   With `small_area`, every rescored row is also written size-gated (`NAME_small.json`): ROIs of
   area >= small_area keep the baseline's detection and only smaller ones are rescored, as Noh
   et al. (2019) send only small proposals through super-resolution. With `sr_gate`, every
   rescored row is also written SR-gated (`NAME_srgate.json`): the ROIs D reads from their HR
   crop (step 3) keep the baseline's detection and only those that go through G are rescored,
   so that the row shows what super-resolution does and nothing else. Off by default: the
   paper rescores every ROI.
5. COCO results JSON with the dataset's category ids and [x, y, w, h] boxes.

The same is done for
- the baseline itself: the ROIs with their baseline scores and classes, through the same
  threshold, NMS and top-k as every rescored row (`baseline.json`);
- the bicubic control: D of the MTGAN fed the bicubic 4x upsampling of the LR crop instead of
  G's output, everything else equal (`bicubic.json`): it separates the gain from
  super-resolution from the gain of a second-stage classifier on the crops;
- each ablation model (`--ablation NAME=PATH`, e.g. an MTGAN trained with --no-adv): its own G
  and D (`NAME.json`);
- with `pretrained_g` (a `train sr` run), the pretrained-G control: the MTGAN's D fed the output of
  the MSE-pretrained generator the MTGAN started from (`pretrained_g.json`): it separates what the
  adversarial stage did to G from what super-resolution gives D;
- each other detector (`--compare NAME=PATH`: a `train fsr` model, its small-head or
  unmatched-target control, another `train detector` model): run on every image of the split by
  the steps that give the baseline's ROIs (`testrois.detector_detections`: its detections at the
  ROIs' score threshold, the same top count), then selected as the baseline row is (`NAME.json`).
  A `--compare` of the baseline's own detector therefore reproduces the baseline row exactly.
  Its "ROIs via SR" are the proposals a feature-SR model sent through its generator.
  Without `mtgan`, the table holds the baseline and these rows only.

Each is evaluated with COCOeval (sodtool.evaluate.coco_evaluate). Outputs in `out` (default
`RUN/eval_<split>` beside the MTGAN run folder): the results JSONs, `metrics.json` (every row:
12 COCO stats, per-class AP, differences to the baseline), `table.md` (AP, AP50, AP75, AP_S,
AP_M, AP_L in percent with one decimal, as the paper's Tables 2 and 3), `figures/`
(`sr_triplets.png`: ground-truth small objects whose ROI goes through G, as LR, bicubic, SR and
HR crops with D's verdict on each; `detections.png`: the baseline's detections beside the
MTGAN's `score` row over every ROI (`mtgan_fused` by default), each column's top k per image
with k = the image's ground-truth count; loss curves of the sr and mtgan runs), and
`manifest.json`, last. Every file is written atomically.

In code: `score_images` is the scoring pass (steps 1-3, one forward pass of every second stage
over batches of ROIs, yielding per image), `image_detections` the pure step from one image's
scores to every row's detections (step 4), and `write_rows` writes and evaluates the rows (step
5, metrics.json, table.md); a row is a `reports.Row` (method, score, gate), named as its file.

Batches: the ROIs of consecutive images are concatenated and sent through G and D
`batch_size` ROIs at a time (so a batch holds the ROIs of several images), in channels_last
(faster on CPU too). On CUDA: bf16 autocast; on CPU float32, and the same inputs give the same
outputs.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch

from sodtool.artefacts import Timer, check_output, staged_dir, write_json, write_manifest, write_text
from sodtool.coco import SplitPaths, load_split, to_coco_results
from sodtool.configs.eval_mtgan import RescoreConfig
from sodtool.console import log, make_progress, warn
from sodtool.device import device_name, resolve_device, seed_everything
from sodtool.errors import InputError
from sodtool.evaluate import STAT_NAMES, coco_evaluate, resolve_ground_truth
from sodtool.models.mtgan import discriminator_quality, load_mtgan, mtgan_file, training_context
from sodtool.models.networks import generator_file, generator_from_checkpoint
from sodtool.provenance import check_evaluation
from sodtool.reports import (
    BASELINE,
    BICUBIC,
    MTGAN,
    PRETRAINED_G,
    SMALL_SUFFIX,
    SR_GATE_SUFFIX,
    Row,
    TripletPicker,
    detector_title,
    print_comparison,
    row_title,
    table_markdown,
    write_figures,
)
from sodtool.resample import SCALE, bicubic_down
from sodtool.rescoring import (
    BicubicControl,
    MtganScorer,
    SCORE_MODES,
    at_or_above,
    baseline_scores,
    check_small_area,
    class_scores,
    keep_baseline,
    reads_hr,
    refine_boxes,
    score_rois,
    select_detections,
)
from sodtool.rois import DEFAULT_CONTEXT, DEFAULT_HR_SIZE, MODE_DEFAULTS
from sodtool.testrois import ImageRois, batch_images, detector_detections, detector_rois, store_rois

STAGE = "eval-mtgan"
RESERVED_NAMES = (BASELINE, MTGAN, BICUBIC, PRETRAINED_G, "metrics", "table", "manifest", "figures")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


def parse_ablation(spec: str, option: str = "--ablation",
                   example: str = "no_adv=runs/quick/mtgan_no_adv") -> tuple[str, Path]:
    """"NAME=PATH" -> (NAME, PATH); NAME is a file-name-safe label (letters, digits, _ . + -)."""
    name, sep, path = str(spec).partition("=")
    name, path = name.strip(), path.strip()
    if not sep or not name or not path:
        raise InputError(f"{option} expects NAME=PATH (e.g. {example}), got '{spec}'")
    if not _NAME_RE.match(name):
        raise InputError(f"{option} name '{name}' must start with a letter or digit and contain only "
                         "letters, digits, '_', '.', '+' or '-'")
    if name.lower() in RESERVED_NAMES or name.lower().endswith(("_fused", SMALL_SUFFIX, SR_GATE_SUFFIX)):
        raise InputError(f"{option} name '{name}' is reserved (it would overwrite {name}.json); pick another")
    return name, Path(path)


def parse_compare(spec: str) -> tuple[str, Path]:
    """A --compare "NAME=PATH" -> (NAME, PATH of a detector's model.pt)."""
    return parse_ablation(spec, "--compare", "fsr=runs/quick/fsr/model.pt")


def resolve_config(cfg: RescoreConfig) -> RescoreConfig:
    """Check every option (InputError naming it) and fill the default output folder."""
    if (cfg.detector is None) == (cfg.rois is None):
        raise InputError("give exactly one ROI source: --detector (a detector model.pt, run here) or --rois "
                         "(a test-mode ROI store from `sodtool crop-rois --mode test`)")
    # Every value first (as predict checks the same ones), then the files.
    checks = [
        (cfg.score in SCORE_MODES, f"--score must be one of {', '.join(SCORE_MODES)}, got '{cfg.score}'"),
        (0.0 < cfg.nms_iou <= 1.0, f"--nms-iou must be in (0, 1], got {cfg.nms_iou}"),
        (cfg.max_per_image >= 1, f"--max-per-image must be >= 1, got {cfg.max_per_image}"),
        (cfg.min_score is None or 0.0 <= cfg.min_score <= 1.0, f"--min-score must be in [0, 1], got {cfg.min_score}"),
        (cfg.batch_size >= 1, f"--batch-size must be >= 1, got {cfg.batch_size}"),
        (cfg.detector_batch >= 1, f"--detector-batch must be >= 1, got {cfg.detector_batch}"),
        (cfg.rois_per_image is None or cfg.rois_per_image >= 1,
         f"--rois-per-image must be >= 1, got {cfg.rois_per_image}"),
        (cfg.context is None or (cfg.context >= 1.0 and math.isfinite(cfg.context)),
         f"--context must be >= 1, got {cfg.context}"),
        (cfg.roi_score_thresh is None or 0.0 <= cfg.roi_score_thresh <= 1.0,
         f"--roi-score-thresh must be in [0, 1], got {cfg.roi_score_thresh}"),
        (cfg.fig_triplets >= 0 and cfg.fig_images >= 0, "figure counts must be >= 0"),
        (cfg.seed >= 0, f"--seed must be non-negative, got {cfg.seed}"),
        (not (cfg.sr_gate and cfg.sr_only), "--sr-gate rescores only the ROIs that go through G, but --sr-only "
         "sends every ROI through G: give one of them"),
        (cfg.slice in (None, 0) or cfg.slice >= 32, f"--slice must be a tile size of at least 32 px (0: whole "
         f"images), got {cfg.slice}"),
        (0.0 <= cfg.overlap < 1.0, f"--overlap must be in [0, 1), got {cfg.overlap}"),
        (cfg.slice is None or cfg.detector is not None, "--slice runs the detector sliced: give --detector (for "
         "--rois, crop the store with `crop-rois --slice`)"),
        (not cfg.slice_full or cfg.slice is not None, "--slice-full adds a whole-image pass to sliced inference: "
         "give --slice too"),
    ]
    for ok, msg in checks:
        if not ok:
            raise InputError(msg)
    small_area = check_small_area(cfg.small_area)
    if cfg.detector is not None and not Path(cfg.detector).is_file():
        raise InputError(f"--detector file not found: {cfg.detector}")
    if cfg.rois is not None and not Path(cfg.rois).is_file():
        raise InputError(f"--rois store not found: {cfg.rois}")
    pretrained_g = cfg.pretrained_g
    if pretrained_g is not None:
        # generator.pt only: an MTGAN's model.pt holds the adversarially trained G, not the control's
        pretrained_g = generator_file(pretrained_g, names=("generator.pt",), what="--pretrained-g")
    if cfg.mtgan is None:
        if not cfg.compare:
            raise InputError("give --mtgan (the MTGAN run folder or model.pt) to rescore the ROIs, or --compare "
                             "NAME=PATH (another detector's model.pt) to put beside the baseline")
        given = [n for n, v in (("--ablation", cfg.ablations), ("--pretrained-g", pretrained_g)) if v]
        if given:
            raise InputError(f"{given[0]} adds rows of the MTGAN's rescoring: give --mtgan too")
        if cfg.out is None:
            raise InputError("give --out: without --mtgan there is no run folder to put eval_<split> beside")
    compares = [parse_compare(c) for c in cfg.compare]
    names = [parse_ablation(a)[0] for a in cfg.ablations] + [n for n, _ in compares]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(f"--ablation / --compare name(s) given twice: {', '.join(dup)}")
    for name, path in compares:
        if not path.is_file():
            raise InputError(f"--compare {name}: detector file not found: {path}")
    out = Path(cfg.out) if cfg.out is not None else mtgan_file(cfg.mtgan).parent.parent / f"eval_{cfg.split}"
    return dataclasses.replace(cfg, out=out, ablations=tuple(str(a) for a in cfg.ablations),
                               compare=tuple(str(c) for c in cfg.compare), small_area=small_area,
                               pretrained_g=pretrained_g)


def score_images(items: Iterable[ImageRois], methods: Sequence, *, device: torch.device, batch_size: int,
                 crop_context: float, lr_size: int, sr_only: bool, picker: TripletPicker,
                 targets: Callable[[int], dict], seconds: dict[str, float],
                 ) -> Iterator[tuple[ImageRois, dict[str, dict], Optional[torch.Tensor]]]:
    """The scoring pass: the ROIs of consecutive images through every second stage (step 3).

    The ROIs of consecutive images are concatenated, `batch_size` rows at least (`batch_images`),
    and `score_rois` runs every method in `methods` over them in one pass. Yields, per image of
    `items` in order: the image (`ImageRois`: rois float32 [R, 4] xyxy px, baseline scores [R],
    labels [R] in 1..K, width, height, its crops), each method's output on its ROIs {method name:
    {"probs": float32 [R, K+1], "reg": float32 [R, 4] in BOX_WEIGHTS scale or None}} (empty
    without methods), and hr_rows: bool [R], the ROIs D read from their HR crop (None with
    `sr_only`: every ROI through G). Along the way `picker` keeps the SR figure's examples
    (`targets`: image id -> `split.targets`) and the forward passes' time is added to
    seconds["forward"].
    """
    for group in batch_images(items, batch_size):
        hr = np.concatenate([g.hr for g in group])
        lr = np.concatenate([g.lr if g.lr is not None else bicubic_down(torch.from_numpy(g.hr), SCALE).numpy()
                             for g in group])
        rois = np.concatenate([g.rois for g in group]).astype(np.float32)
        owner = np.concatenate([np.full(len(g.rois), i) for i, g in enumerate(group)])
        hr_rows = None if sr_only else reads_hr(torch.from_numpy(rois), crop_context, lr_size)
        # The SR figure shows G's output: ground-truth small objects whose ROI went through G.
        picks = picker.wanted(rois, np.concatenate([g.scores for g in group]).astype(np.float32),
                              np.concatenate([g.labels for g in group]).astype(np.int64), owner,
                              [g.image_id for g in group], [targets(g.image_id) for g in group] if picker.needs else [],
                              None if hr_rows is None else ~hr_rows.numpy())
        sr_rows = np.asarray([e.row for e in picks], np.int64)
        t = Timer()
        outs, srs = (score_rois(methods, torch.from_numpy(lr), device, batch_size, sr_rows,
                                torch.from_numpy(hr), hr_rows) if methods else ({}, []))
        seconds["forward"] += t.elapsed
        for j, e in enumerate(picks):
            picker.add(e, lr=lr[e.row], hr=hr[e.row], sr=srs[j], d_sr=outs[MTGAN]["probs"][e.row].numpy(),
                       d_bicubic=outs[BICUBIC]["probs"][e.row].numpy())
        start = 0
        for g in group:
            sl = slice(start, start + len(g.rois))
            start = sl.stop
            yield (g, {name: {"probs": o["probs"][sl], "reg": o["reg"][sl] if o["reg"] is not None else None}
                       for name, o in outs.items()},
                   None if hr_rows is None else hr_rows[sl])


def image_detections(image: ImageRois, outs: dict[str, dict], hr_rows: Optional[torch.Tensor], *, num_classes: int,
                     small_area: Optional[float], sr_gate: bool, nms_iou: float, max_per_image: int,
                     min_score: float) -> tuple[dict[Row, dict[str, np.ndarray]], dict[str, int]]:
    """One image's detections in every row, from its scores alone (step 4; no I/O, no state).

    image: rois [R, 4] xyxy px, baseline scores [R] and labels [R] in 1..K, width and height (its
    crops are not read); outs: per second stage {"probs": [R, K+1], "reg": [R, 4] or None}, as
    `score_images` yields; hr_rows: bool [R], the ROIs D read from their HR crop (None: every ROI
    went through G); small_area / sr_gate: the gates asked for (`RescoreConfig`).

    Returns (detections, through_sr). detections: {Row: `select_detections` output (boxes float32
    [N, 4] xyxy px, scores float32 [N], labels int64 [N] in 1..K)} for Row(BASELINE) and for every
    Row(method, mode, gate) with method in `outs`, mode in SCORE_MODES, gate "" and, when asked
    for, SMALL_SUFFIX (ROIs of area >= small_area keep the baseline's detection) and
    SR_GATE_SUFFIX (the ROIs of hr_rows keep it). through_sr: {gate: how many ROIs a row with that
    gate rescored from their LR crop}.
    """
    rois = torch.from_numpy(np.asarray(image.rois, np.float32))
    scores = torch.from_numpy(np.asarray(image.scores, np.float32))
    labels = torch.from_numpy(np.asarray(image.labels, np.int64))
    n = len(rois)
    select = dict(nms_iou=nms_iou, max_per_image=max_per_image, min_score=min_score)
    found = {Row(BASELINE): select_detections(rois, baseline_scores(scores, labels, num_classes), **select)}
    # Per gate, the ROIs that keep the baseline's detection (None: none).
    keeps: dict[str, Optional[torch.Tensor]] = {"": None}
    if small_area is not None:
        keeps[SMALL_SUFFIX] = at_or_above(rois, small_area)
    if sr_gate:
        keeps[SR_GATE_SUFFIX] = hr_rows if hr_rows is not None else torch.zeros(n, dtype=torch.bool)
    via_lr = torch.ones(n, dtype=torch.bool) if hr_rows is None else ~hr_rows
    through_sr = {gate: int((via_lr if keep is None else via_lr & ~keep).sum()) for gate, keep in keeps.items()}
    for method, o in outs.items():
        boxes = refine_boxes(rois, o["reg"], image.width, image.height)
        for mode in SCORE_MODES:
            cs = class_scores(o["probs"], scores, labels, mode)
            for gate, keep in keeps.items():
                b, c = (boxes, cs) if keep is None else keep_baseline(rois, boxes, cs, scores, labels, keep)
                found[Row(method, mode, gate)] = select_detections(b, c, **select)
    return found, through_sr


def write_rows(work: Path, rows: Sequence[Row], dets: dict[Row, dict[int, dict]], split, info: dict[Row, dict],
               metrics: dict) -> dict:
    """Each row's results file and COCO evaluation, then metrics.json and table.md, in `work`.

    rows: the table's rows, the baseline's first; dets: per row, image id -> detections (boxes
    [N, 4] xyxy px, scores [N], labels [N] in 1..K); split: the CocoSplit evaluated; info: per
    row, what its metrics row says besides its results (title, rois_through_sr, a --compare
    detector's details); metrics: the run's metrics, whose "rows" are filled here. Writes
    `NAME.json` (COCO results, images in split order) per row, metrics.json and table.md;
    returns the metrics written.
    """
    evaluated = []
    for row in rows:
        results = []
        for iid in split.image_ids:
            if iid in dets[row]:
                results.extend(to_coco_results(iid, dets[row][iid], split.categories))
        file = f"{row.name}.json"
        write_json(work / file, results, indent=None)
        stats = coco_evaluate(split.coco, results)
        evaluated.append({"name": row.name, "results": file, **info[row], "detections": len(results),
                          **{k: stats[k] for k in STAT_NAMES}, "per_class_AP": stats["per_class_AP"]})
    base = evaluated[0]
    for r in evaluated:
        r["delta"] = {k: (r[k] - base[k] if r[k] >= 0 and base[k] >= 0 else None) for k in STAT_NAMES}
    metrics = {**metrics, "rows": evaluated}
    write_json(work / "metrics.json", metrics)
    write_text(work / "table.md", table_markdown(metrics))
    return metrics


def rescore_eval(cfg: RescoreConfig) -> dict:
    """Rescore the baseline's ROIs with the MTGAN (and the controls), evaluate, write `cfg.out`.

    Returns the metrics: {"rows": [per method and score: name, title, results file, detections,
    the 12 COCO stats, per_class_AP, delta (stat - baseline's)], "images", "rois", "score_modes",
    "source", "timing"}.
    """
    timer = Timer()
    cfg = resolve_config(cfg)
    out = check_output(cfg.out, "folder", overwrite=cfg.overwrite)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)

    ann, image_dir = resolve_ground_truth(cfg.data, cfg.split, cfg.ann, cfg.images)
    if cfg.detector is not None and image_dir is None:
        raise InputError(f"the image folder of split '{cfg.split}' was not found (give --images): "
                         "--detector runs the detector on the images")
    split = load_split(SplitPaths(ann=ann, images=image_dir or ann.parent), check_files=cfg.detector is not None)
    # No model is evaluated on images it was trained on (unless allowed, for debugging).
    compares = [parse_compare(c) for c in cfg.compare]
    trained = [(MTGAN, f"MTGAN {cfg.mtgan}", mtgan_file(cfg.mtgan))] if cfg.mtgan is not None else []
    trained += [(n, f"ablation '{n}' ({p})", mtgan_file(p)) for n, p in map(parse_ablation, cfg.ablations)]
    trained += [(n, f"--compare {n} ({p})", p) for n, p in compares]
    if cfg.pretrained_g is not None:
        trained.append((PRETRAINED_G, f"--pretrained-g {cfg.pretrained_g}", cfg.pretrained_g))
    trained_overlap = check_evaluation(split, cfg.split, trained, detector=cfg.detector, rois=cfg.rois,
                                       allow=cfg.allow_trained_images)

    # Without an MTGAN (compare rows only) nothing is rescored: no second stage, no crops read.
    main = load_mtgan(cfg.mtgan, device, MTGAN) if cfg.mtgan is not None else None
    models = []
    if main is not None:
        main.categories.check_same(split.categories, f"MTGAN {main.path} vs dataset {ann}")
        models.append(main)
    for spec in cfg.ablations:
        name, path = parse_ablation(spec)
        m = load_mtgan(path, device, name)
        m.categories.check_same(split.categories, f"ablation '{name}' ({m.path}) vs dataset {ann}")
        models.append(m)
    # One pass of every second stage over the same crops: the MTGAN first (its SR crops feed the
    # figures), the ablations, then the controls with the MTGAN's D.
    methods = [MtganScorer(m.name, m.generator, m.discriminator) for m in models]
    if main is not None:
        methods.append(BicubicControl(BICUBIC, main.discriminator))
    if cfg.pretrained_g is not None:
        methods.append(MtganScorer(PRETRAINED_G, generator_from_checkpoint(cfg.pretrained_g, device),
                                   main.discriminator))

    if cfg.rois is not None:
        source, items = store_rois(Path(cfg.rois), cfg.split, split)
    else:
        thresh, max_rois = MODE_DEFAULTS["test"]
        context = cfg.context if cfg.context is not None else float(
            training_context(main, DEFAULT_CONTEXT) if main is not None else DEFAULT_CONTEXT)
        hr_size = (main.hr_size if main is not None else None) or DEFAULT_HR_SIZE
        source, items = detector_rois(
            Path(cfg.detector), device, split, hr_size=hr_size, context=context,
            score_thresh=thresh if cfg.roi_score_thresh is None else cfg.roi_score_thresh,
            max_rois=max_rois if cfg.rois_per_image is None else cfg.rois_per_image, batch_images=cfg.detector_batch,
            slicing=(cfg.slice, cfg.overlap, cfg.slice_full))
    # Every row, the baseline's included, keeps detections down to one score: the ROIs' threshold
    # unless a higher one is asked for (a lower one the baseline row could not follow).
    roi_thresh = float(source.detail["score_thresh"])
    min_score = roi_thresh if cfg.min_score is None else cfg.min_score
    if min_score < roi_thresh:
        raise InputError(f"--min-score {min_score:g} is below the score threshold {roi_thresh:g} of the ROIs of "
                         f"{source.path}: the baseline row cannot keep detections below it, so the rows would not be "
                         f"compared alike (take the ROIs at a lower threshold: crop-rois --score-thresh, or "
                         f"--roi-score-thresh with --detector)")
    for m in models:
        if m.hr_size is not None and m.hr_size != source.hr_size:
            raise InputError(f"{m.path} was trained on {m.hr_size} px crops but the ROI crops of {source.path} "
                             f"are {source.hr_size} px: crop the ROIs with --hr-size {m.hr_size}")
    if source.hr_size % SCALE:
        raise InputError(f"{source.path}: HR size {source.hr_size} is not divisible by {SCALE}")
    if source.kind == "rois" and main is not None:
        trained = training_context(main, None, quiet=True)
        if trained is not None and math.isfinite(source.context) and abs(trained - source.context) > 1e-6:
            warn(f"{source.path} was cropped with context {source.context} but {main.path} was trained on "
                 f"crops with context {trained}")

    log(f"eval: split {cfg.split} ({len(split.image_ids)} images), ROIs from {source.kind} {source.path}, "
        f"models {', '.join([m.name for m in models] + [n for n, _ in compares]) or 'none'}, "
        f"device {device_name(device)}")

    # Which ROIs D reads from their HR crop: those whose window is wider than the LR crop.
    crop_context = (source.context if math.isfinite(source.context)
                    else float(training_context(main, DEFAULT_CONTEXT, quiet=True)) if main is not None
                    else DEFAULT_CONTEXT)
    lr_size = source.hr_size // SCALE

    # Every second stage with every score, from the one forward pass below: each rescored row
    # ungated ("") and with every gate asked for, in this order; the --compare detectors last.
    gates = [""] + ([SMALL_SUFFIX] if cfg.small_area is not None else []) + ([SR_GATE_SUFFIX] if cfg.sr_gate else [])
    controls = [BICUBIC] + ([PRETRAINED_G] if cfg.pretrained_g is not None else [])
    rescored = [MTGAN] + controls + [m.name for m in models[1:]] if main is not None else []
    rows = [Row(BASELINE)] + [Row(n, mode, gate) for gate in gates for n in rescored for mode in SCORE_MODES]
    rows += [Row(n) for n, _ in compares]
    dets: dict[Row, dict[int, dict]] = {row: {} for row in rows}
    picker = TripletPicker(cfg.fig_triplets if cfg.figures and main is not None else 0)
    class_names = list(split.categories.names)
    n_images = n_rois = n_hr_read = 0
    # Per gate, how many ROIs a row rescored from their LR crop, i.e. through G (or bicubic in
    # the control): the ROIs super-resolution actually touched, stated beside every row.
    through_sr = dict.fromkeys(gates, 0)
    seconds = {"forward": 0.0, "postprocess": 0.0}
    t_loop = Timer()
    with make_progress() as progress:
        task = progress.add_task("eval", total=len(split.image_ids), info="")
        for image, outs, hr_rows in score_images(
                items, methods, device=device, batch_size=cfg.batch_size, crop_context=crop_context,
                lr_size=lr_size, sr_only=cfg.sr_only, picker=picker, targets=split.targets, seconds=seconds):
            t = Timer()
            found, via_sr = image_detections(
                image, outs, hr_rows, num_classes=len(class_names), small_area=cfg.small_area, sr_gate=cfg.sr_gate,
                nms_iou=cfg.nms_iou, max_per_image=cfg.max_per_image, min_score=min_score)
            for row, d in found.items():
                dets[row][image.image_id] = d
            for gate, n in via_sr.items():
                through_sr[gate] += n
            seconds["postprocess"] += t.elapsed
            n_images += 1
            n_rois += len(image.rois)
            n_hr_read += 0 if hr_rows is None else int(hr_rows.sum())
            progress.update(task, advance=1, info=f"{n_rois} ROIs")
        progress.update(task, completed=len(split.image_ids))  # images without ROIs were skipped
    loop_s = t_loop.elapsed
    fwd_s, post_s = seconds["forward"], seconds["postprocess"]

    # What each row's metrics say besides its results: the baseline's and the rescored rows' here,
    # a --compare detector's below.
    info = {row: {"title": row_title(row, source.detail.get("arch"), cfg.small_area),
                  "rois_through_sr": 0 if row.method == BASELINE else through_sr[row.gate]}
            for row in rows if row.method == BASELINE or row.mode is not None}
    # The other detectors: their detections taken as the baseline's ROIs were, selected as its row.
    max_rois = int(source.detail.get("max_rois") or MODE_DEFAULTS["test"][1])
    for name, path in compares:
        t = Timer()
        fn, found = detector_detections(path, device, split, score_thresh=roi_thresh, max_rois=max_rois,
                                        batch_images=cfg.detector_batch,
                                        slicing=(cfg.slice, cfg.overlap, cfg.slice_full),
                                        description=f"detect {name}")
        for iid, d in found.items():
            dets[Row(name)][iid] = select_detections(
                torch.from_numpy(d["boxes"]),
                baseline_scores(torch.from_numpy(d["scores"]), torch.from_numpy(d["labels"]), len(class_names)),
                nms_iou=cfg.nms_iou, max_per_image=cfg.max_per_image, min_score=min_score)
        heads = getattr(fn.det.model, "roi_heads", None)
        counts = getattr(heads, "sr_counts", None)  # a feature-SR model's proposals, small ones counted
        has_g = counts is not None and getattr(heads, "generator", None) is not None  # not the small-head control
        info[Row(name)] = {
            "title": detector_title(name, fn.det.family, fn.det.arch, getattr(fn.det.model, "fsr_options", {})),
            "family": fn.det.family, "path": str(path), "rois_through_sr": counts["small"] if has_g else 0,
            "sr_of": counts["proposals"] if counts is not None else None, "detect_s": round(t.elapsed, 3)}

    timing = {"images": n_images, "rois": n_rois, "loop_s": round(loop_s, 3), "forward_s": round(fwd_s, 3),
              "postprocess_s": round(post_s, 3), "roi_source_s": round(max(loop_s - fwd_s - post_s, 0.0), 3),
              "images_per_s": round(n_images / loop_s, 3) if loop_s > 0 else None,
              "rois_per_s": round(n_rois / loop_s, 2) if loop_s > 0 else None,
              "device": device_name(device)}
    metrics = {"split": cfg.split, "images": len(split.image_ids), "images_with_rois": n_images, "rois": n_rois,
               "score_modes": list(SCORE_MODES), "small_area": cfg.small_area, "sr_gate": cfg.sr_gate,
               "figure_score": cfg.score,
               "crops": {"sr_only": cfg.sr_only, "lr_size": lr_size, "context": crop_context,
                         "rois_read_from_hr": n_hr_read},
               "nms_iou": cfg.nms_iou, "max_per_image": cfg.max_per_image, "min_score": min_score,
               "roi_score_thresh": roi_thresh,
               "source": {"kind": source.kind, "path": str(source.path),
                          "lr": str(source.lr_path) if source.lr_path else None, "hr_size": source.hr_size,
                          "context": source.context if math.isfinite(source.context) else None,
                          **{k: v for k, v in source.detail.items() if k != "identity"}},
               "rescored": main is not None, "rows": [],  # filled by write_rows
               "discriminator": discriminator_quality(main) if main is not None else None, "timing": timing}
    if trained_overlap is not None:  # --allow-trained-images let models trained on these images pass
        metrics["trained_overlap"] = trained_overlap

    # Results files and COCO evaluation, in a folder swapped onto `out` once complete.
    with staged_dir(out) as work:
        metrics = write_rows(work, rows, dets, split, info, metrics)
        if cfg.figures:
            # Beside the baseline: the MTGAN's row with the `score` score over every ROI (fused by
            # default), else the first --compare detector's.
            drawn = ({row_title(Row(MTGAN, cfg.score)): Row(MTGAN, cfg.score)} if main is not None
                     else {info[Row(n)]["title"]: Row(n) for n, _ in compares[:1]})
            if main is not None:
                picker.judge(main.discriminator, device)
            write_figures(cfg, work, split, image_dir, dets, picker, main, class_names, drawn)

        inputs: dict[str, Any] = {"annotations": ann}
        if main is not None:
            inputs["mtgan"] = main.path
        if source.kind == "rois":
            inputs["rois"] = source.path
            inputs["rois_lr"] = source.lr_path
        else:
            inputs["detector"] = source.path
        for m in models[1:]:
            inputs[f"ablation_{m.name}"] = m.path
        if cfg.pretrained_g is not None:
            inputs["pretrained_g"] = cfg.pretrained_g
        for name, path in compares:
            inputs[f"compare_{name}"] = path
        write_manifest(work, STAGE, cfg, inputs, metrics, seed=cfg.seed, device=device_name(device),
                       wall_time_s=timer.elapsed)
    print_comparison(metrics)
    log(f"wrote {out}")
    return metrics
