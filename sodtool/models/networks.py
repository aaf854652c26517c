"""The SOD-MTGAN networks (paper Table 1, DESIGN.md section 4) and their checkpoint files.

Images are float [0, 1] NCHW everywhere: the generator maps LR crops [B, 3, s, s] to SR crops
[B, 3, 4s, 4s]; the discriminator takes [B, 3, S, S] (S = 128 for the paper's crops, any size
>= 32 works) and normalises with ImageNet mean/std itself.

Checkpoint layout
-----------------
Checkpoints are `torch.save` of a plain dict (tensors, numbers, strings, lists, dicts) and are
read with `torch.load(weights_only=True)`. The keys this module reads:

    "generator":            Generator state_dict (no "module." / "_orig_mod." prefixes)
    "generator_config":     generator_config(g), e.g. {"channels": 64, "up_channels": 256,
                            "num_blocks": 5, "long_skip": True, "residual_bicubic": True, "scale": 4}
    "discriminator":        Discriminator state_dict                     (MTGAN files only)
    "discriminator_config": discriminator_config(d), e.g. {"num_classes": 10, "arch": "resnet50",
                            "reg_branch": True}                           (MTGAN files only)
    "categories":           CategoryMap.to_json() of the classes 1..K    (MTGAN files only)

The files are `RUN/sr/generator.pt` (generator keys only), `RUN/mtgan/model.pt` (both networks
and categories) and `RUN/mtgan/checkpoint.pt` (the same plus optimiser states, step, ... for
resuming). Any other key is ignored here. `generator_checkpoint(g)` / `discriminator_checkpoint(d)`
return the network's part of that dict; a trainer merges them with its own keys and writes the
file with `sodtool.checkpoint.save(obj, path)` (atomic).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, NamedTuple, Optional

import torch
import torchvision
from torch import nn

from sodtool import checkpoint
from sodtool.errors import InputError
from sodtool.resample import SCALE, bicubic_up

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v3_large")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GEN_INIT_STD = 0.02  # paper Sec. 4.2
HEAD_INIT_STD = 0.1  # paper Sec. 4.2


# --------------------------------------------------------------------------------------------
# Generator
# --------------------------------------------------------------------------------------------


class ResidualBlock(nn.Module):
    """conv3x3-BN-PReLU-conv3x3-BN plus identity skip (SRResNet block); [B, C, h, w] -> same."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.act = nn.PReLU(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))


class Generator(nn.Module):
    """The SR generator of paper Table 1: LR [B, 3, s, s] in [0, 1] -> SR [B, 3, 4s, 4s].

    Layers (Table 1): conv 9x9 (3 -> channels) + PReLU; `num_blocks` residual blocks
    (conv3x3-BN-PReLU-conv3x3-BN + skip); conv 3x3 (channels) + BN; two fractionally-strided
    convs ("de-conv", ConvTranspose2d k=3, stride 2, padding 1, output_padding 1 -> exactly 2x)
    with `up_channels` maps, each + PReLU; conv 9x9 -> 3. No output activation: values may
    leave [0, 1] slightly; clamp for display and metrics.

    Two additions that Table 1 does not show, both on by default:
    - `long_skip`: the output of the conv 3x3 + BN is added to the output of the first conv
      (the SRResNet long skip of Ledig et al., the paper's [21] whose losses it adopts). It
      lets the trunk learn a correction rather than a copy and costs nothing.
    - `residual_bicubic`: the network predicts a residual over the bicubic 4x upsampling of its
      input, output = bicubic(x) + f(x). MSE pretraining then starts from bicubic quality
      instead of from noise (benchmarks/bench_sr.py; docs/design_notes.md). The architecture of f is exactly
      Table 1; `residual_bicubic=False` gives the paper's plain generator.

    Init (paper Sec. 4.2): conv and de-conv weights N(0, 0.02), biases 0; BN weight 1, bias 0;
    PReLU slopes 0.25 (PyTorch default). Light CPU configuration: channels=32, up_channels=64.
    """

    def __init__(
        self,
        channels: int = 64,
        up_channels: int = 256,
        num_blocks: int = 5,
        *,
        long_skip: bool = True,
        residual_bicubic: bool = True,
    ) -> None:
        super().__init__()
        for name, v in (("channels", channels), ("up_channels", up_channels)):
            if int(v) < 1:
                raise InputError(f"generator {name} must be >= 1, got {v}")
        if int(num_blocks) < 0:
            raise InputError(f"generator num_blocks must be >= 0, got {num_blocks}")
        self.channels, self.up_channels, self.num_blocks = int(channels), int(up_channels), int(num_blocks)
        self.long_skip, self.residual_bicubic = bool(long_skip), bool(residual_bicubic)
        self.scale = SCALE

        self.head = nn.Sequential(nn.Conv2d(3, channels, 9, padding=4), nn.PReLU(channels))
        self.blocks = nn.Sequential(*[ResidualBlock(channels) for _ in range(num_blocks)])
        self.trunk_out = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels))
        self.upsample = nn.Sequential(
            nn.ConvTranspose2d(channels, up_channels, 3, stride=2, padding=1, output_padding=1),
            nn.PReLU(up_channels),
            nn.ConvTranspose2d(up_channels, up_channels, 3, stride=2, padding=1, output_padding=1),
            nn.PReLU(up_channels),
        )
        self.tail = nn.Conv2d(up_channels, 3, 9, padding=4)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.normal_(m.weight, 0.0, GEN_INIT_STD)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: LR float [B, 3, s, s] in [0, 1] -> SR float [B, 3, 4s, 4s] (unclamped)."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"generator expects [B, 3, h, w] images, got shape {tuple(x.shape)}")
        feat = self.head(x)
        trunk = self.trunk_out(self.blocks(feat))
        if self.long_skip:
            trunk = trunk + feat
        out = self.tail(self.upsample(trunk))
        if self.residual_bicubic:
            out = out + bicubic_up(x, self.scale)
        return out


# --------------------------------------------------------------------------------------------
# Discriminator
# --------------------------------------------------------------------------------------------


class DiscOut(NamedTuple):
    """Discriminator outputs for a batch of B images.

    adv: [B] real/fake logits (sigmoid -> probability of "real HR image").
    cls: [B, K+1] class logits, column 0 = background.
    reg: [B, 4] class-agnostic box deltas in BOX_WEIGHTS scale (raw delta * (10, 10, 5, 5)),
         or None for a discriminator built with reg_branch=False.
    """

    adv: torch.Tensor
    cls: torch.Tensor
    reg: Optional[torch.Tensor]


class Discriminator(nn.Module):
    """Multi-task discriminator: a torchvision ResNet trunk + three parallel fc heads.

    [B, 3, S, S] float in [0, 1] -> DiscOut(adv [B], cls [B, K+1], reg [B, 4] | None).
    The trunk is torchvision's ResNet (`arch` in resnet18/34/50/101) without its fc layer,
    ending in global average pooling, or MobileNetV3-Large's features and pooling (the trunk of
    the light detectors, for a D initialised from one: `load_trunk`); the heads are Linear(features, 1 / K+1 / 4) initialised
    N(0, 0.1) with zero biases (paper Sec. 4.2). `imagenet_weights` is an optional local file
    with a torchvision ImageNet classification state dict for the same arch (e.g. the
    resnet50-*.pth file from download.pytorch.org fetched by hand); its `fc.*` entries are
    ignored. Nothing is downloaded.
    """

    def __init__(
        self,
        num_classes: int,
        arch: str = "resnet50",
        imagenet_weights: str | os.PathLike | None = None,
        reg_branch: bool = True,
    ) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise InputError(f"unknown discriminator arch '{arch}' (use one of {', '.join(ARCHS)})")
        if int(num_classes) < 1:
            raise InputError(f"discriminator num_classes must be >= 1, got {num_classes}")
        self.num_classes, self.arch, self.reg_branch = int(num_classes), arch, bool(reg_branch)
        if arch.startswith("mobilenet"):
            if imagenet_weights is not None:
                raise InputError(f"--imagenet-weights takes a ResNet state dict; the {arch} trunk is for --disc-init")
            # The light trunk of the quick / bench detectors, as a classifier: features, pooling.
            net = getattr(torchvision.models, arch)(weights=None)
            trunk = nn.Sequential(OrderedDict([("features", net.features), ("pool", nn.AdaptiveAvgPool2d(1)),
                                               ("flatten", nn.Flatten(1))]))
            feat_dim = net.classifier[0].in_features
        else:
            trunk = getattr(torchvision.models, arch)(weights=None)
            if imagenet_weights is not None:
                _load_imagenet(trunk, Path(imagenet_weights), arch)
            feat_dim = trunk.fc.in_features
            trunk.fc = nn.Identity()  # torchvision's forward ends avgpool -> flatten -> fc
        self.trunk = trunk
        self.adv_head = nn.Linear(feat_dim, 1)
        self.cls_head = nn.Linear(feat_dim, self.num_classes + 1)
        self.reg_head = nn.Linear(feat_dim, 4) if self.reg_branch else None
        for head in (self.adv_head, self.cls_head, self.reg_head):
            if head is not None:
                nn.init.normal_(head.weight, 0.0, HEAD_INIT_STD)
                nn.init.zeros_(head.bias)
        # Not persistent: the constants are not weights and would clutter the checkpoint.
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def load_trunk(self, state: dict[str, torch.Tensor], source: str) -> int:
        """Load trunk weights (keys as `self.trunk`'s, e.g. from a detector's backbone); returns
        how many tensors were loaded. Trunk entries missing from `state` keep their init; an
        entry the trunk lacks, or of another shape, is an InputError naming `source`."""
        own = self.trunk.state_dict()
        unknown = sorted(set(state) - set(own))
        if unknown:
            raise InputError(f"{source}: {len(unknown)} trunk weights do not fit a {self.arch} (e.g. {unknown[:3]})")
        for k, v in state.items():
            if tuple(v.shape) != tuple(own[k].shape):
                raise InputError(f"{source}: '{k}' has shape {tuple(v.shape)}, the {self.arch} trunk {tuple(own[k].shape)}")
        self.trunk.load_state_dict(state, strict=False)
        return len(state)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] in [0, 1] -> pooled trunk features [B, F] (F = 512 or 2048)."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"discriminator expects [B, 3, H, W] images, got shape {tuple(x.shape)}")
        return self.trunk((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))

    def forward(self, x: torch.Tensor) -> DiscOut:
        f = self.features(x)
        reg = self.reg_head(f) if self.reg_head is not None else None
        return DiscOut(adv=self.adv_head(f).squeeze(1), cls=self.cls_head(f), reg=reg)


def _load_imagenet(trunk: nn.Module, path: Path, arch: str) -> None:
    """Load a torchvision ImageNet state dict into `trunk` (fc ignored); mismatch -> InputError."""
    state = checkpoint.load(path, "ImageNet weights file")
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"ImageNet weights file {path} does not hold a state dict of tensors")
    state = {_strip_prefix(k): v for k, v in state.items() if not _strip_prefix(k).startswith("fc.")}
    own = {k: v for k, v in trunk.state_dict().items() if not k.startswith("fc.")}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise InputError(
            f"ImageNet weights file {path} does not fit a torchvision {arch}: "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:3]})"
        )
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise InputError(
                f"ImageNet weights file {path} does not fit a torchvision {arch}: "
                f"'{k}' has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}"
            )
    trunk.load_state_dict(state, strict=False)


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------

_GEN_KEYS = {"channels", "up_channels", "num_blocks", "long_skip", "residual_bicubic", "scale"}
_DISC_KEYS = {"num_classes", "arch", "reg_branch"}


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP (`.module`) and/or torch.compile (`._orig_mod`) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel) or type(model).__name__ == "DataParallel":
            model = model.module
        else:
            return model


def generator_config(g: nn.Module) -> dict:
    """The constructor arguments of a Generator as a JSON-ready dict (see module docstring)."""
    g = unwrap(g)
    return {
        "channels": g.channels,
        "up_channels": g.up_channels,
        "num_blocks": g.num_blocks,
        "long_skip": g.long_skip,
        "residual_bicubic": g.residual_bicubic,
        "scale": g.scale,
    }


def discriminator_config(d: nn.Module) -> dict:
    """The constructor arguments of a Discriminator as a JSON-ready dict (no weights path)."""
    d = unwrap(d)
    return {"num_classes": d.num_classes, "arch": d.arch, "reg_branch": d.reg_branch}


def build_generator(config: dict, source: str = "generator_config") -> Generator:
    """A freshly initialised Generator from a `generator_config` dict; bad dict -> InputError."""
    if not isinstance(config, dict):
        raise InputError(f"{source} is not a dict")
    unknown = set(config) - _GEN_KEYS
    if unknown:
        raise InputError(f"{source} has unknown keys {sorted(unknown)}")
    if int(config.get("scale", SCALE)) != SCALE:
        raise InputError(f"{source} has scale {config['scale']}, only {SCALE} is supported")
    kw = {k: v for k, v in config.items() if k != "scale"}
    try:
        return Generator(**kw)
    except (TypeError, ValueError) as e:
        raise InputError(f"{source} is invalid: {e}") from e


def build_discriminator(config: dict, source: str = "discriminator_config") -> Discriminator:
    """A freshly initialised Discriminator from a `discriminator_config` dict."""
    if not isinstance(config, dict):
        raise InputError(f"{source} is not a dict")
    unknown = set(config) - _DISC_KEYS
    if unknown or "num_classes" not in config:
        raise InputError(f"{source} must have keys {sorted(_DISC_KEYS)} (got {sorted(config)})")
    try:
        return Discriminator(**config)
    except (TypeError, ValueError) as e:
        raise InputError(f"{source} is invalid: {e}") from e


def generator_checkpoint(g: nn.Module) -> dict:
    """{"generator": state_dict, "generator_config": {...}} (CPU tensors, unwrapped keys)."""
    g = unwrap(g)
    return {"generator": _cpu_state(g), "generator_config": generator_config(g)}


def discriminator_checkpoint(d: nn.Module) -> dict:
    """{"discriminator": state_dict, "discriminator_config": {...}} (CPU tensors)."""
    d = unwrap(d)
    return {"discriminator": _cpu_state(d), "discriminator_config": discriminator_config(d)}


def generator_file(path: str | os.PathLike, names: tuple[str, ...] = ("generator.pt", "model.pt"),
                   what: str = "generator checkpoint") -> Path:
    """The checkpoint file a user named: `path` itself, or the first of `names` in the run folder
    `path` (RUN/sr holds generator.pt, RUN/mtgan model.pt). Missing -> InputError naming `what`
    (the option, where one option accepts fewer names: --pretrained-g wants train sr's G only)."""
    path = Path(path)
    if path.is_dir():
        for name in names:
            if (path / name).is_file():
                return path / name
        raise InputError(f"{what}: {path} is a folder without {' or '.join(names)}: pass the checkpoint file")
    if not path.is_file():
        raise InputError(f"{what} not found: {path}")
    return path


def generator_from_checkpoint(path: str | os.PathLike, device: torch.device | str = "cpu") -> Generator:
    """The Generator stored in `path` (RUN/sr/generator.pt, RUN/mtgan/model.pt or checkpoint.pt),
    on `device`, in eval mode (call .train() to fine-tune it)."""
    ckpt = checkpoint.load_dict(path, "cpu", "generator checkpoint")
    return _restore(ckpt, path, "generator", build_generator, device)


def discriminator_from_checkpoint(path: str | os.PathLike, device: torch.device | str = "cpu") -> Discriminator:
    """The Discriminator stored in an MTGAN file (RUN/mtgan/model.pt or checkpoint.pt), on
    `device`, in eval mode. The class list is the file's "categories" entry (read it yourself)."""
    ckpt = checkpoint.load_dict(path, "cpu", "discriminator checkpoint")
    return _restore(ckpt, path, "discriminator", build_discriminator, device)


def _restore(ckpt: dict, path, name: str, build, device) -> Any:
    cfg_key = f"{name}_config"
    if name not in ckpt or cfg_key not in ckpt:
        raise InputError(
            f"{path} has no {name} (keys '{name}' and '{cfg_key}' missing; "
            f"it holds {sorted(ckpt)[:8]}): pass a file written by sodtool train"
        )
    model = build(ckpt[cfg_key], source=f"{path}: {cfg_key}")
    state = ckpt[name]
    if not isinstance(state, dict):
        raise InputError(f"{path}: '{name}' is not a state dict")
    state = {_strip_prefix(k): v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise InputError(f"{path}: the {name} weights do not match its {cfg_key} ({' '.join(first[:2])[:300]})") from e
    return model.to(device).eval()


def set_requires_grad(module: nn.Module, flag: bool) -> None:
    """Freeze (False) or unfreeze (True) every parameter, e.g. D during the generator step."""
    for p in module.parameters():
        p.requires_grad_(flag)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _cpu_state(m: nn.Module) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in m.state_dict().items()}


def _strip_prefix(key: str) -> str:
    """Drop DDP ("module.") and torch.compile ("_orig_mod.") prefixes, in any order."""
    while True:
        for prefix in ("module.", "_orig_mod."):
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        else:
            return key
