"""`sodtool train sr`: MSE pretraining of the SR generator (paper Eq. 4 and Sec. 4.2).

The paper initialises the MTGAN generator from "an MSE-based SR network" to avoid bad local
optima; this stage trains exactly that: Generator (sodtool.networks) on the HR/LR crop pairs of
an ROI store, pixel MSE (mean over pixels of images in [0, 1]), Adam (lr 1e-4, betas 0.9/0.999).

Inputs: `rois_<split>.h5` (HR crops) and its `rois_<split>_lr.h5` twin (written by
`sodtool downsample`, which records the identity of the HR file it came from; a mismatch is
refused, as are disagreeing category lists). Several pairs may be given (repeated --hr/--lr,
e.g. crops of two datasets): MSE pretraining is class-agnostic, so their categories may differ;
their HR sizes must agree. Each batch comes from one store; an epoch is one epoch of every
store, their batches interleaved in an order drawn from (seed, epoch) (`MultiStoreLoader`), so
the stores are mixed in proportion to their training rows. Held-out rows, `min_native_size`
and the batch-size check apply to each store on its own. (`train mtgan` takes one pair.)

Held-out rows: a fixed subset of the store (`val_fraction` of the rows, at most `val_max`,
chosen by `val_seed` and the row count only, so `train sr` and `train mtgan` hold out the SAME
rows; with several stores, per store) is never trained on. It is evaluated every `val_every` iterations and at the end: PSNR
and SSIM (RGB and Y channel, `sodtool.srmetrics`) of the generator and of plain bicubic
upsampling of the LR crop, both against the HR crop, over all held-out rows and over the
"native" ones (see `min_native_size`).

`min_native_size` (px): a crop's native side is the width in source-image pixels of the
square window it was cut from (the store's `window` field). A window smaller than the HR size
was itself UPSAMPLED into the store, so its "HR" crop holds no more detail than a bicubic
upsampling; with `min_native_size=S` only crops with a native side >= S are training targets.
The default 0 trains on every crop.

Outputs (`RUN/sr/`): `generator.pt` (networks.py layout: "generator", "generator_config"),
`checkpoint.pt` (everything needed to resume: weights, optimiser, step, data position, RNG
states, config), `metrics.jsonl` (one JSON object per line: every term by name, "step",
"lr"), `manifest.json` (written last). Rerunning the same command resumes from
`checkpoint.pt`; on CPU a killed-and-resumed run ends with the same weights, bit for bit, as an
uninterrupted one (same machine and torch thread count: CPU kernels reduce in a thread-count
dependent order, so 1 and 2 threads give slightly different, equally valid, weights).

A non-finite loss stops training with `NonFiniteLossError` (the CLI exits with code 3) and
leaves the last checkpoint untouched.

The helpers in this module (store pairing, held-out split, batch stream with resumable
position, RNG state, metrics log, evaluation) are shared with `sodtool.train_mtgan`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from sodtool.artefacts import MANIFEST, Timer, atomic_path, config_dict, file_identity, write_manifest
from sodtool.errors import InputError

STAGE = "train-sr"
SCALE = 4

# Widths: "quick" and "bench" are a light CPU configuration (minutes on 2 cores), "paper" Table 1.
# The paper gives no schedule for its MSE pretraining; 100k Adam iterations at batch 64 is our
# choice (SRGAN's SRResNet used 1e6 at batch 16 on ImageNet).
PRESETS: dict[str, dict[str, Any]] = {
    "quick": dict(iterations=300, batch_size=16, channels=32, up_channels=32, num_blocks=5,
                  val_every=100, log_every=10, checkpoint_every=100),
    "bench": dict(iterations=1000, batch_size=16, channels=32, up_channels=32, num_blocks=5,
                  val_every=250, log_every=25, checkpoint_every=250),
    "paper": dict(iterations=100_000, batch_size=64, channels=64, up_channels=256, num_blocks=5,
                  val_every=5_000, log_every=100, checkpoint_every=2_000),
}
# Fields that may change between a run and its resumption (they steer the run, not its result).
RUN_CONTROL_FIELDS = frozenset({"out", "hr", "lr", "sr", "iterations", "device", "num_workers", "log_every",
                                "checkpoint_every", "val_every", "sample_every", "stop_after"})


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN / inf loss. The CLI prints one line and exits with code 3
    (2 is reserved for bad input); the last good checkpoint is left as it was."""

    exit_code = 3


@dataclass(frozen=True)
class TrainSRConfig:
    """Options of `sodtool train sr`. None = take the value from `preset`."""

    hr: Path | tuple[Path, ...]  # one HR store, or several (each with its LR twin at the same place in `lr`)
    lr: Path | tuple[Path, ...]
    out: Path
    preset: str = "quick"
    iterations: Optional[int] = None
    batch_size: Optional[int] = None
    learning_rate: float = 1e-4
    channels: Optional[int] = None
    up_channels: Optional[int] = None
    num_blocks: Optional[int] = None
    min_native_size: int = 0
    val_fraction: float = 0.05
    val_max: int = 256
    val_seed: int = 0
    val_every: Optional[int] = None
    log_every: Optional[int] = None
    checkpoint_every: Optional[int] = None
    seed: int = 0
    device: str = "auto"
    num_workers: Optional[int] = None
    # Test hook: checkpoint and return after this iteration (as if killed right after it).
    stop_after: Optional[int] = None


def fill_preset(cfg, presets: dict[str, dict[str, Any]]):
    """Replace the None fields of a frozen config with its preset's values."""
    if cfg.preset not in presets:
        raise InputError(f"unknown preset '{cfg.preset}' for --preset (choose from {', '.join(presets)})")
    values = {k: v for k, v in presets[cfg.preset].items() if getattr(cfg, k) is None}
    return dataclasses.replace(cfg, **values)


def check_positive(cfg, names: Iterable[str], minimum: int = 1) -> None:
    for name in names:
        v = getattr(cfg, name)
        if v is not None and v < minimum:
            raise InputError(f"--{name.replace('_', '-')} must be at least {minimum}, got {v}")


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


def check_common(cfg) -> None:
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise InputError(f"--val-fraction must be in [0, 1), got {cfg.val_fraction}")
    if cfg.stop_after is not None and cfg.stop_after < 1:
        raise InputError(f"--stop-after must be at least 1, got {cfg.stop_after}")


# --------------------------------------------------------------------------------------------
# The HR/LR store pair
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StorePair:
    """A checked HR/LR store pair: row count, crop sizes, categories, HR identity."""

    hr: Path
    lr: Path
    rows: int
    hr_size: int
    lr_size: int
    categories: Any  # sodtool.coco.CategoryMap
    hr_identity: dict


def _same_file(recorded: Any, actual: dict) -> bool:
    """Whether a recorded file identity (artefacts.file_identity) names the same bytes as `actual`."""
    if not isinstance(recorded, dict):
        return False
    if "sha256" in recorded and "sha256" in actual:
        return recorded["sha256"] == actual["sha256"]
    return recorded.get("size") == actual.get("size") and recorded.get("mtime") == actual.get("mtime")


def open_pair(hr: Path, lr: Path) -> StorePair:
    """Check that `lr` is the downsampled twin of `hr`; InputError naming the file at fault.

    The LR store names its source by the HR store's content digest (`source_content_sha256`
    = the HR file's `content_sha256`) and by its file identity (`source`); the digest decides
    when both files carry one, else the file identity must match.
    """
    from sodtool import store
    from sodtool.coco import CategoryMap

    hr, lr = Path(hr), Path(lr)
    with store.open_store(hr) as fh:
        rows, hr_size = int(fh["hr"].shape[0]), int(fh["hr"].shape[-1])
        cats_hr = CategoryMap.from_json(store.attr_json(fh, "categories"))
        digest = store.attr_str(fh, "content_sha256") if "content_sha256" in fh.attrs else None
    with store.open_store(lr, expect_schema=store.LR_SCHEMA) as fl:
        lr_rows, lr_size = int(fl["lr"].shape[0]), int(fl["lr"].shape[-1])
        cats_lr = CategoryMap.from_json(store.attr_json(fl, "categories"))
        src_digest = store.attr_str(fl, "source_content_sha256") if "source_content_sha256" in fl.attrs else None
        try:
            source = store.attr_json(fl, "source")
        except (KeyError, ValueError):
            source = None
    hr_identity = file_identity(hr)
    same = src_digest == digest if (digest is not None and src_digest is not None) else _same_file(source, hr_identity)
    if not same:
        named = source.get("path") if isinstance(source, dict) else None
        raise InputError(
            f"LR store {lr} was not made from HR store {hr} (it names {named or 'no source'}, "
            f"with other contents); run `sodtool downsample` on {hr} again"
        )
    cats_hr.check_same(cats_lr, f"LR store {lr} vs HR store {hr}")
    if lr_rows != rows:
        raise InputError(f"LR store {lr} has {lr_rows} rows but HR store {hr} has {rows}")
    if lr_size * SCALE != hr_size:
        raise InputError(f"LR crops of {lr} are {lr_size} px but the HR crops of {hr} are {hr_size} px (need x{SCALE})")
    if rows == 0:
        raise InputError(f"HR store {hr} holds no crops")
    return StorePair(hr, lr, rows, hr_size, lr_size, cats_hr, hr_identity)


def store_paths(cfg) -> list[tuple[Path, Path]]:
    """The (HR, LR) store paths of a config whose `hr` / `lr` are one path each or equally long tuples."""
    hrs = [Path(p) for p in (cfg.hr if isinstance(cfg.hr, (tuple, list)) else [cfg.hr])]
    lrs = [Path(p) for p in (cfg.lr if isinstance(cfg.lr, (tuple, list)) else [cfg.lr])]
    if not hrs or len(hrs) != len(lrs):
        raise InputError(f"give one --lr per --hr, in the same order (got {len(hrs)} --hr and {len(lrs)} --lr)")
    for paths, opt in ((hrs, "--hr"), (lrs, "--lr")):
        resolved = [p.resolve() for p in paths]
        dup = [p for p, r in zip(paths, resolved) if resolved.count(r) > 1]
        if dup:
            raise InputError(f"{opt} {dup[0]} is given twice")
    return list(zip(hrs, lrs))


def input_names(i: int) -> tuple[str, str]:
    """Names of the i-th store pair in `inputs` / the manifest: hr, lr, then hr_1, lr_1, ..."""
    return ("hr", "lr") if i == 0 else (f"hr_{i}", f"lr_{i}")


def split_rows(rows: int, fraction: float, cap: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, held-out rows), both sorted int64. The held-out rows depend only on
    (rows, fraction, cap, seed): round(fraction * rows) of them (at least 1 if fraction > 0),
    at most `cap`."""
    n_val = 0 if fraction <= 0 else min(cap, max(1, int(round(fraction * rows))))
    n_val = min(n_val, rows - 1)
    perm = np.random.default_rng([seed, rows]).permutation(rows)
    return np.sort(perm[n_val:]).astype(np.int64), np.sort(perm[:n_val]).astype(np.int64)


def native_sides(hr: Path) -> np.ndarray:
    """Native side in source-image pixels of each crop: window width, float32 [N]."""
    from sodtool import store

    with store.open_store(hr) as fh:
        w = fh["window"][:]
    return (w[:, 2] - w[:, 0]).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Data stream, RNG state, metrics log, resumption
# --------------------------------------------------------------------------------------------


class BatchStream:
    """Endless batches from a `store.make_loader` loader, counted as (epoch, position).

    `position` is the number of batches already taken in `epoch`. A stream built with a saved
    (epoch, position) gives the same batches the original would have given next: the loader's
    order is a function of (seed, epoch) via `set_epoch`.
    """

    def __init__(self, loader, epoch: int = 0, position: int = 0) -> None:
        self.loader, self.epoch, self.position = loader, epoch, position
        self._it = None

    def _open(self, skip: int) -> None:
        self.loader.set_epoch(self.epoch)
        if skip and hasattr(self.loader, "iter_from"):
            self._it = iter(self.loader.iter_from(skip))
            return
        self._it = iter(self.loader)
        for _ in range(skip):  # re-reads the skipped batches: only on resume, at most one epoch
            next(self._it)

    def next(self) -> dict:
        if self._it is None:
            self._open(self.position)
        try:
            batch = next(self._it)
        except StopIteration:
            self.epoch, self.position = self.epoch + 1, 0
            self._open(0)
            try:
                batch = next(self._it)
            except StopIteration:
                raise InputError("the training loader yields no batch (fewer rows than the batch size?)") from None
        self.position += 1
        return batch

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}


def rng_state() -> dict:
    """torch (CPU and CUDA), numpy and python RNG states as weights_only-loadable data."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, pystate, gauss_next = random.getstate()
    st = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
        "python": {"version": version, "state": list(pystate), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    n = st["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = st["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    if "cuda" in st and torch.cuda.is_available() and len(st["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(st["cuda"])


class MetricsLog:
    """`metrics.jsonl`, one JSON object per line, appended as training goes (so `tail -f` works).

    Resuming from a checkpoint at step k first drops the lines logged after k by the run that
    was killed (rewritten atomically), so the log of a resumed run equals an uninterrupted one.
    """

    def __init__(self, path: Path, resume_step: Optional[int], enabled: bool = True) -> None:
        self.path, self.enabled = Path(path), enabled
        if not enabled:
            return
        kept: list[str] = []
        if resume_step is not None and self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:  # a line cut by the kill
                    continue
                if isinstance(rec, dict) and rec.get("step", 0) <= resume_step:
                    kept.append(line)
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def load_resume(path: Path, cfg, inputs: dict[str, dict], stage: str) -> Optional[dict]:
    """The checkpoint at `path` if there is one made by the same configuration, else None.

    A checkpoint of another configuration (fields outside RUN_CONTROL_FIELDS) or of other input
    files is refused with an InputError: the user should pick another --out or delete it.
    """
    from sodtool.networks import load_checkpoint

    if not path.is_file():
        return None
    ckpt = load_checkpoint(path, "cpu", "training checkpoint")
    saved = ckpt.get("config")
    if not isinstance(saved, dict) or "step" not in ckpt or ckpt.get("stage") != stage:
        raise InputError(f"{path} is not a checkpoint of `sodtool {stage.replace('-', ' ')}` "
                         f"(stage {ckpt.get('stage')!r}); delete it or use another --out")
    now = config_dict(cfg)
    diff = [k for k in sorted(set(saved) | set(now)) if k not in RUN_CONTROL_FIELDS and saved.get(k) != now.get(k)]
    if diff:
        shown = ", ".join(f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in diff[:4])
        raise InputError(f"{path} was made with another configuration ({shown}); "
                         f"rerun with the same options to resume, or use another --out")
    for name, ident in inputs.items():
        old = ckpt.get("inputs", {}).get(name)
        if old is not None and not _same_file(old, ident):
            raise InputError(f"{path} was trained on another {name} file than {ident.get('path')}; "
                             f"use another --out to train on it")
    return ckpt


def resume_position(ckpt: Optional[dict], path: Path, iterations: int, announce: bool) -> tuple[int, dict, float]:
    """(step, loader stream state, elapsed seconds) to continue a run from: zeros without a
    checkpoint; else the checkpoint's, with its RNG states restored (the caller loads the weights)."""
    if ckpt is None:
        return 0, {"epoch": 0, "position": 0}, 0.0
    from sodtool.console import log

    set_rng_state(ckpt["rng"])
    step = int(ckpt["step"])
    if announce:
        log(f"resuming {path} at iteration {step}/{iterations}")
    return step, ckpt["stream"], float(ckpt.get("elapsed_s", 0.0))


def remove_stale_manifest(out: Path) -> None:
    """A folder being (re)trained is not finished: drop a manifest left by an earlier run."""
    m = Path(out) / MANIFEST
    if m.is_file():
        m.unlink()


def to_float(x: torch.Tensor, device, channels_last: bool = False) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float32 [0, 1] on `device`."""
    x = x.to(device, non_blocking=True).float().div_(255.0)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def all_finite(values: list[torch.Tensor], ddp: bool) -> bool:
    """Whether every loss is finite, on every rank (one scalar all_reduce under DDP)."""
    ok = torch.stack([v.detach().float() for v in values]).isfinite().all().float()
    if ddp:
        import torch.distributed as dist

        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def make_train_loader(cfg, pair: StorePair, indices: np.ndarray, device, rank: int, world: int):
    from sodtool import store

    workers = cfg.num_workers if cfg.num_workers is not None else (4 if device.type == "cuda" else 0)
    kwargs = dict(batch_size=cfg.batch_size, shuffle=True, seed=cfg.seed, num_workers=workers,
                  rank=rank, world_size=world, drop_last=True, indices=indices)
    if device.type == "cuda":
        kwargs["pin_memory"] = True
    return store.make_loader(pair.hr, pair.lr, **kwargs)


class MultiStoreLoader:
    """The batches of several stores' loaders (each from `make_train_loader`), interleaved.

    An epoch is one epoch of every loader: all their batches (each batch from one store) in an
    order of stores drawn from (seed, epoch). Deterministic and resumable like one loader:
    `set_epoch(e)`, `len()` (batches per epoch), `iter_from(start)` (this epoch from batch
    `start`, without reading the skipped ones). Every rank draws the same order, and each
    sub-loader gives every rank as many batches, so DDP ranks stay in step.
    """

    def __init__(self, loaders: list, seed: int) -> None:
        self.loaders, self.seed, self.epoch = list(loaders), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        for loader in self.loaders:
            loader.set_epoch(epoch)

    def __len__(self) -> int:
        return sum(len(loader) for loader in self.loaders)

    def order(self) -> np.ndarray:
        """The store index of each batch of this epoch, int64 [len(self)]."""
        seq = np.repeat(np.arange(len(self.loaders)), [len(loader) for loader in self.loaders])
        return np.random.default_rng([self.seed & 0xFFFFFFFF, self.seed >> 32 & 0xFFFFFFFF, self.epoch]).permutation(seq)

    def iter_from(self, start: int):
        order = self.order()
        start = max(0, int(start))
        taken = np.bincount(order[:start], minlength=len(self.loaders))
        its = [iter(loader.iter_from(int(k))) if k else iter(loader) for loader, k in zip(self.loaders, taken)]
        for i in order[start:]:
            yield next(its[i])

    def __iter__(self):
        return self.iter_from(0)


def check_enough_rows(n_train: int, batch_size: int, world: int, what: str) -> None:
    if n_train < batch_size * world:
        raise InputError(f"{what} has {n_train} training rows, fewer than one batch "
                         f"({batch_size} x {world} process(es)); lower --batch-size")


class Accumulator:
    """Running means of detached scalar terms, on device (no host sync until `means`). Each term
    is averaged over the steps that reported it (MTGAN's D warm-up steps have no G terms)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, terms: dict[str, torch.Tensor]) -> None:
        for k, v in terms.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
            self.counts[k] = self.counts.get(k, 0) + 1

    def means(self) -> dict[str, float]:
        out = {k: float(v.item()) / self.counts[k] for k, v in self.sums.items()}
        self.sums, self.counts = {}, {}
        return out


def fmt_terms(terms: dict[str, float]) -> str:
    """Loss terms for the progress bar: every term, by name."""
    return " ".join(f"{k}={v:.3g}" for k, v in terms.items())


# --------------------------------------------------------------------------------------------
# Held-out evaluation
# --------------------------------------------------------------------------------------------


@dataclass
class HeldOut:
    """Held-out crops in memory: lr uint8 [M, 3, s, s], hr uint8 [M, 3, S, S], native bool [M]."""

    rows: np.ndarray
    lr: torch.Tensor
    hr: torch.Tensor
    native: np.ndarray
    bicubic: Optional[dict] = None


def concat_held_out(parts: list[HeldOut]) -> HeldOut:
    """Several stores' held-out crops as one set (same crop sizes); `rows` are each store's row numbers."""
    if len(parts) == 1:
        return parts[0]
    return HeldOut(np.concatenate([p.rows for p in parts]), torch.cat([p.lr for p in parts]),
                   torch.cat([p.hr for p in parts]), np.concatenate([p.native for p in parts]))


def load_held_out(pair: StorePair, rows: np.ndarray, native: np.ndarray) -> HeldOut:
    from sodtool import store

    with store.open_store(pair.hr) as fh:
        hr = torch.from_numpy(fh["hr"][rows] if len(rows) else np.zeros((0, 3, pair.hr_size, pair.hr_size), np.uint8))
    with store.open_store(pair.lr, expect_schema=store.LR_SCHEMA) as fl:
        lr = torch.from_numpy(fl["lr"][rows] if len(rows) else np.zeros((0, 3, pair.lr_size, pair.lr_size), np.uint8))
    return HeldOut(rows, lr, hr, native)


QUALITY_KEYS = ("psnr_rgb", "psnr_y", "ssim_rgb", "ssim_y")


def _quality(sr: torch.Tensor, hr: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-crop PSNR / SSIM, RGB and Y channel (sodtool.srmetrics: 8-bit quantised, border of
    SCALE px cropped); sr, hr float [M, 3, S, S] in [0, 1]."""
    from sodtool import srmetrics

    sr, hr = srmetrics.to_uint8_range(sr), srmetrics.to_uint8_range(hr)
    out = {k: np.empty(len(sr)) for k in QUALITY_KEYS}
    for i in range(len(sr)):
        for y in (False, True):
            name = "y" if y else "rgb"
            out[f"psnr_{name}"][i] = srmetrics.psnr(sr[i], hr[i], border=SCALE, y_channel=y)
            out[f"ssim_{name}"][i] = srmetrics.ssim(sr[i], hr[i], border=SCALE, y_channel=y)
    return out


def _summarise(q: dict[str, np.ndarray], mask: np.ndarray, prefix: str) -> dict[str, float]:
    # PSNR is averaged per crop in dB (inf, for a crop reproduced exactly, is capped at 100 dB).
    return {f"{prefix}_{k}": float(np.mean(np.minimum(v[mask], 100.0))) for k, v in q.items()} if mask.any() else {}


@torch.no_grad()
def evaluate_generator(g: torch.nn.Module, held: HeldOut, device, batch_size: int = 32) -> dict[str, float]:
    """Held-out PSNR / SSIM (RGB and Y) of `g` and of bicubic upsampling, over all held-out
    crops ("val_*") and over those with a native side >= the HR size ("val_native_*")."""
    from sodtool.networks import unwrap
    from sodtool.srmetrics import bicubic_upscale

    if len(held.rows) == 0:
        return {}
    g = unwrap(g)
    was_training = g.training
    g.eval()
    outs = []
    try:
        for i in range(0, len(held.rows), batch_size):
            x = to_float(held.lr[i:i + batch_size], device)
            outs.append(g(x).float().clamp_(0, 1).cpu())
    finally:
        g.train(was_training)
    hr = held.hr.float() / 255.0
    q = _quality(torch.cat(outs), hr)
    if held.bicubic is None:
        held.bicubic = _quality(bicubic_upscale(held.lr.float() / 255.0, SCALE), hr)
    res: dict[str, float] = {"val_crops": int(len(held.rows)), "val_native_crops": int(held.native.sum())}
    allm = np.ones(len(held.rows), bool)
    for prefix, mask in (("val", allm), ("val_native", held.native)):
        res.update(_summarise(q, mask, f"{prefix}_sr"))
        res.update(_summarise(held.bicubic, mask, f"{prefix}_bicubic"))
    return res


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def sr_step(model, opt, x: torch.Tensor, y: torch.Tensor, device) -> torch.Tensor:
    """One MSE step: x LR float [B, 3, s, s], y HR float [B, 3, 4s, 4s] (both [0, 1]). Returns the loss."""
    from sodtool.device import autocast

    with autocast(device):
        sr = model(x)
    loss = F.mse_loss(sr.float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


def train_sr(cfg: TrainSRConfig) -> dict:
    """Pretrain the generator with pixel MSE; write RUN/sr/ (see the module docstring)."""
    from sodtool.console import make_progress, summary_table
    from sodtool.device import device_name, dist_env, init_distributed, resolve_device, seed_everything
    from sodtool.networks import Generator, generator_checkpoint, save_checkpoint

    cfg = resolve_config(cfg)
    timer = Timer()
    device = resolve_device(cfg.device)
    ddp = init_distributed(device)
    rank, world, local_rank = dist_env()
    if device.type == "cuda" and device.index is None:  # "--device cuda": this process's GPU
        device = torch.device("cuda", local_rank if ddp else torch.cuda.current_device())
    main = rank == 0
    out = Path(cfg.out)

    pairs = [open_pair(h, l) for h, l in store_paths(cfg)]
    pair = pairs[0]
    for other in pairs[1:]:
        if other.hr_size != pair.hr_size:
            raise InputError(f"HR store {other.hr} has {other.hr_size} px crops but {pair.hr} has {pair.hr_size} px: "
                             "the stores trained together must have one crop size")
    splits = []  # per store: (train rows, held-out rows, native bool [rows])
    inputs = {}
    for i, p in enumerate(pairs):
        train_rows, val_rows = split_rows(p.rows, cfg.val_fraction, cfg.val_max, cfg.val_seed)
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
    g = Generator(cfg.channels, cfg.up_channels, cfg.num_blocks).to(device)
    opt = torch.optim.Adam(g.parameters(), lr=cfg.learning_rate, betas=(0.9, 0.999))
    ckpt_path = out / "checkpoint.pt"
    ckpt = load_resume(ckpt_path, cfg, inputs, STAGE)
    if ckpt is not None and set(ckpt.get("inputs", {})) != set(inputs):
        raise InputError(f"{ckpt_path} was trained on {len(ckpt.get('inputs', {})) // 2} store pair(s), "
                         f"not {len(pairs)}; use another --out to train on these")
    if ckpt is not None:
        g.load_state_dict(ckpt["generator"])
        opt.load_state_dict(ckpt["optimizer"])
    step, stream_state, prior_s = resume_position(ckpt, ckpt_path, cfg.iterations, main)
    channels_last = device.type == "cuda"
    if channels_last:
        torch.backends.cudnn.benchmark = True  # fixed crop sizes: let cuDNN pick its fastest kernels
        g = g.to(memory_format=torch.channels_last)
    ids = [device.index] if device.type == "cuda" else None
    model = torch.nn.parallel.DistributedDataParallel(g, device_ids=ids) if ddp else g
    g.train()
    if main:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_manifest(out)
    metrics_log = MetricsLog(out / "metrics.jsonl", step if ckpt is not None else None, enabled=main)
    held = concat_held_out([load_held_out(p, v, nat[v]) for p, (_, v, nat) in zip(pairs, splits)]) if main else None
    loaders = [make_train_loader(cfg, p, t, device, rank, world) for p, (t, _, _) in zip(pairs, splits)]
    loader = loaders[0] if len(loaders) == 1 else MultiStoreLoader(loaders, cfg.seed)
    stream = BatchStream(loader, **stream_state)

    def save_state(at: int) -> None:
        if main:
            save_checkpoint({**generator_checkpoint(g), "optimizer": opt.state_dict(), "step": at,
                             "stream": stream.state(), "rng": rng_state(), "config": config_dict(cfg),
                             "inputs": inputs, "elapsed_s": prior_s + timer.elapsed, "stage": STAGE}, ckpt_path)

    def validate(at: int) -> dict:
        res = evaluate_generator(g, held, device) if main else {}
        if res:
            metrics_log.write({"step": at, "split": "val", **res})
        return res

    acc, seen, t_log = Accumulator(), 0, Timer()
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
            seen += x.shape[0] * world
            acc.add({"g_mse": loss})
            if step % cfg.log_every == 0 or step == cfg.iterations:
                terms = acc.means()
                rate = seen / max(t_log.elapsed, 1e-9)
                metrics_log.write({"step": step, "epoch": stream.epoch, "lr": opt.param_groups[0]["lr"],
                                   **terms, "crops_per_s": round(rate, 2)})
                progress.update(task, info=fmt_terms(terms) + f" {rate:.1f} crops/s")
                seen, t_log = 0, Timer()
            if step % cfg.val_every == 0 and step < cfg.iterations:
                val = validate(step)
                if val:
                    progress.update(task, info=f"val psnr {val['val_sr_psnr_rgb']:.2f} "
                                               f"(bicubic {val['val_bicubic_psnr_rgb']:.2f})")
            progress.update(task, completed=step)
            if step % cfg.checkpoint_every == 0 or step == cfg.stop_after:
                save_state(step)
            if cfg.stop_after is not None and step >= cfg.stop_after and step < cfg.iterations:
                return {"stopped_at": step}

    val = validate(step)
    metrics = {"iterations": step, "train_crops": int(sum(len(t) for t, _, _ in splits)),
               "val_crops": int(sum(len(v) for _, v, _ in splits)), "min_native_size": cfg.min_native_size, **val,
               "train_time_s": round(prior_s + timer.elapsed, 2),
               "final_g_mse": last_record(out / "metrics.jsonl", "g_mse").get("g_mse")}
    if len(pairs) > 1:
        metrics["train_crops_per_store"] = [int(len(t)) for t, _, _ in splits]
        metrics["val_crops_per_store"] = [int(len(v)) for _, v, _ in splits]
    if main:
        save_checkpoint({**generator_checkpoint(g), "stage": STAGE, "step": step, "hr_size": pair.hr_size,
                         "lr_size": pair.lr_size}, out / "generator.pt")
        save_state(step)
        files = {name: path for i, p in enumerate(pairs) for name, path in zip(input_names(i), (p.hr, p.lr))}
        write_manifest(out, STAGE, cfg, files, metrics, seed=cfg.seed,
                       device=device_name(device), wall_time_s=timer.elapsed)
        summary_table("train sr", {k: v for k, v in metrics.items() if not k.startswith("val_native_ssim")})
    return metrics


def last_record(path: Path, key: str) -> dict:
    """The last line of a metrics.jsonl that has `key` (a resumed, already finished run logs nothing new)."""
    last: dict = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                if isinstance(rec, dict) and key in rec:
                    last = rec
    return last
