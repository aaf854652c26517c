"""`sodtool train sr`: MSE pretraining of the SR generator (paper Eq. 4 and Sec. 4.2).

The paper initialises the MTGAN generator from "an MSE-based SR network" to avoid bad local
optima; this stage trains exactly that: Generator (sodtool.models.networks) on the HR/LR crop pairs of
an ROI store, pixel MSE (mean over pixels of images in [0, 1]), Adam (lr 1e-4, betas 0.9/0.999).

Inputs: `rois_<split>.h5` (HR crops) and its `rois_<split>_lr.h5` twin (written by
`sodtool downsample`, which records the identity of the HR file it came from; a mismatch is
refused, as are disagreeing category lists). Several pairs may be given (repeated --hr/--lr,
e.g. crops of two datasets): MSE pretraining is class-agnostic, so their categories may differ;
their HR sizes must agree. Each batch comes from one store; an epoch is one epoch of every
store, their batches interleaved in an order drawn from (seed, epoch) (`MultiStoreLoader`), so
the stores are mixed in proportion to their training rows. Held-out rows, `min_native_size`
and the batch-size check apply to each store on its own. (`train mtgan` takes one pair.)

Held-out rows: all the rows of a fixed subset of the store's images (about `val_fraction` of
the rows, at most `val_max`, chosen by `val_seed` and the store's image ids only, so `train sr`
and `train mtgan` hold out the SAME rows; with several stores, per store; `srdata.split_rows`)
are never trained on. They are evaluated every `val_every` iterations and at the end: PSNR
and SSIM (RGB and Y channel, `sodtool.srmetrics`) of the generator and of plain bicubic
upsampling of the LR crop, both against the HR crop, over all held-out rows and over the
"native" ones (see `min_native_size`).

`min_native_size` (px): a crop's native side is the width in source-image pixels of the
square window it was cut from (the store's `window` field). A window smaller than the HR size
was itself UPSAMPLED into the store, so its "HR" crop holds no more detail than a bicubic
upsampling; with `min_native_size=S` only crops with a native side >= S are training targets.
The default 0 trains on every crop.

Outputs (`RUN/sr/`): `generator.pt` (`sodtool.models.networks` layout: "generator", "generator_config"),
`checkpoint.pt` (everything needed to resume: weights, optimiser, step, data position, RNG
states, config), `metrics.jsonl` (one JSON object per line: every term by name, "step",
"lr"), `manifest.json` (written last). Rerunning the same command resumes from
`checkpoint.pt`; on CPU a killed-and-resumed run ends with the same weights, bit for bit, as an
uninterrupted one (same machine and torch thread count: CPU kernels reduce in a thread-count
dependent order, so 1 and 2 threads give slightly different, equally valid, weights).

A non-finite loss stops training with `NonFiniteLossError` (the CLI exits with code 3) and
leaves the last checkpoint untouched.

The store pairing, held-out split and evaluation are `sodtool.srdata`'s; the batch stream,
checkpoint, resumption and metrics log are the training engine's (`sodtool.engine`).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from sodtool import checkpoint
from sodtool.artefacts import Timer, check_output, file_identity, write_manifest
from sodtool.configs.train_sr import PRESETS, TrainSRConfig
from sodtool.console import make_progress, summary_table
from sodtool.device import autocast, device_name, seed_everything
from sodtool.engine import (TENSORBOARD_DIR, BatchStream, LossWindow, MetricsLog, all_finite, check_positive,
                            close_run_dir, due, fill_preset, fmt_terms, last_record, load_resume, open_run_dir,
                            resume_position, save_training_state, setup_device, stop_requested, to_float,
                            use_channels_last, wrap_ddp)
from sodtool.errors import InputError, NonFiniteLossError
from sodtool.models.networks import Generator, generator_checkpoint
from sodtool.provenance import store_record, write_record
from sodtool.srdata import (MultiStoreLoader, check_common, check_enough_rows, concat_held_out, evaluate_generator,
                            input_names, load_held_out, make_train_loader, native_sides, open_pair, row_image_ids,
                            split_rows, store_paths)

STAGE = "train-sr"


def resolve_config(cfg: TrainSRConfig) -> TrainSRConfig:
    """Fill preset values and check every option; InputError names the option at fault."""
    cfg = fill_preset(cfg, PRESETS)
    check_positive(cfg, ("iterations", "batch_size", "channels", "up_channels", "val_every", "log_every",
                         "checkpoint_every", "val_max"))
    check_positive(cfg, ("num_blocks", "min_native_size", "seed", "num_workers", "val_seed"), minimum=0)
    check_common(cfg)
    if not cfg.learning_rate > 0 or not math.isfinite(cfg.learning_rate):
        raise InputError(f"--learning-rate must be a positive number, got {cfg.learning_rate}")
    paths = store_paths(cfg)
    if len(paths) > 1 or isinstance(cfg.hr, (tuple, list)):
        # Several stores: tuples of str, so that config_dict (checkpoint, manifest) is plain data.
        cfg = dataclasses.replace(cfg, hr=tuple(str(h) for h, _ in paths), lr=tuple(str(l) for _, l in paths))
    return cfg


def sr_step(model, opt, x: torch.Tensor, y: torch.Tensor, device) -> torch.Tensor:
    """One MSE step: x LR float [B, 3, s, s], y HR float [B, 3, 4s, 4s] (both [0, 1]). Returns the loss."""
    with autocast(device):
        sr = model(x)
    loss = F.mse_loss(sr.float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


def train_sr(cfg: TrainSRConfig) -> dict:
    """Pretrain the generator with pixel MSE; write RUN/sr/ (see the module docstring)."""
    cfg = resolve_config(cfg)
    timer = Timer()
    device, ddp, rank, world = setup_device(cfg.device)
    main = rank == 0
    out = check_output(cfg.out, "folder", finished=False)

    pairs = [open_pair(h, l) for h, l in store_paths(cfg)]
    pair = pairs[0]
    for other in pairs[1:]:
        if other.hr_size != pair.hr_size:
            raise InputError(f"HR store {other.hr} has {other.hr_size} px crops but {pair.hr} has {pair.hr_size} px: "
                             "the stores trained together must have one crop size")
    splits = []  # per store: (train rows, held-out rows, native bool [rows])
    inputs = {}
    for i, p in enumerate(pairs):
        train_rows, val_rows = split_rows(row_image_ids(p.hr), cfg.val_fraction, cfg.val_max, cfg.val_seed)
        sides = native_sides(p.hr)
        if cfg.min_native_size > 0:
            train_rows = train_rows[sides[train_rows] >= cfg.min_native_size]
        check_enough_rows(len(train_rows), cfg.batch_size, world,
                          f"HR store {p.hr}"
                          + (f" with --min-native-size {cfg.min_native_size}" if cfg.min_native_size else ""))
        splits.append((train_rows, val_rows, sides >= p.hr_size))
        name_hr, name_lr = input_names(i)
        inputs[name_hr], inputs[name_lr] = p.hr_identity, file_identity(p.lr)

    seed_everything(cfg.seed)
    g = Generator(cfg.channels, cfg.up_channels, cfg.num_blocks, long_skip=cfg.long_skip,
                  residual_bicubic=cfg.residual_bicubic).to(device)
    opt = torch.optim.Adam(g.parameters(), lr=cfg.learning_rate, betas=(0.9, 0.999))
    ckpt_path = out / "checkpoint.pt"
    ckpt = load_resume(ckpt_path, cfg, inputs, STAGE) if cfg.resume else None
    if ckpt is not None and set(ckpt.get("inputs", {})) != set(inputs):
        raise InputError(f"{ckpt_path} was trained on {len(ckpt.get('inputs', {})) // 2} store pair(s), "
                         f"not {len(pairs)}; use another --out to train on these")
    if ckpt is not None:
        g.load_state_dict(ckpt["generator"])
        opt.load_state_dict(ckpt["optimizer"])
    step, stream_state, prior_s = resume_position(ckpt, ckpt_path, cfg.iterations, main)
    channels_last = use_channels_last(device, g)
    model = wrap_ddp(g, device, ddp)
    g.train()
    run = open_run_dir(out, main, fresh=not cfg.resume)
    ckpt_path = run / "checkpoint.pt"
    metrics_log = MetricsLog(run / "metrics.jsonl", step if ckpt is not None else None, enabled=main,
                             tensorboard=run / TENSORBOARD_DIR if cfg.tensorboard else None)
    held = concat_held_out([load_held_out(p, v, nat[v]) for p, (_, v, nat) in zip(pairs, splits)]) if main else None
    loaders = [make_train_loader(cfg, p, t, device, rank, world) for p, (t, _, _) in zip(pairs, splits)]
    loader = loaders[0] if len(loaders) == 1 else MultiStoreLoader(loaders, cfg.seed)
    stream = BatchStream(loader, **stream_state)

    def save_state(at: int) -> None:
        if main:
            save_training_state(ckpt_path, {**generator_checkpoint(g), "optimizer": opt.state_dict(),
                                            "loss_window": window.state()}, step=at,
                                cfg=cfg, inputs=inputs, stage=STAGE, elapsed_s=prior_s + timer.elapsed,
                                stream=stream.state())

    def validate(at: int) -> dict:
        res = evaluate_generator(g, held, device) if main else {}
        if res:
            metrics_log.write({"step": at, "split": "val", **res})
        return res

    window = LossWindow(ckpt.get("loss_window") if ckpt is not None else None)  # a resumed log line
    val: dict = {}
    with make_progress() as progress:
        task = progress.add_task("train sr", total=cfg.iterations, completed=step, info="")
        while step < cfg.iterations:
            batch = stream.next()
            x = to_float(batch["lr"], device, channels_last)
            y = to_float(batch["hr"], device, channels_last)
            loss = sr_step(model, opt, x, y, device)
            if not all_finite([loss], ddp):
                raise NonFiniteLossError(
                    f"non-finite MSE loss at iteration {step + 1}; stopped, the last good checkpoint "
                    f"{ckpt_path if ckpt_path.is_file() else '(none yet)'} is kept"
                )
            step += 1
            window.add({"g_mse": loss}, x.shape[0] * world)
            if due(step, cfg.log_every, cfg.iterations):
                terms, rate = window.flush()
                metrics_log.write({"step": step, "epoch": stream.epoch, "lr": opt.param_groups[0]["lr"],
                                   **terms, "crops_per_s": round(rate, 2)})
                progress.update(task, info=fmt_terms(terms) + f" {rate:.1f} crops/s")
            if step % cfg.val_every == 0 and step < cfg.iterations:
                val = validate(step)
                if val:
                    progress.update(task, info=f"val psnr {val['val_sr_psnr_rgb']:.2f} "
                                               f"(bicubic {val['val_bicubic_psnr_rgb']:.2f})")
            progress.update(task, completed=step)
            if due(step, cfg.checkpoint_every, cfg.stop_after):
                save_state(step)
            if stop_requested(cfg, step):
                return {"stopped_at": step}

    val = validate(step)
    metrics = {"iterations": step, "train_crops": int(sum(len(t) for t, _, _ in splits)),
               "val_crops": int(sum(len(v) for _, v, _ in splits)), "min_native_size": cfg.min_native_size, **val,
               "train_time_s": round(prior_s + timer.elapsed, 2),
               # rank 0 writes the log; the other ranks would read it while it is written
               "final_g_mse": last_record(run / "metrics.jsonl", "g_mse").get("g_mse") if main else None}
    if len(pairs) > 1:
        metrics["train_crops_per_store"] = [int(len(t)) for t, _, _ in splits]
        metrics["val_crops_per_store"] = [int(len(v)) for _, v, _ in splits]
    if main:
        checkpoint.save({**generator_checkpoint(g), "stage": STAGE, "step": step, "hr_size": pair.hr_size,
                         "lr_size": pair.lr_size}, run / "generator.pt")
        save_state(step)
        files = {name: path for i, p in enumerate(pairs) for name, path in zip(input_names(i), (p.hr, p.lr))}
        # The images of the training stores (held-out ones too: they come from the same split),
        # for trained_images.json: eval refuses to evaluate this G on them.
        recorded = [store_record(p.hr) for p in pairs]
        write_record(run, set().union(*(d for d, _ in recorded)), [u for _, us in recorded for u in us])
        write_manifest(run, STAGE, cfg, files, metrics, seed=cfg.seed,
                       device=device_name(device), wall_time_s=timer.elapsed)
        close_run_dir(run, out, main)
        summary_table("train sr", {k: v for k, v in metrics.items() if not k.startswith("val_native_ssim")})
    return metrics
