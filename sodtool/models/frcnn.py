"""The Faster R-CNN family (`--detector frcnn`): building torchvision `FasterRCNN` models.

Architectures (`build_detector(arch, ...)`), all torchvision `FasterRCNN` with weights=None:

- `resnet50_fpn`: torchvision's `fasterrcnn_resnet50_fpn` layout (its state dicts load as-is);
- `resnet101_fpn`: the same with ResNet-101 (the paper's FPN baseline);
- `resnet50_c4`: the paper's Table 2 baseline, as Detectron's C4: one stride-16 feature map
  (ResNet-50 up to layer3, 1024 channels), an RPN on it, RoIAlign 14x14, then res5 (layer4,
  stride 2 -> 7x7) as the box head, average pooling, and the predictor;
- `resnet18_fpn`, `mobilenet_v3_fpn` (torchvision's `fasterrcnn_mobilenet_v3_large_fpn` layout):
  light trunks for CPU runs.

Boxes are xyxy in image pixels everywhere. Labels inside the model are 0 = background and
1..K = the dataset's `CategoryMap` labels, except for a torchvision COCO checkpoint (91 outputs,
output index = COCO category id): `LoadedDetector.label_map` turns its outputs into the
dataset's labels and drops the classes the dataset does not have.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from sodtool.errors import InputError

ARCHS = ("resnet50_fpn", "resnet101_fpn", "resnet50_c4", "resnet18_fpn", "mobilenet_v3_fpn")
FAMILY = "frcnn"

# ----------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------

def default_build(arch: str) -> dict:
    """torchvision's (or Detectron's, for C4) defaults for `arch`: every option of build_detector."""
    if arch not in ARCHS:
        raise InputError(f"unknown detector architecture '{arch}' (choose from {', '.join(ARCHS)})")
    b: dict[str, Any] = {
        "min_size": 800, "max_size": 1333,
        # "bn": BatchNorm trained with the model (training from scratch, torchvision's choice
        # without pretrained weights); "frozen_bn": FrozenBatchNorm2d (pretrained trunks).
        "norm": "bn", "frozen_bn_eps": 1e-5,
        "trainable_layers": None,  # None: all when norm == "bn", else torchvision's 3
        "fpn_channels": 256,
        "returned_layers": [1, 2, 3, 4],
        "anchor_sizes": [[32], [64], [128], [256], [512]],
        "aspect_ratios": [0.5, 1.0, 2.0],
        "representation_size": 1024,
        "rpn_pre_nms_top_n_train": 2000, "rpn_pre_nms_top_n_test": 1000,
        "rpn_post_nms_top_n_train": 2000, "rpn_post_nms_top_n_test": 1000,
        "rpn_batch_size_per_image": 256, "box_batch_size_per_image": 512, "box_positive_fraction": 0.25,
        "box_score_thresh": 0.05, "box_nms_thresh": 0.5, "box_detections_per_img": 100,
    }
    if arch == "mobilenet_v3_fpn":
        # torchvision: FPN on the last two stages (strides 16, 32) + pool, 5 sizes x 3 ratios per level.
        b["returned_layers"] = None
        b["anchor_sizes"] = [[32, 64, 128, 256, 512]] * 3
    elif arch == "resnet50_c4":
        # Detectron's e2e_faster_rcnn_R-50-C4: one stride-16 level with 5 sizes x 3 ratios,
        # 12000/6000 proposals before NMS (a single level, so per-level = total).
        b["returned_layers"] = None
        b["fpn_channels"] = None
        b["representation_size"] = None
        b["anchor_sizes"] = [[32, 64, 128, 256, 512]]
        b["rpn_pre_nms_top_n_train"], b["rpn_pre_nms_top_n_test"] = 12000, 6000
    return b


def resolve_build(arch: str, **options: Any) -> dict:
    """Defaults of `arch` overridden by `options` (unknown option names are a programming error)."""
    b = default_build(arch)
    unknown = set(options) - set(b)
    if unknown:
        raise TypeError(f"unknown build_detector options: {sorted(unknown)}")
    b.update({k: v for k, v in options.items()})
    for key in ("anchor_sizes",):
        b[key] = [[int(s) for s in level] for level in b[key]]
    b["aspect_ratios"] = [float(r) for r in b["aspect_ratios"]]
    if b["norm"] not in ("bn", "frozen_bn"):
        raise ValueError(f"norm must be 'bn' or 'frozen_bn', not {b['norm']!r}")
    return b


def _norm_layer(build: dict):
    from functools import partial

    from torchvision.ops.misc import FrozenBatchNorm2d

    if build["norm"] == "frozen_bn":
        return partial(FrozenBatchNorm2d, eps=float(build["frozen_bn_eps"]))
    return nn.BatchNorm2d


def _trainable(build: dict, max_value: int) -> int:
    t = build["trainable_layers"]
    if t is None:
        return max_value if build["norm"] == "bn" else 3
    if not 0 <= int(t) <= max_value:
        raise InputError(f"trainable_layers must be in 0..{max_value}, got {t}")
    return int(t)


def _freeze_resnet(body: nn.Module, trainable: int) -> None:
    # torchvision's _resnet_fpn_extractor rule: train the last `trainable` of conv1, layer1..4.
    layers = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable]
    if trainable == 5:
        layers.append("bn1")
    for name, p in body.named_parameters():
        if all(not name.startswith(layer) for layer in layers):
            p.requires_grad_(False)


class _C4Backbone(nn.Module):
    """ResNet conv1..layer3 -> {"0": [B, 1024, H/16, W/16]} (keys `backbone.body.*` as torchvision's)."""

    def __init__(self, resnet: nn.Module) -> None:
        super().__init__()
        from torchvision.models._utils import IntermediateLayerGetter

        self.body = IntermediateLayerGetter(resnet, return_layers={"layer3": "0"})
        self.out_channels = 1024

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.body(x)


def _resnet_fpn_backbone(name: str, build: dict) -> nn.Module:
    import torchvision
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    resnet = getattr(torchvision.models, name)(weights=None, norm_layer=_norm_layer(build))
    _freeze_resnet(resnet, _trainable(build, 5))
    returned = list(build["returned_layers"])
    if not returned or min(returned) < 1 or max(returned) > 4:
        raise InputError(f"returned_layers must be within 1..4, got {returned}")
    in_stage2 = resnet.inplanes // 8  # 256 for ResNet-50/101, 64 for ResNet-18 (as torchvision computes it)
    in_channels = [in_stage2 * 2 ** (i - 1) for i in returned]
    return_layers = {f"layer{k}": str(v) for v, k in enumerate(returned)}
    return BackboneWithFPN(resnet, return_layers, in_channels, int(build["fpn_channels"]),
                           extra_blocks=LastLevelMaxPool())


def _mobilenet_fpn_backbone(build: dict) -> nn.Module:
    # Mirrors torchvision's _mobilenet_extractor (private there) with the FPN width as an option.
    from torchvision.models import mobilenet_v3_large
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    features = mobilenet_v3_large(weights=None, norm_layer=_norm_layer(build)).features
    stage_indices = [0] + [i for i, b in enumerate(features) if getattr(b, "_is_cn", False)] + [len(features) - 1]
    num_stages = len(stage_indices)
    trainable = _trainable(build, num_stages)
    freeze_before = len(features) if trainable == 0 else stage_indices[num_stages - trainable]
    for b in features[:freeze_before]:
        for p in b.parameters():
            p.requires_grad_(False)
    returned = build["returned_layers"]
    if returned is None:
        returned = [num_stages - 2, num_stages - 1]
    if min(returned) < 0 or max(returned) >= num_stages:
        raise InputError(f"returned_layers must be within 0..{num_stages - 1}, got {returned}")
    return_layers = {f"{stage_indices[k]}": str(v) for v, k in enumerate(returned)}
    in_channels = [features[stage_indices[i]].out_channels for i in returned]
    return BackboneWithFPN(features, return_layers, in_channels, int(build["fpn_channels"]),
                           extra_blocks=LastLevelMaxPool())


def num_feature_levels(arch: str, build: dict) -> int:
    if arch == "resnet50_c4":
        return 1
    if arch == "mobilenet_v3_fpn":
        return (len(build["returned_layers"]) if build["returned_layers"] is not None else 2) + 1
    return len(build["returned_layers"]) + 1  # + LastLevelMaxPool


def build_detector(arch: str, num_classes: int, *, min_size: int = 800, max_size: int = 1333,
                   **options: Any):
    """A torchvision `FasterRCNN` for `arch` with `num_classes` outputs (K + 1, background = 0).

    Randomly initialised (weights=None, weights_backbone=None: nothing is downloaded); load
    weights with `load_weights_into` / `load_backbone_weights`. `options` are those of
    `default_build(arch)` (anchor sizes per level, FPN width, sampling sizes...). Input images
    are float [3, H, W] in [0, 1]; the model resizes them so the short side is `min_size`
    (long side at most `max_size`) and returns boxes xyxy in the input's pixels.
    """
    import torchvision
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.ops import MultiScaleRoIAlign

    build = resolve_build(arch, min_size=min_size, max_size=max_size, **options)
    if num_classes < 2:
        raise InputError(f"a detector needs at least one object class (num_classes={num_classes} counts background)")
    levels = num_feature_levels(arch, build)
    sizes = build["anchor_sizes"]
    if len(sizes) != levels:
        raise InputError(f"{arch} has {levels} feature levels but anchor_sizes gives {len(sizes)}: {sizes}")
    if len({len(s) for s in sizes}) != 1:
        raise InputError(f"every level needs the same number of anchor sizes, got {sizes}")
    anchors = AnchorGenerator(tuple(tuple(s) for s in sizes), (tuple(build["aspect_ratios"]),) * levels)

    if arch == "resnet50_c4":
        resnet = torchvision.models.resnet50(weights=None, norm_layer=_norm_layer(build))
        _freeze_resnet(resnet, _trainable(build, 5))
        layer4 = resnet.layer4
        backbone = _C4Backbone(resnet)  # IntermediateLayerGetter stops after layer3
        box_roi_pool = MultiScaleRoIAlign(["0"], output_size=14, sampling_ratio=0)
        box_head = nn.Sequential(OrderedDict(layer4=layer4, pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(1)))
        rep = 2048
    else:
        if arch == "mobilenet_v3_fpn":
            backbone = _mobilenet_fpn_backbone(build)
        else:
            backbone = _resnet_fpn_backbone({"resnet50_fpn": "resnet50", "resnet101_fpn": "resnet101",
                                             "resnet18_fpn": "resnet18"}[arch], build)
        names = [str(i) for i in range(levels - 1)]
        box_roi_pool = MultiScaleRoIAlign(names, output_size=7, sampling_ratio=2)
        rep = int(build["representation_size"])
        box_head = TwoMLPHead(backbone.out_channels * 7 * 7, rep)
    model = FasterRCNN(
        backbone,
        num_classes=None,
        min_size=int(build["min_size"]),
        max_size=int(build["max_size"]),
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=build["rpn_pre_nms_top_n_train"],
        rpn_pre_nms_top_n_test=build["rpn_pre_nms_top_n_test"],
        rpn_post_nms_top_n_train=build["rpn_post_nms_top_n_train"],
        rpn_post_nms_top_n_test=build["rpn_post_nms_top_n_test"],
        rpn_batch_size_per_image=build["rpn_batch_size_per_image"],
        box_roi_pool=box_roi_pool,
        box_head=box_head,
        box_predictor=FastRCNNPredictor(rep, num_classes),
        box_score_thresh=build["box_score_thresh"],
        box_nms_thresh=build["box_nms_thresh"],
        box_detections_per_img=build["box_detections_per_img"],
        box_batch_size_per_image=build["box_batch_size_per_image"],
        box_positive_fraction=build["box_positive_fraction"],
    )
    return model


