"""Detection training data: the images and boxes of a COCO split, indexed by `engine.StepBatchSampler`.

Shared by `sodtool train detector` and `sodtool train fsr` (both train on (image, boxes) batches
whose order is a function of the step alone, so that a resumed run sees the batches an
uninterrupted one would).
"""

from __future__ import annotations

import torch


class DetectionDataset(torch.utils.data.Dataset):
    """Images and targets of a CocoSplit, indexed by (position, augmentation) pairs from
    `engine.StepBatchSampler`: augmentation = (hflip, vflip, quarter turns counter-clockwise).

    Returns (image uint8 [3, H, W], target {"boxes": float32 [N, 4] xyxy, "labels": int64 [N]
    in 1..K, "image_id": int}); images without boxes give N = 0. Images stay uint8 until the
    training process so that worker -> main transfers are 4x smaller.
    """

    def __init__(self, split) -> None:
        self.split = split
        self.ids = list(split.image_ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, item: tuple[int, tuple[bool, bool, int]]):
        index, (hflip, vflip, turns) = item
        iid = self.ids[index]
        arr = self.split.load_image(iid)
        img = torch.from_numpy(arr if arr.flags.writeable else arr.copy()).permute(2, 0, 1)
        t = self.split.targets(iid)
        img, boxes = augment(img, torch.from_numpy(t["boxes"]).reshape(-1, 4), hflip, vflip, turns)
        return img.contiguous(), {"boxes": boxes, "labels": torch.from_numpy(t["labels"]), "image_id": iid}


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
