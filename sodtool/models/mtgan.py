"""A trained MTGAN (`RUN/mtgan/model.pt`) loaded for evaluation: generator, discriminator, classes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from sodtool import checkpoint
from sodtool.artefacts import read_manifest, run_input
from sodtool.coco import CategoryMap
from sodtool.console import warn
from sodtool.errors import InputError
from sodtool.models.networks import discriminator_from_checkpoint, generator_from_checkpoint
from sodtool.store import store_info


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


def load_mtgan(path: str | Path, device, name: str = "mtgan") -> MtganModel:
    """Load generator + discriminator + categories from an MTGAN model.pt (or its folder)."""
    f = mtgan_file(path)
    ckpt = checkpoint.load_dict(f, "cpu", "MTGAN model")
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


def training_logs(model: MtganModel) -> dict[str, Path]:
    """{"sr": RUN/sr/metrics.jsonl, "mtgan": RUN/mtgan/metrics.jsonl} where they exist."""
    found: dict[str, Path] = {}
    sr_dir = model.run_dir.parent / "sr"
    try:
        manifest = read_manifest(model.run_dir)
        sr_dir = run_input(model.run_dir, manifest, manifest["config"].get("sr")) or sr_dir
    except Exception:  # noqa: BLE001 - no manifest: look beside the mtgan folder
        pass
    for run, d in (("sr", sr_dir), ("mtgan", model.run_dir)):
        if (d / "metrics.jsonl").is_file():
            found[run] = d / "metrics.jsonl"
    return found


def training_context(model: MtganModel, default: Optional[float], *, quiet: bool = False) -> Optional[float]:
    """The crop context factor of the store the MTGAN was trained on, read via its run manifest
    (`artefacts.run_input`: where the manifest says, or at the same place relative to the run
    folder if the run was moved); `default` when that store cannot be read, with a warning
    naming `--context` (of `eval` and `predict`) unless `quiet`."""
    why = f"{model.run_dir} holds no readable manifest.json"
    try:
        manifest = read_manifest(model.run_dir)
        recorded = manifest["config"]["hr"]
        why = f"its store {recorded} was not found, as recorded or beside the run"
        hr = run_input(model.run_dir, manifest, recorded)
        if hr is not None:
            why = f"its store {hr} is unreadable"
            return float(store_info(hr)["context"])
    except Exception:  # noqa: BLE001 - any failure means "unknown": fall back
        pass
    if not quiet:
        warn(f"could not read the crop context of the ROIs {model.path} was trained on ({why}); using crop-rois' "
             f"default {default}: give --context if they were cropped with another")
    return default


def discriminator_quality(model: MtganModel) -> dict:
    """D's held-out class accuracy at the end of training, from the MTGAN run's manifest:
    {"val_d_cls_acc_fg_sr", "val_d_cls_acc_fg_hr", "val_d_cls_acc_fg_bicubic", "val_d_cls_acc_fg_read",
    "val_fg_crops", "preset", "hr_size"} where recorded ({} when the manifest cannot be read). "preset" is the
    run's `--preset` (quick / bench / paper) and "hr_size" its HR crop side, so the verdict can say
    what would train D longer."""
    try:
        manifest = read_manifest(model.run_dir)
    except Exception:  # noqa: BLE001 - a model.pt moved away from its run folder: unknown
        return {}
    metrics = manifest.get("metrics", {})
    keys = ("val_d_cls_acc_fg_sr", "val_d_cls_acc_fg_hr", "val_d_cls_acc_fg_bicubic", "val_d_cls_acc_fg_read",
            "val_fg_crops")
    quality = {k: metrics[k] for k in keys if k in metrics}
    preset = manifest.get("config", {}).get("preset")
    if preset:
        quality["preset"] = preset
    if getattr(model, "hr_size", None):
        quality["hr_size"] = int(model.hr_size)
    return quality
