"""Test-time rescoring of the baseline's ROIs by a second stage (paper Sec. 3.3; DESIGN.md section 6).

The second-stage interface: a method maps the LR crops of a batch of ROIs, float [B, 3, s, s]
in [0, 1] on the device, to `Scores`: class probabilities [B, K+1] (0 = background), box deltas
[B, 4] in `boxes.BOX_WEIGHTS` scale or None (no regression branch), and the image it classified
(the SR crop [B, 3, 4s, 4s], for figures) or None; its `read_hr` maps HR crops [B, 3, 4s, 4s] to
`Scores` the same way, without super-resolution. `MtganScorer` (D(G(x)), the paper) and
`BicubicControl` (D(bicubic(x)), which separates the gain of super-resolution from that of a
second-stage classifier) are two instances; a new method (e.g. feature-level SR) is a third.
`score_rois` runs several methods over the same crops in one pass.

Which crop a ROI's second stage reads (`reads_hr`): the paper's G upsamples a ROI as the image
holds it, never a shrunken copy. sodtool's crops have fixed sizes (HR = 4 x LR), so a ROI whose
crop window in the image is wider than the LR crop loses detail in the LR crop that the image
has; D reads such a ROI's HR crop (the image's own pixels at D's input size) and only narrower
windows go through G (or bicubic, for the control); `score_rois` without `hr_rows` sends every
ROI through G (`eval --sr-only`); docs/choices_on_val.md checks this choice on val.

Then per image, pure functions of tensors:
- `refine_boxes`: the refined box `boxes.decode_target(roi, reg / BOX_WEIGHTS)` clipped to the image
  (the ROI itself without deltas);
- `class_scores`: every ROI gives one candidate per class c in 1..K with the score
  - "disc" (the paper): p[c], the second stage's probability of class c alone;
  - "fused": sqrt(p[c] * q[c]), the geometric mean of that probability and the baseline's,
    where the baseline's distribution over the K + 1 outcomes is q[b] = s for its class b with
    score s and (1 - s) / K for each of the other K outcomes (the other classes and
    background). The baseline's confidence then keeps D from promoting a class it never saw
    there, while a confident D can still overturn an unsure baseline;
- `keep_baseline_above`: the size gate of Noh et al. (2019), who send only small proposals through
  their super-resolution branch: ROIs of area >= `area` keep the baseline's detection (their
  box, their class with their score, no other class); `keep_baseline` is the same for any set
  of ROIs, e.g. those D reads from their HR crop (`eval --sr-gate`: only super-resolved ROIs
  rescored);
- `select_detections`: candidates below `min_score` dropped, per-class NMS (torchvision
  batched_nms, IoU 0.5) and the top 100 by score. The baseline row goes through it too
  (`baseline_scores`), with the same threshold, so that no row keeps a longer list than another.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch
from torchvision.ops import batched_nms

from sodtool.boxes import BOX_WEIGHTS, clip, decode_target
from sodtool.device import autocast
from sodtool.engine import to_float
from sodtool.errors import InputError
from sodtool.resample import bicubic_up

SCORE_MODES = ("disc", "fused")


class Scores(NamedTuple):
    """A second stage's output for B ROIs: probs float [B, K+1], reg float [B, 4] or None,
    image float [B, 3, S, S] (what was classified) or None."""

    probs: torch.Tensor
    reg: Optional[torch.Tensor]
    image: Optional[torch.Tensor]


def discriminator_scores(discriminator: torch.nn.Module, x: torch.Tensor,
                         image: Optional[torch.Tensor] = None) -> Scores:
    """D's softmax probabilities and box deltas for the crops x [B, 3, S, S]; `image` is carried as is."""
    o = discriminator(x)
    return Scores(torch.softmax(o.cls.float(), dim=1), o.reg.float() if o.reg is not None else None, image)


class MtganScorer:
    """SOD-MTGAN: D(G(x)), D seeing G's output unclamped, as during training."""

    def __init__(self, name: str, generator: torch.nn.Module, discriminator: torch.nn.Module) -> None:
        self.name, self.generator, self.discriminator = name, generator, discriminator

    def __call__(self, x: torch.Tensor) -> Scores:
        sr = self.generator(x)
        return discriminator_scores(self.discriminator, sr, sr)

    def read_hr(self, hr: torch.Tensor) -> Scores:
        return discriminator_scores(self.discriminator, hr)


class BicubicControl:
    """The bicubic control: the same D fed the bicubic 4x upsampling of the LR crop instead of G's output."""

    def __init__(self, name: str, discriminator: torch.nn.Module) -> None:
        self.name, self.discriminator = name, discriminator

    def __call__(self, x: torch.Tensor) -> Scores:
        return discriminator_scores(self.discriminator, bicubic_up(x))

    def read_hr(self, hr: torch.Tensor) -> Scores:
        return discriminator_scores(self.discriminator, hr)


def wider_than_lr(window_sides: torch.Tensor, lr_size: int) -> torch.Tensor:
    """bool [R]: crop windows (sides [R], image px) wider than the `lr_size` px LR crop, whose LR
    crops are shrunken copies of the image, so that their second stage reads the HR crop."""
    return window_sides > lr_size


def reads_hr(rois: torch.Tensor, context: float, lr_size: int) -> torch.Tensor:
    """bool [R]: the ROIs [R, 4] (xyxy, image px) whose square crop window (`boxes.square_windows`:
    side = context x the longer side) is wider than `lr_size` px (module docstring)."""
    wh = (rois[:, 2:] - rois[:, :2]).float()
    return wider_than_lr(context * wh.max(dim=1).values.clamp(min=1.0), lr_size)


@torch.no_grad()
def score_rois(methods: Sequence, lr_u8: torch.Tensor, device: torch.device, batch_size: int,
               keep_rows: np.ndarray, hr_u8: Optional[torch.Tensor] = None,
               hr_rows: Optional[torch.Tensor] = None) -> tuple[dict[str, dict], np.ndarray]:
    """Every method over the same crops, `batch_size` ROIs at a time.

    lr_u8: uint8 [R, 3, s, s] (CPU). hr_u8: uint8 [R, 3, 4s, 4s] and hr_rows: bool [R]
    (`reads_hr`), or None: the rows each method scores with `read_hr` on their HR crop instead
    of from their LR crop. Returns ({name: {"probs": float32 [R, K+1], "reg": float32 [R, 4] |
    None}} on the CPU, uint8 images [len(keep_rows), 3, S, S] of the FIRST method at `keep_rows`,
    e.g. SR crops for figures; those rows must be read from the LR crop). The crops go in
    channels_last on every device: on CPU oneDNN's convolutions run faster in it
    (benchmarks/bench_rescore.py), and the probabilities move by under 1e-6. On CUDA also bf16
    autocast.
    """
    if hr_rows is not None and bool(hr_rows[torch.from_numpy(keep_rows)].any()):
        raise ValueError("keep_rows must be rows scored from their LR crop")
    parts: dict[str, dict[str, list]] = {m.name: {"probs": [], "reg": []} for m in methods}
    kept: list[torch.Tensor] = []
    r = lr_u8.shape[0]
    for s in range(0, r, batch_size):
        e = min(s + batch_size, r)
        on_hr = hr_rows[s:e] if hr_rows is not None else torch.zeros(e - s, dtype=torch.bool)
        from_lr = torch.nonzero(~on_hr).squeeze(1)
        from_hr = torch.nonzero(on_hr).squeeze(1)
        # A batch's rows in LR order: row j of the batch is row at[j] of the LR pass.
        at = torch.cumsum(~on_hr, 0) - 1
        x = to_float(lr_u8[s:e][from_lr], device, channels_last=True) if len(from_lr) else None
        xh = to_float(hr_u8[s:e][from_hr], device, channels_last=True) if len(from_hr) else None
        want = torch.from_numpy(keep_rows[(keep_rows >= s) & (keep_rows < e)] - s)
        with autocast(device):
            for i, m in enumerate(methods):
                lo = m(x) if x is not None else None
                hi = m.read_hr(xh) if xh is not None else None
                done = [(rows, o) for rows, o in ((from_lr, lo), (from_hr, hi)) if o is not None]
                probs = torch.empty(e - s, done[0][1].probs.shape[1])
                reg = torch.empty(e - s, 4) if done[0][1].reg is not None else None
                for rows, o in done:
                    probs[rows] = o.probs.cpu()
                    if reg is not None:
                        reg[rows] = o.reg.cpu()
                parts[m.name]["probs"].append(probs)
                parts[m.name]["reg"].append(reg)
                if i == 0 and len(want) and lo is not None and lo.image is not None:
                    idx = at[want].to(device)
                    kept.append((lo.image[idx].float().clamp(0, 1) * 255.0).round().to(torch.uint8).cpu())
    res = {}
    for name, p in parts.items():
        regs = p["reg"]
        res[name] = {"probs": torch.cat(p["probs"]), "reg": torch.cat(regs) if regs and regs[0] is not None else None}
    return res, (torch.cat(kept).numpy() if kept else np.zeros((0,), np.uint8))


def refine_boxes(rois: torch.Tensor, reg: Optional[torch.Tensor], width: int, height: int) -> torch.Tensor:
    """Refined boxes [R, 4] xyxy: decode_target(rois, reg / BOX_WEIGHTS) clipped to the image (the
    deltas are relative to each ROI's square, as the training targets: `boxes.encode_target`).

    rois: [R, 4] xyxy image pixels; reg: D's deltas [R, 4] in BOX_WEIGHTS scale, or None (no
    regression branch: the ROIs, clipped).
    """
    rois = rois.float()
    if reg is None:
        return clip(rois, width, height)
    deltas = reg.float() / torch.tensor(BOX_WEIGHTS, dtype=torch.float32, device=reg.device)
    return clip(decode_target(rois, deltas), width, height)


def class_scores(probs: torch.Tensor, base_scores: torch.Tensor, base_labels: torch.Tensor, mode: str) -> torch.Tensor:
    """Scores [R, K] of classes 1..K from the second stage's probabilities `probs` [R, K+1] (module docstring)."""
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


def check_small_area(area: Optional[float]) -> Optional[float]:
    """`--small-area`: a finite area in px², or 0 / None for no gate (every ROI rescored, the
    paper's protocol). Returns the area, or None for no gate; a negative or non-finite one is an
    InputError."""
    if area is not None and not (area >= 0 and math.isfinite(area)):
        raise InputError(f"--small-area must be an area in px² (e.g. 1024 = 32²; 0: every ROI), got {area}")
    return area or None


def at_or_above(rois: torch.Tensor, area: float) -> torch.Tensor:
    """bool [R]: the ROIs [R, 4] (xyxy, image px) whose area is >= `area` px², those the size gate
    leaves to the baseline."""
    wh = (rois[:, 2:] - rois[:, :2]).clamp(min=0)
    return wh[:, 0] * wh[:, 1] >= area


def baseline_scores(base_scores: torch.Tensor, base_labels: torch.Tensor, k: int) -> torch.Tensor:
    """The baseline's own detections as candidates: scores [R, K] of classes 1..K, each ROI's
    baseline class scored with its baseline score and every other class 0. Through
    `select_detections` with the rescored rows' threshold, NMS and top-k, they give the baseline
    row, so that every row of a table is selected alike."""
    scores = torch.zeros(len(base_scores), k, dtype=torch.float32)
    rows = torch.nonzero((base_labels >= 1) & (base_labels <= k)).squeeze(1)
    scores[rows, base_labels[rows] - 1] = base_scores[rows].float()
    return scores


def keep_baseline(rois: torch.Tensor, boxes: torch.Tensor, scores: torch.Tensor, base_scores: torch.Tensor,
                  base_labels: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A gate: the ROIs marked in `keep` (bool [R]) keep the baseline's detection.

    rois, boxes: [R, 4] xyxy (the ROIs and the second stage's refined boxes); scores: [R, K] of
    classes 1..K (`class_scores`); base_scores [R], base_labels [R] (1..K). Returns new (boxes,
    scores): for a kept ROI its own box and only its baseline class scored, with the baseline's
    score, so that after NMS it is the baseline's detection again; the other ROIs unchanged.
    """
    if not bool(keep.any()):
        return boxes, scores
    boxes, scores = boxes.clone(), scores.clone()
    rows = torch.nonzero(keep).squeeze(1)
    boxes[rows] = rois[rows].float()
    scores[rows] = baseline_scores(base_scores[rows], base_labels[rows], scores.shape[1]).to(scores.dtype)
    return boxes, scores


def keep_baseline_above(rois: torch.Tensor, boxes: torch.Tensor, scores: torch.Tensor, base_scores: torch.Tensor,
                        base_labels: torch.Tensor, area: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The size gate (`keep_baseline`): ROIs whose area (xyxy, image px^2) is >= `area` keep the
    baseline's detection; smaller ones are rescored."""
    return keep_baseline(rois, boxes, scores, base_scores, base_labels, at_or_above(rois, area))


def select_detections(boxes: torch.Tensor, scores: torch.Tensor, *, nms_iou: float, max_per_image: int,
                      min_score: float) -> dict[str, np.ndarray]:
    """Per-class NMS over the candidates (each box with each class) and the top `max_per_image`.

    boxes: [R, 4] xyxy (one per ROI, shared by its classes); scores: [R, K] for classes 1..K.
    Returns numpy boxes float32 [N, 4], scores float32 [N], labels int64 [N] (1..K), sorted by
    score, descending (ties: lower ROI index first, then lower class).
    """
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
