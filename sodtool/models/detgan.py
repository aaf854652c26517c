"""DetectorGAN (Liu et al., ICCV 2019, Sec. 3): networks and losses, scaled to image patches.

Set-up: the paper's pedestrian one (PS-GAN, its Sec. 4.2), not the CycleGAN one with a clean
domain X. Aerial images hold cars almost everywhere a car can stand, so there are few clean
patches to learn from, and a clean patch has no real object to compare the inserted one with.
Here the generator's input is a real patch whose object box is filled with noise, plus the box's
mask and one class plane; its output is composited into the box only (the pixels outside are the
input's, exactly), so a synthetic patch differs from its real twin inside the box alone and the
paper's BboxLoss (L1 between the synthetic and the real object crop) compares like with like. No
removal generator G_Y and no DIS_globalY are needed without a clean domain.

Networks (CPU scale: patches of 128 px, not whole 684 × 547 images):
- `PatchGenerator`: CycleGAN's ResNet generator (c7s1, two stride-2 downs, residual blocks, two
  ups, c7s1, tanh; instance norm) with `blocks` residual blocks (9 in the paper) and `channels`
  base width (64 there).
- `PatchDiscriminator`: the PatchGAN (4×4 convs, stride 2, LeakyReLU 0.2, instance norm);
  `layers` = 3 is the 70 × 70 receptive field of the paper's global discriminator; the local one
  takes the object crop resized to `local_size` px with `layers` = 2 (receptive field 34 px, the
  size of a 20-40 px car with its border).

Images inside are float in [-1, 1], [B, 3, P, P]; boxes are xyxy in patch pixels; labels 1..K.

Detector in the loop (`detection_loss`, `unrolled_real_loss`): the project's torchvision Faster
R-CNN. Eq. 3's unroll differentiates the detector's parameter gradient again, and torchvision's
compiled RoIAlign has no second derivative, so the unroll is over the RoI heads (box head and
predictor) on a frozen trunk and RPN: the inner step W' = W − lr ∇_W(L_real + L_syn) is taken
on the heads only, with create_graph, and L_real(W') is differentiated back through ∇_W L_syn,
the RoIAlign's first derivative and the frozen trunk to the synthetic pixels and G. Exact for
a detector whose trunk and RPN do not train; the trunk's share of the real update is not in it.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torchvision.ops import roi_align

from sodtool import checkpoint
from sodtool.errors import InputError

MODEL_FORMAT = "sodtool.detgan/1"


# ----------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------

class _Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3), nn.InstanceNorm2d(c), nn.ReLU(inplace=True),
            nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3), nn.InstanceNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class PatchGenerator(nn.Module):
    """G_X: [B, 4 + K, P, P] (noised patch, box mask, K class planes) -> [B, 3, P, P] in [-1, 1].
    P must be a multiple of 4."""

    def __init__(self, num_classes: int, channels: int = 32, blocks: int = 4) -> None:
        super().__init__()
        self.num_classes, self.channels, self.blocks = num_classes, channels, blocks
        c = channels
        layers: list[nn.Module] = [nn.ReflectionPad2d(3), nn.Conv2d(4 + num_classes, c, 7), nn.InstanceNorm2d(c),
                                   nn.ReLU(inplace=True)]
        for m in (1, 2):
            layers += [nn.Conv2d(c * m, c * 2 * m, 3, stride=2, padding=1), nn.InstanceNorm2d(c * 2 * m),
                       nn.ReLU(inplace=True)]
        layers += [_Block(c * 4) for _ in range(blocks)]
        for m in (4, 2):
            layers += [nn.ConvTranspose2d(c * m, c * m // 2, 3, stride=2, padding=1, output_padding=1),
                       nn.InstanceNorm2d(c * m // 2), nn.ReLU(inplace=True)]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(c, 3, 7), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PatchDiscriminator(nn.Module):
    """PatchGAN: [B, 3, S, S] in [-1, 1] -> real/fake logits [B, 1, s, s], one per receptive field
    (`receptive_field(layers)` px)."""

    def __init__(self, channels: int = 32, layers: int = 3) -> None:
        super().__init__()
        self.channels, self.layers = channels, layers
        mods: list[nn.Module] = [nn.Conv2d(3, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
        c = channels
        for i in range(1, layers + 1):
            out = channels * min(2 ** i, 8)
            mods += [nn.Conv2d(c, out, 4, stride=2 if i < layers else 1, padding=1), nn.InstanceNorm2d(out),
                     nn.LeakyReLU(0.2, inplace=True)]
            c = out
        mods += [nn.Conv2d(c, 1, 4, padding=1)]
        self.net = nn.Sequential(*mods)
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def receptive_field(layers: int) -> int:
    """Receptive field in px of `PatchDiscriminator(layers=layers)` (70 for 3 layers, 34 for 2)."""
    # Walk back from one output pixel: kernel 4 everywhere, stride 2 for the first `layers`
    # convs and 1 for the last two.
    rf = 1
    for s in reversed([2] * layers + [1, 1]):
        rf = (rf - 1) * s + 4
    return rf


def _init(m: nn.Module) -> None:
    # CycleGAN's initialisation: N(0, 0.02) weights, zero biases.
    for mod in m.modules():
        if isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(mod.weight, 0.0, 0.02)
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)


# ----------------------------------------------------------------------------------------------
# Inputs, compositing, crops
# ----------------------------------------------------------------------------------------------

def box_masks(boxes: torch.Tensor, size: int, margin: int = 2) -> torch.Tensor:
    """Masks float [B, 1, size, size]: 1 on the pixels a box (xyxy, patch px, grown by `margin`
    px) touches, 0 elsewhere."""
    b = boxes.shape[0]
    grid = torch.arange(size, dtype=torch.float32, device=boxes.device)
    x0 = (boxes[:, 0] - margin).floor().view(b, 1)
    y0 = (boxes[:, 1] - margin).floor().view(b, 1)
    x1 = (boxes[:, 2] + margin).ceil().view(b, 1)
    y1 = (boxes[:, 3] + margin).ceil().view(b, 1)
    inx = ((grid >= x0) & (grid < x1)).float()  # [B, size]
    iny = ((grid >= y0) & (grid < y1)).float()
    return (iny[:, :, None] * inx[:, None, :]).unsqueeze(1)


def generator_input(patches: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, num_classes: int,
                    noise: torch.Generator, margin: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """(G's input [B, 4 + K, P, P], mask [B, 1, P, P]) for patches [B, 3, P, P] in [-1, 1]: the box
    region (grown by `margin`) replaced by uniform noise in [-1, 1], the mask, and the box's class
    plane (label l in 1..K sets plane l - 1 to the mask)."""
    mask = box_masks(boxes, patches.shape[-1], margin).to(patches.dtype)
    rand = torch.rand(patches.shape, generator=noise, dtype=patches.dtype).to(patches.device) * 2 - 1
    planes = F.one_hot((labels - 1).long(), num_classes).to(patches.dtype)[:, :, None, None] * mask
    return torch.cat([patches * (1 - mask) + rand * mask, mask, planes], dim=1), mask


def composite(patches: torch.Tensor, generated: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The synthetic patch: G's pixels inside the mask, the input patch's outside ([B, 3, P, P])."""
    return patches * (1 - mask) + generated * mask


def object_crops(images: torch.Tensor, boxes: torch.Tensor, size: int, context: float = 1.25) -> torch.Tensor:
    """The local discriminator's view: each image's box (xyxy), grown `context` times about its
    centre, resampled to [B, 3, size, size] (RoIAlign, bilinear)."""
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    half = torch.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) * context / 2
    rois = torch.stack([torch.arange(len(boxes), dtype=images.dtype, device=images.device),
                        cx - half, cy - half, cx + half, cy + half], dim=1).to(images.dtype)
    return roi_align(images, rois, (size, size), spatial_scale=1.0, sampling_ratio=2, aligned=True)


def gan_loss(logits: torch.Tensor, real: bool) -> torch.Tensor:
    """Eq. 4's log loss on PatchGAN logits, in the stable logits form (mean over patches)."""
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, 1.0 if real else 0.0))


@torch.no_grad()
def insert_objects(g: PatchGenerator, patches: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor,
                   noise: torch.Generator, margin: int = 2) -> torch.Tensor:
    """Insert one object per patch: uint8 [B, 3, P, P] patches, boxes [B, 4] xyxy patch px, labels
    [B] in 1..K -> uint8 [B, 3, P, P], equal to the input outside each (grown) box."""
    dev = next(g.parameters()).device
    x = patches.to(dev).float() / 127.5 - 1
    inp, mask = generator_input(x, boxes.to(dev).float(), labels.to(dev), g.num_classes, noise, margin)
    out = composite(x, g(inp), mask)
    return ((out + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu()


# ----------------------------------------------------------------------------------------------
# The detector in the loop
# ----------------------------------------------------------------------------------------------

def head_parameters(det: nn.Module) -> dict[str, torch.Tensor]:
    """The RoI heads' parameters, by name: what the in-loop detector trains and Eq. 3 unrolls."""
    return dict(det.roi_heads.named_parameters())


def freeze_trunk(det: nn.Module) -> None:
    """Trunk (backbone + FPN) and RPN frozen (eval mode: BatchNorm on its running statistics);
    the RoI heads train."""
    det.train()
    det.backbone.eval()
    for m in (det.backbone, det.rpn):
        for p in m.parameters():
            p.requires_grad_(False)


def detector_inputs(det: nn.Module, images: torch.Tensor, targets: list[dict]):
    """Trunk features and proposals for images float [B, 3, P, P] in [0, 1] with their targets
    (boxes [N, 4] xyxy patch px, labels [N] 1..K): (features, proposals, image sizes, targets
    after the detector's transform). The features keep the graph to the images; proposals do not."""
    image_list, targets = det.transform(list(images), [dict(t) for t in targets])
    features = det.backbone(image_list.tensors)
    with torch.no_grad():
        proposals, _ = det.rpn(image_list, features, targets)
    return features, proposals, image_list.image_sizes, targets


def detection_loss(det: nn.Module, inputs, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The RoI heads' detection loss (classification + box regression, torchvision's Fast R-CNN
    loss over its sampled RoIs) on `detector_inputs(...)`, with the heads' parameters replaced by
    `params` when given (the unrolled W')."""
    features, proposals, sizes, targets = inputs
    heads = det.roi_heads
    if params is None:
        losses = heads(features, proposals, sizes, targets)[1]
    else:
        losses = functional_call(heads, params, (features, proposals, sizes, targets))[1]
    return losses["loss_classifier"] + losses["loss_box_reg"]


def unrolled_real_loss(det: nn.Module, real_inputs, syn_inputs, lr: float):
    """Eq. 3: (L_real(W'), L_real(W), L_syn(W), grads) with W' = W − lr ∇_W (L_real(W) + L_syn(W)) over
    the RoI heads (create_graph: L_real(W') differentiates back through ∇_W L_syn to the synthetic
    images). `grads` (detached) are the in-loop detector's own SGD step, the one unrolled."""
    params = head_parameters(det)
    names = list(params)
    l_real = detection_loss(det, real_inputs)
    l_syn = detection_loss(det, syn_inputs)
    grads = torch.autograd.grad(l_real + l_syn, [params[n] for n in names], create_graph=True)
    stepped = {n: params[n] - lr * g for n, g in zip(names, grads)}
    l_unrolled = detection_loss(det, real_inputs, stepped)
    return l_unrolled, l_real, l_syn, {n: g.detach() for n, g in zip(names, grads)}


# ----------------------------------------------------------------------------------------------
# model.pt
# ----------------------------------------------------------------------------------------------

def generator_config(g: PatchGenerator) -> dict:
    return {"num_classes": g.num_classes, "channels": g.channels, "blocks": g.blocks}


def save_model(path: str | os.PathLike, g: PatchGenerator, *, patch: int, margin: int, categories: list[dict],
               extra: dict[str, Any] | None = None) -> None:
    """RUN/detgan/model.pt: the generator, its config, the patch size and box margin it was trained
    with and the dataset's categories ([{"id", "name"}])."""
    checkpoint.save({"format": MODEL_FORMAT, "generator": {k: v.detach().cpu() for k, v in g.state_dict().items()},
                     "generator_config": generator_config(g), "patch": int(patch), "margin": int(margin),
                     "categories": categories, **(extra or {})}, path)


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[PatchGenerator, dict]:
    """(G in eval mode, the file's dict without weights) from RUN/detgan or its model.pt."""
    p = os.fspath(path)
    if os.path.isdir(p):
        p = os.path.join(p, "model.pt")
    if not os.path.isfile(p):
        raise InputError(f"{p}: no DetectorGAN model (run `sodtool train detgan` first)")
    ckpt = checkpoint.load_dict(p, "cpu", "DetectorGAN model")
    if ckpt.get("format") != MODEL_FORMAT:
        raise InputError(f"{p} is not a DetectorGAN model.pt (format {ckpt.get('format')!r})")
    g = PatchGenerator(**ckpt["generator_config"])
    g.load_state_dict(ckpt["generator"])
    g.eval().to(torch.device(device))
    return g, {k: v for k, v in ckpt.items() if k != "generator"}
