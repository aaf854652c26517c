"""SSD and MDSSD (Cui et al., seed paper 003): one-stage detectors from torchvision's SSD pieces.

`build_ssd(family, num_classes, arch, size)` returns a `torchvision.models.detection.SSD` (its
transform, anchor matching, hard negative mining, losses and post-processing, not rewritten)
whose backbone yields the prediction maps of the family:

- "ssd": the control, SSD's own maps (VGG16 at 300: conv4_3 (L2-normalised), conv7, conv8_2,
  conv9_2, conv10_2, conv11_2; at 512 also conv12_2).
- "mdssd": three Fusion Modules replace the shallow maps and add a shallower one: Module 1 =
  Fusion(conv3_3, conv8_2), Module 2 = Fusion(conv4_3, conv9_2), Module 3 = Fusion(conv7,
  conv10_2), then conv8_2, conv9_2, conv10_2, conv11_2 (and conv12_2 at 512): seven prediction
  layers at 300, as the seed's Figure 1.

Trunks (`arch`):
- "vgg16": the papers' VGG16, built as torchvision's `ssd300_vgg16` builds it, with the same
  module names, so a torchvision `ssd300_vgg16` state dict (COCO, fetched by hand) loads into
  "ssd" whole and into "mdssd" for every layer they share (`load_state`).
- "mobilenet_v3": a light CPU trunk (MobileNetV3-Large features, as the light Faster R-CNN)
  with maps at strides 4, 8, 16 (24, 40, 112 channels) and 32 (960), then three extra layers
  at strides 64, 128, 256; "ssd" predicts on strides 8-256 (six maps, as VGG SSD on strides
  8-300), "mdssd" fuses (4, 32), (8, 64), (16, 128) and predicts on seven maps.

What the seed leaves open and what is chosen here (stated in `--help` too):
- The deep branch's three 2x deconvolutions (kernel 2, stride 2, each followed by a 3x3
  convolution + ReLU) give 8x the deep map's size, which is not exactly the shallow map's
  (10 -> 80 against conv3_3's 75 at 300): the upsampled map is resized bilinearly to the
  shallow map's size.
- L2 normalisation with a learnt per-channel scale initialised at 20 (SSD's conv4_3 layer).
- Fusion Module channels: the shallow map's (256, 512, 1024 for VGG16 at 300, as the seed);
  128 each for the light trunk, whose shallow maps are thin (24-112 channels).
- Default boxes: SSD300's for "ssd" with VGG16 at 300; otherwise scales rising from 0.04 of the
  image side on the first map (a 16 px object at 300-320 px is matched with IoU >= 0.5) to 1.05,
  aspect ratios 2 (and 3 on the middle maps), centres at the map's cell centres.

Every image is resized to `size` (square); boxes in and out are xyxy pixels of the input image.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.ssd import SSD, SSDFeatureExtractorVGG

from sodtool.errors import InputError

FAMILIES = ("ssd", "mdssd")
ARCHS = ("vgg16", "mobilenet_v3")
SIZES = {"vgg16": (300, 512), "mobilenet_v3": None}  # None: any size that reaches a 1-px last map
# torchvision's SSD300 (ssd300_vgg16): default boxes and input normalisation (BGR-mean, 0-255 range).
SSD300_ASPECTS = [[2], [2, 3], [2, 3], [2, 3], [2], [2]]
SSD300_SCALES = [0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05]
SSD300_STEPS = [8, 16, 32, 64, 100, 300]
VGG_MEAN, VGG_STD = [0.48235, 0.45882, 0.40784], [1.0 / 255.0] * 3
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
FIRST_SCALE = 0.04
LAST_SCALE = 1.05
L2_SCALE_INIT = 20.0
LIGHT_FUSION_CHANNELS = 128


class L2Norm(nn.Module):
    """Channel-wise L2 normalisation with a learnt per-channel scale (SSD's conv4_3 layer).
    [B, C, H, W] -> [B, C, H, W]."""

    def __init__(self, channels: int, scale: float = L2_SCALE_INIT) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((channels,), float(scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight.view(1, -1, 1, 1) * F.normalize(x, dim=1)


class FusionBlock(nn.Module):
    """The seed's Fusion Block: deep [B, Cd, h, w] + shallow [B, Cs, H, W] -> [B, Co, H, W].

    Deep branch: `up_steps` x (ConvTranspose2d k2 s2 -> Conv3x3 + ReLU), `mid` channels, the
    last convolution to Co, resized bilinearly to (H, W) when 2^up_steps * (h, w) differs, then
    L2Norm. Shallow branch: Conv3x3 (Cs -> Co, stride 1) then L2Norm. Element-wise sum, Conv3x3
    (Co -> Co), ReLU.
    """

    def __init__(self, deep_channels: int, shallow_channels: int, out_channels: int, up_steps: int = 3,
                 mid_channels: int = 256) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = deep_channels
        for i in range(up_steps):
            out = out_channels if i == up_steps - 1 else mid_channels
            layers += [nn.ConvTranspose2d(c, mid_channels, kernel_size=2, stride=2),
                       nn.Conv2d(mid_channels, out, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            c = out
        self.up = nn.Sequential(*layers)
        self.up_norm = L2Norm(out_channels)
        self.lateral = nn.Conv2d(shallow_channels, out_channels, kernel_size=3, padding=1)
        self.lateral_norm = L2Norm(out_channels)
        self.fuse = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.out_channels = out_channels

    def forward(self, deep: torch.Tensor, shallow: torch.Tensor) -> torch.Tensor:
        up = self.up(deep)
        if up.shape[-2:] != shallow.shape[-2:]:
            up = F.interpolate(up, size=shallow.shape[-2:], mode="bilinear", align_corners=False)
        return F.relu(self.fuse(self.up_norm(up) + self.lateral_norm(self.lateral(shallow))))


# conv3_3's ReLU is layer 15 of torchvision's vgg16.features: features[:16] ends there.
VGG_CONV3_3_END = 16


class VGGBackbone(SSDFeatureExtractorVGG):
    """torchvision's SSD VGG16 extractor (same module names: features, scale_weight, extra),
    plus `fusion` for MDSSD. [B, 3, S, S] -> OrderedDict of prediction maps, "0", "1", ...

    Maps at S = 300 (SSD): conv4_3 [512, 38], conv7 [1024, 19], conv8_2 [512, 10], conv9_2
    [256, 5], conv10_2 [256, 3], conv11_2 [256, 1]; S = 512 adds conv12_2. MDSSD: Module 1
    [256, 75], Module 2 [512, 38], Module 3 [1024, 19], then conv8_2 ... as SSD.
    """

    def __init__(self, family: str, highres: bool) -> None:
        super().__init__(torchvision.models.vgg16(weights=None).features, highres)
        self.family = family
        if family == "mdssd":
            # (shallow: conv3_3, conv4_3, conv7) x (deep: conv8_2, conv9_2, conv10_2)
            self.fusion = nn.ModuleList([FusionBlock(512, 256, 256), FusionBlock(256, 512, 512),
                                         FusionBlock(256, 1024, 1024)])

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        conv3_3 = self.features[:VGG_CONV3_3_END](x)
        x = self.features[VGG_CONV3_3_END:](conv3_3)
        maps = [self.scale_weight.view(1, -1, 1, 1) * F.normalize(x)]  # conv4_3, L2-normalised
        for block in self.extra:
            x = block(x)
            maps.append(x)  # conv7, conv8_2, conv9_2, conv10_2, conv11_2 (, conv12_2)
        if self.family == "mdssd":
            shallow = [conv3_3, maps[0], maps[1]]
            deep = maps[2:5]
            maps = [f(d, s) for f, d, s in zip(self.fusion, deep, shallow)] + maps[2:]
        return OrderedDict((str(i), m) for i, m in enumerate(maps))


class MobileBackbone(nn.Module):
    """Light trunk: MobileNetV3-Large features tapped at strides 4, 8, 16, 32, then three extra
    layers (1x1 -> 3x3 stride 2, BN-free as SSD's) at strides 64, 128, 256.
    [B, 3, S, S] -> OrderedDict of prediction maps: SSD strides 8-256 (40, 112, 960, 512, 256,
    256 channels); MDSSD three Fusion Modules (128 channels, strides 4, 8, 16) then strides 32-256.
    """

    TAPS = (4, 7, 13)  # features[:4] -> stride 4 (24 ch), [4:7] -> 8 (40), [7:13] -> 16 (112), [13:] -> 32 (960)
    EXTRA = ((960, 256, 512), (512, 128, 256), (256, 128, 256))

    def __init__(self, family: str) -> None:
        super().__init__()
        self.family = family
        self.body = torchvision.models.mobilenet_v3_large(weights=None).features
        self.extra = nn.ModuleList(
            nn.Sequential(nn.Conv2d(cin, mid, kernel_size=1), nn.ReLU(inplace=True),
                          nn.Conv2d(mid, cout, kernel_size=3, stride=2, padding=1), nn.ReLU(inplace=True))
            for cin, mid, cout in self.EXTRA)
        if family == "mdssd":
            c = LIGHT_FUSION_CHANNELS
            self.fusion = nn.ModuleList([FusionBlock(960, 24, c, mid_channels=c), FusionBlock(512, 40, c, mid_channels=c),
                                         FusionBlock(256, 112, c, mid_channels=c)])

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        a, b, c = self.TAPS
        s4 = self.body[:a](x)
        s8 = self.body[a:b](s4)
        s16 = self.body[b:c](s8)
        s32 = self.body[c:](s16)
        deep = [s32]
        for block in self.extra:
            deep.append(block(deep[-1]))  # strides 64, 128, 256
        if self.family == "mdssd":
            maps = [f(d, s) for f, d, s in zip(self.fusion, deep[:3], [s4, s8, s16])] + deep
        else:
            maps = [s8, s16] + deep
        return OrderedDict((str(i), m) for i, m in enumerate(maps))


def check_family(family: str, arch: str, size: int) -> None:
    if family not in FAMILIES:
        raise InputError(f"unknown detector family '{family}' (use one of {', '.join(FAMILIES)})")
    if arch not in ARCHS:
        raise InputError(f"unknown {family} trunk '{arch}' (use one of {', '.join(ARCHS)})")
    if SIZES[arch] is not None and size not in SIZES[arch]:
        raise InputError(f"the {arch} {family} takes {' or '.join(map(str, SIZES[arch]))} px inputs, not {size}")
    if SIZES[arch] is None and not 64 <= size <= 2048:
        raise InputError(f"--size must be between 64 and 2048 px, got {size}")


def anchor_generator(family: str, arch: str, size: int, levels: int) -> DefaultBoxGenerator:
    """Default boxes of `levels` prediction maps (module docstring)."""
    if family == "ssd" and arch == "vgg16" and size == 300:
        return DefaultBoxGenerator(SSD300_ASPECTS, scales=SSD300_SCALES, steps=SSD300_STEPS)
    aspects = [[2]] + [[2, 3]] * (levels - 3) + [[2], [2]]
    # Scales: 0.04 on the first map, then the rest spread linearly up to LAST_SCALE (the last
    # entry is only used for the extra box of the last map).
    second = 0.1
    scales = [FIRST_SCALE] + [second + (LAST_SCALE - second) * i / (levels - 1) for i in range(levels)]
    return DefaultBoxGenerator(aspects, scales=scales)


def build_ssd(family: str, num_classes: int, arch: str = "mobilenet_v3", size: int = 320, **kwargs) -> SSD:
    """A torchvision SSD of the family for `num_classes` classes plus background (labels 1..K).

    Inputs: list of [3, H, W] float in [0, 1]; resized to size x size. Train mode: targets
    (boxes [N, 4] xyxy pixels, labels [N]) -> {"bbox_regression", "classification"}. Eval mode:
    per image {"boxes" [D, 4] xyxy pixels of the input, "scores" [D], "labels" [D]}.
    kwargs go to SSD (score_thresh, nms_thresh, detections_per_img, topk_candidates).
    """
    check_family(family, arch, size)
    if arch == "vgg16":
        backbone = VGGBackbone(family, highres=size == 512)
        mean, std = VGG_MEAN, VGG_STD
    else:
        backbone = MobileBackbone(family)
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    with torch.no_grad():
        maps = backbone.eval()(torch.zeros(1, 3, size, size))
    backbone.train()
    backbone.out_channels = [m.shape[1] for m in maps.values()]
    if min(m.shape[-1] for m in maps.values()) < 1:  # pragma: no cover - check_family bounds the size
        raise InputError(f"{size} px is too small for the {arch} {family}")
    anchors = anchor_generator(family, arch, size, len(maps))
    return SSD(backbone, anchors, (size, size), num_classes + 1, image_mean=mean, image_std=std, **kwargs)


def map_shapes(model: SSD, size: int) -> list[tuple[int, int, int]]:
    """(channels, height, width) of each prediction map for a size x size input (on the model's
    device: a model built on the "meta" device gives the shapes without computing anything)."""
    was = model.backbone.training
    device = next(model.backbone.parameters()).device
    with torch.no_grad():
        maps = model.backbone.eval()(torch.zeros(1, 3, size, size, device=device))
    model.backbone.train(was)
    return [tuple(m.shape[1:]) for m in maps.values()]


def load_state(model: SSD, state: dict[str, torch.Tensor], source: str) -> tuple[int, list[str]]:
    """Load the entries of `state` whose names and shapes `model` shares (a torchvision
    ssd300_vgg16 file into "ssd" or "mdssd"); returns (tensors loaded, names of model tensors
    left at their initialisation). Into MDSSD only the trunk ("backbone.*"): its head's i-th
    layer serves another map than SSD's, and equal shapes there would be a coincidence. A
    state dict sharing no tensor is an InputError."""
    own = model.state_dict()
    trunk_only = getattr(model.backbone, "family", "ssd") == "mdssd"
    fit = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)
           and not (trunk_only and not k.startswith("backbone."))}
    if not fit:
        raise InputError(f"{source}: no tensor of it fits this detector (not an SSD state dict of this trunk?)")
    model.load_state_dict(fit, strict=False)
    return len(fit), sorted(set(own) - set(fit))


def first_layer_anchors(model: SSD, size: int) -> torch.Tensor:
    """The default boxes of the first prediction map, [N, 4] xyxy pixels of a size x size image."""
    shapes = map_shapes(model, size)
    gen = model.anchor_generator
    per_loc = gen.num_anchors_per_location()[0]
    images = torchvision.models.detection.image_list.ImageList(torch.zeros(1, 3, size, size), [(size, size)])
    feats = [torch.zeros(1, c, h, w) for c, h, w in shapes]
    boxes = gen(images, feats)[0]
    c, h, w = shapes[0]
    return boxes[: h * w * per_loc]


__all__: Sequence[str] = ("FAMILIES", "ARCHS", "FusionBlock", "L2Norm", "VGGBackbone", "MobileBackbone",
                          "build_ssd", "anchor_generator", "map_shapes", "load_state", "first_layer_anchors")
