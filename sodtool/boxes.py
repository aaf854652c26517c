"""Box arithmetic shared by cropping, training and rescoring. All boxes are xyxy in pixels.

`encode` / `decode` are the standard Fast R-CNN delta (Girshick 2015, Eq. 6-9), unweighted:
    dx = (gx - px) / pw,  dy = (gy - py) / ph,  dw = log(gw / pw),  dh = log(gh / ph)
with (px, py, pw, ph) a reference box's centre and size and (gx, gy, gw, gh) the ground truth's.

The discriminator's box target (`encode_target` / `decode_target`) takes as reference box the
ROI's *square*: centred on the ROI, side max(w, h). The crop D sees is that square times the
context factor, resampled to a fixed size: D sees the square's geometry and nothing of the
ROI's own aspect ratio, so deltas relative to the ROI's width and height (the textbook choice
for a second stage that pools the ROI itself) could not be learnt from the crop for a
non-square ROI. Relative to the square, every delta is a property of the picture D sees.
Stores hold these raw deltas; the discriminator regresses them multiplied by BOX_WEIGHTS
(Fast R-CNN's target normalisation, torchvision's (10, 10, 5, 5)).
"""

from __future__ import annotations

import math

import torch

BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
# Largest dw/dh applied when decoding, as torchvision: exp() of more than this overflows boxes.
MAX_LOG_SCALE = math.log(1000.0 / 16)


def encode(rois: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Deltas [N, 4] (dx, dy, dw, dh) taking `rois` [N, 4] onto `gt` [N, 4]; both xyxy pixels."""
    pw = rois[:, 2] - rois[:, 0]
    ph = rois[:, 3] - rois[:, 1]
    px = rois[:, 0] + 0.5 * pw
    py = rois[:, 1] + 0.5 * ph
    gw = gt[:, 2] - gt[:, 0]
    gh = gt[:, 3] - gt[:, 1]
    gx = gt[:, 0] + 0.5 * gw
    gy = gt[:, 1] + 0.5 * gh
    return torch.stack([(gx - px) / pw, (gy - py) / ph, torch.log(gw / pw), torch.log(gh / ph)], dim=1)


def decode(rois: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """Inverse of `encode`: boxes [N, 4] xyxy from `rois` [N, 4] and raw `deltas` [N, 4]."""
    pw = rois[:, 2] - rois[:, 0]
    ph = rois[:, 3] - rois[:, 1]
    px = rois[:, 0] + 0.5 * pw
    py = rois[:, 1] + 0.5 * ph
    dw = deltas[:, 2].clamp(max=MAX_LOG_SCALE)
    dh = deltas[:, 3].clamp(max=MAX_LOG_SCALE)
    cx = px + deltas[:, 0] * pw
    cy = py + deltas[:, 1] * ph
    w = pw * torch.exp(dw)
    h = ph * torch.exp(dh)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=1)


def square_windows(rois: torch.Tensor, context: float) -> torch.Tensor:
    """Square crop windows [N, 4] xyxy centred on `rois` [N, 4], side = context * max(w, h)."""
    w = rois[:, 2] - rois[:, 0]
    h = rois[:, 3] - rois[:, 1]
    cx = rois[:, 0] + 0.5 * w
    cy = rois[:, 1] + 0.5 * h
    half = 0.5 * context * torch.maximum(w, h).clamp(min=1.0)
    return torch.stack([cx - half, cy - half, cx + half, cy + half], dim=1)


def reference_squares(rois: torch.Tensor) -> torch.Tensor:
    """The boxes [N, 4] that D's box deltas are relative to: centred on `rois` [N, 4], side
    max(w, h) (at least 1 px); the crop window is this square scaled by the context factor."""
    return square_windows(rois, 1.0)


def encode_target(rois: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """D's box target [N, 4]: the deltas taking the ROIs' squares onto `gt` [N, 4] (xyxy pixels)."""
    return encode(reference_squares(rois), gt)


def decode_target(rois: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """Inverse of `encode_target`: boxes [N, 4] xyxy from `rois` [N, 4] and raw deltas [N, 4]."""
    return decode(reference_squares(rois), deltas)


def clip(boxes: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Clip xyxy boxes [N, 4] to the image."""
    out = boxes.clone()
    out[:, 0::2] = out[:, 0::2].clamp(0, width)
    out[:, 1::2] = out[:, 1::2].clamp(0, height)
    return out
