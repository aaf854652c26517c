"""`sodtool eval` with an MTGAN: test-time ROI rescoring (paper Sec. 3.3 / 4.2, DESIGN.md section 6).

For every image of a split:

1. ROIs: the baseline detector's top 100 detections (boxes xyxy, scores, classes 1..K), either
   from running the detector (`detector`, through the same code as `sodtool crop-rois --mode
   test`) or read from a test-mode ROI store (`rois`, `rois_<split>.h5`, with its LR twin
   `rois_<split>_lr.h5` when present). Both give the same crops, so the same detections.
2. Crops: the HR-size square context window of each ROI (sodtool.rois' crop function), and its
   LR version by the same 4x bicubic antialiased downsampling as `sodtool downsample`, so that
   the LR crops at test time are made exactly as the training ones.
3. G(LR) -> D: softmax class probabilities p [R, K+1] and box deltas; the refined box is
   `boxes.decode(roi, reg / BOX_WEIGHTS)` clipped to the image (the ROI itself when D has no
   regression branch). D sees G's output unclamped, as during training.
4. Candidates: every ROI gives one candidate per class c in 1..K: (refined box, c, score), with
   the score (`score`):
   - "disc" (the paper): p[c], D's probability of class c alone;
   - "fused": sqrt(p[c] * q[c]), the geometric mean of D's probability and the baseline's,
     where the baseline's distribution over the K + 1 outcomes is q[b] = s for its class b
     with score s and (1 - s) / K for each of the other K outcomes (the other classes and
     background). The baseline's confidence then keeps D from promoting a class it never saw
     there, while a confident D can still overturn an unsure baseline.
   Candidates below `min_score` are dropped, then per-class NMS (torchvision batched_nms, IoU
   `nms_iou` = 0.5) and the top `max_per_image` (100) by score are kept.
5. COCO results JSON with the dataset's category ids and [x, y, w, h] boxes.

The same is done for
- the baseline itself: the ROIs with their baseline scores and classes (`baseline.json`);
- the bicubic control: D of the MTGAN fed the bicubic 4x upsampling of the LR crop instead of
  G's output, everything else equal (`bicubic.json`): it separates the gain from
  super-resolution from the gain of a second-stage classifier on the crops;
- each ablation model (`--ablation NAME=PATH`, e.g. an MTGAN trained with --no-adv): its own G
  and D (`NAME.json`).

Each is evaluated with COCOeval (sodtool.evaluate.coco_evaluate). Outputs in `out` (default
`RUN/eval_<split>` beside the MTGAN run folder): the results JSONs, `metrics.json` (every row:
12 COCO stats, per-class AP, differences to the baseline), `table.md` (AP, AP50, AP75, AP_S,
AP_M, AP_L in percent with one decimal, as the paper's Tables 2 and 3), `figures/` (LR / HR /
SR triplets of small ROIs, detections drawn on images, loss curves of the sr and mtgan runs),
and `manifest.json`, last. Every file is written atomically.

Batches: the ROIs of consecutive images are concatenated and sent through G and D
`batch_size` ROIs at a time (so a batch holds the ROIs of several images). On CUDA: bf16
autocast and channels_last; on CPU float32, and the same inputs give the same outputs.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

from sodtool.errors import InputError

STAGE = "eval-mtgan"
SCORE_MODES = ("disc", "fused")
# Rows of the comparison table, in order; ablations follow.
BASELINE, MTGAN, BICUBIC = "baseline", "mtgan", "bicubic"
RESERVED_NAMES = (BASELINE, MTGAN, BICUBIC, "metrics", "table", "manifest", "figures")
ROW_TITLES = {BASELINE: "Baseline detector", MTGAN: "SOD-MTGAN", BICUBIC: "Bicubic control (D on bicubic)"}
# The paper's table columns: metrics.json key -> column title.
TABLE_COLUMNS = (("AP", "AP"), ("AP50", "AP50"), ("AP75", "AP75"), ("AP_small", "AP_S"),
                 ("AP_medium", "AP_M"), ("AP_large", "AP_L"))
SMALL_AREA = 32.0 ** 2
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


@dataclass(frozen=True)
class RescoreConfig:
    """Options of `sodtool eval --mtgan ...` (rescoring). Exactly one of `detector` / `rois`.

    data/split or ann/images: the dataset split (ground truth and images);
    detector: a detector checkpoint (RUN/detector/model.pt) run on the split's images;
    rois: a test-mode HR ROI store of the split (`rois_<split>.h5`; its `_lr.h5` twin is used
      when present, else the LR crops are made here the same way);
    mtgan: the MTGAN run folder (RUN/mtgan) or its model.pt;
    ablations: "NAME=PATH" pairs, each another MTGAN folder / model.pt evaluated the same way;
    out: output folder (default: RUN/eval_<split>, RUN being the MTGAN folder's parent);
    score: "disc" | "fused" (module docstring); nms_iou / max_per_image / min_score: step 4;
    batch_size: ROIs per forward pass; context / roi_score_thresh / rois_per_image: crop
      context factor, detector score threshold and ROIs per image of the direct path (None: as
      the MTGAN's training store / as crop-rois test mode: 0.05 and 100, the paper's protocol);
      detector_batch: images per detector call (as crop-rois' --batch-images);
    figures: write figures; fig_triplets / fig_images: how many SR triplets / images to draw;
      draw_thresh: smallest score drawn in the detection figure.
    """

    mtgan: Path
    data: Optional[Path] = None
    split: str = "minival"
    ann: Optional[Path] = None
    images: Optional[Path] = None
    detector: Optional[Path] = None
    rois: Optional[Path] = None
    ablations: tuple[str, ...] = ()
    out: Optional[Path] = None
    score: str = "disc"
    nms_iou: float = 0.5
    max_per_image: int = 100
    min_score: float = 1e-3
    batch_size: int = 256
    device: str = "auto"
    seed: int = 0
    context: Optional[float] = None
    roi_score_thresh: Optional[float] = None
    rois_per_image: Optional[int] = None
    detector_batch: int = 4
    figures: bool = True
    fig_triplets: int = 16
    fig_images: int = 4
    draw_thresh: float = 0.5


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------

@dataclass
class MtganModel:
    """A trained MTGAN loaded for evaluation (both networks in eval mode on the device)."""

    name: str
    path: Path  # the model.pt
    run_dir: Path  # the folder holding it
    generator: Any
    discriminator: Any
    categories: Any  # CategoryMap
    hr_size: Optional[int]
    lr_size: Optional[int]


def mtgan_file(path: str | Path) -> Path:
    """RUN/mtgan folder -> RUN/mtgan/model.pt; a file is returned as is; missing -> InputError."""
    p = Path(path)
    if p.is_dir():
        f = p / "model.pt"
        if not f.is_file():
            raise InputError(f"{p} has no model.pt: the `sodtool train mtgan` run there did not finish")
        return f
    if not p.is_file():
        raise InputError(f"MTGAN model not found: {p}")
    return p


def load_mtgan(path: str | Path, device, name: str = MTGAN) -> MtganModel:
    """Load generator + discriminator + categories from an MTGAN model.pt (or its folder)."""
    from sodtool.coco import CategoryMap
    from sodtool.networks import discriminator_from_checkpoint, generator_from_checkpoint, load_checkpoint

    f = mtgan_file(path)
    ckpt = load_checkpoint(f, "cpu", "MTGAN model")
    if "categories" not in ckpt:
        raise InputError(f"{f} has no 'categories': pass the model.pt written by `sodtool train mtgan`")
    try:
        cats = CategoryMap.from_json(ckpt["categories"])
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"{f}: unreadable 'categories' entry ({e})") from None
    g = generator_from_checkpoint(f, device)
    d = discriminator_from_checkpoint(f, device)
    if d.num_classes != cats.num_classes:
        raise InputError(f"{f}: the discriminator has {d.num_classes} classes but the file lists "
                         f"{cats.num_classes} categories")
    del ckpt["generator"], ckpt["discriminator"]
    hr = ckpt.get("hr_size")
    lr = ckpt.get("lr_size")
    return MtganModel(name=name, path=f, run_dir=f.parent, generator=g, discriminator=d, categories=cats,
                      hr_size=int(hr) if hr is not None else None, lr_size=int(lr) if lr is not None else None)


def parse_ablation(spec: str) -> tuple[str, Path]:
    """"NAME=PATH" -> (NAME, PATH); NAME is a file-name-safe label (letters, digits, _ . + -)."""
    name, sep, path = str(spec).partition("=")
    name, path = name.strip(), path.strip()
    if not sep or not name or not path:
        raise InputError(f"--ablation expects NAME=PATH (e.g. no_adv=runs/quick/mtgan_no_adv), got '{spec}'")
    if not _NAME_RE.match(name):
        raise InputError(f"--ablation name '{name}' must start with a letter or digit and contain only "
                         "letters, digits, '_', '.', '+' or '-'")
    if name.lower() in RESERVED_NAMES:
        raise InputError(f"--ablation name '{name}' is reserved (it would overwrite {name}.json); pick another")
    return name, Path(path)


# ----------------------------------------------------------------------------------------------
# ROI sources
# ----------------------------------------------------------------------------------------------

@dataclass
class ImageRois:
    """The test ROIs of one image: rois float32 [R, 4] xyxy, scores float32 [R], labels int64 [R]
    (baseline class 1..K), hr uint8 [R, 3, S, S], lr uint8 [R, 3, S/4, S/4] or None (made later)."""

    image_id: int
    width: int
    height: int
    rois: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    hr: np.ndarray
    lr: Optional[np.ndarray] = None


@dataclass
class SourceInfo:
    kind: str  # "detector" | "rois"
    path: Path
    lr_path: Optional[Path]
    categories: Any
    hr_size: int
    context: float
    detail: dict = field(default_factory=dict)


def _store_source(cfg: RescoreConfig, split, model: MtganModel) -> tuple[SourceInfo, Iterator[ImageRois]]:
    """ROIs and crops read from a test-mode store (and its LR twin when present)."""
    from sodtool import store
    from sodtool.coco import CategoryMap
    from sodtool.console import warn

    path = Path(cfg.rois)
    info = store.store_info(path)
    mode = info.get("mode")
    if mode != "test":
        raise InputError(f"{path} is a {mode!r}-mode ROI store (sampled training crops); eval needs the baseline's "
                         f"top-100 detections: make one with `sodtool crop-rois --mode test --split {cfg.split}`")
    cats = CategoryMap.from_json(info["categories"])
    cats.check_same(split.categories, f"ROI store {path} vs dataset {split.ann_path}")
    lr_path = path.with_name(path.stem + "_lr.h5")
    if lr_path.is_file():
        linfo = store.store_info(lr_path, store.LR_SCHEMA)
        src = linfo.get("source_content_sha256")
        if linfo["num_rows"] != info["num_rows"] or (src is not None and src != info.get("content_sha256")):
            raise InputError(f"{lr_path} was not made from {path} (rows or content digest differ): "
                             f"run `sodtool downsample {path}` again")
        if CategoryMap.from_json(linfo["categories"]) != cats:
            raise InputError(f"{lr_path}: categories disagree with {path}")
    else:
        lr_path = None
    ann_ident = info.get("annotations")
    if isinstance(ann_ident, dict) and "sha256" in ann_ident:
        from sodtool.artefacts import file_identity

        if file_identity(split.ann_path).get("sha256") not in (None, ann_ident["sha256"]):
            warn(f"{path} was cropped for another version of {split.ann_path} (annotation file digest differs)")
    hr_size = int(info["image_size"])
    source = SourceInfo(kind="rois", path=path, lr_path=lr_path, categories=cats, hr_size=hr_size,
                        context=float(info.get("context", float("nan"))),
                        detail={"rows": info["num_rows"], "store_split": info.get("split"),
                                "arch": (info.get("detector") or {}).get("arch")
                                if isinstance(info.get("detector"), dict) else None})

    def rows_iter() -> Iterator[ImageRois]:
        with store.open_store(path) as fh:
            image_id = fh["image_id"][:]
            known = set(split.image_ids)
            unknown = sorted(set(np.unique(image_id).tolist()) - known)
            if unknown:
                raise InputError(f"{path} has ROIs of {len(unknown)} image ids not in {split.ann_path} "
                                 f"(e.g. {unknown[:3]}): a store of another split?")
            # Rows of one image are consecutive (crop-rois writes image by image).
            change = np.flatnonzero(np.diff(image_id)) + 1
            starts = np.r_[0, change] if len(image_id) else np.zeros(0, np.int64)
            ends = np.r_[change, len(image_id)] if len(image_id) else np.zeros(0, np.int64)
            span = {}
            for s, e in zip(starts.tolist(), ends.tolist()):
                iid = int(image_id[s])
                if iid in span:
                    raise InputError(f"{path}: the rows of image {iid} are not consecutive (not written by crop-rois?)")
                span[iid] = (s, e)
            roi, score, det_label = fh["roi"][:], fh["score"][:], fh["det_label"][:]
            lh = store.open_store(lr_path, store.LR_SCHEMA) if lr_path is not None else None
            try:
                for iid in split.image_ids:
                    if iid not in span:
                        continue
                    s, e = span[iid]
                    im = split.image_info(iid)
                    yield ImageRois(image_id=iid, width=int(im["width"]), height=int(im["height"]),
                                    rois=roi[s:e].astype(np.float32), scores=score[s:e].astype(np.float32),
                                    labels=det_label[s:e].astype(np.int64), hr=fh["hr"][s:e],
                                    lr=lh["lr"][s:e] if lh is not None else None)
            finally:
                if lh is not None:
                    lh.close()

    return source, rows_iter()


def _detector_source(cfg: RescoreConfig, split, model: MtganModel, device) -> tuple[SourceInfo, Iterator[ImageRois]]:
    """ROIs from running the detector on the split's images, exactly as `crop-rois --mode test`.

    The same steps and functions as sodtool.rois.crop_rois in test mode: `detector.predict` on
    `detector_batch` images at a time (crop-rois' --batch-images, default 4), then per image
    `rois.prepare_detections` (clip, drop empty boxes, threshold, top 100), the square context
    windows (`boxes.square_windows`) and `rois.crop_windows` on the same device. A test-mode
    store made with the same detector, context, HR size and batch therefore holds the same crops.
    """
    from sodtool import boxes as B
    from sodtool import rois
    from sodtool.detector import load_detector, predict

    det = load_detector(cfg.detector, device, categories=split.categories)
    det.categories.check_same(split.categories, f"detector {cfg.detector} vs dataset {split.ann_path}")
    defaults = rois.CropRoisConfig(out=Path("unused"), mode="test")
    hr_size = model.hr_size or defaults.hr_size
    context = cfg.context if cfg.context is not None else float(_training_context(model, defaults.context))
    thresh, max_rois = rois.MODE_DEFAULTS["test"]
    if cfg.roi_score_thresh is not None:
        thresh = cfg.roi_score_thresh
    if cfg.rois_per_image is not None:
        max_rois = cfg.rois_per_image
    source = SourceInfo(kind="detector", path=Path(cfg.detector), lr_path=None, categories=det.categories,
                        hr_size=hr_size, context=context,
                        detail={"arch": det.arch, "score_thresh": thresh, "max_rois": max_rois,
                                "identity": det.identity})

    def rows_iter() -> Iterator[ImageRois]:
        ids = list(split.image_ids)
        for i in range(0, len(ids), cfg.detector_batch):
            batch = ids[i:i + cfg.detector_batch]
            images = [split.load_image(iid) for iid in batch]
            preds = predict(det, images, score_thresh=thresh, max_per_image=max_rois)
            for iid, img, p in zip(batch, images, preds):
                p = {k: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v))
                     for k, v in p.items()}
                h, w = img.shape[:2]
                d = rois.prepare_detections(p["boxes"], p["scores"], p["labels"], w, h, thresh, max_rois)
                if len(d["boxes"]) == 0:
                    continue
                windows = B.square_windows(torch.from_numpy(d["boxes"]), context)
                img_t = torch.from_numpy(img).to(device) if device.type != "cpu" else torch.from_numpy(img)
                crops = rois.crop_windows(img_t, windows, hr_size).cpu().numpy()
                yield ImageRois(image_id=iid, width=int(w), height=int(h), rois=d["boxes"].astype(np.float32),
                                scores=d["scores"].astype(np.float32), labels=d["labels"].astype(np.int64),
                                hr=crops, lr=None)

    return source, rows_iter()


def _training_context(model: MtganModel, default: Optional[float], *, quiet: bool = False) -> Optional[float]:
    """The crop context factor of the store the MTGAN was trained on (read via its run manifest);
    `default` when that store cannot be read (with a warning unless `quiet`)."""
    from sodtool.console import warn

    try:
        from sodtool.artefacts import read_manifest
        from sodtool.store import store_info

        hr = read_manifest(model.run_dir)["config"]["hr"]
        return float(store_info(hr)["context"])
    except Exception:  # noqa: BLE001 - any failure means "unknown": fall back
        if not quiet:
            warn(f"could not read the crop context of the store {model.path} was trained on; "
                 f"using crop-rois' default {default} (set --context if it was another)")
        return default


def batch_images(items: Iterator[ImageRois], batch_size: int) -> Iterator[list[ImageRois]]:
    """Group consecutive images until their ROIs fill at least `batch_size` rows."""
    group: list[ImageRois] = []
    rows = 0
    for it in items:
        group.append(it)
        rows += len(it.rois)
        if rows >= batch_size:
            yield group
            group, rows = [], 0
    if group:
        yield group


# ----------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------

def refine_boxes(rois: torch.Tensor, reg: Optional[torch.Tensor], width: int, height: int) -> torch.Tensor:
    """Refined boxes [R, 4] xyxy: decode(rois, reg / BOX_WEIGHTS) clipped to the image.

    rois: [R, 4] xyxy image pixels; reg: D's deltas [R, 4] in BOX_WEIGHTS scale, or None (no
    regression branch: the ROIs, clipped).
    """
    from sodtool.boxes import BOX_WEIGHTS, clip, decode

    rois = rois.float()
    if reg is None:
        return clip(rois, width, height)
    deltas = reg.float() / torch.tensor(BOX_WEIGHTS, dtype=torch.float32, device=reg.device)
    return clip(decode(rois, deltas), width, height)


def class_scores(probs: torch.Tensor, base_scores: torch.Tensor, base_labels: torch.Tensor, mode: str) -> torch.Tensor:
    """Scores [R, K] of classes 1..K from D's probabilities `probs` [R, K+1] (module docstring, step 4)."""
    p = probs[:, 1:].float()
    if mode == "disc":
        return p
    if mode != "fused":
        raise ValueError(f"unknown score mode {mode!r}")
    k = p.shape[1]
    s = base_scores.float().clamp(0, 1)
    q = ((1.0 - s) / k).unsqueeze(1).expand(-1, k).clone()
    has = (base_labels >= 1) & (base_labels <= k)
    rows = torch.nonzero(has).squeeze(1)
    q[rows, base_labels[rows] - 1] = s[rows]
    return torch.sqrt(p * q)


def select_detections(boxes: torch.Tensor, scores: torch.Tensor, *, nms_iou: float, max_per_image: int,
                      min_score: float) -> dict[str, np.ndarray]:
    """Per-class NMS over the candidates (each box with each class) and the top `max_per_image`.

    boxes: [R, 4] xyxy (one per ROI, shared by its classes); scores: [R, K] for classes 1..K.
    Returns numpy boxes float32 [N, 4], scores float32 [N], labels int64 [N] (1..K), sorted by
    score, descending (ties: lower ROI index first, then lower class).
    """
    from torchvision.ops import batched_nms

    r, k = scores.shape
    cand_boxes = boxes.float().unsqueeze(1).expand(r, k, 4).reshape(-1, 4)
    cand_scores = scores.float().reshape(-1)
    cand_labels = torch.arange(1, k + 1, device=scores.device).repeat(r)
    keep = torch.nonzero(cand_scores >= min_score).squeeze(1)
    cand_boxes, cand_scores, cand_labels = cand_boxes[keep], cand_scores[keep], cand_labels[keep]
    keep = batched_nms(cand_boxes, cand_scores, cand_labels, nms_iou)
    # batched_nms sorts by score but leaves ties in no defined order: sort the kept candidates
    # back into candidate order, then stably by score, so equal scores come out the same way
    # on every run and device.
    keep = keep.sort().values
    order = torch.sort(-cand_scores[keep], stable=True).indices
    keep = keep[order][:max_per_image]
    return {"boxes": cand_boxes[keep].cpu().numpy().astype(np.float32),
            "scores": cand_scores[keep].cpu().numpy().astype(np.float32),
            "labels": cand_labels[keep].cpu().numpy().astype(np.int64)}


def to_coco_results(image_id: int, det: dict[str, np.ndarray], categories) -> list[dict]:
    """Detections of one image (xyxy, labels 1..K) -> COCO results dicts (dataset ids, xywh)."""
    boxes = np.asarray(det["boxes"], dtype=np.float64).reshape(-1, 4)
    if len(boxes) == 0:
        return []
    cat_ids = categories.labels_to_ids(det["labels"])
    xywh = np.stack([boxes[:, 0], boxes[:, 1], np.maximum(boxes[:, 2] - boxes[:, 0], 0.0),
                     np.maximum(boxes[:, 3] - boxes[:, 1], 0.0)], axis=1)
    return [{"image_id": int(image_id), "category_id": int(c), "bbox": [round(float(v), 3) for v in b],
             "score": round(float(s), 6)} for b, c, s in zip(xywh, cat_ids, det["scores"])]


# ----------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------

def resolve_config(cfg: RescoreConfig) -> RescoreConfig:
    """Check every option (InputError naming it) and fill the default output folder."""
    if (cfg.detector is None) == (cfg.rois is None):
        raise InputError("give exactly one ROI source: --detector (a detector model.pt, run here) or --rois "
                         "(a test-mode ROI store from `sodtool crop-rois --mode test`)")
    if cfg.detector is not None and not Path(cfg.detector).is_file():
        raise InputError(f"--detector file not found: {cfg.detector}")
    if cfg.rois is not None and not Path(cfg.rois).is_file():
        raise InputError(f"--rois store not found: {cfg.rois}")
    checks = [
        (cfg.score in SCORE_MODES, f"--score must be one of {', '.join(SCORE_MODES)}, got '{cfg.score}'"),
        (0.0 < cfg.nms_iou <= 1.0, f"--nms-iou must be in (0, 1], got {cfg.nms_iou}"),
        (cfg.max_per_image >= 1, f"--max-per-image must be >= 1, got {cfg.max_per_image}"),
        (0.0 <= cfg.min_score <= 1.0, f"--min-score must be in [0, 1], got {cfg.min_score}"),
        (cfg.batch_size >= 1, f"--batch-size must be >= 1, got {cfg.batch_size}"),
        (cfg.detector_batch >= 1, f"--detector-batch must be >= 1, got {cfg.detector_batch}"),
        (cfg.rois_per_image is None or cfg.rois_per_image >= 1,
         f"--rois-per-image must be >= 1, got {cfg.rois_per_image}"),
        (cfg.context is None or (cfg.context >= 1.0 and math.isfinite(cfg.context)),
         f"--context must be >= 1, got {cfg.context}"),
        (cfg.roi_score_thresh is None or 0.0 <= cfg.roi_score_thresh <= 1.0,
         f"--roi-score-thresh must be in [0, 1], got {cfg.roi_score_thresh}"),
        (cfg.fig_triplets >= 0 and cfg.fig_images >= 0, "figure counts must be >= 0"),
        (0.0 <= cfg.draw_thresh <= 1.0, f"--draw-thresh must be in [0, 1], got {cfg.draw_thresh}"),
        (cfg.seed >= 0, f"--seed must be non-negative, got {cfg.seed}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise InputError(msg)
    names = [parse_ablation(a)[0] for a in cfg.ablations]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(f"--ablation name(s) given twice: {', '.join(dup)}")
    out = Path(cfg.out) if cfg.out is not None else mtgan_file(cfg.mtgan).parent.parent / f"eval_{cfg.split}"
    return dataclasses.replace(cfg, out=out, ablations=tuple(str(a) for a in cfg.ablations))


class _TripletPicker:
    """Keeps the `n` small ROIs (area < 32²) with the highest baseline scores, at most 2 per image,
    with their LR / HR / SR crops, for the Fig. 3 grid."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.items: list[tuple] = []  # (-score, order, lr, hr, sr, caption)
        self.order = 0

    def wanted(self, rois: np.ndarray, scores: np.ndarray, owner: np.ndarray) -> np.ndarray:
        """Row indices worth keeping the SR of: per image the 2 best small ROIs."""
        if self.n == 0 or len(rois) == 0:
            return np.zeros(0, np.int64)
        area = (rois[:, 2] - rois[:, 0]) * (rois[:, 3] - rois[:, 1])
        rows = []
        for o in np.unique(owner):
            idx = np.flatnonzero((owner == o) & (area < SMALL_AREA))
            rows.extend(idx[np.argsort(-scores[idx], kind="stable")[:2]].tolist())
        return np.asarray(sorted(rows), np.int64)

    def add(self, score: float, lr: np.ndarray, hr: np.ndarray, sr: np.ndarray, caption: str) -> None:
        self.items.append((-float(score), self.order, lr, hr, sr, caption))
        self.order += 1
        if len(self.items) > 4 * self.n:
            self._trim()

    def _trim(self) -> None:
        self.items.sort(key=lambda t: (t[0], t[1]))
        del self.items[self.n:]

    def result(self):
        self._trim()
        if not self.items:
            return None
        return (np.stack([t[2] for t in self.items]), np.stack([t[3] for t in self.items]),
                np.stack([t[4] for t in self.items]), [t[5] for t in self.items])


@torch.no_grad()
def _forward(models: Sequence[MtganModel], lr_u8: torch.Tensor, device, batch_size: int,
             sr_rows: np.ndarray) -> tuple[dict[str, dict], np.ndarray]:
    """G -> D for every model and D on bicubic for the first (main) model, `batch_size` ROIs at a time.

    lr_u8: uint8 [R, 3, s, s] (CPU). Returns ({name: {"probs": float32 [R, K+1], "reg": float32
    [R, 4] | None}}, uint8 SR crops [len(sr_rows), 3, S, S] of the main model at `sr_rows`).
    """
    from sodtool.device import autocast
    from sodtool.networks import bicubic_upsample

    main = models[0]
    names = [m.name for m in models] + [BICUBIC]
    parts: dict[str, dict[str, list]] = {n: {"probs": [], "reg": []} for n in names}
    sr_keep: list[torch.Tensor] = []
    channels_last = device.type == "cuda"
    r = lr_u8.shape[0]
    for s in range(0, r, batch_size):
        x = lr_u8[s:s + batch_size].to(device, non_blocking=True).float().div_(255.0)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        want = sr_rows[(sr_rows >= s) & (sr_rows < s + batch_size)] - s
        with autocast(device):
            for m in models:
                sr = m.generator(x)
                o = m.discriminator(sr)
                parts[m.name]["probs"].append(torch.softmax(o.cls.float(), dim=1).cpu())
                parts[m.name]["reg"].append(o.reg.float().cpu() if o.reg is not None else None)
                if m is main and len(want):
                    idx = torch.from_numpy(want).to(device)
                    sr_keep.append((sr[idx].float().clamp(0, 1) * 255.0).round().to(torch.uint8).cpu())
            o = main.discriminator(bicubic_upsample(x))
            parts[BICUBIC]["probs"].append(torch.softmax(o.cls.float(), dim=1).cpu())
            parts[BICUBIC]["reg"].append(o.reg.float().cpu() if o.reg is not None else None)
    out = {}
    for n in names:
        regs = parts[n]["reg"]
        out[n] = {"probs": torch.cat(parts[n]["probs"]),
                  "reg": torch.cat(regs) if regs and regs[0] is not None else None}
    srs = torch.cat(sr_keep).numpy() if sr_keep else np.zeros((0,), np.uint8)
    return out, srs


def rescore_eval(cfg: RescoreConfig) -> dict:
    """Rescore the baseline's ROIs with the MTGAN (and the controls), evaluate, write `cfg.out`.

    Returns the metrics: {"rows": [per method: name, title, results file, detections, the 12
    COCO stats, per_class_AP, delta (stat - baseline's)], "images", "rois", "score_mode",
    "source", "timing"}.
    """
    from sodtool.artefacts import MANIFEST, Timer, write_json, write_manifest, write_text
    from sodtool.coco import SplitPaths, load_split
    from sodtool.console import log, make_progress, warn
    from sodtool.device import device_name, resolve_device, seed_everything
    from sodtool.downsample import bicubic_down
    from sodtool.evaluate import resolve_ground_truth
    from sodtool.networks import SCALE

    timer = Timer()
    cfg = resolve_config(cfg)
    out = Path(cfg.out)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)

    ann, image_dir = resolve_ground_truth(cfg.data, cfg.split, cfg.ann, cfg.images)
    if cfg.detector is not None and image_dir is None:
        raise InputError(f"the image folder of split '{cfg.split}' was not found (give --images): "
                         "--detector runs the detector on the images")
    split = load_split(SplitPaths(ann=ann, images=image_dir or ann.parent), check_files=cfg.detector is not None)

    main = load_mtgan(cfg.mtgan, device, MTGAN)
    main.categories.check_same(split.categories, f"MTGAN {main.path} vs dataset {ann}")
    models = [main]
    for spec in cfg.ablations:
        name, path = parse_ablation(spec)
        m = load_mtgan(path, device, name)
        m.categories.check_same(split.categories, f"ablation '{name}' ({m.path}) vs dataset {ann}")
        models.append(m)

    if cfg.rois is not None:
        source, items = _store_source(cfg, split, main)
    else:
        source, items = _detector_source(cfg, split, main, device)
    for m in models:
        if m.hr_size is not None and m.hr_size != source.hr_size:
            raise InputError(f"{m.path} was trained on {m.hr_size} px crops but the ROI crops of {source.path} "
                             f"are {source.hr_size} px: crop the ROIs with --hr-size {m.hr_size}")
    if source.hr_size % SCALE:
        raise InputError(f"{source.path}: HR size {source.hr_size} is not divisible by {SCALE}")
    if source.kind == "rois":
        trained = _training_context(main, None, quiet=True)
        if trained is not None and math.isfinite(source.context) and abs(trained - source.context) > 1e-6:
            warn(f"{source.path} was cropped with context {source.context} but {main.path} was trained on "
                 f"crops with context {trained}")

    out.mkdir(parents=True, exist_ok=True)
    if (out / MANIFEST).is_file():
        (out / MANIFEST).unlink()  # this folder is being rewritten: not finished until the end
    log(f"eval: split {cfg.split} ({len(split.image_ids)} images), ROIs from {source.kind} {source.path}, "
        f"models {', '.join(m.name for m in models)}, score '{cfg.score}', device {device_name(device)}")

    names = [BASELINE, MTGAN, BICUBIC] + [m.name for m in models[1:]]
    dets: dict[str, dict[int, dict]] = {n: {} for n in names}
    picker = _TripletPicker(cfg.fig_triplets if cfg.figures else 0)
    class_names = list(split.categories.names)
    n_images = n_rois = 0
    fwd_s = post_s = 0.0
    t_loop = Timer()
    with make_progress() as progress:
        task = progress.add_task("eval", total=len(split.image_ids), info="")
        for group in batch_images(items, cfg.batch_size):
            hr = np.concatenate([g.hr for g in group])
            lr = np.concatenate([g.lr if g.lr is not None else bicubic_down(torch.from_numpy(g.hr), SCALE).numpy()
                                 for g in group])
            rois = np.concatenate([g.rois for g in group]).astype(np.float32)
            scores = np.concatenate([g.scores for g in group]).astype(np.float32)
            labels = np.concatenate([g.labels for g in group]).astype(np.int64)
            owner = np.concatenate([np.full(len(g.rois), i) for i, g in enumerate(group)])
            sr_rows = picker.wanted(rois, scores, owner)
            t = Timer()
            outs, srs = _forward(models, torch.from_numpy(lr), device, cfg.batch_size, sr_rows)
            fwd_s += t.elapsed
            t = Timer()
            start = 0
            for g in group:
                n = len(g.rois)
                sl = slice(start, start + n)
                start += n
                order = np.argsort(-g.scores, kind="stable")[:cfg.max_per_image]
                dets[BASELINE][g.image_id] = {"boxes": g.rois[order], "scores": g.scores[order],
                                              "labels": g.labels[order]}
                r_t = torch.from_numpy(rois[sl])
                s_t, l_t = torch.from_numpy(scores[sl]), torch.from_numpy(labels[sl])
                for name, o in outs.items():
                    reg = o["reg"][sl] if o["reg"] is not None else None
                    boxes = refine_boxes(r_t, reg, g.width, g.height)
                    cs = class_scores(o["probs"][sl], s_t, l_t, cfg.score)
                    dets[name][g.image_id] = select_detections(boxes, cs, nms_iou=cfg.nms_iou,
                                                               max_per_image=cfg.max_per_image,
                                                               min_score=cfg.min_score)
            for j, row in enumerate(sr_rows.tolist()):
                p = outs[MTGAN]["probs"][row]
                d_cls = int(p[1:].argmax()) + 1
                w, h = rois[row, 2] - rois[row, 0], rois[row, 3] - rois[row, 1]
                cap = (f"{_class_name(class_names, int(labels[row]))} {scores[row]:.2f} | "
                       f"D(SR): {_class_name(class_names, d_cls)} {float(p[d_cls]):.2f} | {w:.0f}x{h:.0f}px")
                picker.add(scores[row], lr[row], hr[row], srs[j], cap)
            post_s += t.elapsed
            n_images += len(group)
            n_rois += len(rois)
            progress.update(task, advance=len(group), info=f"{n_rois} ROIs")
        progress.update(task, completed=len(split.image_ids))  # images without ROIs were skipped
    loop_s = t_loop.elapsed

    # Results files and COCO evaluation.
    from sodtool.evaluate import STAT_NAMES, coco_evaluate

    files = {BASELINE: "baseline.json", MTGAN: "mtgan.json", BICUBIC: "bicubic.json",
             **{m.name: f"{m.name}.json" for m in models[1:]}}
    rows = []
    for name in names:
        results = []
        for iid in split.image_ids:
            if iid in dets[name]:
                results.extend(to_coco_results(iid, dets[name][iid], split.categories))
        write_json(out / files[name], results, indent=None)
        stats = coco_evaluate(split.coco, results)
        rows.append({"name": name, "title": _row_title(name, source), "results": files[name],
                     "detections": len(results), **{k: stats[k] for k in STAT_NAMES},
                     "per_class_AP": stats["per_class_AP"]})
    base = rows[0]
    for row in rows:
        row["delta"] = {k: (row[k] - base[k] if row[k] >= 0 and base[k] >= 0 else None) for k in STAT_NAMES}
    timing = {"images": n_images, "rois": n_rois, "loop_s": round(loop_s, 3), "forward_s": round(fwd_s, 3),
              "postprocess_s": round(post_s, 3), "roi_source_s": round(max(loop_s - fwd_s - post_s, 0.0), 3),
              "images_per_s": round(n_images / loop_s, 3) if loop_s > 0 else None,
              "rois_per_s": round(n_rois / loop_s, 2) if loop_s > 0 else None,
              "device": device_name(device)}
    metrics = {"split": cfg.split, "images": len(split.image_ids), "images_with_rois": n_images, "rois": n_rois,
               "score_mode": cfg.score, "nms_iou": cfg.nms_iou, "max_per_image": cfg.max_per_image,
               "source": {"kind": source.kind, "path": str(source.path),
                          "lr": str(source.lr_path) if source.lr_path else None, "hr_size": source.hr_size,
                          "context": source.context if math.isfinite(source.context) else None,
                          **{k: v for k, v in source.detail.items() if k != "identity"}},
               "rows": rows, "timing": timing}
    write_json(out / "metrics.json", metrics)
    write_text(out / "table.md", table_markdown(metrics))

    if cfg.figures:
        _write_figures(cfg, out, split, image_dir, dets, picker, main, class_names)

    inputs: dict[str, Any] = {"annotations": ann, "mtgan": main.path}
    if source.kind == "rois":
        inputs["rois"] = source.path
        inputs["rois_lr"] = source.lr_path
    else:
        inputs["detector"] = source.path
    for m in models[1:]:
        inputs[f"ablation_{m.name}"] = m.path
    write_manifest(out, STAGE, cfg, inputs, metrics, seed=cfg.seed, device=device_name(device),
                   wall_time_s=timer.elapsed)
    print_comparison(metrics)
    log(f"wrote {out}")
    return metrics


def _class_name(names: Sequence[str], label: int) -> str:
    return names[label - 1] if 1 <= label <= len(names) else "bg"


def _row_title(name: str, source: SourceInfo) -> str:
    if name == BASELINE:
        arch = source.detail.get("arch")
        return f"{ROW_TITLES[BASELINE]} ({arch})" if arch else ROW_TITLES[BASELINE]
    return ROW_TITLES.get(name, name)


def _pct(v: Optional[float], signed: bool = False) -> str:
    if v is None or v < 0 and not signed:
        return "n/a"  # COCOeval's -1: no ground truth of that size
    return f"{100 * v:+.1f}" if signed else f"{100 * v:.1f}"


def table_markdown(metrics: dict) -> str:
    """The comparison as Markdown: AP columns in percent with one decimal (the paper's Tables 2-3),
    then the differences to the baseline in percentage points."""
    head = "| Method | " + " | ".join(t for _, t in TABLE_COLUMNS) + " |"
    sep = "| --- | " + " | ".join("---:" for _ in TABLE_COLUMNS) + " |"
    src = metrics["source"]
    lines = [f"# SOD-MTGAN evaluation on {metrics['split']}", "",
             f"COCO bbox AP in percent on {metrics['images']} images; ROIs: the baseline's top "
             f"{metrics['max_per_image']} detections per image from the {src['kind']} {src['path']} "
             f"({metrics['rois']} ROIs); MTGAN score: '{metrics['score_mode']}'; "
             f"per-class NMS at IoU {metrics['nms_iou']}.",
             "", head, sep]
    for row in metrics["rows"]:
        lines.append(f"| {row['title']} | " + " | ".join(_pct(row[k]) for k, _ in TABLE_COLUMNS) + " |")
    lines += ["", "Difference to the baseline (percentage points):", "", head, sep]
    for row in metrics["rows"][1:]:
        cells = " | ".join(_pct(row["delta"][k], signed=True) for k, _ in TABLE_COLUMNS)
        lines.append(f"| {row['title']} | {cells} |")
    lines += ["", "n/a: the ground truth has no object of that size (COCOeval reports -1)."]
    return "\n".join(lines) + "\n"


def print_comparison(metrics: dict) -> None:
    """The comparison table on the console (rich, stderr)."""
    from sodtool.console import print_table

    header = ["method"] + [t for _, t in TABLE_COLUMNS] + ["ΔAP_S"]
    rows = [[row["title"]] + [_pct(row[k]) for k, _ in TABLE_COLUMNS]
            + ["" if row["name"] == BASELINE else _pct(row["delta"]["AP_small"], signed=True)]
            for row in metrics["rows"]]
    print_table(f"COCO bbox AP (%) on {metrics['split']}, {metrics['images']} images", header, rows)


def _write_figures(cfg: RescoreConfig, out: Path, split, image_dir, dets, picker: _TripletPicker,
                   main: MtganModel, class_names: list[str]) -> None:
    """figures/sr_triplets.png, figures/detections.png, figures/loss_<run>.png."""
    from sodtool import figures
    from sodtool.console import warn

    fig_dir = out / "figures"
    trip = picker.result()
    if cfg.fig_triplets:
        if trip is None:
            figures.sr_triplets(np.zeros((0, 3, 1, 1), np.uint8), np.zeros((0, 3, 4, 4), np.uint8),
                                np.zeros((0, 3, 4, 4), np.uint8), fig_dir / "sr_triplets.png")
        else:
            lr, hr, sr, caps = trip
            figures.sr_triplets(lr, hr, sr, fig_dir / "sr_triplets.png", captions=caps,
                                titles=("LR (4x nearest)", "HR", "SR (MTGAN G)"))
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
            figures.detections_figure(
                images, gts,
                {"Baseline": [dets[BASELINE].get(i, empty) for i in chosen],
                 "SOD-MTGAN": [dets[MTGAN].get(i, empty) for i in chosen]},
                fig_dir / "detections.png", class_names=class_names, score_thresh=cfg.draw_thresh, captions=caps)
    for run, path in _training_logs(main).items():
        try:
            recs = figures.read_metrics_jsonl(path)
        except OSError as e:
            warn(f"cannot read {path}: {e}")
            continue
        figures.loss_curves(recs, fig_dir / f"loss_{run}.png", title=f"{run} training losses ({path})")


def _training_logs(model: MtganModel) -> dict[str, Path]:
    """{"sr": RUN/sr/metrics.jsonl, "mtgan": RUN/mtgan/metrics.jsonl} where they exist."""
    from sodtool.artefacts import read_manifest

    found: dict[str, Path] = {}
    sr_dir = model.run_dir.parent / "sr"
    try:
        sr_cfg = read_manifest(model.run_dir)["config"].get("sr")
        if sr_cfg:
            sr_dir = Path(sr_cfg)
    except Exception:  # noqa: BLE001 - no manifest: look beside the mtgan folder
        pass
    for run, d in (("sr", sr_dir), ("mtgan", model.run_dir)):
        if (d / "metrics.jsonl").is_file():
            found[run] = d / "metrics.jsonl"
    return found
