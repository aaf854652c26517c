"""HR/LR ROI store pairs as training data for the generator and the discriminator.

Shared by `train sr` and `train mtgan`: checking that an LR store is the downsampled twin of an
HR store (`open_pair`), the held-out rows (`split_rows`: whole images, chosen by (image ids,
fraction, cap, seed) alone, so both stages hold out the SAME rows), the training loaders
(`make_train_loader`, `MultiStoreLoader` for several stores), and the held-out evaluation of a generator
(`evaluate_generator`: PSNR / SSIM of G and of bicubic upsampling, RGB and Y).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from sodtool import srmetrics, store
from sodtool.artefacts import file_identity, same_file
from sodtool.coco import CategoryMap
from sodtool.engine import to_float
from sodtool.errors import InputError
from sodtool.models.networks import unwrap
from sodtool.resample import SCALE, bicubic_up

def check_common(cfg) -> None:
    """Options `train sr` and `train mtgan` share: the held-out fraction and the stop hook."""
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise InputError(f"--val-fraction must be in [0, 1), got {cfg.val_fraction}")
    if cfg.stop_after is not None and cfg.stop_after < 1:
        raise InputError(f"--stop-after must be at least 1, got {cfg.stop_after}")


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

def open_pair(hr: Path, lr: Path) -> StorePair:
    """Check that `lr` is the downsampled twin of `hr`; InputError naming the file at fault.

    The LR store names its source by the HR store's content digest (`source_content_sha256`
    = the HR file's `content_sha256`) and by its file identity (`source`); the digest decides
    when both files carry one, else the file identity must match.
    """
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
    same = src_digest == digest if (digest is not None and src_digest is not None) else same_file(source, hr_identity)
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


def split_rows(image_ids: np.ndarray, fraction: float, cap: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, held-out rows), both sorted int64, split BY IMAGE: the held-out rows are all the
    rows of randomly chosen images (`image_ids` [N]: the store's image id of each row).

    Rows of one image (its detector ROIs, the jittered copies of one ground-truth box) are never
    on both sides, so held-out figures are not flattered by near-copies of training crops.
    Images are taken in an order drawn from (seed, N) until the held-out rows reach
    round(fraction * N) (at least one image if fraction > 0), skipping an image that would pass
    `cap` rows; at least one image stays for training. Depends only on (image_ids, fraction,
    cap, seed), so `train sr` and `train mtgan` hold out the same rows.
    """
    image_ids = np.asarray(image_ids)
    n = len(image_ids)
    uniq, inv, counts = np.unique(image_ids, return_inverse=True, return_counts=True)
    held = np.zeros(len(uniq), bool)
    if fraction > 0 and len(uniq) > 1:
        want, total = min(cap, max(1, int(round(fraction * n)))), 0
        for u in np.random.default_rng([seed, n]).permutation(len(uniq)):
            if total >= want or held.sum() == len(uniq) - 1:
                break
            if total + counts[u] > cap and total > 0:
                continue
            held[u] = True
            total += counts[u]
    mask = held[inv]
    return np.flatnonzero(~mask).astype(np.int64), np.flatnonzero(mask).astype(np.int64)


def row_image_ids(hr: Path) -> np.ndarray:
    """The image id of every row of an HR store, int64 [N]."""
    with store.open_store(hr) as fh:
        return fh["image_id"][:].astype(np.int64)


def native_sides(hr: Path) -> np.ndarray:
    """Native side in source-image pixels of each crop: window width, float32 [N]."""
    with store.open_store(hr) as fh:
        w = fh["window"][:]
    return (w[:, 2] - w[:, 0]).astype(np.float32)


# --------------------------------------------------------------------------------------------

def make_train_loader(cfg, pair: StorePair, indices: np.ndarray, device, rank: int, world: int):
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
    with store.open_store(pair.hr) as fh:
        hr = torch.from_numpy(fh["hr"][rows] if len(rows) else np.zeros((0, 3, pair.hr_size, pair.hr_size), np.uint8))
    with store.open_store(pair.lr, expect_schema=store.LR_SCHEMA) as fl:
        lr = torch.from_numpy(fl["lr"][rows] if len(rows) else np.zeros((0, 3, pair.lr_size, pair.lr_size), np.uint8))
    return HeldOut(rows, lr, hr, native)


QUALITY_KEYS = ("psnr_rgb", "psnr_y", "ssim_rgb", "ssim_y")


def _quality(sr: torch.Tensor, hr: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-crop PSNR / SSIM, RGB and Y channel (sodtool.srmetrics: 8-bit quantised, border of
    SCALE px cropped); sr, hr float [M, 3, S, S] in [0, 1]."""
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
        held.bicubic = _quality(bicubic_up(held.lr.float() / 255.0, SCALE).clamp(0.0, 1.0), hr)
    res: dict[str, float] = {"val_crops": int(len(held.rows)), "val_native_crops": int(held.native.sum())}
    allm = np.ones(len(held.rows), bool)
    for prefix, mask in (("val", allm), ("val_native", held.native)):
        res.update(_summarise(q, mask, f"{prefix}_sr"))
        res.update(_summarise(held.bicubic, mask, f"{prefix}_bicubic"))
    return res


# --------------------------------------------------------------------------------------------


def label_rows(hr: Path, rows: np.ndarray) -> torch.Tensor:
    """Labels (0 = background, 1..K) of `rows` of an HR store, int64 [len(rows)]."""
    with store.open_store(hr) as fh:
        return torch.from_numpy(fh["label"][rows].astype(np.int64)) if len(rows) else torch.zeros(0, dtype=torch.int64)
