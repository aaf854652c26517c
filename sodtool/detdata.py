"""Detection training data: the images and boxes of COCO splits, indexed by `engine.StepBatchSampler`
(or `MixedStepBatchSampler`, which mixes a second pool of images into it).

Shared by `sodtool train detector` and `sodtool train fsr` (both train on (image, boxes) batches
whose order is a function of the step alone, so that a resumed run sees the batches an
uninterrupted one would).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Iterator

import numpy as np
import torch

from sodtool.engine import StepBatchSampler

# Slots whose real-or-extra choices are drawn together: the number of extra images before any
# slot is then a sum over a few cached blocks, not a replay of every step since the start.
MIX_BLOCK = 4096
# Mixed into the seeds of the extra pool's stream and of the choices, so that neither repeats
# the real pool's permutation of the same seed.
_EXTRA_TAG, _CHOICE_TAG = 1, 2


class DetectionDataset(torch.utils.data.Dataset):
    """Images and targets of one or more CocoSplits, indexed by (position, augmentation) pairs
    from `engine.StepBatchSampler`: augmentation = (hflip, vflip, quarter turns counter-clockwise).
    Positions run over the splits in the order given (the first split's images, then the next's).

    Returns (image uint8 [3, H, W], target {"boxes": float32 [N, 4] xyxy pixels, "labels":
    int64 [N] in 1..K, "image_id": int, the id within its own split}); images without boxes give
    N = 0. Images stay uint8 until the training process so that worker -> main transfers are 4x
    smaller. Every split must share the first's category list (the caller checks).
    """

    def __init__(self, split, *more) -> None:
        self.split = split
        self.items = [(s, iid) for s in (split, *more) for iid in s.image_ids]
        self.ids = [iid for _, iid in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, item: tuple[int, tuple[bool, bool, int]]):
        index, (hflip, vflip, turns) = item
        split, iid = self.items[index]
        arr = split.load_image(iid)
        img = torch.from_numpy(arr if arr.flags.writeable else arr.copy()).permute(2, 0, 1)
        t = split.targets(iid)
        img, boxes = augment(img, torch.from_numpy(t["boxes"]).reshape(-1, 4), hflip, vflip, turns)
        return img.contiguous(), {"boxes": boxes, "labels": torch.from_numpy(t["labels"]), "image_id": iid}


@lru_cache(maxsize=256)
def _choices(seed: int, ratio: float, block: int) -> torch.Tensor:
    """Whether each slot of block `block` takes an extra image: bool [MIX_BLOCK], a function of
    (seed, ratio, block) alone."""
    state = np.random.SeedSequence([seed, block, _CHOICE_TAG]).generate_state(2)
    g = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
    return torch.rand(MIX_BLOCK, generator=g) < ratio


class MixedStepBatchSampler:
    """`StepBatchSampler`'s batches with a second pool mixed in: each slot of each batch takes the
    next extra image with probability `ratio`, else the next real one.

    Index space (that of `DetectionDataset(real, *extra)`): 0..n_real-1 real, then n_real..
    n_real+n_extra-1 extra. Slot k (= step * batch_size + place in the batch) chooses from
    (seed, k) alone; each pool is walked like a StepBatchSampler of its own (epoch permutations
    and augmentations), the extra one from a derived seed. The pools' positions at a slot follow
    from the number of extra choices before it (`extra_before`), so batch s is the same whether a
    run got there directly or resumed at step s. Yields lists of (index, (hflip, vflip, turns)).
    """

    def __init__(self, n_real: int, n_extra: int, ratio: float, batch_size: int, seed: int, start_step: int = 0,
                 hflip: bool = True, vflip: bool = False, rot90: bool = False) -> None:
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"ratio must be in (0, 1), got {ratio}")
        extra_seed = int(np.random.SeedSequence([seed, _EXTRA_TAG]).generate_state(1)[0])
        self.real = StepBatchSampler(n_real, batch_size, seed, 0, hflip, vflip, rot90)
        self.extra = StepBatchSampler(n_extra, batch_size, extra_seed, 0, hflip, vflip, rot90)
        self.n_real, self.n_extra, self.ratio = n_real, n_extra, float(ratio)
        self.batch_size, self.seed, self.start_step = batch_size, seed, start_step

    def extra_before(self, slot: int) -> int:
        """How many of the slots 0..slot-1 take an extra image (`slot` = steps x batch size)."""
        full, rest = divmod(slot, MIX_BLOCK)
        n = sum(int(_choices(self.seed, self.ratio, b).sum()) for b in range(full))
        return n + (int(_choices(self.seed, self.ratio, full)[:rest].sum()) if rest else 0)

    @staticmethod
    def _walk(pool: StepBatchSampler, position: int, offset: int) -> Iterator[tuple[int, tuple[bool, bool, int]]]:
        """The (index + offset, augmentation) items of `pool`'s endless stream from `position`."""
        e, i = divmod(position, pool.n)
        while True:
            perm, augs = pool.epoch(e)
            for j in range(i, pool.n):
                yield perm[j] + offset, augs[j]
            e, i = e + 1, 0

    def __iter__(self) -> Iterator[list[tuple[int, tuple[bool, bool, int]]]]:
        slot = self.start_step * self.batch_size
        n_extra = self.extra_before(slot)
        real, extra = self._walk(self.real, slot - n_extra, 0), self._walk(self.extra, n_extra, self.n_real)
        batch: list[tuple[int, tuple[bool, bool, int]]] = []
        while True:
            block, i = divmod(slot, MIX_BLOCK)
            for take_extra in _choices(self.seed, self.ratio, block)[i:].tolist():
                batch.append(next(extra) if take_extra else next(real))
                if len(batch) == self.batch_size:
                    yield batch
                    batch = []
            slot = (block + 1) * MIX_BLOCK


def augment(img: torch.Tensor, boxes: torch.Tensor, hflip: bool, vflip: bool, turns: int):
    """Flip / rotate an image [C, H, W] and its boxes [N, 4] (xyxy pixels): a horizontal flip, a
    vertical flip, then `turns` quarter turns counter-clockwise (torch.rot90 on H, W)."""
    if hflip:
        w = img.shape[2]
        img = img.flip(-1)
        boxes = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], dim=1)
    if vflip:
        h = img.shape[1]
        img = img.flip(-2)
        boxes = torch.stack([boxes[:, 0], h - boxes[:, 3], boxes[:, 2], h - boxes[:, 1]], dim=1)
    for _ in range(turns % 4):
        # Counter-clockwise: pixel (x, y) of a W-wide image goes to (y, W - x).
        w = img.shape[2]
        img = torch.rot90(img, 1, dims=(1, 2))
        boxes = torch.stack([boxes[:, 1], w - boxes[:, 2], boxes[:, 3], w - boxes[:, 0]], dim=1)
    return img, boxes


def collate(batch):
    """Detection batches are lists (images differ in size): ([img, ...], [target, ...])."""
    return [b[0] for b in batch], [b[1] for b in batch]
