"""`sodtool train detgan`: DetectorGAN (Liu et al., ICCV 2019), trained on patches of a split.

Networks, the PS-GAN set-up and the unroll's scope: `sodtool.models.detgan`. Each iteration
draws `batch_size` real objects of the split (uniformly over its boxes) and the `patch`-px
window around each (placed at random while it holds the object; `sodtool.insertion`): the real
patch y, its boxes (those with at least `min_visibility` of their area inside, clipped), and
the drawn object's box, which G repaints from noise into the synthetic patch G(x).

Two phases (the paper pretrains the generator-discriminator pair and the detector separately,
then trains them jointly):
1. iterations [0, pretrain_iterations): G and the discriminators alone. G: adversarial (global
   PatchGAN on the patch, local PatchGAN on the object crop) + `l1_weight` × BboxLoss (L1
   between the synthetic and the real object crop). The discriminators: Eq. 4's log loss, real
   patches against synthetic ones drawn from a history of `pool_size` (Shrivastava et al.).
2. then, jointly, with the detector `--detector` (a `train detector` Faster R-CNN, pretrained on
   the same split) in the loop, its trunk and RPN frozen: G also minimises `unroll_weight` ×
   L_real(W') (Eq. 3: the detection loss on the real patches after one SGD step of the RoI heads
   on real + synthetic patches) and maximises `syn_weight` × L_syn (the paper's sign: images
   the detector cannot yet predict well); the detector then takes exactly the step that was
   unrolled (plain SGD at `det_lr` on L_real + L_syn). `--no-unroll` drops the L_real(W') term
   (the paper's "DetectorGAN - unrolling") and keeps everything else.

Every random draw of iteration i comes from generators seeded with (seed, i), so the batch and
noise of an iteration do not depend on where a run was resumed; `checkpoint.pt` (every
`checkpoint_every` iterations, atomic) holds the four networks, both optimisers, the history
pool and the step, and rerunning the same command resumes from it to the same weights, bit for
bit, as an uninterrupted run (CPU, same thread count).

Outputs (`RUN/detgan/`): `model.pt` (G, its config, patch size, box margin, categories: what
`sodtool data generate --method detgan` takes), `checkpoint.pt`, `metrics.jsonl` (every loss term
by name, "phase", patches/s and the seconds the detector terms took), `samples/iter_N.png` (rows:
real patch, G's input, synthetic patch), `trained_images.json`, `manifest.json` (last).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sodtool.artefacts import Timer, check_output, file_identity, write_manifest
from sodtool.coco import load_split, resolve_split
from sodtool.configs.train_detgan import TrainDetGANConfig
from sodtool.console import make_progress, summary_table
from sodtool.device import device_name, resolve_device, seed_everything
from sodtool.engine import (TENSORBOARD_DIR, LossWindow, MetricsLog, all_finite, close_run_dir, due, fmt_terms,
                            last_record, load_resume, open_run_dir, resume_position, save_training_state,
                            stop_requested)
from sodtool.errors import InputError, NonFiniteLossError
from sodtool.insertion import crop_window, window_around
from sodtool.models import detgan
from sodtool.models.detector_weights import build_from_file, read_detector_checkpoint
from sodtool.models.networks import set_requires_grad
from sodtool.provenance import gather, read_record, split_digests, write_record

STAGE = "train-detgan"

RESUME_FREE = frozenset({"device", "resume", "checkpoint_every", "log_every", "sample_every", "out", "stop_after",
                         "tensorboard"})


def check_config(cfg: TrainDetGANConfig) -> None:
    """InputError (one line) naming the first option out of range."""
    for name in ("iterations", "batch_size", "channels", "d_channels", "local_size", "log_every", "checkpoint_every",
                 "sample_every", "pool_size"):
        if getattr(cfg, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    for name in ("blocks", "margin", "seed", "pretrain_iterations"):
        if getattr(cfg, name) < 0:
            raise InputError(f"--{name.replace('_', '-')} must be at least 0, got {getattr(cfg, name)}")
    if cfg.patch < 32 or cfg.patch % 4:
        raise InputError(f"--patch must be a multiple of 4 of at least 32 px, got {cfg.patch}")
    if cfg.pretrain_iterations > cfg.iterations:
        raise InputError(f"--pretrain-iterations ({cfg.pretrain_iterations}) exceeds --iterations ({cfg.iterations})")
    for name in ("lr", "det_lr"):
        v = getattr(cfg, name)
        if not (v > 0 and math.isfinite(v)):
            raise InputError(f"--{name.replace('_', '-')} must be a positive number, got {v}")
    for name in ("adv_weight", "local_weight", "l1_weight", "syn_weight", "unroll_weight"):
        v = getattr(cfg, name)
        if not (v >= 0 and math.isfinite(v)):
            raise InputError(f"--{name.replace('_', '-')} must be a number >= 0, got {v}")
    if not 0 < cfg.min_visibility <= 1:
        raise InputError(f"--min-visibility must be in (0, 1], got {cfg.min_visibility}")


# ----------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------

class PatchSampler:
    """Real patches around the split's objects. The split is the small-data regime this method is
    for, so its images stay decoded in memory."""

    def __init__(self, split, patch: int, min_visibility: float) -> None:
        self.split, self.patch, self.min_visibility = split, patch, min_visibility
        self.targets = {iid: split.targets(iid) for iid in split.image_ids}
        self.objects = [(iid, j) for iid in split.image_ids for j in range(len(self.targets[iid]["boxes"]))]
        self._images: dict[int, np.ndarray] = {}

    def image(self, iid: int) -> np.ndarray:
        if iid not in self._images:
            self._images[iid] = self.split.load_image(iid)
        return self._images[iid]

    def sample(self, rng: np.random.Generator, count: int):
        """(patches uint8 [B, 3, P, P], object boxes float [B, 4] xyxy patch px, labels int64 [B],
        targets: per patch {"boxes" [N, 4], "labels" [N]} of every object kept in it)."""
        patches, boxes, labels, targets = [], [], [], []
        for k in rng.integers(0, len(self.objects), size=count):
            iid, j = self.objects[int(k)]
            img, t = self.image(iid), self.targets[iid]
            x0, y0 = window_around(t["boxes"][j], img.shape[:2], self.patch, rng)
            patches.append(torch.from_numpy(np.ascontiguousarray(crop_window(img, x0, y0, self.patch))).permute(2, 0, 1))
            shifted = t["boxes"] - np.array([x0, y0, x0, y0], dtype=np.float32)
            clipped = np.clip(shifted, 0, self.patch)
            area = (shifted[:, 2] - shifted[:, 0]) * (shifted[:, 3] - shifted[:, 1])
            inside = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
            keep = inside >= self.min_visibility * area
            keep[j] = True
            boxes.append(torch.from_numpy(clipped[j].astype(np.float32)))
            labels.append(int(t["labels"][j]))
            targets.append({"boxes": torch.from_numpy(clipped[keep].astype(np.float32)),
                            "labels": torch.from_numpy(t["labels"][keep].astype(np.int64))})
        return torch.stack(patches), torch.stack(boxes), torch.tensor(labels, dtype=torch.int64), targets


class HistoryPool:
    """Shrivastava et al.'s history of synthetic patches for the discriminators: once full, each
    new patch is, with probability 1/2, swapped for a stored one (which the discriminators see
    instead). Holds patches float [n, 3, P, P] and their object boxes [n, 4]."""

    def __init__(self, size: int, state: Optional[dict] = None) -> None:
        self.size = size
        self.images = state["images"] if state else None
        self.boxes = state["boxes"] if state else None

    def state(self) -> dict:
        return {"images": self.images, "boxes": self.boxes}

    def query(self, images: torch.Tensor, boxes: torch.Tensor, gen: torch.Generator):
        out_i, out_b = images.clone(), boxes.clone()
        for k in range(len(images)):
            n = 0 if self.images is None else len(self.images)
            if n < self.size:
                self.images = images[k:k + 1].clone() if self.images is None else torch.cat([self.images, images[k:k + 1]])
                self.boxes = boxes[k:k + 1].clone() if self.boxes is None else torch.cat([self.boxes, boxes[k:k + 1]])
            elif torch.rand(1, generator=gen).item() < 0.5:
                r = int(torch.randint(0, n, (1,), generator=gen).item())
                out_i[k], out_b[k] = self.images[r], self.boxes[r]
                self.images[r], self.boxes[r] = images[k], boxes[k]
        return out_i, out_b


def _seed(seed: int, step: int, stream: int) -> int:
    return int(np.random.SeedSequence([seed, step, stream]).generate_state(1)[0])


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

def train_detgan(cfg: TrainDetGANConfig) -> dict:
    """Train DetectorGAN; write RUN/detgan/ (see the module docstring)."""
    check_config(cfg)
    timer = Timer()
    device = resolve_device(cfg.device)
    out = check_output(cfg.out, "folder", finished=False)
    split = load_split(resolve_split(cfg.data, cfg.split))
    sampler = PatchSampler(split, cfg.patch, cfg.min_visibility)
    if not sampler.objects:
        raise InputError(f"split '{cfg.split}' of {cfg.data} has no boxes to learn objects from")
    largest = max(max(float(b[2] - b[0]), float(b[3] - b[1])) for t in sampler.targets.values() for b in t["boxes"])
    if largest + 2 * cfg.margin > cfg.patch:
        raise InputError(f"--patch {cfg.patch} px cannot hold the split's largest object ({largest:.0f} px) "
                         "with its margin; use a larger --patch")
    f = read_detector_checkpoint(cfg.detector, split.categories, min_size=cfg.patch, max_size=cfg.patch)
    if f.family != "frcnn":
        raise InputError(f"--detector {cfg.detector}: DetectorGAN's loop takes a Faster R-CNN (its RoI heads are what "
                         f"is unrolled), not {f.family}")
    if f.label_map is not None:
        raise InputError(f"--detector {cfg.detector}: a detector trained on this dataset's categories is needed "
                         "(train one with `sodtool train detector`)")
    k = len(split.categories.ids)
    inputs = {"detector": file_identity(f.path), "train_annotations": file_identity(split.ann_path)}

    seed_everything(cfg.seed)
    g = detgan.PatchGenerator(k, cfg.channels, cfg.blocks).to(device)
    d_global = detgan.PatchDiscriminator(cfg.d_channels, 3).to(device)
    d_local = detgan.PatchDiscriminator(cfg.d_channels, 2).to(device)
    det = build_from_file(f).to(device)
    detgan.freeze_trunk(det)
    opt_g = torch.optim.Adam(g.parameters(), lr=cfg.lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam([*d_global.parameters(), *d_local.parameters()], lr=cfg.lr, betas=(0.5, 0.999))
    heads = detgan.head_parameters(det)

    ckpt_path = out / "checkpoint.pt"
    ckpt = load_resume(ckpt_path, cfg, inputs, STAGE, free=RESUME_FREE) if cfg.resume else None
    if ckpt is not None:
        g.load_state_dict(ckpt["generator"])
        d_global.load_state_dict(ckpt["d_global"])
        d_local.load_state_dict(ckpt["d_local"])
        det.load_state_dict(ckpt["detector"])
        opt_g.load_state_dict(ckpt["opt_g"])
        opt_d.load_state_dict(ckpt["opt_d"])
    step, _, prior_s = resume_position(ckpt, ckpt_path, cfg.iterations, True)
    resumed_from = step
    pool = HistoryPool(cfg.pool_size, ckpt.get("pool") if ckpt is not None else None)
    run = open_run_dir(out, True, fresh=not cfg.resume)
    ckpt_path = run / "checkpoint.pt"
    metrics_log = MetricsLog(run / "metrics.jsonl", step if ckpt is not None else None,
                             tensorboard=run / TENSORBOARD_DIR if cfg.tensorboard else None)
    window = LossWindow(ckpt.get("loss_window") if ckpt is not None else None)
    trained_images = gather([(str(f.path), read_record(f.path))], split_digests(split).values())

    def save_state(at: int) -> None:
        save_training_state(ckpt_path, {"generator": g.state_dict(), "d_global": d_global.state_dict(),
                                        "d_local": d_local.state_dict(), "detector": det.state_dict(),
                                        "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(),
                                        "pool": pool.state(), "loss_window": window.state()},
                            step=at, cfg=cfg, inputs=inputs, stage=STAGE, elapsed_s=prior_s + timer.elapsed)

    det_s = 0.0
    g.train(), d_global.train(), d_local.train()
    with make_progress() as progress:
        task = progress.add_task("train detgan", total=cfg.iterations, completed=step, info="")
        while step < cfg.iterations:
            rng = np.random.default_rng(_seed(cfg.seed, step, 0))
            noise = torch.Generator().manual_seed(_seed(cfg.seed, step, 1))
            torch.manual_seed(_seed(cfg.seed, step, 2))  # the RoI heads' sampling of proposals
            real_u8, boxes, labels, targets = sampler.sample(rng, cfg.batch_size)
            real = real_u8.to(device).float() / 127.5 - 1
            boxes, labels = boxes.to(device), labels.to(device)
            targets = [{kk: v.to(device) for kk, v in t.items()} for t in targets]
            joint = step >= cfg.pretrain_iterations

            # Generator step (discriminators fixed).
            set_requires_grad(d_global, False)
            set_requires_grad(d_local, False)
            inp, mask = detgan.generator_input(real, boxes, labels, k, noise, cfg.margin)
            fake = detgan.composite(real, g(inp), mask)
            real_crops = detgan.object_crops(real, boxes, cfg.local_size)
            fake_crops = detgan.object_crops(fake, boxes, cfg.local_size)
            terms = {"g_adv": detgan.gan_loss(d_global(fake), True),
                     "g_local": detgan.gan_loss(d_local(fake_crops), True),
                     "g_l1": F.l1_loss(fake_crops, real_crops)}
            g_total = (cfg.adv_weight * terms["g_adv"] + cfg.local_weight * terms["g_local"]
                       + cfg.l1_weight * terms["g_l1"])
            grads = None
            if joint:
                t0 = time.perf_counter()
                real_in = detgan.detector_inputs(det, ((real + 1) / 2).detach(), targets)
                syn_in = detgan.detector_inputs(det, (fake + 1) / 2, targets)
                if cfg.unroll:
                    l_unrolled, l_real, l_syn, grads = detgan.unrolled_real_loss(det, real_in, syn_in, cfg.det_lr)
                    terms["det_unrolled"] = l_unrolled
                    g_total = g_total + cfg.unroll_weight * l_unrolled
                else:
                    l_real = detgan.detection_loss(det, real_in)
                    l_syn = detgan.detection_loss(det, syn_in)
                    names = list(heads)
                    got = torch.autograd.grad(l_real + l_syn, [heads[n] for n in names], retain_graph=True)
                    grads = dict(zip(names, got))
                terms["det_real"], terms["det_syn"] = l_real, l_syn
                g_total = g_total - cfg.syn_weight * l_syn
                det_s += time.perf_counter() - t0
            terms["g_total"] = g_total
            if not all_finite(list(terms.values()), False):
                raise NonFiniteLossError(f"non-finite generator loss at iteration {step + 1}; stopped, the last good "
                                         f"checkpoint {ckpt_path if ckpt_path.is_file() else '(none yet)'} is kept")
            opt_g.zero_grad(set_to_none=True)
            g_total.backward()
            opt_g.step()
            if grads is not None:
                t0 = time.perf_counter()
                with torch.no_grad():  # the detector's own step: exactly the one unrolled
                    for n, p in heads.items():
                        p.sub_(cfg.det_lr * grads[n])
                        p.grad = None
                det_s += time.perf_counter() - t0

            # Discriminator step (real patches against the history of synthetic ones).
            set_requires_grad(d_global, True)
            set_requires_grad(d_local, True)
            old, old_boxes = pool.query(fake.detach(), boxes, noise)
            d_terms = {"d_global": 0.5 * (detgan.gan_loss(d_global(real), True) + detgan.gan_loss(d_global(old), False)),
                       "d_local": 0.5 * (detgan.gan_loss(d_local(real_crops), True)
                                         + detgan.gan_loss(d_local(detgan.object_crops(old, old_boxes, cfg.local_size)),
                                                           False))}
            if not all_finite(list(d_terms.values()), False):
                raise NonFiniteLossError(f"non-finite discriminator loss at iteration {step + 1}; stopped, the last good "
                                         f"checkpoint {ckpt_path if ckpt_path.is_file() else '(none yet)'} is kept")
            opt_d.zero_grad(set_to_none=True)
            (d_terms["d_global"] + d_terms["d_local"]).backward()
            opt_d.step()

            step += 1
            window.add({**terms, **d_terms}, cfg.batch_size)
            if due(step, cfg.log_every, cfg.iterations):
                flushed, rate = window.flush()
                metrics_log.write({"step": step, "phase": "joint" if joint else "pretrain", **flushed,
                                   "patches_per_s": round(rate, 2), "detector_s": round(det_s, 2)})
                det_s = 0.0
                progress.update(task, info=fmt_terms(flushed))
            if due(step, cfg.sample_every, cfg.iterations):
                grid = write_samples(run / "samples" / f"iter_{step:07d}.png", real, inp, fake)
                metrics_log.image("samples", grid, step)
            progress.update(task, completed=step)
            if due(step, cfg.checkpoint_every, cfg.stop_after):
                save_state(step)
            if stop_requested(cfg, step):
                return {"stopped_at": step}

    metrics = {"iterations": step, "resumed_from_step": resumed_from, "objects": len(sampler.objects), "images": len(split.image_ids),
               "unroll": cfg.unroll, "train_time_s": round(prior_s + timer.elapsed, 2),
               "final_g_l1": last_record(run / "metrics.jsonl", "g_l1").get("g_l1"),
               "final_det_real": last_record(run / "metrics.jsonl", "det_real").get("det_real")}
    cats = [{"id": int(i), "name": n} for i, n in zip(split.categories.ids, split.categories.names)]
    detgan.save_model(run / "model.pt", g, patch=cfg.patch, margin=cfg.margin, categories=cats,
                      extra={"stage": STAGE, "step": step})
    save_state(step)
    write_record(run, *trained_images)
    write_manifest(run, STAGE, cfg, {"detector": f.path, "train_annotations": split.ann_path}, metrics,
                   seed=cfg.seed, device=device_name(device), wall_time_s=timer.elapsed)
    close_run_dir(run, out, True)
    summary_table("train detgan", metrics)
    return metrics


def write_samples(path: Path, real: torch.Tensor, inp: torch.Tensor, fake: torch.Tensor, count: int = 4) -> np.ndarray:
    """A PNG grid: per column one patch; rows: the real patch, G's input (noised box), the synthetic
    patch. Returns the grid (uint8 [H, W, 3])."""
    n = min(count, len(real))
    rows = [real[:n], inp[:n, :3], fake[:n]]
    grid = torch.cat([torch.cat(list(r.detach().cpu()), dim=2) for r in rows], dim=1)
    arr = ((grid.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return arr
