"""Feature-level super-resolution of small proposals (Noh et al., ICCV 2019): the `fsr` detector family.

A torchvision Faster R-CNN (`sodtool.models.frcnn`) with four additions (paper Fig. 3):

- the **SR target extractor** (Sec. 4.1, Fig. 4c): the detector's own trunk and FPN run with every
  convolution wider than 1x1 dilated by 2 and every stride-2 layer run at stride 1 and followed by
  a 2x2 pooling of stride 2 (a stride-2 max pool's window is widened instead, as the paper says
  for parameter-free layers). Fig. 4c draws max pooling; the option `pool` defaults to average
  pooling, chosen on the val split (docs/results.md): the trunk's BatchNorm statistics were
  learnt on strided convolutions, which subsample without taking a maximum. It runs the very modules of the backbone through
  `torch.nn.functional` with their own weight tensors (`run_trunk(..., rate=2)`): it has no
  parameters of its own. On the full-size image I^1.0 its features have the backbone's stride
  and the receptive field, in image pixels, of the backbone on the 0.5x image I^0.5;
- the **feature generator** (Sec. 4.2, Fig. 5): residual blocks over the concatenation of a
  RoI's pooled base feature F [R, C, P, P] and its pooled sub-layer feature F_sub [R, C_sub, P, P]
  (the trunk one octave finer than the finest pooled level), of which the first C channels are
  the super-resolved feature S [R, C, P, P];
- the **feature discriminator** (`FeatureDiscriminator`, training only): an MLP of three layers;
- the **small box head and predictor**: copies of the large ones at initialisation (separate
  parameters), used for proposals whose area is below `small_size`² model-input pixels (the
  pixels of the image after the model's resize to `min_size`).

Inference (Sec. 4.4, `FSRRoIHeads.forward`): every proposal is pooled by torchvision's
MultiScaleRoIAlign; small ones go through the generator and the small head and predictor, the
others through the large ones; the two sets of class logits and box deltas are merged in proposal
order and go through torchvision's `postprocess_detections`. The model keeps the predict
contract (`sodtool.models.detectors.predict`).

Two controls are options of the same model (`control`):
- `small-head`: no generator; the small head and predictor read the small proposals' own pooled
  features (a dedicated head for small objects, without super-resolution);
- `unmatched-target`: trained with targets from the plain backbone on I^1.0 instead of the
  extractor (the paper's "naive supervision", Table 4), whose relative receptive field does not
  match that of F^0.5.

Boxes are xyxy in model-input pixels inside the model, in image pixels at its output.
`sample`, `pair_features`, `small_losses`, `large_losses` and the loss functions below are what
`sodtool train fsr` composes into the paper's three training steps (Sec. 4.3).
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss
from torchvision.models.mobilenetv3 import InvertedResidual
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops import box_area, roi_align
from torchvision.ops.misc import FrozenBatchNorm2d, SqueezeExcitation
from torchvision.ops.poolers import LevelMapper

from sodtool.errors import InputError
from sodtool.models.frcnn import ARCHS, build_detector

FAMILY = "fsr"
CONTROLS = ("none", "small-head", "unmatched-target")
POOLS = ("max", "avg")
RATE = 2  # the extractor's dilation: targets for a 2x super-resolution (the paper's fixed ratio)

# ----------------------------------------------------------------------------------------------
# Running the backbone: plainly, or as the SR target extractor (atrous, the same parameters)
# ----------------------------------------------------------------------------------------------

# Modules that act on each pixel alone: the extractor runs them as they are.
_PER_PIXEL = (nn.BatchNorm2d, FrozenBatchNorm2d, nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.SiLU,
              nn.Sigmoid, nn.Identity, nn.Dropout)


def _stride_pool(y: torch.Tensor, stride: tuple[int, int], pool: str) -> torch.Tensor:
    """Fig. 4c's pooling after a layer run at stride 1: window = stride = the layer's stride.
    ceil_mode keeps the strided layer's output size (ceil(H / 2)) for odd sizes."""
    if tuple(stride) == (1, 1):
        return y
    fn = F.max_pool2d if pool == "max" else F.avg_pool2d
    return fn(y, kernel_size=tuple(stride), stride=tuple(stride), ceil_mode=True)


def _conv(m: nn.Conv2d, x: torch.Tensor, rate: int, pool: str) -> torch.Tensor:
    if rate == 1:
        return m(x)
    if m.padding_mode != "zeros" or isinstance(m.padding, str):
        raise TypeError(f"the SR target extractor needs zero-padded convolutions with explicit padding, got {m}")
    k = m.kernel_size
    # Dilate every kernel wider than 1 (Sec. 4.1); its "same" padding grows with the dilation.
    dilation = tuple(d * rate if kk > 1 else d for d, kk in zip(m.dilation, k))
    padding = tuple(p * rate if kk > 1 else p for p, kk in zip(m.padding, k))
    # The module's own weight and bias tensors: the extractor shares the backbone's parameters.
    y = F.conv2d(x, m.weight, m.bias, 1, padding, dilation, m.groups)
    return _stride_pool(y, m.stride, pool)


def _max_pool(m: nn.MaxPool2d, x: torch.Tensor, rate: int, pool: str) -> torch.Tensor:
    if rate == 1:
        return m(x)
    if m.dilation != 1 or m.ceil_mode:
        raise TypeError(f"the SR target extractor cannot widen {m}")
    # A parameter-free layer: widen its window to cover the same receptive field (Sec. 4.1).
    k, s, p = m.kernel_size, m.stride, m.padding
    k, s, p = (k if isinstance(k, int) else k[0]), (s if isinstance(s, int) else s[0]), (p if isinstance(p, int) else p[0])
    y = F.max_pool2d(x, (k - 1) * rate + 1, stride=1, padding=p * rate)
    return _stride_pool(y, (s, s), pool)


def _run(m: nn.Module, x: torch.Tensor, rate: int, pool: str, hold_se: bool) -> torch.Tensor:
    """Run module `m` of a trunk on x [B, C, H, W] at dilation `rate` (1: as trained).

    hold_se: SE gates computed without gradient (the receptive-field probe: an SE gate pools the
    whole image, so with it every output depends on every pixel)."""
    if isinstance(m, nn.Conv2d):
        return _conv(m, x, rate, pool)
    if isinstance(m, nn.MaxPool2d):
        return _max_pool(m, x, rate, pool)
    if isinstance(m, SqueezeExcitation):
        # Global average pooling, then 1x1 convolutions: the same at any rate.
        scale = m.scale_activation(m.fc2(m.activation(m.fc1(m.avgpool(x)))))
        return (scale.detach() if hold_se else scale) * x
    if isinstance(m, InvertedResidual):
        y = _run(m.block, x, rate, pool, hold_se)
        return y + x if m.use_res_connect else y
    if isinstance(m, Bottleneck):
        out = m.relu(m.bn1(_run(m.conv1, x, rate, pool, hold_se)))
        out = m.relu(m.bn2(_run(m.conv2, out, rate, pool, hold_se)))
        out = m.bn3(_run(m.conv3, out, rate, pool, hold_se))
        identity = x if m.downsample is None else _run(m.downsample, x, rate, pool, hold_se)
        return m.relu(out + identity)
    if isinstance(m, BasicBlock):
        out = m.relu(m.bn1(_run(m.conv1, x, rate, pool, hold_se)))
        out = m.bn2(_run(m.conv2, out, rate, pool, hold_se))
        identity = x if m.downsample is None else _run(m.downsample, x, rate, pool, hold_se)
        return m.relu(out + identity)
    if isinstance(m, nn.Sequential):
        for child in m:
            x = _run(child, x, rate, pool, hold_se)
        return x
    if isinstance(m, _PER_PIXEL):
        return m(x)
    raise TypeError(f"the SR target extractor cannot run a {type(m).__name__}")


def _run_fpn(fpn: nn.Module, feats: OrderedDict, rate: int, pool: str, hold_se: bool) -> OrderedDict:
    """torchvision's FeaturePyramidNetwork.forward with each block run by `_run` (its 3x3 output
    convolutions dilated at rate 2). The extra "pool" level (a stride-2 subsampling of the last
    one) is left out: only the RPN reads it, and no RoI is pooled from it."""
    names, xs = list(feats), list(feats.values())
    last_inner = _run(fpn.inner_blocks[-1], xs[-1], rate, pool, hold_se)
    results = [_run(fpn.layer_blocks[-1], last_inner, rate, pool, hold_se)]
    for idx in range(len(xs) - 2, -1, -1):
        lateral = _run(fpn.inner_blocks[idx], xs[idx], rate, pool, hold_se)
        top_down = F.interpolate(last_inner, size=lateral.shape[-2:], mode="nearest")
        last_inner = lateral + top_down
        results.insert(0, _run(fpn.layer_blocks[idx], last_inner, rate, pool, hold_se))
    return OrderedDict(zip(names, results))


def run_trunk(backbone: nn.Module, x: torch.Tensor, *, rate: int = 1, pool: str = "max", hold_se: bool = False,
              sub_layer: Optional[str] = None, fpn: bool = True) -> tuple[OrderedDict, Optional[torch.Tensor]]:
    """Features of a Faster R-CNN backbone (`backbone.body`, an IntermediateLayerGetter, plus
    `backbone.fpn` when it has one) for a normalised image batch x [B, 3, H, W].

    rate 1 without hold_se: exactly `backbone(x)` (the same module calls). rate 2: the SR target
    extractor (module docstring), whose maps have the same sizes as at rate 1 and no "pool" level.
    `pool`: "max" (the paper's Fig. 4c) or "avg", the pooling after each layer that strides.
    `fpn`: False gives the trunk's maps (before the FPN), keyed as the FPN's levels.
    Returns (OrderedDict level name -> [B, C, H/s, W/s], the output of body child `sub_layer`
    [B, C_sub, H/s', W/s'] or None).
    """
    body = backbone.body
    plain = rate == 1 and not hold_se
    outs: OrderedDict = OrderedDict()
    sub = None
    for name, module in body.items():
        x = module(x) if plain else _run(module, x, rate, pool, hold_se)
        if name == sub_layer:
            sub = x
        if name in body.return_layers:
            outs[body.return_layers[name]] = x
    neck = getattr(backbone, "fpn", None)
    if neck is None or not fpn:
        return outs, sub
    return (neck(outs) if plain else _run_fpn(neck, outs, rate, pool, hold_se)), sub


def find_sub_layer(backbone: nn.Module) -> tuple[str, int]:
    """(name, channels) of the body child whose output is one octave finer than the finest level
    the box head pools from: F_sub's layer (MobileNetV3 quick: features.3, stride 4; ResNet-FPN:
    the stem's relu, stride 2; ResNet-C4: layer2, stride 8). Found by running the body on a
    64x64 zero image in eval mode (BatchNorm statistics untouched)."""
    body = backbone.body
    finest = next(name for name in body if name in body.return_layers)
    was_training = body.training
    dev = next(backbone.parameters()).device
    x = torch.zeros(1, 3, 64, 64, device=dev)
    shapes = []
    body.eval()
    try:
        with torch.no_grad():
            for name, module in body.items():
                x = module(x)
                shapes.append((name, tuple(x.shape)))
                if name == finest:
                    break
    finally:
        body.train(was_training)
    side = shapes[-1][1][-1]
    finer = [(n, s) for n, s in shapes[:-1] if s[-1] == 2 * side]
    if not finer:
        raise InputError("the detector's trunk has no layer one octave finer than its finest pooled level "
                         "(the feature generator's F_sub)")
    name, shape = finer[-1]
    return name, int(shape[1])


# ----------------------------------------------------------------------------------------------
# RoI pooling at given levels (the pairs of Sec. 4.2 come from two images of different sizes)
# ----------------------------------------------------------------------------------------------

def level_scales(feats: dict, names: list[str], image_sizes: list[tuple[int, int]]) -> list[float]:
    """Spatial scale of each pooled level: 2^round(log2(map height / tallest image)), as
    torchvision's MultiScaleRoIAlign infers it."""
    tallest = max(int(s[0]) for s in image_sizes)
    return [2.0 ** round(math.log2(feats[n].shape[-2] / tallest)) for n in names]


def roi_levels(pooler: nn.Module, rois: torch.Tensor, scales: list[float]) -> torch.Tensor:
    """Level index (into pooler.featmap_names) of each RoI [R, 5] (image index, xyxy model-input px)
    by the FPN rule of torchvision's MultiScaleRoIAlign (canonical 224 px at level 4)."""
    if len(scales) == 1:
        return torch.zeros(rois.shape[0], dtype=torch.int64, device=rois.device)
    mapper = LevelMapper(int(-math.log2(scales[0])), int(-math.log2(scales[-1])),
                         getattr(pooler, "canonical_scale", 224), getattr(pooler, "canonical_level", 4))
    return mapper([rois[:, 1:]])


def pool_rois(pooler: nn.Module, feats: dict, rois: torch.Tensor, levels: torch.Tensor, scales: list[float],
              factor: float = 1.0) -> torch.Tensor:
    """RoIAlign of RoIs [R, 5] (image index, xyxy model-input px) at the given `levels` [R] of
    `feats` -> [R, C, P, P], with the pooler's output size and sampling ratio.

    `factor` scales the boxes onto a resized copy of the input (0.5: the 0.5x image, whose level
    maps have the same scale relative to their own input). With factor 1 this is exactly what
    MultiScaleRoIAlign computes for the same boxes."""
    names = list(pooler.featmap_names)
    size = pooler.output_size
    first = feats[names[0]]
    out = first.new_zeros((rois.shape[0], first.shape[1], *size))
    boxes = torch.cat([rois[:, :1], rois[:, 1:] * factor], dim=1)
    for lvl, (name, scale) in enumerate(zip(names, scales)):
        idx = torch.where(levels == lvl)[0]
        if idx.numel():
            out[idx] = roi_align(feats[name], boxes[idx], output_size=size, spatial_scale=scale,
                                 sampling_ratio=pooler.sampling_ratio).to(out.dtype)
    return out


def pool_sub(sub: torch.Tensor, rois: torch.Tensor, image_sizes: list[tuple[int, int]], pooler: nn.Module,
             factor: float = 1.0) -> torch.Tensor:
    """RoIAlign of RoIs [R, 5] (image index, xyxy model-input px, times `factor`) on the sub-layer
    map [B, C_sub, h, w] -> F_sub [R, C_sub, P, P]. `image_sizes` are those of the image `sub`
    came from before any `factor` resize: its scale is a power of 2 of the box coordinates."""
    tallest = max(int(s[0]) for s in image_sizes) * factor
    scale = 2.0 ** round(math.log2(sub.shape[-2] / tallest))
    boxes = torch.cat([rois[:, :1], rois[:, 1:] * factor], dim=1)
    return roi_align(sub, boxes, output_size=pooler.output_size, spatial_scale=scale,
                     sampling_ratio=pooler.sampling_ratio)


def as_rois(boxes: list[torch.Tensor]) -> torch.Tensor:
    """Per-image boxes [N_i, 4] -> RoIs [sum N_i, 5] (image index, x1, y1, x2, y2)."""
    if not boxes:
        raise ValueError("no images")
    return torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)])


# ----------------------------------------------------------------------------------------------
# Generator, discriminator
# ----------------------------------------------------------------------------------------------

class _ResidualBlock(nn.Module):
    """x + conv3x3(relu(conv3x3(x))) (Fig. 5); the second convolution starts at zero, so that the
    block, and the generator, start as the identity."""

    def __init__(self, channels: int, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(x)))


class FeatureGenerator(nn.Module):
    """The SR feature generator (Fig. 5): base F [R, C, P, P] and sub-layer F_sub [R, C_sub, P, P]
    -> S [R, C, P, P], the first C channels of `blocks` residual blocks over cat(F, F_sub).

    At initialisation S = F exactly (each block's last convolution is zero): the FSR detector
    then detects what its base detector does."""

    def __init__(self, channels: int, sub_channels: int, blocks: int = 2, width: Optional[int] = None) -> None:
        super().__init__()
        total = channels + sub_channels
        self.channels = channels
        self.blocks = nn.Sequential(*[_ResidualBlock(total, int(width or total)) for _ in range(blocks)])

    def forward(self, f: torch.Tensor, f_sub: torch.Tensor) -> torch.Tensor:
        x = self.blocks(torch.cat([f, f_sub.to(f.dtype)], dim=1))
        return x[:, :self.channels]


class FeatureDiscriminator(nn.Module):
    """The SR feature discriminator: an MLP of three layers on a flattened RoI feature
    [R, C, P, P] -> real/fake logits [R] (target T^1.0 real, generated S^0.5 fake)."""

    def __init__(self, in_features: int, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(1), nn.Linear(in_features, hidden), nn.LeakyReLU(0.2),
                                 nn.Linear(hidden, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.float()).squeeze(1)


# ----------------------------------------------------------------------------------------------
# The detector
# ----------------------------------------------------------------------------------------------

class FSRRoIHeads(RoIHeads):
    """torchvision's RoIHeads (its pooler, large box head and predictor, sampling, box coder and
    postprocess_detections) plus the small box head and predictor and the generator (None for
    the small-head control). `small_size`: proposals of area < small_size² model-input pixels are
    small. `sr_counts` counts, since it was last reset, the proposals seen at inference
    ("proposals") and those sent through the small branch ("small")."""

    def __init__(self, base: RoIHeads, *, small_size: int, generator: Optional[FeatureGenerator]) -> None:
        super().__init__(base.box_roi_pool, base.box_head, base.box_predictor,
                         base.proposal_matcher.high_threshold, base.proposal_matcher.low_threshold,
                         base.fg_bg_sampler.batch_size_per_image, base.fg_bg_sampler.positive_fraction,
                         base.box_coder.weights, base.score_thresh, base.nms_thresh, base.detections_per_img)
        # Initialised from the large ones (Sec. 4.3), trained apart from them from here on.
        self.small_head = copy.deepcopy(base.box_head)
        self.small_predictor = copy.deepcopy(base.box_predictor)
        self.generator = generator
        self.small_size = int(small_size)
        self.sr_counts = {"proposals": 0, "small": 0}

    def is_small(self, boxes: torch.Tensor) -> torch.Tensor:
        """Boxes [N, 4] xyxy model-input px -> bool [N]: area below small_size²."""
        return box_area(boxes) < float(self.small_size) ** 2

    def small_branch(self, pooled: torch.Tensor, pooled_sub: Optional[torch.Tensor]):
        """Pooled F [R, C, P, P] (and F_sub [R, C_sub, P, P]) of small RoIs -> (class logits
        [R, K+1], box deltas [R, 4(K+1)]) of the small predictor, through the generator if any."""
        x = pooled if self.generator is None else self.generator(pooled, pooled_sub)
        return self.small_predictor(self.small_head(x))

    def large_branch(self, pooled: torch.Tensor):
        return self.box_predictor(self.box_head(pooled))

    def class_and_box(self, features: dict, sub: Optional[torch.Tensor], proposals: list[torch.Tensor],
                      image_shapes: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Sec. 4.4: (class logits float32 [R, K+1], box deltas float32 [R, 4(K+1)]) of all
        proposals (per image [N_i, 4] xyxy model-input px, R = sum N_i), small ones from the small
        branch, the others from the large one, in proposal order."""
        pooled = self.box_roi_pool(features, proposals, image_shapes)
        rois = as_rois(proposals)
        small = self.is_small(rois[:, 1:])
        n, k = pooled.shape[0], self.box_predictor.cls_score.out_features
        logits = pooled.new_zeros((n, k), dtype=torch.float32)
        deltas = pooled.new_zeros((n, 4 * k), dtype=torch.float32)
        large_idx, small_idx = torch.where(~small)[0], torch.where(small)[0]
        if large_idx.numel():
            c, r = self.large_branch(pooled[large_idx])
            logits[large_idx], deltas[large_idx] = c.float(), r.float()
        if small_idx.numel():
            pooled_sub = None
            if self.generator is not None:
                pooled_sub = pool_sub(sub, rois[small_idx], image_shapes, self.box_roi_pool)
            c, r = self.small_branch(pooled[small_idx], pooled_sub)
            logits[small_idx], deltas[small_idx] = c.float(), r.float()
        self.sr_counts["proposals"] += int(n)
        self.sr_counts["small"] += int(small_idx.numel())
        return logits, deltas

    def forward(self, features, proposals, image_shapes, targets=None, sub: Optional[torch.Tensor] = None):
        """Inference: per image {"boxes" [N, 4] xyxy model-input px, "labels" [N] 1..K, "scores"
        [N]} through torchvision's postprocess_detections (score threshold, per-class NMS, top
        detections_per_img). Training goes through this module's functions (`sodtool train fsr`)."""
        if self.training:
            raise RuntimeError("the fsr heads are trained by sodtool.models.fsr's loss functions (sodtool train fsr)")
        logits, deltas = self.class_and_box(features, sub, proposals, image_shapes)
        boxes, scores, labels = self.postprocess_detections(logits, deltas, proposals, image_shapes)
        return [{"boxes": b, "labels": lab, "scores": s} for b, s, lab in zip(boxes, scores, labels)], {}


class FSRFasterRCNN(GeneralizedRCNN):
    """A Faster R-CNN whose small proposals are super-resolved in feature space (module docstring).

    Same submodules (backbone, rpn, roi_heads, transform) and state-dict keys as torchvision's
    FasterRCNN, plus roi_heads.small_head.*, roi_heads.small_predictor.* and roi_heads.generator.*.
    `options` (`fsr_options`): every option of `from_detector`, resolved; saved in model.pt's build.
    In eval mode `model(images)` takes float images [3, H, W] in [0, 1] and returns per image
    {"boxes" [N, 4] xyxy image px, "labels" [N], "scores" [N]}, as a FasterRCNN does.
    """

    def __init__(self, base: nn.Module, roi_heads: FSRRoIHeads, options: dict) -> None:
        super().__init__(base.backbone, base.rpn, roi_heads, base.transform)
        self.fsr_options = dict(options)

    @property
    def control(self) -> str:
        return self.fsr_options["control"]

    def features(self, x: torch.Tensor) -> tuple[OrderedDict, torch.Tensor]:
        """The backbone's maps of a normalised batch x [B, 3, H, W] (exactly `backbone(x)`) and the
        sub-layer map [B, C_sub, h, w]."""
        return run_trunk(self.backbone, x, sub_layer=self.fsr_options["sub_layer"])

    def target_features(self, x: torch.Tensor) -> OrderedDict:
        """The SR targets' maps of the full-size batch x [B, 3, H, W]: the atrous extractor's, or,
        for the unmatched-target control, the plain backbone's."""
        if self.control == "unmatched-target":
            return run_trunk(self.backbone, x)[0]
        return run_trunk(self.backbone, x, rate=RATE, pool=self.fsr_options["pool"])[0]

    def train(self, mode: bool = True):
        super().train(mode)
        # Sec. 4.3 freezes the trunk (and with it the extractor) and the RPN: BatchNorm keeps its
        # statistics, the RPN gives test-time proposals, and the resize draws no random size.
        for m in (self.backbone, self.rpn, self.transform):
            m.train(False)
        return self

    def forward(self, images, targets=None):
        if self.training:
            raise RuntimeError("FSRFasterRCNN is trained by sodtool.models.fsr's loss functions (sodtool train fsr)")
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        image_list, _ = self.transform(images)
        feats, sub = self.features(image_list.tensors)
        proposals, _ = self.rpn(image_list, feats)
        detections, _ = self.roi_heads(feats, proposals, image_list.image_sizes, sub=sub)
        return self.transform.postprocess(detections, image_list.image_sizes, original_sizes)


def default_small_size(arch: str) -> int:
    """The small-proposal side (area < side²) in model-input px when none is given: 32 for the
    light trunks of the synthetic presets (COCO's small objects at the quick/bench 320 px input),
    96 for the ResNet-50/101 trunks of the coco preset (the paper's VOC/COCO threshold)."""
    return 32 if arch in ("mobilenet_v3_fpn", "resnet18_fpn") else 96


def resolve_options(arch: str, control: str = "none", small_size: Optional[int] = None, pool: str = "avg",
                    gen_blocks: int = 2, gen_width: Optional[int] = None, sub_layer: Optional[str] = None,
                    sub_channels: Optional[int] = None) -> dict:
    """The fsr options with their defaults, checked (InputError naming the option)."""
    if arch not in ARCHS:
        raise InputError(f"unknown detector architecture '{arch}' for fsr (choose from {', '.join(ARCHS)})")
    if control not in CONTROLS:
        raise InputError(f"--control must be one of {', '.join(CONTROLS)}, got '{control}'")
    if pool not in POOLS:
        raise InputError(f"--pool must be one of {', '.join(POOLS)}, got '{pool}'")
    small_size = default_small_size(arch) if small_size is None else int(small_size)
    for name, v in (("small-size", small_size), ("gen-blocks", gen_blocks), ("gen-width", gen_width)):
        if v is not None and int(v) < 1:
            raise InputError(f"--{name} must be at least 1, got {v}")
    return {"control": control, "small_size": small_size, "pool": pool, "gen_blocks": int(gen_blocks),
            "gen_width": None if gen_width is None else int(gen_width), "sub_layer": sub_layer,
            "sub_channels": None if sub_channels is None else int(sub_channels)}


def from_detector(base: nn.Module, arch: str, **options: Any) -> FSRFasterRCNN:
    """An FSR detector around a torchvision FasterRCNN `base` of `arch` (its modules are taken
    over, not copied; the small head and predictor are copies of its box head and predictor).

    options: control ("none", "small-head", "unmatched-target"), small_size (px, area <
    small_size²), pool ("max" / "avg", the extractor's pooling), gen_blocks (residual blocks),
    gen_width (their inner width; None: C + C_sub up to 512), sub_layer / sub_channels (F_sub's
    layer; None: `find_sub_layer`)."""
    opts = resolve_options(arch, **options)
    if opts["sub_layer"] is None:
        opts["sub_layer"], opts["sub_channels"] = find_sub_layer(base.backbone)
    channels = int(base.backbone.out_channels)
    if opts["gen_width"] is None:
        opts["gen_width"] = min(channels + opts["sub_channels"], 512)
    generator = None
    if opts["control"] != "small-head":
        generator = FeatureGenerator(channels, opts["sub_channels"], opts["gen_blocks"], opts["gen_width"])
    heads = FSRRoIHeads(base.roi_heads, small_size=opts["small_size"], generator=generator)
    return FSRFasterRCNN(base, heads, {"arch": arch, **opts})


def build_fsr(arch: str, num_classes: int, build: dict) -> FSRFasterRCNN:
    """Rebuild an FSR detector from a model.pt's build: the Faster R-CNN's `build_detector` options
    plus "fsr" (its `fsr_options`). Randomly initialised: load the state dict into it."""
    b = dict(build)
    opts = dict(b.pop("fsr"))
    opts.pop("arch", None)
    return from_detector(build_detector(arch, num_classes, **b), arch, **opts)


def fsr_build(frcnn_build: dict, model: FSRFasterRCNN) -> dict:
    """The build a model.pt of `model` records: its Faster R-CNN's build plus "fsr"."""
    return {**frcnn_build, "fsr": dict(model.fsr_options)}


def discriminator_for(model: FSRFasterRCNN, hidden: int) -> FeatureDiscriminator:
    """A discriminator sized for the model's pooled features (C x P x P inputs)."""
    p = model.roi_heads.box_roi_pool.output_size
    return FeatureDiscriminator(int(model.backbone.out_channels) * int(p[0]) * int(p[1]), hidden)


# ----------------------------------------------------------------------------------------------
# Training (Sec. 4.2, 4.3): the pieces `sodtool train fsr` composes
# ----------------------------------------------------------------------------------------------

@dataclass
class Sampled:
    """One training batch through the frozen detector, RoIs sampled as torchvision does.

    tensors: the normalised, padded batch [B, 3, H, W]; image_sizes: (h, w) of each image in it;
    feats: the backbone's maps; sub: the sub-layer map; rois [R, 5] (image index, xyxy
    model-input px): the proposals (plus ground truth) sampled by RoIHeads.select_training_samples;
    labels [R] in 0..K; reg_targets [R, 4] (the box coder's deltas to the matched ground truth);
    scales: the spatial scale of each pooled level; levels [R]: each RoI's level at full size.
    """

    tensors: torch.Tensor
    image_sizes: list
    feats: OrderedDict
    sub: torch.Tensor
    rois: torch.Tensor
    labels: torch.Tensor
    reg_targets: torch.Tensor
    scales: list
    levels: torch.Tensor

    def sides(self) -> torch.Tensor:
        """sqrt(area) of each RoI [R], model-input px."""
        return box_area(self.rois[:, 1:]).clamp_min(0).sqrt()


def sample(model: FSRFasterRCNN, images: list[torch.Tensor], targets: list[dict]) -> Sampled:
    """Resize and normalise images (float [3, H, W] in [0, 1]) and targets ({"boxes" [N, 4] xyxy
    image px, "labels" [N] 1..K}), run the frozen backbone and RPN (test-time proposal counts,
    no gradient), and sample RoIs for the heads (draws from torch's global RNG)."""
    with torch.no_grad():
        image_list, targets = model.transform(images, targets)
        feats, sub = model.features(image_list.tensors)
        proposals, _ = model.rpn(image_list, feats)
    heads = model.roi_heads
    props, _, labels, reg = heads.select_training_samples([p.detach() for p in proposals], targets)
    rois = as_rois(props)
    names = list(heads.box_roi_pool.featmap_names)
    scales = level_scales(feats, names, image_list.image_sizes)
    return Sampled(tensors=image_list.tensors, image_sizes=list(image_list.image_sizes), feats=feats, sub=sub,
                   rois=rois, labels=torch.cat(labels), reg_targets=torch.cat(reg), scales=scales,
                   levels=roi_levels(heads.box_roi_pool, rois, scales))


@dataclass
class Pairs:
    """Training pairs of Sec. 4.2 for RoIs `index` [M] of a Sampled batch: lr F^0.5 [M, C, P, P]
    and lr_sub F_sub^0.5 [M, C_sub, P, P] pooled from the 0.5x image, target T^1.0 [M, C, P, P]."""

    index: torch.Tensor
    lr: torch.Tensor
    lr_sub: torch.Tensor
    target: torch.Tensor


def pair_features(model: FSRFasterRCNN, s: Sampled, min_side: float, max_side: float) -> Optional[Pairs]:
    """The (F^0.5, F_sub^0.5, T^1.0) of the sampled RoIs whose full-size side sqrt(area) is in
    [min_side, max_side) (Sec. 4.2's thresholding: a RoI too small at full size makes a poor
    target, one large enough at half size needs no super-resolution), None when there are none.

    The 0.5x image is the 2x2 average of the normalised batch; its RoIs are the full-size ones
    halved, pooled from the level their full-size box maps to (the target's level), so that
    input and target channels are those of one FPN level. No gradient."""
    sides = s.sides()
    index = torch.where((sides >= min_side) & (sides < max_side))[0]
    if index.numel() == 0:
        return None
    pooler = model.roi_heads.box_roi_pool
    rois, levels = s.rois[index], s.levels[index]
    with torch.no_grad():
        half = F.avg_pool2d(s.tensors, 2, ceil_mode=True)
        feats_half, sub_half = model.features(half)
        lr = pool_rois(pooler, feats_half, rois, levels, s.scales, factor=0.5)
        lr_sub = pool_sub(sub_half, rois, s.image_sizes, pooler, factor=0.5)
        target = pool_rois(pooler, model.target_features(s.tensors), rois, levels, s.scales)
    return Pairs(index=index, lr=lr, lr_sub=lr_sub, target=target)


def pooled_full(model: FSRFasterRCNN, s: Sampled, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(F^1.0 [M, C, P, P], F_sub^1.0 [M, C_sub, P, P]) of sampled RoIs `index` [M] (what
    inference pools for them). No gradient: the trunk is frozen."""
    pooler = model.roi_heads.box_roi_pool
    with torch.no_grad():
        f = pool_rois(pooler, s.feats, s.rois[index], s.levels[index], s.scales)
        f_sub = pool_sub(s.sub, s.rois[index], s.image_sizes, pooler)
    return f, f_sub


def _detection_losses(logits: torch.Tensor, deltas: torch.Tensor, s: Sampled, index: torch.Tensor):
    return fastrcnn_loss(logits.float(), deltas.float(), [s.labels[index]], [s.reg_targets[index]])


def small_losses(model: FSRFasterRCNN, s: Sampled, train_generator: bool) -> Optional[dict]:
    """Fast R-CNN losses of the small predictor on the small sampled RoIs (area < small_size²),
    through the generator when the model has one ({"loss_small_classifier", "loss_small_box_reg"}),
    None when the batch has none. `train_generator` False: the generator runs without gradient
    (the fine-tuning step)."""
    heads = model.roi_heads
    index = torch.where(heads.is_small(s.rois[:, 1:]))[0]
    if index.numel() == 0:
        return None
    f, f_sub = pooled_full(model, s, index)
    x = f
    if heads.generator is not None:
        with torch.set_grad_enabled(train_generator and torch.is_grad_enabled()):
            x = heads.generator(f, f_sub)
    logits, deltas = heads.small_predictor(heads.small_head(x))
    cls, reg = _detection_losses(logits, deltas, s, index)
    return {"loss_small_classifier": cls, "loss_small_box_reg": reg}


def large_losses(model: FSRFasterRCNN, s: Sampled) -> Optional[dict]:
    """Fast R-CNN losses of the large predictor on the sampled RoIs that are not small (Sec. 4.3:
    it is fine-tuned only on the proposals it will see), None when the batch has none."""
    heads = model.roi_heads
    index = torch.where(~heads.is_small(s.rois[:, 1:]))[0]
    if index.numel() == 0:
        return None
    f, _ = pooled_full(model, s, index)
    logits, deltas = heads.large_branch(f)
    cls, reg = _detection_losses(logits, deltas, s, index)
    return {"loss_large_classifier": cls, "loss_large_box_reg": reg}


def content_loss(sr: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Eq. 4 as a mean: mean((T - S)²) / mean(T²) over the batch's pairs [M, C, P, P]. Dividing by
    the targets' mean square (no gradient) makes the loss's weight mean the same for every trunk
    and feature scale; it changes Eq. 4's size, not its direction."""
    t = target.float()
    return F.mse_loss(sr.float(), t) / t.pow(2).mean().detach().clamp_min(1e-12)


def generator_adv_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Eq. 5 as a mean: -log D(S), from logits [M] (numerically stable)."""
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Eq. 6 as a mean: -log D(T) - log(1 - D(S)), from logits [M] each."""
    return (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
            + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))
