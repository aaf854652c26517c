"""What `eval` reports: the comparison table (the paper's Tables 2 and 3) and its figures.

`Row` is one row of the table (a method, its score and its gate), named as its results file;
`table_markdown` / `print_comparison` turn eval's metrics into Markdown and a console table (AP
columns in percent with one decimal, then the differences to the baseline); `TripletPicker`
chooses ground-truth small objects whose ROI goes through G and keeps their crops and D's
verdicts for Fig. 3, and `write_figures` draws them, the detections on the images with the most
small objects (Fig. 4) and the training loss curves.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torchvision.ops import box_iou

from sodtool import figures
from sodtool.artefacts import read_jsonl
from sodtool.console import log, print_table, warn
from sodtool.device import autocast
from sodtool.engine import to_float
from sodtool.errors import InputError
from sodtool.models.mtgan import MtganModel, training_logs
from sodtool.rescoring import discriminator_scores
from sodtool.resample import bicubic_up

# Rows of the comparison table, in order; ablations follow.
BASELINE, MTGAN, BICUBIC, PRETRAINED_G = "baseline", "mtgan", "bicubic", "pretrained_g"
ROW_TITLES = {BASELINE: "Baseline detector", MTGAN: "SOD-MTGAN", BICUBIC: "Bicubic control (D on bicubic)",
              PRETRAINED_G: "Pretrained-G control (D on train sr's G)"}
# A `train fsr` model's row title, by its control (`eval --compare`).
FSR_TITLES = {"none": "Feature SR (Noh et al.)", "small-head": "Small-head control (no SR)",
              "unmatched-target": "Unmatched-target control (feature SR, plain-backbone targets)"}
# The paper's table columns: metrics.json key -> column title.
TABLE_COLUMNS = (("AP", "AP"), ("AP50", "AP50"), ("AP75", "AP75"), ("AP_small", "AP_S"),
                 ("AP_medium", "AP_M"), ("AP_large", "AP_L"))
SMALL_AREA = 32.0 ** 2
# The Markdown header and alignment lines of a table with TABLE_COLUMNS.
_TABLE_HEAD = ("| Method | " + " | ".join(t for _, t in TABLE_COLUMNS) + " |",
               "| --- | " + " | ".join("---:" for _ in TABLE_COLUMNS) + " |")


# The SR figure's objects: ground-truth boxes of COCO's small size, and the IoU at which a ROI
# stands for one (COCO's AP50 match).
MATCH_IOU = 0.5


@dataclass
class SrExample:
    """One ground-truth small object of the SR figure, through the ROI that overlaps it best.

    image_id; row: the ROI's row in its eval batch; roi, gt_box: float [4] xyxy image px; iou:
    their IoU; gt_label: the object's class 1..K; det_label / det_score: the baseline's class and
    score of the ROI. Filled by `TripletPicker.add`: lr uint8 [3, s, s], hr, sr uint8 [3, S, S],
    d_sr / d_bicubic: D's probabilities [K+1] on G's output and on the bicubic upsampling (those
    eval scored the ROI with); by `TripletPicker.judge`: bicubic uint8 [3, S, S], d_nearest /
    d_hr: D's probabilities on the LR crop enlarged nearest-neighbour and on the HR crop.
    """

    image_id: int
    row: int
    roi: np.ndarray
    gt_box: np.ndarray
    iou: float
    gt_label: int
    det_label: int
    det_score: float
    lr: Optional[np.ndarray] = None
    hr: Optional[np.ndarray] = None
    sr: Optional[np.ndarray] = None
    bicubic: Optional[np.ndarray] = None
    d_nearest: Optional[np.ndarray] = None
    d_bicubic: Optional[np.ndarray] = None
    d_sr: Optional[np.ndarray] = None
    d_hr: Optional[np.ndarray] = None


def match_small_objects(rois: np.ndarray, gt_boxes: np.ndarray, gt_areas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each ROI's best ground-truth small object: (iou float [R], index int [R] into the ground
    truth, -1 where none). rois [R, 4], gt_boxes [G, 4] xyxy px; gt_areas [G]: the annotations'
    areas (COCO's size measure), small below 32²."""
    iou = np.zeros(len(rois), np.float32)
    idx = np.full(len(rois), -1, np.int64)
    small = np.flatnonzero(np.asarray(gt_areas) < SMALL_AREA)
    if len(rois) and len(small):
        m = box_iou(torch.as_tensor(rois, dtype=torch.float32),
                    torch.as_tensor(np.asarray(gt_boxes)[small], dtype=torch.float32)).numpy()
        best = m.argmax(axis=1)
        iou = m[np.arange(len(rois)), best].astype(np.float32)
        idx = small[best]
    return iou, idx


class TripletPicker:
    """Chooses the SR figure's examples: the first `n` ground-truth small objects (area < 32²) of
    the split, in image order, at most 2 per image, that a ROI eval sends through G matches
    (IoU >= MATCH_IOU); each shown through its best-overlapping such ROI. Within an image the
    best-matched objects come first. Only these few crops are kept, and only they are shown to D
    again (`judge`)."""

    def __init__(self, n: int, per_image: int = 2) -> None:
        self.n, self.per_image = n, per_image
        self.examples: list[SrExample] = []
        self.promised = 0  # examples chosen by `wanted`, kept by `add` once scored

    @property
    def needs(self) -> bool:
        """Whether more examples are wanted (else eval need not look up the ground truth)."""
        return self.promised < self.n

    def wanted(self, rois: np.ndarray, scores: np.ndarray, labels: np.ndarray, owner: np.ndarray,
               image_ids: Sequence[int], targets: Sequence[dict], eligible: Optional[np.ndarray] = None
               ) -> list[SrExample]:
        """The batch's new examples, by row (`score_rois` keeps G's output of these rows).

        rois [R, 4] xyxy px, scores [R], labels [R]: the batch's ROIs and their baseline
        detections; owner [R]: each row's image, an index into `image_ids` and `targets` (that
        image's `split.targets`); eligible: bool [R], the rows that go through G (None: all).
        """
        picked: list[SrExample] = []
        for o, (iid, t) in enumerate(zip(image_ids, targets)):
            if not self.needs:
                break
            rows = np.flatnonzero((owner == o) & (True if eligible is None else eligible))
            iou, gt = match_small_objects(rois[rows], t["boxes"], t["areas"])
            best: dict[int, int] = {}  # object -> row of its best ROI
            for j in np.argsort(-iou, kind="stable"):
                if iou[j] >= MATCH_IOU and int(gt[j]) not in best:
                    best[int(gt[j])] = j
            for g, j in list(best.items())[:min(self.per_image, self.n - self.promised)]:
                r = int(rows[j])
                picked.append(SrExample(image_id=int(iid), row=r, roi=rois[r].astype(np.float32),
                                        gt_box=np.asarray(t["boxes"][g], np.float32), iou=float(iou[j]),
                                        gt_label=int(t["labels"][g]), det_label=int(labels[r]),
                                        det_score=float(scores[r])))
                self.promised += 1
        return sorted(picked, key=lambda e: e.row)

    def add(self, ex: SrExample, *, lr: np.ndarray, hr: np.ndarray, sr: np.ndarray, d_sr, d_bicubic) -> None:
        """Keep a chosen example with its crops (uint8 [3, s, s], [3, S, S], [3, S, S]) and D's
        probabilities [K+1] on its SR and bicubic crops."""
        self.examples.append(dataclasses.replace(
            ex, lr=np.asarray(lr), hr=np.asarray(hr), sr=np.asarray(sr),
            d_sr=np.asarray(d_sr, np.float32), d_bicubic=np.asarray(d_bicubic, np.float32)))

    @torch.no_grad()
    def judge(self, discriminator: torch.nn.Module, device: torch.device) -> None:
        """D's probabilities on the examples' two other views, the LR crop enlarged nearest-
        neighbour and the HR crop, and the bicubic upsampling as shown (clamped to uint8)."""
        if not self.examples:
            return
        lr = torch.from_numpy(np.stack([e.lr for e in self.examples]))
        hr = torch.from_numpy(np.stack([e.hr for e in self.examples]))
        scale = hr.shape[-1] // lr.shape[-1]
        lr_f = to_float(lr, device)
        nearest = torch.nn.functional.interpolate(lr_f, scale_factor=scale, mode="nearest")
        bicubic = bicubic_up(lr_f, scale)
        with autocast(device):
            p_near = discriminator_scores(discriminator, nearest).probs.cpu().numpy()
            p_hr = discriminator_scores(discriminator, to_float(hr, device)).probs.cpu().numpy()
        bic = (bicubic.clamp(0, 1) * 255.0).round().to(torch.uint8).cpu().numpy()
        self.examples = [dataclasses.replace(e, d_nearest=p_near[i], d_hr=p_hr[i], bicubic=bic[i])
                         for i, e in enumerate(self.examples)]


def class_name(names: Sequence[str], label: int) -> str:
    return names[label - 1] if 1 <= label <= len(names) else "bg"


# A rescored row's gate, the suffix of its name: only ROIs below the size gate rescored (`eval
# --small-area`), only the ROIs G super-resolves rescored (`eval --sr-gate`).
SMALL_SUFFIX = "_small"
SR_GATE_SUFFIX = "_srgate"


@dataclass(frozen=True)
class Row:
    """One row of eval's table, the key of its detections.

    method: BASELINE, a second stage (MTGAN, BICUBIC, PRETRAINED_G, an ablation's NAME) or a
    `--compare` detector's NAME; mode: the score of a rescored row ("disc": D's probability, the
    paper's; "fused"), None for a detector's own detections (the baseline, a --compare row);
    gate: "" (every ROI rescored), SMALL_SUFFIX or SR_GATE_SUFFIX.
    """

    method: str
    mode: Optional[str] = None
    gate: str = ""

    @property
    def name(self) -> str:
        """The row's name and results file stem: `baseline`, `mtgan` (D's score), `mtgan_fused`,
        `bicubic`, `bicubic_fused`, `NAME`, `NAME_fused`, each with its gate's suffix."""
        return (self.method if self.mode in (None, "disc") else f"{self.method}_{self.mode}") + self.gate


def row_title(row: Row, baseline_arch: Optional[str] = None, small_area: Optional[float] = None) -> str:
    """The table's title of the baseline's or a rescored row; the baseline's names its detector
    architecture when known; a `_small` row names the size gate (`small_area`, px^2), a `_srgate`
    row the SR gate."""
    if row.method == BASELINE:
        return f"{ROW_TITLES[BASELINE]} ({baseline_arch})" if baseline_arch else ROW_TITLES[BASELINE]
    title = f"{ROW_TITLES.get(row.method, row.method)}, {'fused score' if row.mode == 'fused' else 'D score'}"
    if row.gate == SMALL_SUFFIX:
        side = math.sqrt(small_area) if small_area else float("nan")
        square = f" ({side:.0f}²)" if side == round(side) else ""
        title += f", ROIs < {small_area:g} px²{square} only"
    elif row.gate == SR_GATE_SUFFIX:
        title += ", super-resolved ROIs only"
    return title


def detector_title(name: str, family: str, arch: str, fsr_options: Optional[dict] = None) -> str:
    """The row title of another detector put beside the baseline (`eval --compare NAME=PATH`):
    a feature-SR model's names its method or control (and the extractor's pooling, where it has
    an extractor), any other detector its architecture."""
    if family == "fsr":
        opts = fsr_options or {}
        title = FSR_TITLES.get(opts.get("control"), "Feature SR")
        if opts.get("control") == "none" and opts.get("pool"):
            title += f", {opts['pool']} pooling in the extractor"
        return f"{title} [{name}]"
    return f"Detector {name} ({family} {arch})"


# Below this share of held-out object crops classified right, D's class scores are closer to
# noise than to a second opinion: the table says so under the rescored rows.
TRUSTED_D_ACCURACY = 0.5


# What trains a stronger D than the MTGAN run's own preset (None: the preset is not recorded).
# bench.sh trains on the paper's 128 px crops of 8 times the images, with train mtgan's bench
# schedule; there D's score beat the baseline in every column over every ROI (docs/results.md, "Bench").
_BENCH_ADVICE = ("pipelines/bench.sh (the paper's 128 px crops, 8 times the images, train mtgan --preset bench) "
                 "and the paper preset on a GPU train a stronger D.")
LONGER_TRAINING = {
    None: _BENCH_ADVICE,
    "quick": _BENCH_ADVICE,
    "bench": "the paper preset on a GPU (train mtgan --preset paper: ResNet-50 D, 80,000 iterations) trains D "
             "40 times longer.",
    "paper": "D is still weak after the paper's whole schedule; its loss curves (figures/loss_*.png beside "
             "this table) show whether it stopped learning.",
}
# A quick-preset D already trained on the paper's 128 px crops lacks only bench.sh's longer
# schedule: the advice names that, not the crops it has. Quick seeds of that setting spread from
# 49% to 70% held-out accuracy (README).
_AT_128_ADVICE = ("this run already has the paper's 128 px crops: the bench preset (train mtgan --preset bench: "
                  "2,000 iterations instead of 750, pipelines/bench.sh's setting), another --seed, or the paper "
                  "preset on a GPU train D longer.")


def _advice(d: dict) -> str:
    """What would train a weaker-than-trusted D longer than this run's preset and crop size did."""
    preset = d.get("preset")
    if preset in (None, "quick") and (d.get("hr_size") or 0) >= 128:
        return _AT_128_ADVICE
    return LONGER_TRAINING.get(preset, LONGER_TRAINING[None])


def verdict(d: Optional[dict]) -> str:
    """One line on how far the rescored rows can be trusted, from D's held-out object accuracy
    (`train mtgan`'s final validation: crops of held-out images, split by image)."""
    if not d or d.get("val_d_cls_acc_fg_sr") is None:
        return ("D's held-out accuracy is unknown (no train mtgan manifest beside the model): "
                "the rescored rows cannot be judged from here.")
    sr, hr, n = d["val_d_cls_acc_fg_sr"], d.get("val_d_cls_acc_fg_hr", float("nan")), d.get("val_fg_crops")
    crops = f" of {n}" if n else ""
    acc = d.get("val_d_cls_acc_fg_read")
    if acc is None:  # a run from before eval read HR crops: its SR figure
        acc = sr
        head = (f"D classifies {100 * sr:.0f}%{crops} held-out object crops right on SR input "
                f"({100 * hr:.0f}% on HR; held-out images, split by image).")
    else:
        head = (f"D classifies {100 * acc:.0f}%{crops} held-out object crops right on the crops eval gives it "
                f"(HR where the window is wider than the LR crop, else SR; {100 * sr:.0f}% on SR input alone, "
                f"{100 * hr:.0f}% on HR; held-out images, split by image).")
    if acc < TRUSTED_D_ACCURACY:
        return head + " At that level the SOD-MTGAN rows show that the pipeline runs, not what the method can do: " \
            + _advice(d)
    return head + " The rescored rows measure the method at this training budget."


def _pct(v: Optional[float], signed: bool = False) -> str:
    if v is None or v < 0 and not signed:
        return "n/a"  # COCOeval's -1: no ground truth of that size
    return f"{100 * v:+.1f}" if signed else f"{100 * v:.1f}"


def _crops_sentence(crops: Optional[dict]) -> str:
    """What the second stages read (eval's `crops` entry; none in metrics of older runs)."""
    if not crops:
        return ""
    if crops["sr_only"]:
        return " Every ROI through G (or bicubic) from its LR crop (--sr-only)."
    return (f" D reads the HR crop of the {crops['rois_read_from_hr']} ROIs whose crop window is wider than "
            f"the {crops['lr_size']} px LR crop; the others go through G (or bicubic).")


def _threshold_sentence(metrics: dict) -> str:
    """The score down to which every row keeps detections (none recorded in metrics of older runs,
    whose baseline row kept the ROIs' threshold and rescored rows went down to 0.001)."""
    if metrics.get("min_score") is None:
        return ""
    return (f" Every row, the baseline's included, keeps detections with score >= {metrics['min_score']:g} "
            f"(the ROIs were taken at >= {metrics['roi_score_thresh']:g}), the top {metrics['max_per_image']} "
            f"per image after the same NMS.")


def _overlap_lines(overlap: Optional[dict]) -> list[str]:
    """The caption of a table whose figures include training images (`eval --allow-trained-images`)."""
    if not overlap:
        return []
    return ["", f"**These figures include {overlap['images']} of the {overlap['of']} images evaluated that the "
                f"models were trained on** ({', '.join(overlap['models'])}; --allow-trained-images): they are "
                "for debugging, not a measurement on unseen images."]


def table_markdown(metrics: dict) -> str:
    """The comparison as Markdown: AP columns in percent with one decimal (the paper's Tables 2-3),
    then the differences to the baseline in percentage points."""
    head, sep = _TABLE_HEAD
    src = metrics["source"]
    rescored = metrics.get("rescored", True)  # older runs always had an MTGAN
    compared = [r for r in metrics["rows"] if r.get("sr_of") is not None or r.get("family")]
    lines = [f"# {'SOD-MTGAN evaluation' if rescored else 'Detector comparison'} on {metrics['split']}", "",
             f"COCO bbox AP in percent on {metrics['images']} images; ROIs: the baseline's top "
             f"{metrics['max_per_image']} detections per image from the {src['kind']} {src['path']} "
             f"({metrics['rois']} ROIs)"
             + ("; scores: D's class probability (the paper's) and its geometric mean with the baseline's (fused)"
                if rescored else "")
             + f"; per-class NMS at IoU {metrics['nms_iou']}."
             + _threshold_sentence(metrics)
             + (_crops_sentence(metrics.get("crops")) if rescored else "")
             + (f" Rows 'ROIs < {metrics['small_area']:g} px² only': larger ROIs keep the baseline's detection."
                if metrics.get("small_area") and rescored else "")
             + (" Detector rows (--compare): that detector's own detections, taken and selected as the "
                "baseline's." if compared else ""),
             *_overlap_lines(metrics.get("trained_overlap")), ""]
    if rescored:
        lines += ["ROIs via SR: how many of the row's ROIs were rescored from their LR crop, i.e. went through "
                  "G (through bicubic upsampling in the bicubic control); a row whose count is small measures D's "
                  "second look, not super-resolution."
                  + (" Feature-SR rows: the proposals whose pooled features went through the feature generator."
                     if compared else ""), ""]
    else:
        lines += ["ROIs via SR: for a feature-SR row, how many of the detector's proposals (area below its small "
                  "size) had their pooled features super-resolved by the feature generator; 0 where nothing was "
                  "super-resolved (the baseline, a small-head control).", ""]
    lines += [head + " ROIs via SR |", sep + " ---: |"]
    for row in metrics["rows"]:
        via = row.get("rois_through_sr")  # none in metrics of older runs
        if via is None:
            via_cell = "n/a"
        elif row.get("sr_of") is not None:
            via_cell = f"{via:,} of {row['sr_of']:,} proposals"
        else:
            via_cell = f"{via:,} of {metrics['rois']:,}"
        lines.append(f"| {row['title']} | " + " | ".join(_pct(row[k]) for k, _ in TABLE_COLUMNS) + f" | {via_cell} |")
    lines += ["", "Difference to the baseline (percentage points):", "", head, sep]
    for row in metrics["rows"][1:]:
        cells = " | ".join(_pct(row["delta"][k], signed=True) for k, _ in TABLE_COLUMNS)
        lines.append(f"| {row['title']} | {cells} |")
    lines += ["", "n/a: the ground truth has no object of that size (COCOeval reports -1)."]
    if rescored:
        lines += ["", verdict(metrics.get("discriminator"))]
    return "\n".join(lines) + "\n"


def seeds_markdown(runs: Sequence[dict], diffs: Sequence[tuple[str, str]] = ()) -> str:
    """Several `eval` runs of one comparison (e.g. MTGAN seeds 0, 1, 2) as one Markdown table: each
    row found in every run, in the first run's order, with its AP columns as mean ± sd over the
    runs (sample sd, n - 1; percent, one decimal), then D's held-out SR accuracy per run (runs
    that rescored with an MTGAN). Rows missing from some run are named under the table, not
    averaged. Runs of another split or image count than the first are an InputError: each mean
    must be over the same measurement.

    `diffs`: (A, B) row names; a second table gives A - B per run, as mean ± sd (paired: the
    spread of the difference, not of either row)."""
    if not runs:
        raise InputError("give at least one eval metrics.json")
    for i, m in enumerate(runs[1:], 2):
        if (m["split"], m["images"]) != (runs[0]["split"], runs[0]["images"]):
            raise InputError(f"run {i} is on {m['split']} ({m['images']} images), run 1 on {runs[0]['split']} "
                             f"({runs[0]['images']} images): compare like with like")
    by_name = [{r["name"]: r for r in m["rows"]} for m in runs]
    names = [r["name"] for r in runs[0]["rows"] if all(r["name"] in b for b in by_name)]
    partial = sorted({n for b in by_name for n in b} - set(names))
    for a, b in diffs:
        missing = [x for x in (a, b) if x not in names]
        if missing:
            raise InputError(f"--diff {a}:{b}: no row '{missing[0]}' in every run (rows: {', '.join(names)})")
    n = len(runs)

    def cell(v: np.ndarray, signed: bool = False) -> str:
        sign = "+" if signed else ""
        mean = round(float(v.mean()), 1) + 0.0  # + 0.0: no "-0.0" for a mean that rounds to zero
        return f"{mean:{sign}.1f}" if n == 1 else f"{mean:{sign}.1f} ± {v.std(ddof=1):.1f}"

    def values(name: str, k: str) -> np.ndarray:
        return np.array([b[name][k] for b in by_name], dtype=np.float64) * 100

    lines = [f"COCO bbox AP in percent on {runs[0]['split']}, {runs[0]['images']} images; mean ± sd of {n} "
             f"run{'s' if n > 1 else ''}.", "", *_TABLE_HEAD]
    for name in names:
        # COCOeval's -1: no ground truth of that size
        cells = ["n/a" if (values(name, k) < 0).any() else cell(values(name, k)) for k, _ in TABLE_COLUMNS]
        lines.append(f"| {by_name[0][name]['title']} | " + " | ".join(cells) + " |")
    if diffs:
        lines += ["", f"Paired differences (percentage points; mean ± sd over the {n} runs of each run's "
                  "difference):", "", "| Difference | " + " | ".join(t for _, t in TABLE_COLUMNS) + " |",
                  "| --- |" + " ---: |" * len(TABLE_COLUMNS)]
        for a, b in diffs:
            cells = ["n/a" if (values(a, k) < 0).any() or (values(b, k) < 0).any()
                     else cell(values(a, k) - values(b, k), signed=True) for k, _ in TABLE_COLUMNS]
            lines.append(f"| {a} − {b} | " + " | ".join(cells) + " |")
    if any(m.get("rescored", True) for m in runs):
        accs = [(m.get("discriminator") or {}).get("val_d_cls_acc_fg_sr") for m in runs]
        lines += ["", "D's held-out object accuracy on SR input, per run: "
                  + ", ".join("unknown" if a is None else f"{100 * a:.0f}%" for a in accs) + "."]
    if partial:
        lines.append("Rows not in every run, left out: " + ", ".join(partial) + ".")
    return "\n".join(lines) + "\n"


def print_comparison(metrics: dict) -> None:
    """The comparison table on the console (rich, stderr)."""
    header = ["method"] + [t for _, t in TABLE_COLUMNS] + ["ΔAP_S"]
    rows = [[row["title"]] + [_pct(row[k]) for k, _ in TABLE_COLUMNS]
            + ["" if row["name"] == BASELINE else _pct(row["delta"]["AP_small"], signed=True)]
            for row in metrics["rows"]]
    print_table(f"COCO bbox AP (%) on {metrics['split']}, {metrics['images']} images", header, rows)
    if metrics.get("rescored", True):
        log(verdict(metrics.get("discriminator")))


def _verdict(p: np.ndarray, label: int, names: Sequence[str]) -> str:
    """D's verdict on one crop: its probability of the true class `label`, and its top class
    (over the K + 1 outcomes, background included) where that is another."""
    top = int(np.argmax(p))
    text = f"p({class_name(names, label)}) {float(p[label]):.2f}"
    return text if top == label else f"{text}\ntop: {class_name(names, top)} {float(p[top]):.2f}"


def sr_figure(examples: Sequence[SrExample], path: Path, class_names: Sequence[str]) -> Path:
    """figures/sr_triplets.png: the picker's judged examples (`TripletPicker`), one row each:
    LR (nearest x4), bicubic x4, G's output, HR, D's verdict under each (`_verdict`)."""
    title = (f"Ground-truth small objects (area < 32²) matched by a ROI (IoU >= {MATCH_IOU:g}) that eval sends "
             "through G: the first ones in image order, at most 2 per image. Under each crop, D's verdict: its "
             "probability of the object's true class, and its top class where that is another (bg: background).")
    if not examples:
        return figures.sr_figure(np.zeros((0, 3, 1, 1), np.uint8), *(np.zeros((0, 3, 4, 4), np.uint8),) * 3, path,
                                 empty=f"No ground-truth small object (area < 32²) has a ROI (IoU >= {MATCH_IOU:g}) "
                                       "that goes through G: no SR example to show.")
    stack = {k: np.stack([getattr(e, k) for e in examples]) for k in ("lr", "bicubic", "sr", "hr")}
    labels = []
    for e in examples:
        w, h = e.gt_box[2] - e.gt_box[0], e.gt_box[3] - e.gt_box[1]
        labels.append(f"image {e.image_id}: {class_name(class_names, e.gt_label)}, {w:.0f}x{h:.0f} px; its ROI: "
                      f"IoU {e.iou:.2f}, baseline {class_name(class_names, e.det_label)} {e.det_score:.2f}")
    captions = [[_verdict(p, e.gt_label, class_names) for p in (e.d_nearest, e.d_bicubic, e.d_sr, e.d_hr)]
                for e in examples]
    return figures.sr_figure(stack["lr"], stack["bicubic"], stack["sr"], stack["hr"], path, captions=captions,
                             row_labels=labels, title=title)


def write_figures(cfg, out: Path, split, image_dir, dets: dict[Row, dict], picker: TripletPicker,
                  main: Optional[MtganModel], class_names: list[str], drawn: dict[str, Row]) -> None:
    """figures/sr_triplets.png (`sr_figure`, the picker's examples, judged) and
    figures/loss_<run>.png with an MTGAN (`main`), and figures/detections.png: the baseline's
    detections beside those of the `drawn` rows (column title -> row; `dets`: per row, image id ->
    detections), on the `cfg.fig_images` images with the most small objects, each column showing
    per image its top k detections with k = the image's ground-truth count
    (`figures.detections_figure`)."""
    fig_dir = out / "figures"
    if cfg.fig_triplets and main is not None:
        sr_figure(picker.examples, fig_dir / "sr_triplets.png", class_names)
    if cfg.fig_images:
        if image_dir is None:
            warn("no image folder: the detections figure is skipped")
        else:
            # The images with the most small objects: where the paper's Fig. 4 looks.
            small = []
            for iid in split.image_ids:
                t = split.targets(iid)
                small.append((-int((t["areas"] < SMALL_AREA).sum()), iid))
            chosen = [iid for _, iid in sorted(small)[:cfg.fig_images]]
            empty = {"boxes": np.zeros((0, 4), np.float32), "scores": np.zeros(0, np.float32),
                     "labels": np.zeros(0, np.int64)}
            images, gts, caps = [], [], []
            for iid in chosen:
                images.append(split.load_image(iid))
                t = split.targets(iid)
                gts.append({"boxes": t["boxes"], "labels": t["labels"]})
                caps.append(f"image {iid}: {len(t['boxes'])} objects, {int((t['areas'] < SMALL_AREA).sum())} small")
            columns = {f"{ROW_TITLES[BASELINE]} [{BASELINE}]": Row(BASELINE),
                       **{(title if f"[{row.name}]" in title else f"{title} [{row.name}]"): row
                          for title, row in drawn.items()}}
            title = ("Green: ground truth. Red: each column's top k detections of the image, k = the image's number "
                     "of ground-truth objects (no score threshold: the rows' scores are on different scales), "
                     "labelled with class and score; [name]: the row of table.md and its results file.")
            figures.detections_figure(
                images, gts, {col: [dets[row].get(i, empty) for i in chosen] for col, row in columns.items()},
                fig_dir / "detections.png", class_names=class_names, title=title, captions=caps)
    for run, path in (training_logs(main) if main is not None else {}).items():
        try:
            recs = read_jsonl(path)
        except OSError as e:
            warn(f"cannot read {path}: {e}")
            continue
        figures.loss_curves(recs, fig_dir / f"loss_{run}.png", title=f"{run} training losses ({path})")
