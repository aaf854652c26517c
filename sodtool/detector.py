"""The baseline detector: torchvision Faster R-CNN, trained, loaded and run by sodtool.

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

Checkpoint files (all read with `torch.load(weights_only=True)`):

- `model.pt` (format `sodtool.detector/1`): {"format", "arch", "num_classes" (K+1), "categories"
  (JSON of CategoryMap.to_json()), "build" (every option of `build_detector`, image sizes
  included), "model" (state dict)};
- `checkpoint.pt` (format `sodtool.detector-train/1`): model, optimizer, scheduler, step, RNG
  state, resolved config; written atomically every `checkpoint_every` iterations and at the end.
- a torchvision detection state dict (e.g. `fasterrcnn_resnet50_fpn_coco-258fb6c6.pth`, downloaded
  by hand) is accepted wherever a detector checkpoint is.
"""

from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from sodtool.errors import InputError

ARCHS = ("resnet50_fpn", "resnet101_fpn", "resnet50_c4", "resnet18_fpn", "mobilenet_v3_fpn")
DETECTOR_FAMILIES = ("frcnn",)
MODEL_FORMAT = "sodtool.detector/1"
TRAIN_FORMAT = "sodtool.detector-train/1"

# COCO 2017's 80 categories (id -> name). A 91-output torchvision COCO checkpoint indexes its
# outputs by these ids; it is used on a dataset only if that dataset's ids and names are COCO's.
COCO_CATEGORIES = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train", 8: "truck",
    9: "boat", 10: "traffic light", 11: "fire hydrant", 13: "stop sign", 14: "parking meter", 15: "bench",
    16: "bird", 17: "cat", 18: "dog", 19: "horse", 20: "sheep", 21: "cow", 22: "elephant", 23: "bear",
    24: "zebra", 25: "giraffe", 27: "backpack", 28: "umbrella", 31: "handbag", 32: "tie", 33: "suitcase",
    34: "frisbee", 35: "skis", 36: "snowboard", 37: "sports ball", 38: "kite", 39: "baseball bat",
    40: "baseball glove", 41: "skateboard", 42: "surfboard", 43: "tennis racket", 44: "bottle",
    46: "wine glass", 47: "cup", 48: "fork", 49: "knife", 50: "spoon", 51: "bowl", 52: "banana", 53: "apple",
    54: "sandwich", 55: "orange", 56: "broccoli", 57: "carrot", 58: "hot dog", 59: "pizza", 60: "donut",
    61: "cake", 62: "chair", 63: "couch", 64: "potted plant", 65: "bed", 67: "dining table", 70: "toilet",
    72: "tv", 73: "laptop", 74: "mouse", 75: "remote", 76: "keyboard", 77: "cell phone", 78: "microwave",
    79: "oven", 80: "toaster", 81: "sink", 82: "refrigerator", 84: "book", 85: "clock", 86: "vase",
    87: "scissors", 88: "teddy bear", 89: "hair drier", 90: "toothbrush",
}
COCO_NUM_OUTPUTS = 91


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


# ----------------------------------------------------------------------------------------------
# Weight files
# ----------------------------------------------------------------------------------------------

def save_detector(path: str | os.PathLike, model: nn.Module, arch: str, build: dict, categories) -> Path:
    """Write sodtool's model.pt (format MODEL_FORMAT) atomically; `build` as from resolve_build."""
    from sodtool.artefacts import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save({
            "format": MODEL_FORMAT,
            "arch": arch,
            "num_classes": categories.num_classes + 1,
            "categories": json.dumps(categories.to_json()),
            "build": build,
            "model": model.state_dict(),
        }, tmp)
    return path


def _torch_load(path: str | os.PathLike, what: str) -> Any:
    p = Path(path)
    if not p.exists():
        raise InputError(f"{what} not found: {p}")
    if not p.is_file():
        raise InputError(f"{what} is not a file: {p}")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, zip errors, weights_only refusals: all "not a state dict"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"{p}: not a PyTorch weights file that loads with weights_only=True ({first[:160]})") from None


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _unwrap_state_dict(obj: Any, path: Path) -> dict:
    """A torchvision state dict, or the one under "model" (torchvision's reference checkpoints)."""
    if _is_state_dict(obj):
        return obj
    if isinstance(obj, dict) and _is_state_dict(obj.get("model")):
        return obj["model"]
    raise InputError(f"{path}: not a state dict (expected a dict of tensors such as torchvision's "
                     f"fasterrcnn_resnet50_fpn_coco file, or sodtool's model.pt)")


def infer_arch(sd: dict) -> str | None:
    """The `ARCHS` entry whose layout a detection state dict has (None when none fits)."""
    keys = sd.keys()
    if "backbone.body.0.0.weight" in keys:
        return "mobilenet_v3_fpn"
    c4 = any(k.startswith("roi_heads.box_head.layer4.") for k in keys)
    if "backbone.body.layer1.0.conv3.weight" in keys:
        blocks = {int(k.split(".")[3]) for k in keys if k.startswith("backbone.body.layer3.")}
        depth = {6: 50, 23: 101}.get(len(blocks))
        if c4:
            return "resnet50_c4" if depth == 50 else None
        if any(k.startswith("backbone.fpn.") for k in keys):
            return {50: "resnet50_fpn", 101: "resnet101_fpn"}.get(depth)
        return None
    if "backbone.body.layer1.0.conv1.weight" in keys and any(k.startswith("backbone.fpn.") for k in keys):
        blocks = {int(k.split(".")[3]) for k in keys if k.startswith("backbone.body.layer3.")}
        return "resnet18_fpn" if len(blocks) == 2 else None
    return None


def _predictor_classes(sd: dict) -> int | None:
    w = sd.get("roi_heads.box_predictor.cls_score.weight")
    return int(w.shape[0]) if w is not None else None


def _torchvision_build(arch: str, sd: dict) -> dict:
    """The build options a torchvision-format detection state dict of `arch` needs."""
    b = default_build(arch)
    b["norm"] = "frozen_bn"
    if arch == "resnet50_fpn":
        # torchvision's only published weights of this layout (COCO_V1) were trained with a
        # FrozenBatchNorm eps of 0; its builder sets it (overwrite_eps) and so do we.
        b["frozen_bn_eps"] = 0.0
    if "backbone.fpn.inner_blocks.0.0.weight" in sd:
        b["fpn_channels"] = int(sd["backbone.fpn.inner_blocks.0.0.weight"].shape[0])
    elif "backbone.fpn.inner_blocks.0.weight" in sd:
        b["fpn_channels"] = int(sd["backbone.fpn.inner_blocks.0.weight"].shape[0])
    if "roi_heads.box_head.fc6.weight" in sd:
        b["representation_size"] = int(sd["roi_heads.box_head.fc6.weight"].shape[0])
    return b


def _coco_label_map(categories, path: Path, outputs: int) -> np.ndarray:
    """Output index (= COCO category id) -> dataset label 1..K, 0 = not in the dataset.

    Only a dataset whose categories are COCO's (same ids, same names) may use a 91-output
    COCO checkpoint: anything else would silently relabel the classes.
    """
    for cid, name in zip(categories.ids, categories.names):
        if COCO_CATEGORIES.get(cid, "").lower() != name.strip().lower():
            coco_name = COCO_CATEGORIES.get(cid)
            detail = (f"the dataset's category {cid} is '{name}', COCO's is '{coco_name}'" if coco_name
                      else f"the dataset's category id {cid} ('{name}') is not a COCO category")
            raise InputError(f"{path.name}: box predictor has {outputs} classes, the dataset has "
                             f"{categories.num_classes}+1 (a {outputs}-class torchvision COCO model needs COCO's "
                             f"category ids and names; {detail})")
    label_map = np.zeros(outputs, dtype=np.int64)
    for label, cid in enumerate(categories.ids, start=1):
        label_map[cid] = label
    return label_map


def _load_state_into(model: nn.Module, sd: dict, path: Path, arch: str) -> None:
    """load_state_dict with one clear line for whatever does not fit."""
    found = infer_arch(sd)
    if found is not None and found != arch:
        raise InputError(f"{path.name}: weights are for {found}, the model is {arch}")
    own = model.state_dict()
    bad_shapes = [f"{k} {list(v.shape)} vs {list(own[k].shape)}" for k, v in sd.items()
                  if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if bad_shapes:
        raise InputError(f"{path.name}: weights do not fit {arch}: {len(bad_shapes)} tensors differ in shape "
                         f"(file vs model), e.g. {bad_shapes[0]}")
    res = model.load_state_dict(dict(sd), strict=False)
    if res.missing_keys or res.unexpected_keys:
        parts = []
        if res.missing_keys:
            parts.append(f"{len(res.missing_keys)} missing (e.g. {res.missing_keys[0]})")
        if res.unexpected_keys:
            parts.append(f"{len(res.unexpected_keys)} unexpected (e.g. {res.unexpected_keys[0]})")
        what = f"weights for {found}" if found else "not a torchvision Faster R-CNN layout sodtool knows"
        raise InputError(f"{path.name}: weights do not fit {arch} ({what}): " + ", ".join(parts))


def load_backbone_weights(model: nn.Module, arch: str, path: str | os.PathLike) -> int:
    """Copy a torchvision ImageNet classification state dict into the detector's trunk.

    ResNets: `conv1..layer4` -> `backbone.body.*` (C4: `layer4` -> `roi_heads.box_head.layer4`);
    MobileNetV3: `features.*` -> `backbone.body.*`. The classifier (`fc`, `classifier`) is
    ignored. Returns the number of tensors copied.
    """
    path = Path(path)
    sd = _unwrap_state_dict(_torch_load(path, "backbone weights file"), path)
    target: dict[str, str] = {}
    if arch == "mobilenet_v3_fpn":
        for k in sd:
            if k.startswith("features."):
                target[k] = "backbone.body." + k[len("features."):]
    else:
        for k in sd:
            if k.startswith("fc.") or k.startswith("classifier."):
                continue
            if arch == "resnet50_c4" and k.startswith("layer4."):
                target[k] = "roi_heads.box_head." + k
            else:
                target[k] = "backbone.body." + k
    own = model.state_dict()
    trunk = [k for k in own if k.startswith("backbone.body.") or k.startswith("roi_heads.box_head.layer4.")]
    mapped = {target[k]: v for k, v in sd.items() if k in target}
    missing = [k for k in trunk if k not in mapped and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in mapped if k not in own and not k.endswith("num_batches_tracked")]
    trunk_name = {"mobilenet_v3_fpn": "mobilenet_v3_large", "resnet18_fpn": "resnet18",
                  "resnet101_fpn": "resnet101"}.get(arch, "resnet50")
    if missing or unexpected:
        eg = (missing or unexpected)[0]
        raise InputError(f"{path.name}: not {trunk_name} ImageNet weights for {arch} "
                         f"({len(missing)} trunk tensors missing, {len(unexpected)} unexpected, e.g. {eg})")
    bad = [f"{k} {list(v.shape)} vs {list(own[k].shape)}" for k, v in mapped.items()
           if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise InputError(f"{path.name}: not {trunk_name} ImageNet weights for {arch} (shape of {bad[0]})")
    model.load_state_dict(mapped, strict=False)
    return len(mapped)


# ----------------------------------------------------------------------------------------------
# Loading a trained detector and predicting
# ----------------------------------------------------------------------------------------------

@dataclass
class LoadedDetector:
    """A detector ready for `predict`: model (eval mode, on its device) and its label space.

    `label_map` is None when model outputs are the dataset's labels 1..K; for a torchvision
    COCO checkpoint it maps output index (= COCO category id) -> label 1..K (0: drop).
    """

    model: nn.Module
    categories: Any  # CategoryMap
    arch: str
    identity: dict
    label_map: np.ndarray | None = None
    build: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def _checkpoint_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_dir():
        if (p / "model.pt").is_file():
            return p / "model.pt"
        if (p / "detector" / "model.pt").is_file():
            return p / "detector" / "model.pt"
        raise InputError(f"{p} holds no model.pt (did `sodtool train detector` finish?)")
    return p


def read_detector_checkpoint(path: str | os.PathLike, categories=None, *, min_size: int | None = None,
                             max_size: int | None = None, arch: str | None = None):
    """Read a detector file into (arch, build, num_classes, state_dict, categories, label_map, format).

    `path`: sodtool's model.pt (or its run folder), or a torchvision detection state dict.
    `categories`: the dataset's CategoryMap; checked against a model.pt, required for a
    torchvision state dict that is not a 91-class COCO model. `arch`: the architecture the
    caller wants (checked before anything else).
    """
    want = arch
    from sodtool.coco import CategoryMap

    path = _checkpoint_path(path)
    obj = _torch_load(path, "detector weights file")
    if isinstance(obj, dict) and obj.get("format") == TRAIN_FORMAT:
        raise InputError(f"{path.name} is a training checkpoint; use the finished run's model.pt")
    if isinstance(obj, dict) and obj.get("format") == MODEL_FORMAT:
        arch = str(obj["arch"])
        if want is not None and arch != want:
            raise InputError(f"{path.name}: weights are for {arch}, the model is {want}")
        build = dict(obj["build"])
        try:
            own_cats = CategoryMap.from_json(json.loads(obj["categories"]))
        except (ValueError, KeyError, TypeError) as e:
            raise InputError(f"{path}: malformed categories in a sodtool model file ({e})") from None
        if categories is not None:
            categories.check_same(own_cats, f"{path} vs the dataset")
        sd, fmt, label_map = obj["model"], "sodtool", None
        num_classes = int(obj["num_classes"])
        categories = own_cats
    else:
        sd = _unwrap_state_dict(obj, path)
        arch = infer_arch(sd)
        if arch is None:
            raise InputError(f"{path.name}: not a Faster R-CNN state dict of a layout sodtool knows ({', '.join(ARCHS)})")
        if want is not None and arch != want:
            raise InputError(f"{path.name}: weights are for {arch}, the model is {want}")
        outputs = _predictor_classes(sd)
        if outputs is None:
            raise InputError(f"{path.name}: no box predictor (roi_heads.box_predictor.cls_score.weight) in the state dict")
        build = _torchvision_build(arch, sd)
        fmt, num_classes = "torchvision", outputs
        if categories is None:
            if outputs != COCO_NUM_OUTPUTS:
                raise InputError(f"{path.name} is a torchvision state dict with {outputs} classes and no category "
                                 f"names: give the dataset it was trained on")
            categories = CategoryMap(ids=tuple(COCO_CATEGORIES), names=tuple(COCO_CATEGORIES.values()))
        if outputs == categories.num_classes + 1:
            label_map = None
        elif outputs == COCO_NUM_OUTPUTS:
            label_map = _coco_label_map(categories, path, outputs)
        else:
            raise InputError(f"{path.name}: box predictor has {outputs} classes, the dataset has "
                             f"{categories.num_classes}+1")
    if min_size is not None:
        build["min_size"] = int(min_size)
    if max_size is not None:
        build["max_size"] = int(max_size)
    return arch, build, num_classes, sd, categories, label_map, fmt, path


def load_detector(path: str | os.PathLike, device: torch.device | str = "cpu", categories=None, *,
                  min_size: int | None = None, max_size: int | None = None) -> LoadedDetector:
    """Load `RUN/detector/model.pt` (or a torchvision detection state dict) for `predict`.

    `categories` (the dataset's CategoryMap) is checked against the file's; a 91-class
    torchvision COCO model gets a label map onto it. `min_size`/`max_size` override the image
    size the model resizes to.
    """
    from sodtool.artefacts import file_identity

    arch, build, num_classes, sd, cats, label_map, fmt, path = read_detector_checkpoint(
        path, categories, min_size=min_size, max_size=max_size)
    model = build_detector(arch, num_classes, **build)
    _load_state_into(model, sd, path, arch)
    model.eval().to(torch.device(device))
    ident = {**file_identity(path), "format": fmt, "arch": arch, "num_classes": num_classes}
    return LoadedDetector(model=model, categories=cats, arch=arch, identity=ident, label_map=label_map, build=build)


def _to_tensor(img: np.ndarray, dev: torch.device) -> torch.Tensor:
    if not (isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3):
        got = f"{img.dtype} {img.shape}" if isinstance(img, np.ndarray) else type(img).__name__
        raise ValueError(f"predict wants RGB uint8 [H, W, 3] arrays, got {got}")
    if not img.flags.writeable:
        img = img.copy()  # torch warns about read-only arrays (PIL's are)
    t = torch.from_numpy(np.ascontiguousarray(img)).to(dev, non_blocking=True)
    return t.permute(2, 0, 1).float().div_(255.0)


def predict(det: LoadedDetector, images: list[np.ndarray], *, score_thresh: float = 0.05,
            max_per_image: int = 100, batch_size: int = 4, amp: bool = False) -> list[dict]:
    """Detect objects in RGB uint8 images [H, W, 3].

    Returns one dict per image: boxes float32 [N, 4] xyxy image pixels, scores float32 [N] in
    [0, 1], labels int64 [N] in 1..K (the dataset's CategoryMap labels), sorted by score,
    descending, N <= max_per_image. Per-class NMS at IoU 0.5 (torchvision's default).
    """
    from sodtool.device import autocast

    model, dev = det.model, det.device
    rh = model.roi_heads
    saved = (rh.score_thresh, rh.detections_per_img)
    rh.score_thresh = float(score_thresh)
    # With a label map some outputs are dropped afterwards: keep them all until then.
    rh.detections_per_img = int(max_per_image) if det.label_map is None else 1_000_000
    results: list[dict] = []
    try:
        with torch.inference_mode(), autocast(dev, enabled=amp):
            for start in range(0, len(images), batch_size):
                batch = [_to_tensor(im, dev) for im in images[start:start + batch_size]]
                for out in model(batch):
                    boxes = out["boxes"].float().cpu().numpy().astype(np.float32)
                    scores = out["scores"].float().cpu().numpy().astype(np.float32)
                    labels = out["labels"].cpu().numpy().astype(np.int64)
                    if det.label_map is not None:
                        labels = det.label_map[labels]
                        keep = labels > 0
                        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
                    order = np.argsort(-scores, kind="stable")[:max_per_image]
                    results.append({"boxes": boxes[order].reshape(-1, 4), "scores": scores[order],
                                    "labels": labels[order]})
    finally:
        rh.score_thresh, rh.detections_per_img = saved
    return results


def to_coco_results(image_id: int, det: dict, categories) -> list[dict]:
    """One image's `predict` output as COCO results entries (dataset category ids, bbox xywh)."""
    b = det["boxes"]
    ids = categories.labels_to_ids(det["labels"]) if len(det["labels"]) else np.zeros(0, np.int64)
    return [{"image_id": int(image_id), "category_id": int(c),
             "bbox": [round(float(x1), 2), round(float(y1), 2), round(float(x2 - x1), 2), round(float(y2 - y1), 2)],
             "score": round(float(s), 5)}
            for (x1, y1, x2, y2), s, c in zip(b.tolist(), det["scores"].tolist(), ids.tolist())]


def detect_split(det: LoadedDetector, split, *, score_thresh: float, max_per_image: int, batch_size: int,
                 description: str = "detect", amp: bool = False) -> list[dict]:
    """Run `predict` over every image of a CocoSplit -> COCO results list (with a progress bar)."""
    from sodtool.console import make_progress

    results: list[dict] = []
    ids = split.image_ids
    with make_progress() as progress:
        task = progress.add_task(description, total=len(ids), info="")
        for start in range(0, len(ids), batch_size):
            chunk = ids[start:start + batch_size]
            outs = predict(det, [split.load_image(i) for i in chunk], score_thresh=score_thresh,
                           max_per_image=max_per_image, batch_size=batch_size, amp=amp)
            for iid, out in zip(chunk, outs):
                results.extend(to_coco_results(iid, out, det.categories))
            progress.advance(task, len(chunk))
    return results


# ----------------------------------------------------------------------------------------------
# Training data
# ----------------------------------------------------------------------------------------------

class DetectionDataset(torch.utils.data.Dataset):
    """Images and targets of a CocoSplit, indexed by (position, hflip) pairs from `BatchStream`.

    Returns (image uint8 [3, H, W], target {"boxes": float32 [N, 4] xyxy, "labels": int64 [N]
    in 1..K, "image_id": int}); images without boxes give N = 0. Images stay uint8 until the
    training process so that worker -> main transfers are 4x smaller.
    """

    def __init__(self, split) -> None:
        self.split = split
        self.ids = list(split.image_ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, item: tuple[int, bool]):
        index, flip = item
        iid = self.ids[index]
        arr = self.split.load_image(iid)
        img = torch.from_numpy(arr if arr.flags.writeable else arr.copy()).permute(2, 0, 1)
        t = self.split.targets(iid)
        boxes = torch.from_numpy(t["boxes"]).reshape(-1, 4)
        if flip:
            w = img.shape[2]
            img = img.flip(-1)
            boxes = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], dim=1)
        return img.contiguous(), {"boxes": boxes, "labels": torch.from_numpy(t["labels"]), "image_id": iid}


def collate(batch):
    """Detection batches are lists (images differ in size): ([img, ...], [target, ...])."""
    return [b[0] for b in batch], [b[1] for b in batch]


class BatchStream:
    """An endless, deterministic stream of batches of (index, hflip) pairs, starting at `start_step`.

    Epoch e is a permutation drawn from (seed, e) alone, with hflip decisions drawn beside it,
    and batches run across epoch boundaries (like detectron2's TrainingSampler). So batch s is
    the same whether a run got there directly or resumed at step s: resumption needs no saved
    sampler state.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start_step: int = 0, hflip: bool = True) -> None:
        if n == 0:
            raise InputError("the training split has no images")
        self.n, self.batch_size, self.seed, self.start_step, self.hflip = n, batch_size, seed, start_step, hflip

    def epoch(self, e: int) -> tuple[list[int], list[bool]]:
        state = np.random.SeedSequence([self.seed, e]).generate_state(2)
        g = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        perm = torch.randperm(self.n, generator=g).tolist()
        flips = (torch.rand(self.n, generator=g) < 0.5).tolist() if self.hflip else [False] * self.n
        return perm, flips

    def __iter__(self) -> Iterator[list[tuple[int, bool]]]:
        e, offset = divmod(self.start_step * self.batch_size, self.n)
        batch: list[tuple[int, bool]] = []
        while True:
            perm, flips = self.epoch(e)
            for i in range(offset, self.n):
                batch.append((perm[i], flips[i]))
                if len(batch) == self.batch_size:
                    yield batch
                    batch = []
            e, offset = e + 1, 0


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

# Presets fill every config field left at None.
#
# `quick`: the synthetic quickstart on a 2-core CPU (about 5 minutes). MobileNetV3-Large trained
#   from scratch: it learns the classes' patterns in fewer CPU-seconds than ResNet-18 (measured:
#   at equal CPU time ResNet-18-FPN was still at chance on the class). The FPN takes the
#   stride-8/16/32 stages (torchvision's mobilenet layout takes only stride-32 ones, blind to
#   8 px objects); anchors 16-128 px on P3-P6 for objects of 8-190 px in 320 px images
#   (torchvision's are 32-512 px for 800 px images). A narrow FPN (64), 64 sampled RoIs per image
#   of which up to half positive (RoIAlign's backward dominates a CPU iteration otherwise) and
#   fewer proposals keep an iteration near 0.4 s on 2 cores. No flips: the synthetic stripes-d
#   and stripes-a classes are mirror images of each other. 800 iterations (3200 images): the
#   class patterns start being learnt after about 1500 images; 600 iterations fell short.
# `bench`: the same network on the synthetic bench data (4000 images), 3x longer (9600 images
#   seen, about 16 minutes on 2 cores).
# `coco`: the paper's COCO 2017 baseline, Detectron's e2e_faster_rcnn_R-50-C4_1x (which the paper
#   takes from Mask R-CNN [10]): ResNet-50-C4, 800/1333 px, batch 16 (8 GPUs x 2 there, one
#   process here), lr 0.02, 90k iterations, lr /10 at 60k and 80k, 500 warm-up iterations from
#   1/3, weight decay 1e-4, 512 RoIs per image (1/4 positive), flips; ImageNet trunk via
#   --backbone-weights (BatchNorm frozen, conv1 and layer1 frozen, as Detectron).
PRESETS: dict[str, dict[str, Any]] = {
    "quick": dict(
        arch="mobilenet_v3_fpn", iterations=800, batch_size=4, lr=0.02, weight_decay=1e-4,
        warmup_iters=100, milestones=(640,), min_size=320, max_size=533,
        fpn_channels=64, returned_layers=(2, 3, 4), anchor_sizes=(16, 32, 64, 128),
        roi_batch_size=64, roi_positive_fraction=0.5, representation_size=256,
        rpn_pre_nms_train=1000, rpn_post_nms_train=500, rpn_post_nms_test=300,
        hflip=False, checkpoint_every=100,
    ),
    "bench": dict(
        arch="mobilenet_v3_fpn", iterations=2400, batch_size=4, lr=0.02, weight_decay=1e-4,
        warmup_iters=100, milestones=(1900, 2200), min_size=320, max_size=533,
        fpn_channels=64, returned_layers=(2, 3, 4), anchor_sizes=(16, 32, 64, 128),
        roi_batch_size=64, roi_positive_fraction=0.5, representation_size=256,
        rpn_pre_nms_train=1000, rpn_post_nms_train=500, rpn_post_nms_test=300,
        hflip=False, checkpoint_every=200,
    ),
    "coco": dict(
        arch="resnet50_c4", iterations=90_000, batch_size=16, lr=0.02, weight_decay=1e-4,
        warmup_iters=500, warmup_factor=1 / 3, milestones=(60_000, 80_000), min_size=800, max_size=1333,
        fpn_channels=None, returned_layers=None, anchor_sizes=None, roi_batch_size=512,
        representation_size=None, rpn_pre_nms_train=None, rpn_post_nms_train=None, rpn_post_nms_test=None,
        roi_positive_fraction=None, hflip=True, checkpoint_every=5000,
    ),
}


@dataclass(frozen=True)
class TrainDetectorConfig:
    """`sodtool train detector`. Fields left None take the preset's value (PRESETS)."""

    data: Path | None = None
    out: Path = Path("runs/detector")
    detector: str = "frcnn"
    preset: str = "quick"
    train_split: str = "train"
    train_ann: Path | None = None
    train_images: Path | None = None
    val_split: str = "minival"
    val_ann: Path | None = None
    val_images: Path | None = None
    arch: str | None = None
    iterations: int | None = None
    epochs: float | None = None  # alternative to iterations: epochs * images / batch_size
    batch_size: int | None = None
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float | None = None
    warmup_iters: int | None = None
    warmup_factor: float | None = None  # lr multiplier at step 0, rising linearly to 1
    milestones: tuple[int, ...] | None = None  # lr *= gamma at each
    gamma: float = 0.1
    min_size: int | None = None
    max_size: int | None = None
    train_sizes: tuple[int, ...] = ()  # multi-scale training: short side drawn from these per image
    hflip: bool | None = None  # preset: off on the synthetic data (a flip turns "/" stripes into "\\")
    fpn_channels: int | None = None
    returned_layers: tuple[int, ...] | None = None
    anchor_sizes: tuple[int, ...] | None = None  # one size per feature level
    roi_batch_size: int | None = None  # sampled RoIs per image for the box head
    roi_positive_fraction: float | None = None  # at most this share of them positive
    representation_size: int | None = None
    rpn_pre_nms_train: int | None = None  # proposals per level before NMS in training
    rpn_post_nms_train: int | None = None  # proposals kept per image in training
    rpn_post_nms_test: int | None = None  # ... and at test time
    weights: Path | None = None
    backbone_weights: Path | None = None
    seed: int = 0
    device: str = "auto"
    workers: int | None = None  # None: 0 on CPU, 4 on CUDA
    checkpoint_every: int | None = None
    log_every: int = 20
    resume: bool = True
    eval: bool = True
    eval_score_thresh: float = 0.001
    eval_batch_size: int = 4
    amp: bool = False  # bf16 autocast on CUDA
    skip_invalid: bool = False


# Fields that may change between a run and its resumption.
_RESUME_FREE = {"device", "workers", "resume", "checkpoint_every", "log_every", "eval", "eval_score_thresh",
                "eval_batch_size", "out"}


def resolve_train_config(cfg: TrainDetectorConfig, num_train_images: int | None = None) -> TrainDetectorConfig:
    """Fill the None fields from the preset; turn epochs into iterations."""
    if cfg.detector not in DETECTOR_FAMILIES:
        raise InputError(f"unknown detector '{cfg.detector}' (only {', '.join(DETECTOR_FAMILIES)} is available)")
    if cfg.preset not in PRESETS:
        raise InputError(f"unknown preset '{cfg.preset}' (choose from {', '.join(PRESETS)})")
    p = {"warmup_factor": 0.001, **PRESETS[cfg.preset]}
    if cfg.arch is not None and cfg.arch not in ARCHS:
        raise InputError(f"unknown detector architecture '{cfg.arch}' (choose from {', '.join(ARCHS)})")
    if cfg.arch is not None and cfg.arch != p["arch"]:
        # The preset's build options are for its own trunk; another trunk gets its defaults.
        for k in ("fpn_channels", "returned_layers", "anchor_sizes", "representation_size"):
            p[k] = None
    if cfg.weights is not None and cfg.arch is None:
        p["arch"] = None  # the weights file decides
    changes = {k: v for k, v in p.items() if getattr(cfg, k) is None}
    if cfg.epochs is not None and cfg.iterations is None:
        if num_train_images is None:
            raise ValueError("epochs need the number of training images")
        changes["iterations"] = max(1, math.ceil(cfg.epochs * num_train_images / (cfg.batch_size or p["batch_size"])))
    iters = cfg.iterations if cfg.iterations is not None else changes["iterations"]
    if cfg.milestones is None and iters != p["iterations"]:
        # The preset's decay points are for its own length: keep them at the same fractions.
        changes["milestones"] = tuple(max(1, round(m * iters / p["iterations"])) for m in p["milestones"])
    out = replace(cfg, **changes)
    if out.iterations < 1 or out.batch_size < 1 or out.lr <= 0:
        raise InputError(f"iterations, batch size and lr must be positive (got {out.iterations}, {out.batch_size}, {out.lr})")
    if out.checkpoint_every < 1:
        raise InputError(f"--checkpoint-every must be at least 1, got {out.checkpoint_every}")
    return out


def _build_options(cfg: TrainDetectorConfig) -> dict:
    opts: dict[str, Any] = {"min_size": cfg.min_size, "max_size": cfg.max_size}
    if cfg.fpn_channels is not None:
        opts["fpn_channels"] = cfg.fpn_channels
    if cfg.returned_layers is not None:
        opts["returned_layers"] = list(cfg.returned_layers)
    if cfg.anchor_sizes is not None:
        opts["anchor_sizes"] = [[int(s)] for s in cfg.anchor_sizes]
    if cfg.roi_batch_size is not None:
        opts["box_batch_size_per_image"] = cfg.roi_batch_size
    if cfg.representation_size is not None:
        opts["representation_size"] = cfg.representation_size
    if cfg.roi_positive_fraction is not None:
        opts["box_positive_fraction"] = cfg.roi_positive_fraction
    if cfg.rpn_pre_nms_train is not None:
        opts["rpn_pre_nms_top_n_train"] = cfg.rpn_pre_nms_train
    if cfg.rpn_post_nms_train is not None:
        opts["rpn_post_nms_top_n_train"] = cfg.rpn_post_nms_train
    if cfg.rpn_post_nms_test is not None:
        opts["rpn_post_nms_top_n_test"] = cfg.rpn_post_nms_test
    if cfg.backbone_weights is not None:
        opts["norm"] = "frozen_bn"  # torchvision's choice with a pretrained trunk
    return opts


def _initial_model(cfg: TrainDetectorConfig, categories) -> tuple[nn.Module, str, dict, dict]:
    """Build the model to train and load --weights / --backbone-weights into it.

    Returns (model, arch, build, info). With --weights the structure comes from the file (a
    sodtool model.pt's build, or torchvision's layout for a torchvision state dict); the image
    sizes and sampling options come from the config.
    """
    info: dict[str, Any] = {}
    num_classes = categories.num_classes + 1
    if cfg.weights is not None:
        arch, build, file_classes, sd, _, label_map, fmt, path = read_detector_checkpoint(
            cfg.weights, categories, min_size=cfg.min_size, max_size=cfg.max_size, arch=cfg.arch)
        if label_map is not None:
            # A COCO checkpoint on a COCO-category dataset: keep the rows of the dataset's classes.
            sd = dict(sd)
            rows = torch.as_tensor([0] + list(categories.ids))
            box_rows = (rows[:, None] * 4 + torch.arange(4)).reshape(-1)
            for name, idx in (("cls_score", rows), ("bbox_pred", box_rows)):
                for kind in ("weight", "bias"):
                    k = f"roi_heads.box_predictor.{name}.{kind}"
                    sd[k] = sd[k][idx].clone()
            info["predictor_rows_from_coco_ids"] = True
        for k, v in _build_options(cfg).items():
            if k in ("box_batch_size_per_image", "box_positive_fraction", "rpn_pre_nms_top_n_train",
                     "rpn_post_nms_top_n_train", "rpn_post_nms_top_n_test", "min_size", "max_size"):
                build[k] = v
        model = build_detector(arch, num_classes, **build)
        _load_state_into(model, sd, path, arch)
        info["weights"] = fmt
    else:
        arch = cfg.arch
        build = resolve_build(arch, **_build_options(cfg))
        model = build_detector(arch, num_classes, **build)
        if cfg.backbone_weights is not None:
            info["backbone_tensors_loaded"] = load_backbone_weights(model, arch, cfg.backbone_weights)
    return model, arch, build, info


def _lr_factor(cfg: TrainDetectorConfig):
    milestones = sorted(cfg.milestones or ())

    def factor(step: int) -> float:
        f = cfg.gamma ** sum(1 for m in milestones if step >= m)
        if step < cfg.warmup_iters:
            a = step / cfg.warmup_iters
            f *= cfg.warmup_factor * (1 - a) + a
        return f

    return factor


def _save_checkpoint(path: Path, model, optimizer, scheduler, step: int, cfg, train_time_s: float, arch: str,
                     build: dict, categories) -> None:
    from sodtool.artefacts import atomic_path, config_dict

    state = {
        "format": TRAIN_FORMAT,
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        "config": config_dict(cfg),
        "arch": arch,
        "build": build,
        "categories": json.dumps(categories.to_json()),
        "train_time_s": float(train_time_s),
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _comparable(d: dict) -> dict:
    return {k: v for k, v in d.items() if k not in _RESUME_FREE}


def _read_resume_state(path: Path, cfg: TrainDetectorConfig) -> dict:
    from sodtool.artefacts import config_dict

    state = _torch_load(path, "training checkpoint")
    if not (isinstance(state, dict) and state.get("format") == TRAIN_FORMAT):
        raise InputError(f"{path}: not a sodtool detector training checkpoint (--no-resume starts over)")
    old, new = _comparable(state["config"]), _comparable(config_dict(cfg))
    for k in new:
        if old.get(k) != new[k]:
            raise InputError(f"{path}: was written by a run with {k}={old.get(k)!r}, this run has {k}={new[k]!r}; "
                             f"rerun with the same settings to resume, or pass --no-resume to start over")
    return state


def _rewrite_log(log_path: Path, upto_step: int) -> None:
    """Keep the loss log lines a resumed run will not write again (step <= the checkpoint's)."""
    from sodtool.artefacts import write_text

    if not log_path.exists():
        return
    kept = []
    for line in log_path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if rec.get("step", 0) <= upto_step:
            kept.append(line)
    write_text(log_path, "".join(k + "\n" for k in kept))


def train_detector(cfg: TrainDetectorConfig) -> dict:
    """Train the baseline Faster R-CNN on `train`; evaluate on `minival`; write RUN/detector/.

    SGD with momentum, linear warm-up, step decay. Writes `config.json` (resolved config) at the
    start, `metrics.jsonl` (every loss term by name, lr, step), `checkpoint.pt` every
    `checkpoint_every` iterations and at the end, then `model.pt` and `manifest.json` (last).
    Rerunning the same command resumes from checkpoint.pt at its step with the same data order.
    Returns the metrics (COCO AP of minival under "AP", "AP50", ... when `eval`).
    """
    from sodtool.artefacts import MANIFEST, Timer, config_dict, write_json, write_manifest
    from sodtool.coco import load_split, resolve_split
    from sodtool.console import log, make_progress, summary_table, warn
    from sodtool.device import autocast, device_name, resolve_device, seed_everything

    timer = Timer()
    dev = resolve_device(cfg.device)
    resolve_train_config(cfg, 0)  # fail fast on a bad detector / preset / arch name
    train_paths = resolve_split(cfg.data, cfg.train_split, cfg.train_ann, cfg.train_images)
    val_paths = resolve_split(cfg.data, cfg.val_split, cfg.val_ann, cfg.val_images) if cfg.eval else None
    train = load_split(train_paths, skip_invalid=cfg.skip_invalid)
    cfg = resolve_train_config(cfg, len(train.image_ids))
    val = load_split(val_paths, skip_invalid=cfg.skip_invalid) if val_paths is not None else None
    categories = train.categories
    if val is not None:
        categories.check_same(val.categories, f"{val_paths.ann} vs {train_paths.ann}")
    if cfg.weights is not None and cfg.backbone_weights is not None:
        raise InputError("give --weights (a whole detector) or --backbone-weights (an ImageNet trunk), not both")
    if cfg.preset == "coco" and cfg.weights is None and cfg.backbone_weights is None:
        warn("the coco preset expects ImageNet trunk weights (--backbone-weights): training from scratch "
             "for 90k iterations falls far short of the paper's baseline")

    out = Path(cfg.out)
    ckpt_path, log_path, model_path = out / "checkpoint.pt", out / "metrics.jsonl", out / "model.pt"
    seed_everything(cfg.seed)
    model, arch, build, init_info = _initial_model(cfg, categories)
    if cfg.arch is None:
        cfg = replace(cfg, arch=arch)
    state = _read_resume_state(ckpt_path, cfg) if (cfg.resume and ckpt_path.exists()) else None
    # Inputs are all checked: from here the folder stops looking finished, then changes.
    out.mkdir(parents=True, exist_ok=True)
    for stale in (out / MANIFEST, model_path):
        if stale.exists():
            stale.unlink()
    write_json(out / "config.json", {"config": config_dict(cfg), "arch": arch, "build": build,
                                     "categories": categories.to_json()})
    model.to(dev)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(cfg))

    start, train_time = 0, 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start, train_time = int(state["step"]), float(state["train_time_s"])
        torch.set_rng_state(state["rng"]["torch"])
        if dev.type == "cuda" and state["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        _rewrite_log(log_path, start)
        log(f"resuming from {ckpt_path} at iteration {start}/{cfg.iterations}")
    else:
        if ckpt_path.exists():
            log(f"--no-resume: starting over (removing {ckpt_path})")
            ckpt_path.unlink()
        if log_path.exists():
            log_path.unlink()

    workers = cfg.workers if cfg.workers is not None else (4 if dev.type == "cuda" else 0)
    stream = BatchStream(len(train.image_ids), cfg.batch_size, cfg.seed, start, cfg.hflip)
    loader = torch.utils.data.DataLoader(
        DetectionDataset(train), batch_sampler=stream, num_workers=workers, collate_fn=collate,
        pin_memory=dev.type == "cuda", persistent_workers=False,
        # Its own generator: creating the loader must not draw from the global RNG, which a
        # resumed run restores from the checkpoint.
        generator=torch.Generator().manual_seed(cfg.seed))
    if cfg.train_sizes:
        model.transform.min_size = tuple(int(s) for s in cfg.train_sizes)

    with open(log_path, "a", encoding="utf-8") as logf:
        if start > 0:
            logf.write(json.dumps({"event": "resume", "step": start}) + "\n")
            logf.flush()
        model.train()
        window: dict[str, float] = {}
        window_n = 0
        last_ckpt = start
        seg_timer = Timer()
        seg_base = train_time
        it = iter(loader)
        with make_progress() as progress:
            task = progress.add_task("train detector", total=cfg.iterations, completed=start, info="")
            for step in range(start, cfg.iterations):
                images, targets = next(it)
                images = [im.to(dev, non_blocking=True).float().div_(255.0) for im in images]
                targets = [{"boxes": t["boxes"].to(dev), "labels": t["labels"].to(dev)} for t in targets]
                with autocast(dev, enabled=cfg.amp):
                    loss_dict = model(images, targets)
                loss = sum(loss_dict.values())
                if not torch.isfinite(loss):
                    terms = ", ".join(f"{k}={float(v):.4g}" for k, v in loss_dict.items())
                    from sodtool.train_sr import NonFiniteLossError  # the CLI's exit code 3

                    raise NonFiniteLossError(f"loss is not finite at iteration {step + 1} ({terms}); training stopped, "
                                           f"the last good checkpoint ({ckpt_path}, iteration {last_ckpt}) is kept; "
                                           f"try a lower --lr")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                lr_used = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                for k, v in loss_dict.items():
                    window[k] = window.get(k, 0.0) + float(v.detach())
                window["loss"] = window.get("loss", 0.0) + float(loss.detach())
                window_n += 1
                done = step + 1
                train_time = seg_base + seg_timer.elapsed
                if done % cfg.log_every == 0 or done == cfg.iterations:
                    rec = {"step": done, "lr": lr_used}
                    rec.update({k: round(v / window_n, 6) for k, v in window.items()})
                    rec["train_time_s"] = round(train_time, 3)
                    logf.write(json.dumps(rec) + "\n")
                    logf.flush()
                    progress.update(task, info=f"loss {rec['loss']:.3f} lr {rec['lr']:.4g}")
                    window, window_n = {}, 0
                if done % cfg.checkpoint_every == 0 or done == cfg.iterations:
                    _save_checkpoint(ckpt_path, model, optimizer, scheduler, done, cfg, train_time, arch, build,
                                     categories)
                    last_ckpt = done
                progress.update(task, completed=done)

    model.transform.min_size = (int(build["min_size"]),)
    model.eval()
    save_detector(model_path, model, arch, build, categories)

    metrics: dict[str, Any] = {
        "iterations": cfg.iterations, "resumed_from_step": start, "train_time_s": round(train_time, 3),
        "s_per_iteration": round(train_time / max(1, cfg.iterations), 4),
        "images_seen": cfg.iterations * cfg.batch_size, "arch": arch, **init_info,
    }
    if log_path.exists():
        lines = [json.loads(x) for x in log_path.read_text(encoding="utf-8").splitlines() if x.strip()]
        losses = [x for x in lines if "loss" in x]
        if losses:
            metrics["final_loss"] = losses[-1]["loss"]
    if val is not None:
        from sodtool.evaluate import coco_evaluate

        det = LoadedDetector(model=model, categories=categories, arch=arch, identity={}, build=build)
        eval_timer = Timer()
        results = detect_split(det, val, score_thresh=cfg.eval_score_thresh, max_per_image=100,
                               batch_size=cfg.eval_batch_size, description=f"eval {cfg.val_split}", amp=cfg.amp)
        ev = coco_evaluate(val.coco, results)
        metrics["eval_split"] = cfg.val_split
        metrics["eval_images"] = len(val.image_ids)
        metrics["eval_time_s"] = round(eval_timer.elapsed, 3)
        metrics.update({k: v for k, v in ev.items()})
    write_manifest(out, "train_detector", cfg,
                   inputs={"train_annotations": train_paths.ann,
                           "val_annotations": val_paths.ann if val_paths else None,
                           "weights": cfg.weights, "backbone_weights": cfg.backbone_weights},
                   metrics=metrics, seed=cfg.seed, device=device_name(dev), wall_time_s=timer.elapsed)
    shown = {k: metrics[k] for k in ("arch", "iterations", "resumed_from_step", "train_time_s", "final_loss")
             if k in metrics}
    shown.update({k: metrics[k] for k in ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large") if k in metrics})
    summary_table(f"train detector -> {out}", shown)
    return metrics


# ----------------------------------------------------------------------------------------------
# Detection on a split
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DetectConfig:
    """`sodtool detect`: run a detector over a split and write COCO results JSON.

    `detector`: a checkpoint (RUN/detector/model.pt, its folder, or a torchvision detection
    state dict) or the family name "frcnn" together with `weights`.
    `out` defaults to RUN/detections_<split>.json for RUN/detector/model.pt, else
    ./detections_<split>.json; its manifest is written beside it as <out stem>.manifest.json.
    """

    detector: str = "frcnn"
    weights: Path | None = None
    data: Path | None = None
    split: str = "minival"
    ann: Path | None = None
    images: Path | None = None
    out: Path | None = None
    score_thresh: float = 0.001
    max_per_image: int = 100
    batch_size: int = 4
    min_size: int | None = None
    max_size: int | None = None
    device: str = "auto"
    seed: int = 0
    evaluate: bool = True
    amp: bool = False
    skip_invalid: bool = False


def _detector_file(cfg: DetectConfig) -> Path:
    if cfg.weights is not None:
        if cfg.detector not in DETECTOR_FAMILIES:
            raise InputError(f"unknown detector '{cfg.detector}' with --weights (only {', '.join(DETECTOR_FAMILIES)})")
        return Path(cfg.weights)
    if cfg.detector in DETECTOR_FAMILIES:
        raise InputError(f"--detector {cfg.detector} needs --weights FILE (or pass the checkpoint itself as --detector)")
    p = Path(cfg.detector)
    if not p.exists():
        raise InputError(f"detector not found: {p} (give RUN/detector/model.pt, a torchvision state dict, "
                         f"or --detector frcnn --weights FILE)")
    return _checkpoint_path(p)


def manifest_path_for(results_path: Path) -> Path:
    """detections_minival.json -> detections_minival.manifest.json (the file's own manifest)."""
    from sodtool.artefacts import sidecar_manifest_path

    return sidecar_manifest_path(results_path)


def detect(cfg: DetectConfig) -> dict:
    """Run a detector over a split; write COCO results JSON (top `max_per_image` per image).

    Results use the dataset's category ids and bbox [x, y, w, h] image pixels. The file is
    written atomically, then its manifest (`<out stem>.manifest.json`) last. With `evaluate`
    and a split that has annotations, the metrics include COCO AP.
    """
    from sodtool.artefacts import Timer, write_json, write_manifest
    from sodtool.coco import load_split, resolve_split
    from sodtool.console import summary_table
    from sodtool.device import device_name, resolve_device, seed_everything

    timer = Timer()
    if cfg.max_per_image < 1 or cfg.batch_size < 1:
        raise InputError("--max-per-image and --batch-size must be at least 1")
    dev = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    ckpt = _detector_file(cfg)
    paths = resolve_split(cfg.data, cfg.split, cfg.ann, cfg.images)
    split = load_split(paths, skip_invalid=cfg.skip_invalid)
    det = load_detector(ckpt, dev, split.categories, min_size=cfg.min_size, max_size=cfg.max_size)
    if cfg.out is not None:
        out = Path(cfg.out)
    elif ckpt.name == "model.pt" and det.identity.get("format") == "sodtool":
        out = ckpt.parent.parent / f"detections_{cfg.split}.json"
    else:
        out = Path(f"detections_{cfg.split}.json")
    run_timer = Timer()
    results = detect_split(det, split, score_thresh=cfg.score_thresh, max_per_image=cfg.max_per_image,
                           batch_size=cfg.batch_size, description=f"detect {cfg.split}", amp=cfg.amp)
    elapsed = run_timer.elapsed
    write_json(out, results, indent=None)
    metrics: dict[str, Any] = {"images": len(split.image_ids), "detections": len(results),
                               "images_per_s": round(len(split.image_ids) / max(elapsed, 1e-9), 3)}
    if cfg.evaluate and split.coco.anns:
        from sodtool.evaluate import coco_evaluate

        metrics.update(coco_evaluate(split.coco, results))
    write_manifest(out.parent, "detect", cfg, {"detector": det.identity, "annotations": paths.ann}, metrics,
                   seed=cfg.seed, device=device_name(dev), wall_time_s=timer.elapsed, outputs=[out.name],
                   path=manifest_path_for(out))
    shown = {"results": str(out), **{k: metrics[k] for k in ("images", "detections", "images_per_s")}}
    shown.update({k: metrics[k] for k in ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large") if k in metrics})
    summary_table(f"detect {cfg.split}", shown)
    metrics["results_path"] = str(out)
    return metrics
