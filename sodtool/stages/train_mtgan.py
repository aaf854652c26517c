"""`sodtool train mtgan`: the multi-task GAN of the paper (Eq. 10 and 11, Sec. 4.2).

The generator starts from the MSE-pretrained `RUN/sr/generator.pt`; the discriminator is a
torchvision ResNet trunk with real/fake, class (K+1) and box heads (sodtool.models.networks). Each
iteration takes one batch (x LR crops, y HR crops, u labels, v raw box deltas) and makes

1. one discriminator step, G fixed: sr = G(x) is computed once and D sees `sr.detach()`;
   L_D = Eq. 11 (`sodtool.losses.discriminator_loss`), optimiser step, LR schedule step;
2. one generator step, D fixed: D's parameters are frozen (requires_grad False, so its
   optimiser has nothing to step), D(sr) with the just-updated D, L_G = Eq. 10
   (`sodtool.losses.generator_loss`), Adam step. The graph of sr is reused: G has not changed.

D stays in training mode in both steps (batch statistics in its BN layers, as SRGAN /
BasicSR train their discriminators) and sees the HR and SR crops of a batch as one joint batch
(`joint_forward`) in both, so real and fake crops are normalised alike and its running
statistics are those of the mixture it is used on at test time.

Defaults are the paper's: alpha = 0.001, beta = gamma = 0.01; Adam for G (lr 1e-4); SGD for D
(lr 0.01, momentum 0.9, weight decay 1e-4) divided by 10 every 40k iterations, 80k iterations
(`--preset paper`). `--preset quick` / `bench` are light CPU configurations (ResNet-18 D from
scratch, trained with Adam: see PRESETS; a few hundred / a few thousand iterations, the D
schedule scaled proportionally). Ablations (paper Table 3): `--no-reg-branch`,
`--no-adv`, `--no-cls`, `--no-reg` (their exact meaning is in sodtool.losses); `--tv-weight`
(Gu et al.'s total variation, 0 = off); `--adversarial paper|nonsaturating`.

Outputs (`RUN/mtgan/`):
- `checkpoint.pt` every `checkpoint_every` iterations (atomic): both networks and configs,
  categories, both optimisers, the D scheduler, the step, the data position (epoch and batches
  taken in it), the torch / numpy / python RNG states, the config and input identities.
  Rerunning the same command resumes from it. On CPU with a fixed seed (and the same torch
  thread count), a run killed at any moment and rerun ends with exactly the same weights as an
  uninterrupted run.
- `metrics.jsonl`: every loss term by name (g_mse, g_adv, g_cls, g_reg, g_tv, g_total,
  d_adv_real, ..., d_total: the ones switched on), "step", "lr_g", "lr_d", "crops_per_s"; and
  held-out lines ("split": "val"): PSNR / SSIM of G and of bicubic, D's class accuracy on HR,
  SR and bicubic crops.
- `samples/iter_NNNNNNN.png`: grids of a few held-out crops, rows = LR (nearest), bicubic, SR, HR.
- `model.pt`: generator + discriminator + configs + categories + loss weights (what `eval` takes).
- `manifest.json`, last.

Exit codes: 2 for bad input (InputError), 3 when a loss becomes NaN / inf (NonFiniteLossError;
the last good checkpoint is kept untouched).

Device: `--device auto|cpu|cuda`. G and D run in channels_last (faster on CPU too). On CUDA:
bf16 autocast (losses in float32), pinned memory and loader workers. Several GPUs: launch with
`torchrun --nproc_per_node=N -m sodtool train mtgan ...`; both networks are wrapped in DDP, each
rank reads a disjoint shard of the rows, only rank 0 writes files (checkpoints hold rank 0's RNG
state; exact resumption is a CPU, single-process guarantee). The CUDA path has not been run on a
GPU yet.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from sodtool import checkpoint
from sodtool.artefacts import Timer, atomic_path, check_output, file_identity, read_manifest, write_manifest
from sodtool.configs.train_mtgan import PRESETS, TrainMTGANConfig
from sodtool.console import log, make_progress, summary_table
from sodtool.device import autocast, device_name, seed_everything
from sodtool.engine import (TENSORBOARD_DIR, BatchStream, LossWindow, MetricsLog, all_finite, check_positive,
                            close_run_dir, due, fill_preset, fmt_terms, last_record, load_resume, open_run_dir,
                            resume_position, save_training_state, setup_device, stop_requested, to_float,
                            use_channels_last, wrap_ddp)
from sodtool.errors import InputError, NonFiniteLossError
from sodtool.losses import LossWeights, discriminator_loss, generator_loss
from sodtool.models.detector_weights import detector_trunk
from sodtool.models.networks import (ARCHS, DiscOut, Discriminator, discriminator_checkpoint, generator_checkpoint,
                                     generator_from_checkpoint, unwrap)
from sodtool.provenance import gather, read_record, store_record, write_record
from sodtool.rescoring import BicubicControl, MtganScorer, wider_than_lr
from sodtool.resample import SCALE, bicubic_up
from sodtool.srdata import (HeldOut, check_common, check_enough_rows, evaluate_generator, label_rows, load_held_out,
                            make_train_loader, native_sides, open_pair, row_image_ids, split_rows)

STAGE = "train-mtgan"

# Presets and the config: sodtool.configs.train_mtgan.
D_OPTIMIZERS = ("sgd", "adam")


def resolve_config(cfg: TrainMTGANConfig) -> TrainMTGANConfig:
    """Fill preset values and check every option; InputError names the option at fault."""
    cfg = fill_preset(cfg, PRESETS)
    check_positive(cfg, ("iterations", "batch_size", "d_lr_step", "val_every", "log_every", "checkpoint_every",
                         "sample_every", "val_max"))
    check_positive(cfg, ("sample_count", "seed", "num_workers", "val_seed", "d_warmup"), minimum=0)
    if cfg.d_warmup >= cfg.iterations:
        raise InputError(f"--d-warmup ({cfg.d_warmup}) must be below --iterations ({cfg.iterations}): G would never train")
    check_common(cfg)
    if cfg.d_optimizer not in D_OPTIMIZERS:
        raise InputError(f"unknown --d-optimizer '{cfg.d_optimizer}' (choose from {', '.join(D_OPTIMIZERS)})")
    if cfg.disc_arch not in ARCHS:
        raise InputError(f"unknown --disc-arch '{cfg.disc_arch}' (choose from {', '.join(ARCHS)})")
    for name in ("g_lr", "d_lr"):
        v = getattr(cfg, name)
        if not (v > 0 and math.isfinite(v)):
            raise InputError(f"--{name.replace('_', '-')} must be a positive number, got {v}")
    if not 0.0 <= cfg.d_momentum < 1.0:
        raise InputError(f"--d-momentum must be in [0, 1), got {cfg.d_momentum}")
    for name in ("d_weight_decay", "d_lr_gamma", "alpha", "beta", "gamma", "tv_weight"):
        v = getattr(cfg, name)
        if not (v >= 0 and math.isfinite(v)):
            raise InputError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {v}")
    if cfg.disc_init is not None and cfg.imagenet_weights is not None:
        raise InputError("give --imagenet-weights or --disc-init (a detector whose trunk initialises D), not both")
    loss_weights(cfg)  # validates alpha / beta / gamma / tv / adversarial
    return cfg


def loss_weights(cfg: TrainMTGANConfig):
    return LossWeights(alpha=cfg.alpha, beta=cfg.beta, gamma=cfg.gamma, tv=cfg.tv_weight, adv=cfg.adv,
                       cls=cfg.cls, reg=cfg.reg and cfg.reg_branch, adversarial=cfg.adversarial)


@torch.no_grad()
def evaluate_discriminator(g, d, held: HeldOut, labels: torch.Tensor, device, batch_size: int = 32,
                           window_sides: Optional[np.ndarray] = None) -> dict[str, float]:
    """Held-out class accuracy of D (eval mode) on HR, SR and bicubic crops: on all rows, and on the
    object rows alone (`_fg_`). SR and bicubic crops go through the very second stages `eval`
    rescores with (`rescoring.MtganScorer`: D sees G's output unclamped, as in training;
    `rescoring.BicubicControl`), in `score_rois`'s layout (channels_last), so these figures are
    what rescoring will see: the SR and bicubic ones for ROIs whose crop window is no wider than
    the LR crop, the HR one for wider ROIs, which rescoring reads from their HR crop. With the
    crops' `window_sides` (float [M], image px) also "read": D's answer on the crop `eval` gives it
    (`rescoring.wider_than_lr`: HR crop for a window wider than the LR crop, else SR)."""
    if len(held.rows) == 0:
        return {}
    g, d = unwrap(g), unwrap(d)
    modes = (g.training, d.training)
    g.eval()
    d.eval()
    methods = {"sr": MtganScorer("sr", g, d), "bicubic": BicubicControl("bicubic", d)}
    wide = None if window_sides is None else wider_than_lr(torch.from_numpy(window_sides), held.lr.shape[-1])
    correct = {"hr": 0, "sr": 0, "bicubic": 0, **({} if wide is None else {"read": 0})}
    correct_fg = dict(correct)  # on the object rows alone: a D that answers "background" everywhere scores 0
    try:
        for i in range(0, len(held.rows), batch_size):
            x = to_float(held.lr[i:i + batch_size], device, channels_last=True)
            u = labels[i:i + batch_size].to(device)
            with autocast(device):
                preds = {"hr": d(to_float(held.hr[i:i + batch_size], device, channels_last=True)).cls.argmax(1),
                         **{k: m(x).probs.argmax(1) for k, m in methods.items()}}
            if wide is not None:
                preds["read"] = torch.where(wide[i:i + batch_size].to(device), preds["hr"], preds["sr"])
            for k, pred in preds.items():
                hit = pred == u
                correct[k] += int(hit.sum().item())
                correct_fg[k] += int((hit & (u > 0)).sum().item())
    finally:
        g.train(modes[0])
        d.train(modes[1])
    n_fg = int((labels > 0).sum().item())
    res = {f"val_d_cls_acc_{k}": v / len(held.rows) for k, v in correct.items()}
    if n_fg:
        res.update({f"val_d_cls_acc_fg_{k}": v / n_fg for k, v in correct_fg.items()}, val_fg_crops=n_fg)
    return res


@torch.no_grad()
def save_sample_grid(g, held: HeldOut, device, path: Path, count: int) -> Optional[np.ndarray]:
    """PNG grid, one column per crop; rows: LR (nearest x4), bicubic, SR (clamped), HR. Returns the
    grid (uint8 [H, W, 3]), or None without held-out crops."""
    n = min(count, len(held.rows))
    if n == 0:
        return None
    g = unwrap(g)
    was = g.training
    g.eval()
    try:
        x = to_float(held.lr[:n], device)
        sr = g(x).float().clamp(0, 1).cpu()
    finally:
        g.train(was)
    x = x.cpu()
    rows = [torch.nn.functional.interpolate(x, scale_factor=SCALE, mode="nearest"),
            bicubic_up(x).clamp(0, 1), sr, held.hr[:n].float() / 255.0]
    s, gap = held.hr.shape[-1], 2
    grid = np.full((4 * s + 3 * gap, n * s + (n - 1) * gap, 3), 255, np.uint8)
    for r, imgs in enumerate(rows):
        tiles = (imgs * 255.0).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        for c in range(n):
            grid[r * (s + gap):r * (s + gap) + s, c * (s + gap):c * (s + gap) + s] = tiles[c]
    with atomic_path(path) as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")
    return grid


def joint_forward(d, real: torch.Tensor, fake: torch.Tensor) -> tuple[DiscOut, DiscOut]:
    """D on real [B, 3, S, S] and fake [B, 3, S, S] crops as ONE batch of 2B: (D(real), D(fake)).

    D's BatchNorm layers then normalise real and fake crops with the same batch statistics. As two
    batches, each would be normalised by its own statistics, so that D could tell them apart by
    those alone, and its class head would be trained on features normalised otherwise than at
    test time, where the running statistics (of these joint batches) are used.
    """
    b = real.shape[0]
    out = d(torch.cat([real, fake]))
    halves = [(t[:b], t[b:]) if t is not None else (None, None) for t in out]
    return DiscOut(*(h[0] for h in halves)), DiscOut(*(h[1] for h in halves))


def train_step(g_model, d_model, d_params, opt_g, opt_d, sched_d, x, y, u, v, w, device, g_step: bool = True):
    """One MTGAN iteration on a batch: a D step (G fixed), then a G step (D fixed) unless `g_step` is False.

    x: LR float [B, 3, s, s]; y: HR float [B, 3, S, S] (both [0, 1]); u: labels int64 [B];
    v: raw box deltas float32 [B, 4]. `g_model` / `d_model` may be DDP wrappers; `d_params` are
    D's trainable parameters. Returns (L_D, L_G, terms dict of detached scalars); L_G is None, and
    the terms are D's alone, for a D-only step. Nothing here
    checks for NaN: the caller does, before anything is saved.
    """
    if g_step:
        with autocast(device):
            sr = g_model(x)
    else:
        # D warm-up: G is fixed, BatchNorm statistics included (eval mode, no graph).
        g = unwrap(g_model)
        g.eval()
        try:
            with autocast(device), torch.no_grad():
                sr = g(x)
        finally:
            g.train()
    # Discriminator step, G fixed: D sees G's output detached.
    with autocast(device):
        d_real, d_fake = joint_forward(d_model, y, sr.detach())
        loss_d, terms_d = discriminator_loss(d_real, d_fake, u, v, w)
    opt_d.zero_grad(set_to_none=True)
    loss_d.backward()
    opt_d.step()
    sched_d.step()
    if not g_step:
        return loss_d, None, terms_d
    # Generator step, D fixed: its parameters are frozen, and the plain module runs (not the DDP
    # wrapper) because no D gradient is reduced in this step. sr's graph is reused: G has not
    # changed since it was computed.
    d = unwrap(d_model)
    for p in d_params:
        p.requires_grad_(False)
    try:
        with autocast(device):
            _, d_sr = joint_forward(d, y, sr)
            loss_g, terms_g = generator_loss(sr, y, d_sr, u, v, w)
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
    finally:
        for p in d_params:
            p.requires_grad_(True)
    opt_g.step()
    return loss_d, loss_g, {**terms_g, **terms_d}


def train_mtgan(cfg: TrainMTGANConfig) -> dict:
    """Train the MTGAN (Eq. 10 / 11) from an MSE-pretrained generator; write RUN/mtgan/."""
    cfg = resolve_config(cfg)
    w = loss_weights(cfg)
    timer = Timer()
    device, ddp, rank, world = setup_device(cfg.device)
    main = rank == 0
    out = check_output(cfg.out, "folder", finished=False)

    pair = open_pair(cfg.hr, cfg.lr)
    read_manifest(cfg.sr, "train-sr")
    g_path = Path(cfg.sr) / "generator.pt"
    train_rows, val_rows = split_rows(row_image_ids(pair.hr), cfg.val_fraction, cfg.val_max, cfg.val_seed)
    check_enough_rows(len(train_rows), cfg.batch_size, world, f"HR store {pair.hr}")
    inputs = {"hr": pair.hr_identity, "lr": file_identity(pair.lr), "sr_generator": file_identity(g_path)}
    if cfg.disc_init is not None:
        # No ImageNet weights can be downloaded, but every pipeline has trained a detector on these
        # images: its trunk has learnt their classes' patterns.
        trunk_arch, trunk_state, det_arch = detector_trunk(cfg.disc_init)
        cfg = dataclasses.replace(cfg, disc_arch=trunk_arch)
        inputs["disc_init"] = file_identity(cfg.disc_init)

    seed_everything(cfg.seed)
    g = generator_from_checkpoint(g_path, device).train()
    d = Discriminator(pair.categories.num_classes, cfg.disc_arch, cfg.imagenet_weights, cfg.reg_branch)
    if cfg.disc_init is not None:
        loaded = d.load_trunk(trunk_state, str(cfg.disc_init))
    d = d.to(device).train()
    if not w.adv:
        # No loss reaches the real/fake head: freeze it, so that DDP does not wait for its gradients.
        d.adv_head.requires_grad_(False)
    d_params = [p for p in d.parameters() if p.requires_grad]
    opt_g = torch.optim.Adam(g.parameters(), lr=cfg.g_lr, betas=(0.9, 0.999))
    if cfg.d_optimizer == "sgd":
        opt_d = torch.optim.SGD(d_params, lr=cfg.d_lr, momentum=cfg.d_momentum, weight_decay=cfg.d_weight_decay)
    else:
        # Decoupled weight decay: with Adam's L2 form, the decay would compete with gradients
        # that beta = gamma = 0.01 have made 100 times smaller.
        opt_d = torch.optim.AdamW(d_params, lr=cfg.d_lr, betas=(0.9, 0.999), weight_decay=cfg.d_weight_decay)
    sched_d = torch.optim.lr_scheduler.StepLR(opt_d, step_size=cfg.d_lr_step, gamma=cfg.d_lr_gamma)

    ckpt_path = out / "checkpoint.pt"
    ckpt = load_resume(ckpt_path, cfg, inputs, STAGE) if cfg.resume else None
    if ckpt is not None:
        g.load_state_dict(ckpt["generator"])
        d.load_state_dict(ckpt["discriminator"])
        opt_g.load_state_dict(ckpt["optimizer_g"])
        opt_d.load_state_dict(ckpt["optimizer_d"])
        sched_d.load_state_dict(ckpt["scheduler_d"])
    if cfg.disc_init is not None and ckpt is None and main:
        log(f"D: {trunk_arch} trunk, {loaded} of {len(d.trunk.state_dict())} tensors from the {det_arch} "
            f"detector {cfg.disc_init}")
    step, stream_state, prior_s = resume_position(ckpt, ckpt_path, cfg.iterations, main)
    channels_last = use_channels_last(device, g, d)
    g_model, d_model = wrap_ddp(g, device, ddp), wrap_ddp(d, device, ddp)
    run = open_run_dir(out, main, fresh=not cfg.resume)
    ckpt_path = run / "checkpoint.pt"
    metrics_log = MetricsLog(run / "metrics.jsonl", step if ckpt is not None else None, enabled=main,
                             tensorboard=run / TENSORBOARD_DIR if cfg.tensorboard else None)
    held_sides = native_sides(pair.hr)[val_rows] if main else None
    held = load_held_out(pair, val_rows, held_sides >= pair.hr_size) if main else None
    held_labels = label_rows(pair.hr, val_rows) if main else None
    loader = make_train_loader(cfg, pair, train_rows, device, rank, world)
    stream = BatchStream(loader, **stream_state)
    categories = pair.categories.to_json()
    extra = {"categories": categories, "loss_weights": dataclasses.asdict(w), "hr_size": pair.hr_size,
             "lr_size": pair.lr_size, "stage": STAGE}

    def save_state(at: int) -> None:
        if main:
            save_training_state(ckpt_path, {**generator_checkpoint(g), **discriminator_checkpoint(d), **extra,
                                            "optimizer_g": opt_g.state_dict(), "optimizer_d": opt_d.state_dict(),
                                            "scheduler_d": sched_d.state_dict(), "loss_window": window.state()},
                                step=at, cfg=cfg, inputs=inputs, stage=STAGE, elapsed_s=prior_s + timer.elapsed,
                                stream=stream.state())

    def validate(at: int) -> dict:
        if not main:
            return {}
        res = {**evaluate_generator(g, held, device),
               **evaluate_discriminator(g, d, held, held_labels, device, window_sides=held_sides)}
        if res:
            metrics_log.write({"step": at, "split": "val", **res})
        return res

    window = LossWindow(ckpt.get("loss_window") if ckpt is not None else None)  # a resumed log line
    last_terms: dict[str, float] = {}
    with make_progress() as progress:
        task = progress.add_task("train mtgan", total=cfg.iterations, completed=step, info="")
        while step < cfg.iterations:
            batch = stream.next()
            x = to_float(batch["lr"], device, channels_last)
            y = to_float(batch["hr"], device, channels_last)
            u = batch["label"].to(device, non_blocking=True)
            v = batch["target"].to(device, non_blocking=True)

            g_step = step >= cfg.d_warmup
            loss_d, loss_g, terms = train_step(g_model, d_model, d_params, opt_g, opt_d, sched_d, x, y, u, v, w, device,
                                               g_step=g_step)
            if not all_finite([loss_d, loss_g] if g_step else [loss_d], ddp):
                bad = {k: float(t) for k, t in terms.items() if not math.isfinite(float(t))}
                raise NonFiniteLossError(
                    f"non-finite loss at iteration {step + 1} ({', '.join(f'{k}={val}' for k, val in bad.items())}); "
                    f"stopped, the last good checkpoint {ckpt_path if ckpt_path.is_file() else '(none yet)'} is kept"
                )
            step += 1
            window.add(terms, x.shape[0] * world)
            if due(step, cfg.log_every, cfg.iterations):
                last_terms, rate = window.flush()
                metrics_log.write({"step": step, "epoch": stream.epoch, "lr_g": opt_g.param_groups[0]["lr"],
                                   "lr_d": opt_d.param_groups[0]["lr"], **last_terms, "crops_per_s": round(rate, 2)})
                progress.update(task, info=fmt_terms(last_terms) + f" {rate:.1f} crops/s")
            if step % cfg.val_every == 0 and step < cfg.iterations:
                validate(step)
            if main and due(step, cfg.sample_every):
                grid = save_sample_grid(g, held, device, run / "samples" / f"iter_{step:07d}.png", cfg.sample_count)
                if grid is not None:
                    metrics_log.image("samples", grid, step)
            progress.update(task, completed=step)
            if due(step, cfg.checkpoint_every, cfg.stop_after):
                save_state(step)
            if stop_requested(cfg, step):
                return {"stopped_at": step}

    val = validate(step)
    if not last_terms and main:  # resumed at the end: nothing new was logged
        rec = last_record(run / "metrics.jsonl", "g_total")
        last_terms = {k: v for k, v in rec.items() if k.startswith(("g_", "d_"))}
    metrics = {"iterations": step, "train_crops": int(len(train_rows)), "val_crops": int(len(val_rows)),
               **{f"final_{k}": v for k, v in last_terms.items()}, **val,
               "train_time_s": round(prior_s + timer.elapsed, 2)}
    if main:
        grid = save_sample_grid(g, held, device, run / "samples" / f"iter_{step:07d}.png", cfg.sample_count)
        if grid is not None:
            metrics_log.image("samples", grid, step)
        checkpoint.save({**generator_checkpoint(g), **discriminator_checkpoint(d), **extra, "step": step},
                        run / "model.pt")
        save_state(step)
        # What G and D learnt from, for trained_images.json (eval refuses to evaluate on it): the
        # store's images, the `train sr` run's G started from, the detector's D's trunk started from.
        own, unrecorded = store_record(pair.hr)
        starts = [(str(cfg.sr), read_record(cfg.sr))]
        if cfg.disc_init is not None:
            starts.append((str(cfg.disc_init), read_record(cfg.disc_init)))
        digests, more = gather(starts, own)
        write_record(run, digests, unrecorded + more)
        write_manifest(run, STAGE, cfg, {"hr": pair.hr, "lr": pair.lr, "sr": g_path,
                                              "imagenet_weights": cfg.imagenet_weights, "disc_init": cfg.disc_init},
                       metrics, seed=cfg.seed,
                       device=device_name(device), wall_time_s=timer.elapsed)
        close_run_dir(run, out, main)
        summary_table("train mtgan", metrics)
    return metrics
