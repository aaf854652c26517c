"""`sodtool train fsr`: feature-level super-resolution of small proposals (Noh et al., ICCV 2019) on a
trained `train detector` Faster R-CNN, or one of its two controls.

The three training steps of the paper's Sec. 4.3, with the trunk (and so the SR target
extractor, which is the trunk run atrous) and the RPN frozen throughout:

1. the base detector: `sodtool train detector` (its model.pt is --detector);
2. `iterations - finetune_iterations` steps of the GAN (`models.fsr`): per step, RoIs sampled as
   torchvision samples them for the box head; the generator G step on
   content_weight * L_cont (Eq. 4, against the extractor's targets T^1.0 for the pairs whose
   full-size side is in [pair_min_size, 2 * small_size)) + adv_weight * L_gen (Eq. 5) +
   det_weight * (the small predictor's Fast R-CNN losses on the small RoIs' super-resolved
   features G(F^1.0), which train the small head and predictor too); then the discriminator step
   on L_dis (Eq. 6). The small-head control has no G and no D: its small head and predictor learn
   from the small RoIs' own pooled features. The unmatched-target control takes the targets from
   the plain backbone on the full-size image;
3. `finetune_iterations` steps fine-tuning the small head and predictor (on G's output, G frozen)
   and the large ones (on the RoIs that are not small only), everything else frozen.

On the training engine (`sodtool.engine`) as `train detector`: `checkpoint.pt` (format
`sodtool.fsr-train/1`: model, discriminator, the three optimisers, step, every RNG state, the loss
window, resolved config) every `checkpoint_every` steps and at the end; rerunning the same command
resumes with the same data order and ends with the same weights, bit for bit, as an uninterrupted
run (CPU, same thread count); `metrics.jsonl` logs every loss term by name; a non-finite loss
stops the run with the last checkpoint kept. The output, `model.pt`, is a detector of family
`fsr` (`models.detector_weights`), which `detect`, `eval --detector`, `crop-rois --detector fsr`
and `predict` take as they take the base detector's.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from sodtool.artefacts import Timer, check_output, config_dict, file_identity, write_json, write_manifest
from sodtool.coco import load_split, resolve_split
from sodtool.configs.train_fsr import PRESETS, TrainFSRConfig
from sodtool.console import log, make_progress, summary_table
from sodtool.detdata import DetectionDataset, collate
from sodtool.device import autocast, device_name, resolve_device, seed_everything
from sodtool.engine import (
    TENSORBOARD_DIR,
    LossWindow,
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
from sodtool.models import fsr
from sodtool.models.detector_weights import FSR_TRAIN_FORMAT, build_from_file, read_detector_checkpoint, save_detector
from sodtool.models.detectors import LoadedDetector, detect_split
from sodtool.models.frcnn import FAMILY as FRCNN
from sodtool.provenance import gather, read_record, split_digests, write_record

STAGE = "train-fsr"

# Presets and the config: sodtool.configs.train_fsr.

# Fields that may change between a run and its resumption (they steer the run, not its result).
RESUME_FREE = frozenset({"device", "workers", "resume", "checkpoint_every", "log_every", "eval", "eval_score_thresh",
                         "eval_batch_size", "out", "stop_after", "tensorboard"})


def _finite(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def check_values(cfg: TrainFSRConfig) -> None:
    """Every given option's value (InputError naming it); None fields are the preset's, checked once filled."""
    checks = [
        ("iterations", lambda v: v >= 1, "at least 1"),
        ("finetune_iterations", lambda v: v >= 0, "at least 0"),
        ("batch_size", lambda v: v >= 1, "at least 1"),
        ("lr", lambda v: _finite(v) and v > 0, "a finite number > 0"),
        ("momentum", lambda v: _finite(v) and 0.0 <= v < 1.0, "in [0, 1)"),
        ("weight_decay", lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
        ("g_lr", lambda v: _finite(v) and v > 0, "a finite number > 0"),
        ("d_lr", lambda v: _finite(v) and v > 0, "a finite number > 0"),
        ("content_weight", lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
        ("adv_weight", lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
        ("det_weight", lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
        ("small_size", lambda v: v >= 1, "at least 1 px"),
        ("pair_min_size", lambda v: v >= 1, "at least 1 px"),
        ("gen_blocks", lambda v: v >= 1, "at least 1"),
        ("gen_width", lambda v: v >= 1, "at least 1"),
        ("disc_hidden", lambda v: v >= 1, "at least 1"),
        ("workers", lambda v: v >= 0, "at least 0"),
        ("checkpoint_every", lambda v: v >= 1, "at least 1"),
        ("log_every", lambda v: v >= 1, "at least 1"),
        ("eval_score_thresh", lambda v: _finite(v) and 0.0 <= v <= 1.0, "a score in [0, 1]"),
        ("eval_batch_size", lambda v: v >= 1, "at least 1"),
    ]
    for name, ok, what in checks:
        v = getattr(cfg, name)
        if v is not None and not ok(v):
            raise InputError(f"--{name.replace('_', '-')} must be {what}, got {v}")
    if cfg.control not in fsr.CONTROLS:
        raise InputError(f"--control must be one of {', '.join(fsr.CONTROLS)}, got '{cfg.control}'")
    if cfg.pool not in fsr.POOLS:
        raise InputError(f"--pool must be one of {', '.join(fsr.POOLS)}, got '{cfg.pool}'")
    if cfg.iterations is not None and cfg.finetune_iterations is not None and cfg.finetune_iterations > cfg.iterations:
        raise InputError(f"--finetune-iterations ({cfg.finetune_iterations}) must be at most --iterations "
                         f"({cfg.iterations}): they are the last of them")
    if cfg.small_size is not None and cfg.pair_min_size is not None and cfg.pair_min_size >= 2 * cfg.small_size:
        raise InputError(f"--pair-min-size must be below 2 x --small-size ({2 * cfg.small_size} px), "
                         f"got {cfg.pair_min_size}")


def resolve_config(cfg: TrainFSRConfig) -> TrainFSRConfig:
    """Fill the None fields from the preset; check every value."""
    if cfg.preset not in PRESETS:
        raise InputError(f"unknown preset '{cfg.preset}' for train fsr (choose from {', '.join(PRESETS)})")
    check_values(cfg)
    p = PRESETS[cfg.preset]
    changes = {k: v for k, v in p.items() if getattr(cfg, k) is None}
    if cfg.iterations is not None and cfg.finetune_iterations is None:
        # The preset's fine-tuning share of its own length.
        changes["finetune_iterations"] = round(p["finetune_iterations"] * cfg.iterations / p["iterations"])
    out = replace(cfg, **changes)
    if out.pair_min_size is None:
        out = replace(out, pair_min_size=max(1, out.small_size // 2))
    check_values(out)
    return out


def _heads_params(model: fsr.FSRFasterRCNN) -> list[torch.nn.Parameter]:
    heads = model.roi_heads
    mods = [heads.small_head, heads.small_predictor, heads.box_head, heads.box_predictor]
    return [p for m in mods for p in m.parameters() if p.requires_grad]


def _terms_line(terms: dict) -> str:
    return ", ".join(f"{k}={float(v):.4g}" for k, v in terms.items())


def train_fsr(cfg: TrainFSRConfig) -> dict:
    """Train the feature-SR detector (or a control) on `train`; evaluate it on `val_split`; write
    OUT/: config.json, metrics.jsonl, checkpoint.pt, model.pt (family `fsr`), trained_images.json
    and manifest.json (last). Returns the metrics (COCO AP of the val split when `eval`, and how
    many of its proposals went through the small branch)."""
    timer = Timer()
    resolve_config(cfg)  # fail fast on a bad option value or preset name
    check_output(cfg.out, "folder", finished=False)
    dev = resolve_device(cfg.device)
    train_paths = resolve_split(cfg.data, cfg.train_split, cfg.train_ann, cfg.train_images)
    val_paths = resolve_split(cfg.data, cfg.val_split, cfg.val_ann, cfg.val_images) if cfg.eval else None
    train = load_split(train_paths, skip_invalid=cfg.skip_invalid)
    cfg = resolve_config(cfg)
    val = load_split(val_paths, skip_invalid=cfg.skip_invalid) if val_paths is not None else None
    categories = train.categories
    if val is not None:
        categories.check_same(val.categories, f"{val_paths.ann} vs {train_paths.ann}")
    f = read_detector_checkpoint(cfg.detector, categories)
    if f.family != FRCNN:
        raise InputError(f"{f.path.name} holds a {f.family} detector; train fsr starts from a Faster R-CNN "
                         "(`sodtool train detector --detector frcnn`)")
    if f.label_map is not None:
        raise InputError(f"{f.path.name} is a {f.num_classes}-class COCO model; fine-tune it on the dataset first "
                         "(`sodtool train detector --weights ...`), then train fsr from that model.pt")

    # The images learnt from: the train split's, and those the base detector records.
    trained_images = gather([(str(f.path), read_record(f.path))], split_digests(train).values())

    out = Path(cfg.out)
    seed_everything(cfg.seed)
    model = fsr.from_detector(build_from_file(f), f.arch, control=cfg.control, small_size=cfg.small_size,
                              pool=cfg.pool, gen_blocks=cfg.gen_blocks, gen_width=cfg.gen_width)
    generator = model.roi_heads.generator
    disc = fsr.discriminator_for(model, cfg.disc_hidden) if generator is not None else None
    build = fsr.fsr_build(f.build, model)
    inputs = {"train_annotations": file_identity(train_paths.ann), "detector": file_identity(f.path)}
    state = (load_resume(out / "checkpoint.pt", cfg, inputs, STAGE, free=RESUME_FREE,
                         restart="pass --no-resume to start over") if cfg.resume else None)
    run = open_run_dir(out, True, fresh=not cfg.resume)
    ckpt_path, log_path, model_path = run / "checkpoint.pt", run / "metrics.jsonl", run / "model.pt"
    write_json(run / "config.json", {"config": config_dict(cfg), "arch": f.arch, "build": build,
                                     "categories": categories.to_json()})

    # Sec. 4.3: the trunk (the extractor is the trunk) and the RPN stay as the base detector has them.
    for p in [*model.backbone.parameters(), *model.rpn.parameters()]:
        p.requires_grad_(False)
    model.to(dev)
    if dev.type == "cpu":
        model.to(memory_format=torch.channels_last)  # oneDNN's convolutions are faster so (train detector)
    opt_heads = torch.optim.SGD(_heads_params(model), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    opt_g = torch.optim.Adam(generator.parameters(), lr=cfg.g_lr, betas=(0.5, 0.999)) if generator is not None else None
    opt_d = None
    if disc is not None:
        disc.to(dev)
        opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.d_lr, betas=(0.5, 0.999))

    if state is not None:
        model.load_state_dict(state["model"])
        opt_heads.load_state_dict(state["opt_heads"])
        if disc is not None:
            disc.load_state_dict(state["disc"])
            opt_g.load_state_dict(state["opt_g"])
            opt_d.load_state_dict(state["opt_d"])
    elif run != out:
        log(f"--no-resume: starting over; {out} is replaced once the new run is complete")
    start, _, train_time = resume_position(state, ckpt_path, cfg.iterations, announce=True)
    metrics_log = MetricsLog(log_path, start if state is not None else None,
                             tensorboard=run / TENSORBOARD_DIR if cfg.tensorboard else None)

    workers = cfg.workers if cfg.workers is not None else (4 if dev.type == "cuda" else 0)
    stream = StepBatchSampler(len(train.image_ids), cfg.batch_size, cfg.seed, start, cfg.hflip, False, False)
    loader = torch.utils.data.DataLoader(
        DetectionDataset(train), batch_sampler=stream, num_workers=workers, collate_fn=collate,
        pin_memory=dev.type == "cuda", persistent_workers=False,
        # Its own generator: creating the loader must not draw from the global RNG (restored on resume).
        generator=torch.Generator().manual_seed(cfg.seed))

    model.train()  # the heads and G; FSRFasterRCNN.train keeps trunk, RPN and resize as they are
    if disc is not None:
        disc.train()
    window = LossWindow(state.get("loss_window") if state is not None else None)
    gan_steps = cfg.iterations - cfg.finetune_iterations
    last_ckpt = start
    seg_timer, seg_base = Timer(), train_time
    it = iter(loader)
    with make_progress() as progress:
        task = progress.add_task(f"train fsr ({cfg.control})", total=cfg.iterations, completed=start, info="")
        for step in range(start, cfg.iterations):
            images, targets = next(it)
            images = [im.to(dev, non_blocking=True).float().div_(255.0) for im in images]
            targets = [{"boxes": t["boxes"].to(dev), "labels": t["labels"].to(dev)} for t in targets]
            where = f"step {step + 1}"
            kept = f"the last good checkpoint ({ckpt_path}, step {last_ckpt}) is kept"
            if step < gan_steps:
                terms = _gan_step(model, disc, opt_heads, opt_g, opt_d, images, targets, cfg, dev, where, kept)
            else:
                terms = _finetune_step(model, opt_heads, images, targets, cfg, dev, where, kept)
            window.add(terms, len(images))
            done = step + 1
            train_time = seg_base + seg_timer.elapsed
            if done % cfg.log_every == 0 or done == cfg.iterations:
                means, _ = window.flush()
                rec = {"step": done, "phase": "gan" if step < gan_steps else "finetune"}
                rec.update({k: round(v, 6) for k, v in means.items()})
                rec["train_time_s"] = round(train_time, 3)
                metrics_log.write(rec)
                if "loss" in rec:
                    progress.update(task, info=f"{rec['phase']} loss {rec['loss']:.3f}")
            if done % cfg.checkpoint_every == 0 or done == cfg.iterations or done == cfg.stop_after:
                ckpt = {"format": FSR_TRAIN_FORMAT, "model": model.state_dict(), "opt_heads": opt_heads.state_dict(),
                        "arch": f.arch, "build": build, "categories": json.dumps(categories.to_json()),
                        "loss_window": window.state()}
                if disc is not None:
                    ckpt.update(disc=disc.state_dict(), opt_g=opt_g.state_dict(), opt_d=opt_d.state_dict())
                save_training_state(ckpt_path, ckpt, step=done, cfg=cfg, inputs=inputs, stage=STAGE,
                                    elapsed_s=train_time)
                last_ckpt = done
            progress.update(task, completed=done)
            if stop_requested(cfg, done):
                return {"stopped_at": done}

    model.to(memory_format=torch.contiguous_format).eval()
    save_detector(model_path, model, f.arch, build, categories, family=fsr.FAMILY)

    metrics: dict[str, Any] = {
        "iterations": cfg.iterations, "gan_iterations": gan_steps, "finetune_iterations": cfg.finetune_iterations,
        "resumed_from_step": start, "train_time_s": round(train_time, 3),
        "s_per_iteration": round(train_time / max(1, cfg.iterations), 4), "arch": f.arch, "control": cfg.control,
        "small_size": cfg.small_size, "sub_layer": model.fsr_options["sub_layer"],
        "skipped_annotations": {"train": train.skipped_report(), **({"val": val.skipped_report()} if val else {})},
    }
    final = last_record(log_path, "loss")
    if final:
        metrics["final_loss"] = final["loss"]
    if val is not None:
        det = LoadedDetector(model=model, categories=categories, arch=f.arch, identity={}, build=build,
                             family=fsr.FAMILY)
        model.roi_heads.sr_counts = {"proposals": 0, "small": 0}
        eval_timer = Timer()
        results = detect_split(det, val, score_thresh=cfg.eval_score_thresh, max_per_image=100,
                               batch_size=cfg.eval_batch_size, description=f"eval {cfg.val_split}", amp=cfg.amp)
        ev = coco_evaluate(val.coco, results)
        counts = model.roi_heads.sr_counts
        metrics.update(eval_split=cfg.val_split, eval_images=len(val.image_ids), eval_time_s=round(eval_timer.elapsed, 3),
                       eval_proposals=counts["proposals"], eval_small_proposals=counts["small"])
        metrics.update(ev)
    write_record(run, *trained_images)
    write_manifest(run, "train_fsr", cfg,
                   inputs={"detector": f.path, "train_annotations": train_paths.ann,
                           "val_annotations": val_paths.ann if val_paths else None},
                   metrics=metrics, seed=cfg.seed, device=device_name(dev), wall_time_s=timer.elapsed)
    close_run_dir(run, out, True)
    shown = {k: metrics[k] for k in ("control", "arch", "iterations", "resumed_from_step", "train_time_s",
                                     "final_loss", "eval_small_proposals", "eval_proposals") if k in metrics}
    shown.update({k: metrics[k] for k in ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large") if k in metrics})
    summary_table(f"train fsr -> {out}", shown)
    return metrics


def _check(terms: dict, where: str, kept: str) -> None:
    if terms and not all_finite(list(terms.values()), ddp=False):
        raise NonFiniteLossError(f"loss is not finite at {where} ({_terms_line(terms)}); training stopped, {kept}; "
                                 "try a lower --lr / --g-lr / --d-lr")


def _gan_step(model, disc, opt_heads, opt_g, opt_d, images, targets, cfg: TrainFSRConfig, dev, where: str,
              kept: str) -> dict:
    """Step 2 of Sec. 4.3: one G step (with the small head and predictor), then one D step.
    Returns the step's terms (detached or not; the window detaches them)."""
    terms: dict[str, torch.Tensor] = {}
    gen = model.roi_heads.generator
    with autocast(dev, enabled=cfg.amp):
        s = fsr.sample(model, images, targets)
        pairs = fsr.pair_features(model, s, cfg.pair_min_size, 2 * cfg.small_size) if gen is not None else None
        sr = None
        if pairs is not None:
            sr = gen(pairs.lr, pairs.lr_sub)
            terms["loss_content"] = fsr.content_loss(sr, pairs.target)
            terms["loss_adv"] = fsr.generator_adv_loss(disc(sr))
        small = fsr.small_losses(model, s, train_generator=True)
    parts = []
    if pairs is not None:
        parts += [cfg.content_weight * terms["loss_content"], cfg.adv_weight * terms["loss_adv"]]
    if small is not None:
        terms.update(small)
        parts += [cfg.det_weight * (small["loss_small_classifier"] + small["loss_small_box_reg"])]
    if parts:
        loss = torch.stack([p.float() for p in parts]).sum()
        terms["loss"] = loss
        _check(terms, where, kept)
        opt_heads.zero_grad(set_to_none=True)
        if opt_g is not None:
            opt_g.zero_grad(set_to_none=True)
        loss.backward()
        if opt_g is not None:
            opt_g.step()
        opt_heads.step()
    if pairs is not None:
        with autocast(dev, enabled=cfg.amp):
            real, fake = disc(pairs.target), disc(sr.detach())
            loss_d = fsr.discriminator_loss(real, fake)
        _check({"loss_disc": loss_d}, where, kept)
        opt_d.zero_grad(set_to_none=True)  # also drops what G's adversarial term left in D
        loss_d.backward()
        opt_d.step()
        terms["loss_disc"] = loss_d
        terms["d_real"] = torch.sigmoid(real.detach()).mean()
        terms["d_fake"] = torch.sigmoid(fake.detach()).mean()
        terms["pairs"] = torch.tensor(float(pairs.index.numel()))
    terms["small_rois"] = torch.tensor(float(_small_count(model, s)))
    return {k: v.detach() for k, v in terms.items()}


def _finetune_step(model, opt_heads, images, targets, cfg: TrainFSRConfig, dev, where: str, kept: str) -> dict:
    """Step 3 of Sec. 4.3: the small head and predictor (on G's output, G frozen) and the large
    ones (on the RoIs that are not small) fine-tuned on their detection losses."""
    terms: dict[str, torch.Tensor] = {}
    with autocast(dev, enabled=cfg.amp):
        s = fsr.sample(model, images, targets)
        for part in (fsr.small_losses(model, s, train_generator=False), fsr.large_losses(model, s)):
            if part is not None:
                terms.update(part)
    if terms:
        loss = torch.stack([v.float() for v in terms.values()]).sum()
        terms["loss"] = loss
        _check(terms, where, kept)
        opt_heads.zero_grad(set_to_none=True)
        loss.backward()
        opt_heads.step()
    terms["small_rois"] = torch.tensor(float(_small_count(model, s)))
    return {k: v.detach() for k, v in terms.items()}


def _small_count(model, s: fsr.Sampled) -> int:
    """How many of a batch's sampled RoIs are small (area < small_size²)."""
    return int(model.roi_heads.is_small(s.rois[:, 1:]).sum())

