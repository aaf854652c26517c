"""`sodtool train detector`: the baseline detector (torchvision Faster R-CNN), trained on a split.

SGD with momentum, linear warm-up, step decay, on the training engine (`sodtool.engine`):
`checkpoint.pt` (format `sodtool.detector-train/1`: model, optimizer, scheduler, step, every
RNG state, resolved config) is written atomically every `checkpoint_every` iterations and at
the end; rerunning the same command resumes from it with the same data order and ends with the
same weights, bit for bit, as an uninterrupted run (CPU, same thread count).
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sodtool.artefacts import Timer, check_output, config_dict, file_identity, write_json, write_manifest
from sodtool.coco import load_split, resolve_split
from sodtool.configs.train_detector import PRESETS, SSD_PRESETS, TrainDetectorConfig
from sodtool.console import log, make_progress, summary_table, warn
from sodtool.device import autocast, device_name, resolve_device, seed_everything
# The training data (moved down a floor: `train fsr` trains on the same batches); `augment` is
# re-exported for the tests that check it here.
from sodtool.detdata import DetectionDataset, MixedStepBatchSampler, augment, collate  # noqa: F401
from sodtool.engine import (
    TENSORBOARD_DIR,
    MetricsLog,
    StepBatchSampler,
    all_finite,
    close_run_dir,
    last_record,
    load_resume,
    open_run_dir,
    resume_position,
    save_training_state,
    stop_requested,
)
from sodtool.errors import InputError, NonFiniteLossError
from sodtool.evaluate import coco_evaluate
from sodtool.models.detector_weights import (
    TRAIN_FORMAT,
    load_backbone_weights,
    load_state_into,
    load_trunk,
    read_detector_checkpoint,
    save_detector,
)
from sodtool.models.detectors import LoadedDetector, detect_split
from sodtool.models.frcnn import ARCHS, FAMILY, build_detector, resolve_build
from sodtool.models.ssd import ARCHS as SSD_ARCHS, FAMILIES as SSD_FAMILIES, build_ssd, load_state as load_ssd_state
from sodtool.provenance import gather, read_record, split_digests, write_record

STAGE = "train-detector"

# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

# Presets (PRESETS, SSD_PRESETS) and the config: sodtool.configs.train_detector.
# Options of the Faster R-CNN build, refused with --detector ssd / mdssd.
FRCNN_ONLY = ("min_size", "max_size", "fpn_channels", "returned_layers", "anchor_sizes", "roi_batch_size",
              "roi_positive_fraction", "representation_size", "rpn_pre_nms_train", "rpn_post_nms_train",
              "rpn_post_nms_test", "backbone_weights")

# Fields that may change between a run and its resumption (they steer the run, not its result).
RESUME_FREE = frozenset({"device", "workers", "resume", "checkpoint_every", "log_every", "eval", "eval_score_thresh",
                         "eval_batch_size", "out", "stop_after", "tensorboard"})


def resolve_train_config(cfg: TrainDetectorConfig, num_train_images: int | None = None) -> TrainDetectorConfig:
    """Fill the None fields from the preset; turn epochs into iterations."""
    families = (FAMILY, *SSD_FAMILIES)
    if cfg.detector not in families:
        raise InputError(f"unknown detector '{cfg.detector}' (choose from {', '.join(families)})")
    one_stage = cfg.detector in SSD_FAMILIES
    presets, archs = (SSD_PRESETS, SSD_ARCHS) if one_stage else (PRESETS, ARCHS)
    if cfg.preset not in presets:
        raise InputError(f"unknown preset '{cfg.preset}' for --detector {cfg.detector} "
                         f"(choose from {', '.join(presets)})")
    if one_stage:
        given = [f for f in FRCNN_ONLY if getattr(cfg, f) is not None] + (["train_sizes"] if cfg.train_sizes else [])
        if given:
            raise InputError(f"--{given[0].replace('_', '-')} is a Faster R-CNN option; --detector {cfg.detector} "
                             "resizes every image to --size")
    elif cfg.size is not None:
        raise InputError("--size is the input size of --detector ssd / mdssd; Faster R-CNN takes --min-size / --max-size")
    if cfg.extra_ratio is not None and not cfg.extra_data:
        raise InputError("--extra-ratio is the share of --extra-data images: give --extra-data too")
    if cfg.reinit_heads and cfg.weights is None:
        raise InputError("--reinit-heads keeps the trunk of --weights: give --weights too")
    check_values(cfg)
    p = {"warmup_factor": 0.001, **presets[cfg.preset]}
    if cfg.arch is not None and cfg.arch not in archs:
        raise InputError(f"unknown {cfg.detector} architecture '{cfg.arch}' (choose from {', '.join(archs)})")
    if cfg.arch is not None and cfg.arch != p["arch"] and not one_stage:
        # The preset's build options are for its own trunk; another trunk gets its defaults.
        for k in ("fpn_channels", "returned_layers", "anchor_sizes", "representation_size"):
            p[k] = None
    if one_stage and cfg.arch is not None and cfg.arch != p["arch"] and cfg.size is None:
        p["size"] = 300 if cfg.arch == "vgg16" else 320  # the preset's size is for its own trunk
    if cfg.weights is not None and cfg.arch is None:
        p["arch"] = None  # the weights file decides
    if cfg.reinit_heads and not one_stage:
        # The new heads take the file's structure unless an option says otherwise: the preset's
        # build options are for a model built from scratch.
        for k in ("fpn_channels", "returned_layers", "anchor_sizes", "representation_size"):
            p[k] = None
    if cfg.extra_data:
        p["extra_ratio"] = 0.5
    changes = {k: v for k, v in p.items() if getattr(cfg, k) is None}
    changes["extra_data"] = tuple(str(d) for d in cfg.extra_data)
    if cfg.epochs is not None and cfg.iterations is None:
        if num_train_images is None:
            raise ValueError("epochs need the number of training images")
        changes["iterations"] = max(1, math.ceil(cfg.epochs * num_train_images / (cfg.batch_size or p["batch_size"])))
    iters = cfg.iterations if cfg.iterations is not None else changes["iterations"]
    if cfg.milestones is None and iters != p["iterations"]:
        # The preset's decay points are for its own length: keep them at the same fractions.
        changes["milestones"] = tuple(max(1, round(m * iters / p["iterations"])) for m in p["milestones"])
    out = replace(cfg, **changes)
    check_values(out)  # the preset's values too
    return out


def _finite(v) -> bool:
    return v is not None and math.isfinite(v)


def check_values(cfg: TrainDetectorConfig) -> None:
    """Check every given option's value (InputError naming it); None fields are the preset's, checked
    once filled. Called before any file is read."""
    checks = [
        ("iterations", lambda v: v >= 1, "at least 1"),
        ("batch_size", lambda v: v >= 1, "at least 1"),
        ("epochs", lambda v: _finite(v) and v > 0, "a finite number > 0"),
        ("lr", lambda v: _finite(v) and v > 0, "a finite number > 0"),
        ("momentum", lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
        ("weight_decay", lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
        ("warmup_iters", lambda v: v >= 0, "at least 0"),
        ("warmup_factor", lambda v: 0.0 < v <= 1.0, "in (0, 1]"),
        ("gamma", lambda v: _finite(v) and v > 0, "a finite number > 0"),
        ("clip_grad_norm", lambda v: _finite(v) and v >= 0, "a norm >= 0 (0: no clipping)"),
        ("extra_ratio", lambda v: _finite(v) and 0.0 < v < 1.0, "a share in (0, 1)"),
        ("eval_score_thresh", lambda v: 0.0 <= v <= 1.0, "a score in [0, 1]"),
        ("checkpoint_every", lambda v: v >= 1, "at least 1"),
        ("log_every", lambda v: v >= 1, "at least 1"),
    ]
    for name, ok, what in checks:
        v = getattr(cfg, name)
        if v is not None and not ok(v):
            raise InputError(f"--{name.replace('_', '-')} must be {what}, got {v}")


def _build_options(cfg: TrainDetectorConfig) -> dict:
    opts: dict[str, Any] = {"min_size": cfg.min_size, "max_size": cfg.max_size}
    # Config field -> build_detector option; a None field leaves the build's default.
    for field_name, option in (("fpn_channels", "fpn_channels"), ("returned_layers", "returned_layers"),
                               ("anchor_sizes", "anchor_sizes"), ("roi_batch_size", "box_batch_size_per_image"),
                               ("representation_size", "representation_size"),
                               ("roi_positive_fraction", "box_positive_fraction"),
                               ("rpn_pre_nms_train", "rpn_pre_nms_top_n_train"),
                               ("rpn_post_nms_train", "rpn_post_nms_top_n_train"),
                               ("rpn_post_nms_test", "rpn_post_nms_top_n_test")):
        value = getattr(cfg, field_name)
        if value is not None:
            opts[option] = value
    if cfg.returned_layers is not None:
        opts["returned_layers"] = list(cfg.returned_layers)
    if cfg.anchor_sizes is not None:
        opts["anchor_sizes"] = [[int(s)] for s in cfg.anchor_sizes]  # one size per feature level
    if cfg.backbone_weights is not None:
        opts["norm"] = "frozen_bn"  # torchvision's choice with a pretrained trunk
    return opts


def _initial_model(cfg: TrainDetectorConfig, categories) -> tuple[nn.Module, str, dict, dict]:
    """Build the model to train and load --weights / --backbone-weights into it.

    Returns (model, arch, build, info). Faster R-CNN: with --weights the structure comes from the
    file (a sodtool model.pt's build, or torchvision's layout for a torchvision state dict); the
    image sizes and sampling options come from the config. SSD / MDSSD: the configured family
    and trunk; --weights loads every tensor of the file that fits (an ssd300_vgg16 file: all of
    SSD but a class head of another class count, MDSSD's shared trunk). --reinit-heads (either
    family): only the trunk is loaded, from a file of any class count; the heads stay new, and
    info counts the tensors loaded and left.
    """
    if cfg.detector in SSD_FAMILIES:
        return _initial_one_stage(cfg, categories)
    info: dict[str, Any] = {}
    num_classes = categories.num_classes + 1
    if cfg.weights is not None:
        f = read_detector_checkpoint(cfg.weights, categories, min_size=cfg.min_size, max_size=cfg.max_size,
                                     arch=cfg.arch, any_classes=cfg.reinit_heads)
        if f.family != FAMILY:
            raise InputError(f"{f.path.name} holds a {f.family} detector; --detector {cfg.detector} needs a "
                             f"{cfg.detector} one")
        arch, build, sd = f.arch, f.build, f.state
        if cfg.reinit_heads:
            # The file's structure, reshaped by every build option given: the heads are new anyway.
            build.update({k: v for k, v in _build_options(cfg).items() if v is not None})
            model = build_detector(arch, num_classes, **build)
            loaded, left = load_trunk(model, sd, f.path, arch)
            info.update(weights=f.format, weight_tensors_loaded=loaded, weight_tensors_left=left)
            log(f"--reinit-heads: {loaded} trunk tensors loaded from {f.path.name}, {left} left new")
            return model, arch, build, info
        if f.label_map is not None:
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
        load_state_into(model, sd, f.path, arch)
        info["weights"] = f.format
    else:
        arch = cfg.arch
        build = resolve_build(arch, **_build_options(cfg))
        model = build_detector(arch, num_classes, **build)
        if cfg.backbone_weights is not None:
            info["backbone_tensors_loaded"] = load_backbone_weights(model, arch, cfg.backbone_weights)
    return model, arch, build, info


def _initial_one_stage(cfg: TrainDetectorConfig, categories) -> tuple[nn.Module, str, dict, dict]:
    """SSD / MDSSD: (model, arch, build {"size"}, info) for `_initial_model`."""
    info: dict[str, Any] = {}
    arch, size = cfg.arch, cfg.size
    if cfg.weights is not None:
        f = read_detector_checkpoint(cfg.weights, None, any_classes=cfg.reinit_heads)
        if f.family not in SSD_FAMILIES:
            raise InputError(f"{f.path.name} holds a {f.family} detector; --detector {cfg.detector} takes SSD or "
                             "MDSSD weights (e.g. torchvision's ssd300_vgg16 file)")
        arch, size = arch or f.arch, size or int(f.build["size"])
        model = build_ssd(cfg.detector, categories.num_classes, arch, size)
        # --reinit-heads: the trunk (backbone and extra layers) only; the box and class heads stay new.
        state = {k: v for k, v in f.state.items() if k.startswith("backbone.")} if cfg.reinit_heads else f.state
        loaded, left = load_ssd_state(model, state, str(f.path))
        info.update(weights=f.format, weight_tensors_loaded=loaded, weight_tensors_left=len(left))
    else:
        model = build_ssd(cfg.detector, categories.num_classes, arch, size)
    return model, arch, {"size": int(size)}, info


def training_scale(split, build: dict, train_sizes: tuple[int, ...]) -> dict:
    """How a Faster R-CNN's training images were resized, for sliced inference to follow
    (`models.detectors.predict_sliced`): {"scale": the median over the split's images of the
    factor torchvision's transform resizes them by (short side to min_size, or the middle of the
    scale jitter, capped by max_size), "tile": the tile side when every image is a tile cut by
    `data slice` (its image entries record their source), else None}."""
    target = float(np.median(train_sizes)) if train_sizes else float(build["min_size"])
    sides = [(float(im["width"]), float(im["height"])) for im in (split.coco.imgs[i] for i in split.image_ids)]
    scales = [min(target / min(w, h), float(build["max_size"]) / max(w, h)) for w, h in sides]
    tiled = bool(split.image_ids) and all("tile" in split.coco.imgs[i] for i in split.image_ids)
    return {"scale": round(float(np.median(scales)), 4) if scales else None,
            "tile": int(max(max(w, h) for w, h in sides)) if tiled else None}


def load_extra_data(cfg: TrainDetectorConfig, categories) -> tuple[list, list]:
    """The --extra-data folders' train splits: (SplitPaths, CocoSplit) lists, in the order given.
    Each must have images and the real data's categories (same ids, same names): a label means
    the same class in both pools."""
    paths, splits = [], []
    for folder in cfg.extra_data:
        p = resolve_split(folder, "train")
        split = load_split(p, skip_invalid=cfg.skip_invalid)
        categories.check_same(split.categories, f"--extra-data {folder}")
        if not split.image_ids:
            raise InputError(f"--extra-data {folder}: its train split has no images")
        paths.append(p)
        splits.append(split)
    return paths, splits


def _lr_factor(cfg: TrainDetectorConfig):
    milestones = sorted(cfg.milestones or ())

    def factor(step: int) -> float:
        f = cfg.gamma ** sum(1 for m in milestones if step >= m)
        if step < cfg.warmup_iters:
            a = step / cfg.warmup_iters
            f *= cfg.warmup_factor * (1 - a) + a
        return f

    return factor


def train_detector(cfg: TrainDetectorConfig) -> dict:
    """Train the baseline Faster R-CNN on `train`; evaluate on `minival`; write RUN/detector/.

    SGD with momentum, linear warm-up, step decay. Writes `config.json` (resolved config) at the
    start, `metrics.jsonl` (every loss term by name, lr, step), `checkpoint.pt` every
    `checkpoint_every` iterations and at the end, then `model.pt` and `manifest.json` (last).
    Rerunning the same command resumes from checkpoint.pt at its step with the same data order.
    --extra-data: each batch slot takes an image of the extra pool with probability extra_ratio
    (`detdata.MixedStepBatchSampler`), within the same iteration budget; metrics.jsonl and the
    manifest count the extra images seen, trained_images.json records them too.
    Returns the metrics (COCO AP of minival under "AP", "AP50", ... when `eval`).
    """
    timer = Timer()
    resolve_train_config(cfg, 0)  # fail fast on a bad option value, detector / preset / arch name
    check_output(cfg.out, "folder", finished=False)
    dev = resolve_device(cfg.device)
    train_paths = resolve_split(cfg.data, cfg.train_split, cfg.train_ann, cfg.train_images)
    val_paths = resolve_split(cfg.data, cfg.val_split, cfg.val_ann, cfg.val_images) if cfg.eval else None
    train = load_split(train_paths, skip_invalid=cfg.skip_invalid)
    cfg = resolve_train_config(cfg, len(train.image_ids))
    val = load_split(val_paths, skip_invalid=cfg.skip_invalid) if val_paths is not None else None
    categories = train.categories
    if val is not None:
        categories.check_same(val.categories, f"{val_paths.ann} vs {train_paths.ann}")
    extra_paths, extras = load_extra_data(cfg, categories)
    if cfg.weights is not None and cfg.backbone_weights is not None:
        raise InputError("give --weights (a whole detector) or --backbone-weights (an ImageNet trunk), not both")
    if cfg.preset == "coco" and cfg.weights is None and cfg.backbone_weights is None:
        warn("the coco preset expects ImageNet trunk weights (--backbone-weights): training from scratch "
             "for 90k iterations falls far short of the paper's baseline")

    # The identities of the images trained on (and of those --weights was trained on, when it
    # records them), for trained_images.json: eval refuses to evaluate the model on them.
    trained_images = gather([(str(cfg.weights), read_record(cfg.weights))] if cfg.weights is not None else [],
                            [d for split in (train, *extras) for d in split_digests(split).values()])

    out = Path(cfg.out)
    ckpt_path = out / "checkpoint.pt"
    seed_everything(cfg.seed)
    model, arch, build, init_info = _initial_model(cfg, categories)
    if cfg.arch is None:
        cfg = replace(cfg, arch=arch)
    inputs = {"train_annotations": file_identity(train_paths.ann),
              **{f"extra_annotations_{i}": file_identity(p.ann) for i, p in enumerate(extra_paths)}}
    state = (load_resume(ckpt_path, cfg, inputs, STAGE, free=RESUME_FREE, restart="pass --no-resume to start over")
             if cfg.resume else None)
    # Inputs are all checked: from here the folder stops looking finished, then changes (with
    # --no-resume, a new folder beside it that replaces it at the end).
    run = open_run_dir(out, True, fresh=not cfg.resume)
    ckpt_path, log_path, model_path = run / "checkpoint.pt", run / "metrics.jsonl", run / "model.pt"
    write_json(run / "config.json", {"config": config_dict(cfg), "arch": arch, "build": build,
                                     "categories": categories.to_json()})
    model.to(dev)
    if dev.type == "cpu":
        # oneDNN's convolutions are faster in channels_last (docs/design_notes.md has the timings).
        # Not on CUDA, where it is unmeasured.
        model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(cfg))

    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    elif run != out:
        log(f"--no-resume: starting over; {out} is replaced once the new run is complete")
    start, _, train_time = resume_position(state, ckpt_path, cfg.iterations, announce=True)
    metrics_log = MetricsLog(log_path, start if state is not None else None,
                             tensorboard=run / TENSORBOARD_DIR if cfg.tensorboard else None)

    workers = cfg.workers if cfg.workers is not None else (4 if dev.type == "cuda" else 0)
    n_extra = sum(len(x.image_ids) for x in extras)
    if extras:
        stream = MixedStepBatchSampler(len(train.image_ids), n_extra, cfg.extra_ratio, cfg.batch_size, cfg.seed, start,
                                       cfg.hflip, cfg.vflip, cfg.rot90)
    else:
        stream = StepBatchSampler(len(train.image_ids), cfg.batch_size, cfg.seed, start, cfg.hflip, cfg.vflip,
                                  cfg.rot90)
    loader = torch.utils.data.DataLoader(
        DetectionDataset(train, *extras), batch_sampler=stream, num_workers=workers, collate_fn=collate,
        pin_memory=dev.type == "cuda", persistent_workers=False,
        # Its own generator: creating the loader must not draw from the global RNG, which a
        # resumed run restores from the checkpoint.
        generator=torch.Generator().manual_seed(cfg.seed))
    if cfg.train_sizes:
        model.transform.min_size = tuple(int(s) for s in cfg.train_sizes)

    model.train()
    # The loss sums of the steps since the last log line; a checkpoint between two lines holds
    # them, so that a resumed run's line equals the uninterrupted run's.
    saved_window = state.get("loss_window", {}) if state is not None else {}
    window: dict[str, float] = {k: float(v) for k, v in saved_window.get("sums", {}).items()}
    window_n = int(saved_window.get("steps", 0))
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
            if not all_finite([loss], ddp=False):
                terms = ", ".join(f"{k}={float(v):.4g}" for k, v in loss_dict.items())
                raise NonFiniteLossError(f"loss is not finite at iteration {step + 1} ({terms}); training stopped, "
                                         f"the last good checkpoint ({ckpt_path}, iteration {last_ckpt}) is kept; "
                                         f"try a lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad_norm:
                norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad_norm))
                window["grad_norm_max"] = max(window.get("grad_norm_max", 0.0), norm)  # before clipping
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
                rec.update({k: round(v if k == "grad_norm_max" else v / window_n, 6) for k, v in window.items()})
                if extras:  # extra images among the done * batch_size seen so far
                    rec["extra_images_seen"] = stream.extra_before(done * cfg.batch_size)
                rec["train_time_s"] = round(train_time, 3)
                metrics_log.write(rec)
                progress.update(task, info=f"loss {rec['loss']:.3f} lr {rec['lr']:.4g}")
                window, window_n = {}, 0
            if done % cfg.checkpoint_every == 0 or done == cfg.iterations or done == cfg.stop_after:
                save_training_state(ckpt_path, {"format": TRAIN_FORMAT, "model": model.state_dict(),
                                                "optimizer": optimizer.state_dict(),
                                                "scheduler": scheduler.state_dict(), "arch": arch, "build": build,
                                                "categories": json.dumps(categories.to_json()),
                                                "loss_window": {"sums": dict(window), "steps": window_n}},
                                    step=done, cfg=cfg, inputs=inputs, stage=STAGE, elapsed_s=train_time)
                last_ckpt = done
            progress.update(task, completed=done)
            if stop_requested(cfg, done):
                return {"stopped_at": done}

    if cfg.detector == FAMILY:
        model.transform.min_size = (int(build["min_size"]),)
    # model.pt and the minival figures below in the layout `crop-rois` and `detect` load it in.
    model.to(memory_format=torch.contiguous_format).eval()
    trained_at = training_scale(train, build, cfg.train_sizes) if cfg.detector == FAMILY else None
    save_detector(model_path, model, arch, build, categories, family=cfg.detector, trained_at=trained_at)

    metrics: dict[str, Any] = {
        "iterations": cfg.iterations, "resumed_from_step": start, "train_time_s": round(train_time, 3),
        "s_per_iteration": round(train_time / max(1, cfg.iterations), 4),
        "images_seen": cfg.iterations * cfg.batch_size, "arch": arch, **init_info,
        "skipped_annotations": {"train": train.skipped_report(), **({"val": val.skipped_report()} if val else {}),
                                **{f"extra_{i}": x.skipped_report() for i, x in enumerate(extras)}},
    }
    if trained_at:
        metrics["trained_at"] = trained_at
    if extras:
        metrics.update(extra_images=n_extra, extra_images_seen=stream.extra_before(cfg.iterations * cfg.batch_size))
    final = last_record(log_path, "loss")
    if final:
        metrics["final_loss"] = final["loss"]
    if val is not None:
        det = LoadedDetector(model=model, categories=categories, arch=arch, identity={}, build=build,
                             family=cfg.detector)
        eval_timer = Timer()
        results = detect_split(det, val, score_thresh=cfg.eval_score_thresh, max_per_image=100,
                               batch_size=cfg.eval_batch_size, description=f"eval {cfg.val_split}", amp=cfg.amp)
        ev = coco_evaluate(val.coco, results)
        metrics["eval_split"] = cfg.val_split
        metrics["eval_images"] = len(val.image_ids)
        metrics["eval_time_s"] = round(eval_timer.elapsed, 3)
        metrics.update({k: v for k, v in ev.items()})
    write_record(run, *trained_images)
    write_manifest(run, "train_detector", cfg,
                   inputs={"train_annotations": train_paths.ann,
                           **{f"extra_annotations_{i}": p.ann for i, p in enumerate(extra_paths)},
                           "val_annotations": val_paths.ann if val_paths else None,
                           "weights": cfg.weights, "backbone_weights": cfg.backbone_weights},
                   metrics=metrics, seed=cfg.seed, device=device_name(dev), wall_time_s=timer.elapsed)
    close_run_dir(run, out, True)
    shown = {k: metrics[k] for k in ("arch", "iterations", "resumed_from_step", "train_time_s", "final_loss",
                                     "extra_images_seen") if k in metrics}
    shown.update({k: metrics[k] for k in ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large") if k in metrics})
    summary_table(f"train detector -> {out}", shown)
    return metrics


