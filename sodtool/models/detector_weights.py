"""Detector weight files: sodtool's `model.pt`, torchvision detection state dicts, ImageNet trunks.

Files (all read with `torch.load(weights_only=True)`, through `sodtool.checkpoint`):

- `model.pt` (format `sodtool.detector/1`): {"format", "family" ("frcnn", "ssd", "mdssd" or "fsr";
  absent in files written before SSD: "frcnn"), "arch", "num_classes" (K+1), "categories" (JSON of
  CategoryMap.to_json()), "build" (every option of the family's build: `build_detector`'s for
  Faster R-CNN, those plus "fsr" (`models.fsr` options) for the feature-SR detector, {"size"} for
  SSD / MDSSD), "model" (state dict)};
- a torchvision detection state dict (e.g. `fasterrcnn_resnet50_fpn_coco-258fb6c6.pth`, downloaded
  by hand) is accepted wherever a detector checkpoint is. Labels inside the model are 0 =
  background and 1..K = the dataset's `CategoryMap` labels, except for a torchvision COCO
  checkpoint (91 outputs, output index = COCO category id), whose `label_map` turns its outputs
  into the dataset's labels. Faster R-CNN layouts and torchvision's `ssd300_vgg16` are known.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sodtool import checkpoint
from sodtool.coco import CategoryMap
from sodtool.errors import InputError
from sodtool.models import fsr, ssd
from sodtool.models.frcnn import ARCHS, FAMILY as FRCNN, build_detector, default_build

MODEL_FORMAT = "sodtool.detector/1"
FAMILIES = (FRCNN, *ssd.FAMILIES, fsr.FAMILY)
TRAIN_FORMAT = "sodtool.detector-train/1"  # a training checkpoint: not a weights file
FSR_TRAIN_FORMAT = "sodtool.fsr-train/1"  # `train fsr`'s training checkpoint: not a weights file either

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
# Weight files
# ----------------------------------------------------------------------------------------------

def save_detector(path: str | os.PathLike, model: nn.Module, arch: str, build: dict, categories,
                  family: str = FRCNN, trained_at: dict | None = None) -> Path:
    """Write sodtool's model.pt (format MODEL_FORMAT) atomically; `build` as from resolve_build
    (Faster R-CNN) or {"size": S} (SSD, MDSSD); `trained_at`: the scale its training images were
    resized by and the tile size when they were tiles ({"scale": float, "tile": int | None}),
    which sliced inference follows (`models.detectors.resolve_slicing`)."""
    return checkpoint.save({
        **({"trained_at": trained_at} if trained_at else {}),
        "format": MODEL_FORMAT,
        "family": family,
        "arch": arch,
        "num_classes": categories.num_classes + 1,
        "categories": json.dumps(categories.to_json()),
        "build": build,
        "model": model.state_dict(),
    }, path)


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


def infer_ssd(sd: dict) -> bool:
    """Whether a state dict has torchvision's ssd300_vgg16 layout."""
    return "backbone.scale_weight" in sd and "backbone.extra.1.0.weight" in sd and \
        "head.classification_head.module_list.0.weight" in sd


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


def load_state_into(model: nn.Module, sd: dict, path: Path, arch: str) -> None:
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
    sd = _unwrap_state_dict(checkpoint.load(path, "backbone weights file"), path)
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


def load_trunk(model: nn.Module, sd: dict, path: Path, arch: str) -> tuple[int, int]:
    """Copy the trunk of a Faster R-CNN state dict into `model` (built for any class count) and
    leave the RPN head, box head (but C4's, which is ResNet's layer4) and box predictor as built.
    Returns (tensors loaded, model tensors left at their initialisation).

    Every tensor of the model's backbone body must be in the file with its shape (otherwise the
    file is another trunk: InputError); FPN tensors are loaded where name and shape agree (a new
    --fpn-channels or --returned-layers leaves the others new).
    """
    found = infer_arch(sd)
    if found is not None and found != arch:
        raise InputError(f"{path.name}: weights are for {found}, the model is {arch}")
    own = model.state_dict()
    # C4's res5 box head is ResNet's layer4: trunk, as for `load_backbone_weights` and `detector_trunk`.
    body_prefixes = ("backbone.body.", "roi_heads.box_head.layer4.") if arch == "resnet50_c4" else ("backbone.body.",)
    body = [k for k in own if k.startswith(body_prefixes)]
    bad = [k for k in body if k not in sd or tuple(sd[k].shape) != tuple(own[k].shape)]
    if bad:
        eg = bad[0] if bad[0] not in sd else f"{bad[0]} {list(sd[bad[0]].shape)} vs {list(own[bad[0]].shape)}"
        raise InputError(f"{path.name}: its trunk does not fit {arch}: {len(bad)} of {len(body)} trunk tensors "
                         f"missing or of another shape (e.g. {eg})")
    fit = {k: v for k, v in sd.items() if k.startswith((*body_prefixes, "backbone.")) and k in own
           and tuple(v.shape) == tuple(own[k].shape)}
    model.load_state_dict(fit, strict=False)
    return len(fit), len(own) - len(fit)


def detector_file(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_dir():
        if (p / "model.pt").is_file():
            return p / "model.pt"
        if (p / "detector" / "model.pt").is_file():
            return p / "detector" / "model.pt"
        raise InputError(f"{p} holds no model.pt (did `sodtool train detector` finish?)")
    return p


@dataclass
class DetectorFile:
    """A detector weights file, read: what its family's build needs and what its outputs mean.

    family: "frcnn" | "ssd" | "mdssd"; arch: the family's trunk name; build: the build options
    (`build_detector`'s, or {"size"} for SSD / MDSSD); num_classes: outputs including background;
    state: the state dict; categories: a CategoryMap; label_map: output index -> label 1..K
    (0: drop) for a torchvision COCO model, else None; format: "sodtool" | "torchvision".
    """

    family: str
    arch: str
    build: dict
    num_classes: int
    state: dict
    categories: Any
    label_map: np.ndarray | None
    format: str
    path: Path
    trained_at: dict = field(default_factory=dict)  # save_detector's record ({} when the file has none)


def read_detector_checkpoint(path: str | os.PathLike, categories=None, *, min_size: int | None = None,
                             max_size: int | None = None, arch: str | None = None,
                             any_classes: bool = False) -> DetectorFile:
    """Read a detector file.

    `path`: sodtool's model.pt (or its run folder), or a torchvision detection state dict
    (Faster R-CNN layouts, ssd300_vgg16). `categories`: the dataset's CategoryMap; checked
    against a model.pt, required for a torchvision state dict that is not a 91-class COCO
    model. `arch`: the architecture the caller wants (checked before anything else).
    `min_size` / `max_size` override a Faster R-CNN's image sizes (an SSD's size is fixed).
    `any_classes`: the caller keeps only the trunk (`load_trunk`), so the file's classes are not
    checked against `categories` (and a torchvision state dict needs none); categories and
    label_map are then None for a torchvision state dict.
    """
    want = arch

    path = detector_file(path)
    obj = checkpoint.load(path, "detector weights file")
    if isinstance(obj, dict) and obj.get("format") in (TRAIN_FORMAT, FSR_TRAIN_FORMAT):
        raise InputError(f"{path.name} is a training checkpoint; use the finished run's model.pt")
    if isinstance(obj, dict) and obj.get("format") == MODEL_FORMAT:
        family = str(obj.get("family", FRCNN))
        if family not in FAMILIES:
            raise InputError(f"{path}: unknown detector family {family!r} (this sodtool knows {', '.join(FAMILIES)})")
        arch = str(obj["arch"])
        if want is not None and arch != want:
            raise InputError(f"{path.name}: weights are for {arch}, the model is {want}")
        build = dict(obj["build"])
        try:
            own_cats = CategoryMap.from_json(json.loads(obj["categories"]))
        except (ValueError, KeyError, TypeError) as e:
            raise InputError(f"{path}: malformed categories in a sodtool model file ({e})") from None
        if categories is not None and not any_classes:
            categories.check_same(own_cats, f"{path} vs the dataset")
        sd, fmt, label_map = obj["model"], "sodtool", None
        num_classes = int(obj["num_classes"])
        categories = own_cats
        trained_at = dict(obj.get("trained_at") or {})
    else:
        trained_at = {}
        sd = _unwrap_state_dict(obj, path)
        if infer_ssd(sd):
            family, arch, build = "ssd", "vgg16", {"size": 300}
            # SSD300's first map has 4 default boxes per cell, each with num_classes scores.
            outputs = int(sd["head.classification_head.module_list.0.weight"].shape[0]) // 4
        else:
            family, arch = FRCNN, infer_arch(sd)
            if arch is None:
                raise InputError(f"{path.name}: not a Faster R-CNN ({', '.join(ARCHS)}) or ssd300_vgg16 state dict "
                                 "of a layout sodtool knows")
            outputs = _predictor_classes(sd)
            if outputs is None:
                raise InputError(f"{path.name}: no box predictor (roi_heads.box_predictor.cls_score.weight) in the "
                                 "state dict")
            build = _torchvision_build(arch, sd)
        if want is not None and arch != want:
            raise InputError(f"{path.name}: weights are for {arch}, the model is {want}")
        fmt, num_classes = "torchvision", outputs
        if any_classes:
            categories, label_map = None, None
        elif categories is None:
            if outputs != COCO_NUM_OUTPUTS:
                raise InputError(f"{path.name} is a torchvision state dict with {outputs} classes and no category "
                                 f"names: give the dataset it was trained on")
            categories = CategoryMap(ids=tuple(COCO_CATEGORIES), names=tuple(COCO_CATEGORIES.values()))
        if any_classes:
            pass
        elif outputs == categories.num_classes + 1:
            label_map = None
        elif outputs == COCO_NUM_OUTPUTS:
            label_map = _coco_label_map(categories, path, outputs)
        else:
            raise InputError(f"{path.name}: box predictor has {outputs} classes, the dataset has "
                             f"{categories.num_classes}+1")
    if family in (FRCNN, fsr.FAMILY):
        if min_size is not None:
            build["min_size"] = int(min_size)
        if max_size is not None:
            build["max_size"] = int(max_size)
    return DetectorFile(family=family, arch=arch, build=build, num_classes=num_classes, state=sd,
                        categories=categories, label_map=label_map, format=fmt, path=path, trained_at=trained_at)


def build_from_file(f: DetectorFile) -> nn.Module:
    """The family's model for a read detector file, its weights loaded (one clear line for any
    that do not fit)."""
    if f.family == FRCNN:
        model = build_detector(f.arch, f.num_classes, **f.build)
        load_state_into(model, f.state, f.path, f.arch)
    elif f.family == fsr.FAMILY:
        if not isinstance(f.build.get("fsr"), dict):
            raise InputError(f"{f.path}: an fsr model file without its fsr options (build['fsr'])")
        model = fsr.build_fsr(f.arch, f.num_classes, f.build)
        load_state_into(model, f.state, f.path, f.arch)
    else:
        model = ssd.build_ssd(f.family, f.num_classes - 1, f.arch, int(f.build["size"]))
        own = model.state_dict()
        bad = [k for k, v in f.state.items() if k not in own or tuple(v.shape) != tuple(own[k].shape)]
        missing = [k for k in own if k not in f.state]
        if bad or missing:
            eg = (bad or missing)[0]
            raise InputError(f"{f.path.name}: weights do not fit the {f.arch} {f.family}: {len(bad)} tensors unknown "
                             f"or of another shape, {len(missing)} missing (e.g. {eg})")
        model.load_state_dict(f.state)
    return model


# The classification network whose layers a detector's trunk is (torchvision's module names).
TRUNK_OF = {"resnet50_fpn": "resnet50", "resnet101_fpn": "resnet101", "resnet50_c4": "resnet50",
            "resnet18_fpn": "resnet18", "mobilenet_v3_fpn": "mobilenet_v3_large", "mobilenet_v3": "mobilenet_v3_large"}


def detector_trunk(path: str | os.PathLike) -> tuple[str, dict[str, torch.Tensor], str]:
    """(classification arch, trunk weights keyed as that network's modules, detector arch) of a
    detector weights file: the backbone body (for C4 also its res5 box head, which is ResNet's
    layer4), without the FPN, RPN and heads. MobileNet keys gain the `features.` prefix of
    the discriminator's MobileNet trunk. BatchNorm's num_batches_tracked is left out (frozen
    BatchNorm has none)."""
    f = read_detector_checkpoint(path)
    arch, sd = f.arch, f.state
    if arch not in TRUNK_OF:
        raise InputError(f"{f.path.name}: a {arch} {f.family} trunk cannot initialise D (ResNet and MobileNetV3 "
                         "trunks can)")
    trunk: dict[str, torch.Tensor] = {}
    prefix = "features." if TRUNK_OF[arch].startswith("mobilenet") else ""
    for k, v in sd.items():
        if k.endswith("num_batches_tracked"):
            continue
        if k.startswith("backbone.body."):
            trunk[prefix + k[len("backbone.body."):]] = v
        elif arch == "resnet50_c4" and k.startswith("roi_heads.box_head.layer4."):
            trunk[k[len("roi_heads.box_head."):]] = v
    return TRUNK_OF[arch], trunk, arch
