"""Object insertion: where extra objects may go in a real training image, and the copy-paste
baseline that puts them there (generated training data, DetectorGAN's setting, Liu et al. 2019).

Boxes are xyxy in image pixels throughout; images are RGB uint8 [H, W, 3]. A box's pixels are
the integer rectangle `pixel_rect(box)`: x0 = round(x0), width = max(1, round(x1 - x0)).

Insertion rule (`sample_insertion_boxes`), for one image and its real boxes:
1. A candidate starts from an anchor, a real box of this image drawn at random, and a source
   object drawn at random from the pool (the training set's whole objects: size, label, image
   and box of origin). The source is turned a quarter when needed so that its long side lies
   along the anchor's long side, then flipped left-right and up-down at random (overhead
   imagery has no "up").
2. Its centre is the anchor's centre shifted along the anchor's long axis by ±(1.1..3) anchor
   lengths (a random sign and a uniform length: cars queue along lanes and parking rows), plus
   a jitter across that axis of up to `jitter` of the anchor's short side. Its size is the
   (turned) source's, in whole pixels.
3. It is kept only if it lies inside the image with `edge` px to spare; grown by `gap` px, it
   meets no real box, no `avoid` box (crowd regions) and no box already inserted; and its
   pixels look like the surfaces this image's objects stand on (`SurfaceReference`): its mean
   colour lies, channel by channel, within the [5th, 95th] percentile range of the mean
   colours of the rings `ring` px wide just outside the real boxes (the pixels of other boxes
   left out), and its pixel spread (per-channel std, averaged) is at most the 95th percentile
   of those rings' spreads. A textured or oddly coloured place (roof, lawn, lane marking)
   fails; the asphalt beside a car passes.
4. At most `tries_per_object * count` candidates are drawn; fewer than `count` boxes come back
   when the rule rejects the rest (none for an image without real boxes or without a pool).

Copy-paste (`paste_objects`): each source object is cut with `CONTEXT_PX` px of its
surroundings (`object_crop`), turned and flipped like its box, resized to the box plus that
margin when its size differs, and alpha-blended: weight 1 on the box, falling linearly to 0
across the margin with the distance from the box (`feather` px), and 0 on the pixels of boxes
that must stay as they are (the real ones, the other inserted ones), so that no seam shows and
no neighbour is painted over.

`window_around`, `crop_window` and `paste_window` cut the fixed-size square around a box that a
generator works on, and put its output back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
from PIL import Image

# Context cut around a source object and blended into the target: enough for the blend to
# fade out before the crop's border, little enough not to carry the source's neighbours.
CONTEXT_PX = 4
FEATHER_PX = 4
# Ring outside each real box whose pixels describe the surface objects stand on.
RING_PX = 3
# Inserted boxes keep this far from every other box and from the image border.
GAP_PX = 2
EDGE_PX = 2
SHIFT_RANGE = (1.1, 3.0)  # anchor lengths, along the anchor's long axis
JITTER = 0.15  # of the anchor's short side, across its long axis
TRIES_PER_OBJECT = 25
SURFACE_PERCENTILES = (5.0, 95.0)
REJECT_REASONS = ("outside", "overlap", "not_surface")


@dataclass(frozen=True)
class ObjectPool:
    """The objects insertion copies. boxes float64 [M, 4] xyxy pixels of their own image;
    labels int64 [M] in 1..K; image_ids, ann_ids int64 [M]: where each comes from."""

    boxes: np.ndarray
    labels: np.ndarray
    image_ids: np.ndarray
    ann_ids: np.ndarray

    def __len__(self) -> int:
        return len(self.boxes)

    @property
    def sizes(self) -> np.ndarray:
        """int64 [M, 2]: (width, height) of each object's pixel rectangle."""
        rects = pixel_rects(self.boxes)
        return rects[:, 2:] - rects[:, :2]


@dataclass(frozen=True)
class SurfaceReference:
    """What the ground under an image's objects looks like: per-channel mean colour range
    lo, hi float64 [3] and the largest pixel spread max_std (module docstring, step 3)."""

    lo: np.ndarray
    hi: np.ndarray
    max_std: float


def pixel_rects(boxes: np.ndarray) -> np.ndarray:
    """int64 [N, 4] xyxy pixel rectangles of float boxes [N, 4]: x0 = round(x0), width at least 1."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    lo = np.rint(boxes[:, :2])
    wh = np.maximum(np.rint(boxes[:, 2:] - boxes[:, :2]), 1.0)
    return np.concatenate([lo, lo + wh], axis=1).astype(np.int64)


def window_around(box, image_hw: tuple[int, int], size: int,
                  rng: Optional[np.random.Generator] = None) -> tuple[int, int]:
    """Top-left (x0, y0) of a size x size window holding `box` (xyxy px) whole where it fits.

    Along each axis: uniformly random among the integer positions that hold the box and stay
    inside the image when `rng` is given, the box centred otherwise; a box longer than the
    window gets it centred on the box, inside the image; 0 where the image is shorter than size.
    """
    x0b, y0b, x1b, y1b = (float(v) for v in box)
    height, width = image_hw
    start = []
    for lo_box, hi_box, length in ((x0b, x1b, width), (y0b, y1b, height)):
        if length <= size:
            start.append(0)
            continue
        lo = max(0, int(np.ceil(hi_box)) - size)
        hi = min(int(np.floor(lo_box)), length - size)
        centred = int(round((lo_box + hi_box) / 2.0 - size / 2.0))
        if lo > hi:  # the box does not fit: centre it, inside the image
            start.append(min(max(centred, 0), length - size))
        elif rng is not None:
            start.append(int(rng.integers(lo, hi + 1)))
        else:
            start.append(min(max(centred, lo), hi))
    return start[0], start[1]


def crop_rect(image: np.ndarray, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    """uint8 [y1 - y0, x1 - x0, 3]: the image's pixels in [x0, x1) x [y0, y1), reflect-padded
    where the rectangle leaves the image (which it must meet)."""
    height, width = image.shape[:2]
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    if cx0 >= cx1 or cy0 >= cy1:
        raise ValueError(f"rectangle {[x0, y0, x1, y1]} lies outside the {width}x{height} image")
    part = image[cy0:cy1, cx0:cx1]
    pad = ((cy0 - y0, y1 - cy1), (cx0 - x0, x1 - cx1), (0, 0))
    if any(p for pair in pad for p in pair):
        part = np.pad(part, pad, mode="reflect")
    return np.ascontiguousarray(part)


def crop_window(image: np.ndarray, x0: int, y0: int, size: int) -> np.ndarray:
    """uint8 [size, size, 3]: the window at (x0, y0) of image [H, W, 3], reflect-padded where it
    leaves the image."""
    return crop_rect(image, x0, y0, x0 + size, y0 + size)


def paste_window(image: np.ndarray, patch: np.ndarray, x0: int, y0: int) -> np.ndarray:
    """A copy of image [H, W, 3] with patch [h, w, 3] written at (x0, y0): only the part that
    falls inside the image (the inverse of crop_window)."""
    out = image.copy()
    height, width = image.shape[:2]
    h, w = patch.shape[:2]
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x0 + w, width), min(y0 + h, height)
    if cx0 < cx1 and cy0 < cy1:
        out[cy0:cy1, cx0:cx1] = patch[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
    return out


def transform_crop(crop: np.ndarray, turns: int, hflip: bool, vflip: bool) -> np.ndarray:
    """crop [h, w, C] turned `turns` quarters (np.rot90: counter-clockwise as displayed), then
    flipped left-right, then up-down. A box of size (w, h) becomes (h, w) for odd turns."""
    out = np.rot90(crop, k=int(turns))
    if hflip:
        out = out[:, ::-1]
    if vflip:
        out = out[::-1]
    return np.ascontiguousarray(out)


def object_crop(image: np.ndarray, box, margin: int = CONTEXT_PX, turns: int = 0, hflip: bool = False,
                vflip: bool = False) -> np.ndarray:
    """A source object cut with `margin` px of context: uint8 [h + 2m, w + 2m, 3] for its pixel
    rectangle of size (w, h), transformed as `transform_crop` (sides swapped for odd turns)."""
    x0, y0, x1, y1 = (int(v) for v in pixel_rects(box)[0])
    crop = crop_rect(image, x0 - margin, y0 - margin, x1 + margin, y1 + margin)
    return transform_crop(crop, turns, hflip, vflip)


def _region_stats(pixels: np.ndarray) -> tuple[np.ndarray, float]:
    """Mean colour [3] and spread (per-channel std, averaged) of pixels [P, 3]."""
    pixels = pixels.astype(np.float64)
    return pixels.mean(axis=0), float(pixels.std(axis=0).mean())


def surface_reference(image: np.ndarray, boxes: np.ndarray, ring: int = RING_PX) -> Optional[SurfaceReference]:
    """The surface statistics of image [H, W, 3] from the rings `ring` px wide outside its boxes
    [N, 4] xyxy (pixels of any box left out); None when no ring has pixels to measure."""
    height, width = image.shape[:2]
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    covered = np.zeros((height, width), bool)
    outer = np.concatenate([np.floor(boxes[:, :2]), np.ceil(boxes[:, 2:])], axis=1).astype(np.int64)
    for x0, y0, x1, y1 in outer:
        covered[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)] = True
    means, spreads = [], []
    for x0, y0, x1, y1 in outer:
        gx0, gy0 = max(x0 - ring, 0), max(y0 - ring, 0)
        gx1, gy1 = min(x1 + ring, width), min(y1 + ring, height)
        if gx0 >= gx1 or gy0 >= gy1:
            continue
        free = ~covered[gy0:gy1, gx0:gx1]
        if free.sum() < 2 * ring:  # a ring hidden by its neighbours says nothing of the ground
            continue
        mean, spread = _region_stats(image[gy0:gy1, gx0:gx1][free])
        means.append(mean)
        spreads.append(spread)
    if not means:
        return None
    means_arr = np.stack(means)
    low, high = SURFACE_PERCENTILES
    return SurfaceReference(lo=np.percentile(means_arr, low, axis=0), hi=np.percentile(means_arr, high, axis=0),
                            max_std=float(np.percentile(spreads, high)))


def looks_like_surface(image: np.ndarray, rect, reference: Optional[SurfaceReference]) -> bool:
    """Whether the pixels of rect (int xyxy, inside the image) look like the reference surface:
    mean colour within [lo, hi] on every channel and spread at most max_std."""
    if reference is None:
        return False
    x0, y0, x1, y1 = (int(v) for v in rect)
    mean, spread = _region_stats(image[y0:y1, x0:x1].reshape(-1, 3))
    return bool(np.all(mean >= reference.lo) and np.all(mean <= reference.hi) and spread <= reference.max_std)


def _meets(box: np.ndarray, others: np.ndarray) -> bool:
    """Whether box [4] overlaps any of others [M, 4] with a positive area (xyxy)."""
    if len(others) == 0:
        return False
    w = np.minimum(box[2], others[:, 2]) - np.maximum(box[0], others[:, 0])
    h = np.minimum(box[3], others[:, 3]) - np.maximum(box[1], others[:, 1])
    return bool(np.any((w > 0) & (h > 0)))


def sample_insertion_boxes(image: np.ndarray, gt_boxes: np.ndarray, pool: ObjectPool, count: int,
                           rng: np.random.Generator, *, avoid: Optional[np.ndarray] = None,
                           shift_range: tuple[float, float] = SHIFT_RANGE, jitter: float = JITTER,
                           gap: float = GAP_PX, edge: float = EDGE_PX, ring: int = RING_PX,
                           tries_per_object: int = TRIES_PER_OBJECT) -> dict:
    """Up to `count` places for new objects in image [H, W, 3] by the module docstring's rule.

    gt_boxes: float [N, 4] xyxy, the image's real objects (anchors, rings, boxes to keep clear
    of); avoid: more boxes [A, 4] to keep clear of (crowd regions). Returns a dict: boxes
    float64 [k, 4] xyxy (whole pixels), labels int64 [k] in 1..K, source int64 [k] (pool
    index), anchor int64 [k] (index into gt_boxes), turns int64 [k] (0 or 1), hflip, vflip
    bool [k]; tried (candidates drawn) and rejected ({reason: count}, REJECT_REASONS).
    """
    height, width = image.shape[:2]
    gt = np.asarray(gt_boxes, np.float64).reshape(-1, 4)
    blocked = [gt, np.asarray(avoid if avoid is not None else np.zeros((0, 4)), np.float64).reshape(-1, 4)]
    sizes = pool.sizes
    rejected = dict.fromkeys(REJECT_REASONS, 0)
    chosen: list[dict] = []
    inserted = np.zeros((0, 4))
    tried = 0
    reference = surface_reference(image, gt, ring) if len(gt) and len(pool) and count > 0 else None
    if reference is not None:
        anchor_wh = gt[:, 2:] - gt[:, :2]
        while len(chosen) < count and tried < tries_per_object * count:
            tried += 1
            a = int(rng.integers(len(gt)))
            s = int(rng.integers(len(pool)))
            sign = 1.0 if rng.random() < 0.5 else -1.0
            shift = rng.uniform(*shift_range)
            across = rng.uniform(-jitter, jitter)
            hflip, vflip = bool(rng.random() < 0.5), bool(rng.random() < 0.5)
            aw, ah = anchor_wh[a]
            along_x = aw >= ah  # the anchor's long axis
            sw, sh = sizes[s]
            turns = int((sw >= sh) != along_x)
            w, h = (sh, sw) if turns else (sw, sh)
            cx, cy = (gt[a, 0] + gt[a, 2]) / 2.0, (gt[a, 1] + gt[a, 3]) / 2.0
            if along_x:
                cx, cy = cx + sign * shift * aw, cy + across * ah
            else:
                cx, cy = cx + across * aw, cy + sign * shift * ah
            x0, y0 = float(np.rint(cx - w / 2.0)), float(np.rint(cy - h / 2.0))
            box = np.array([x0, y0, x0 + w, y0 + h])
            if box[0] < edge or box[1] < edge or box[2] > width - edge or box[3] > height - edge:
                rejected["outside"] += 1
                continue
            grown = box + np.array([-gap, -gap, gap, gap])
            if any(_meets(grown, b) for b in (*blocked, inserted)):
                rejected["overlap"] += 1
                continue
            if not looks_like_surface(image, box.astype(np.int64), reference):
                rejected["not_surface"] += 1
                continue
            chosen.append({"box": box, "label": int(pool.labels[s]), "source": s, "anchor": a, "turns": turns,
                           "hflip": hflip, "vflip": vflip})
            inserted = np.concatenate([inserted, box[None]])

    def column(key, dtype):
        return np.array([c[key] for c in chosen], dtype=dtype)

    return {"boxes": inserted.astype(np.float64).reshape(-1, 4), "labels": column("label", np.int64),
            "source": column("source", np.int64), "anchor": column("anchor", np.int64),
            "turns": column("turns", np.int64), "hflip": column("hflip", bool), "vflip": column("vflip", bool),
            "tried": tried, "rejected": rejected}


def paste_objects(image: np.ndarray, boxes: np.ndarray, crops: list[np.ndarray], feather: float = FEATHER_PX,
                  margin: int = CONTEXT_PX, keep: Optional[np.ndarray] = None) -> np.ndarray:
    """Copy-paste with feathered blending; returns a new image (module docstring).

    image uint8 [H, W, 3]; boxes [k, 4] xyxy px where the objects go; crops[i] uint8
    [h_i, w_i, 3]: object i with `margin` px of context on each side, already turned and
    flipped like its box (resized to the box's pixel rectangle grown by margin when its size
    differs); keep: boxes [M, 4] xyxy whose pixels stay unchanged (the real objects).
    Weight of the crop at a pixel whose centre lies d px from the box: 1 - d / feather, at
    least 0 (1 on the box); 0 inside any other inserted box or any `keep` box."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    if len(boxes) != len(crops):
        raise ValueError(f"{len(boxes)} boxes but {len(crops)} crops")
    out = image.astype(np.float32)
    height, width = image.shape[:2]
    rects = pixel_rects(boxes)
    keep_arr = np.asarray(keep if keep is not None else np.zeros((0, 4)), np.float64).reshape(-1, 4)
    for i, (rect, crop) in enumerate(zip(rects, crops)):
        x0, y0, x1, y1 = (int(v) for v in rect)
        rx0, ry0, rx1, ry1 = x0 - margin, y0 - margin, x1 + margin, y1 + margin
        if crop.shape[:2] != (ry1 - ry0, rx1 - rx0):
            crop = np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((rx1 - rx0, ry1 - ry0), Image.BILINEAR))
        xs = np.arange(rx0, rx1) + 0.5
        ys = np.arange(ry0, ry1) + 0.5
        dx = np.maximum(np.maximum(x0 - xs, xs - x1), 0.0)
        dy = np.maximum(np.maximum(y0 - ys, ys - y1), 0.0)
        dist = np.hypot(dy[:, None], dx[None, :])
        alpha = np.clip(1.0 - dist / feather, 0.0, 1.0) if feather > 0 else (dist == 0).astype(np.float64)
        others = np.concatenate([keep_arr, np.delete(boxes, i, axis=0)])
        for ox0, oy0, ox1, oy1 in others:  # neighbours keep their own pixels
            alpha[((ys >= oy0) & (ys <= oy1))[:, None] & ((xs >= ox0) & (xs <= ox1))[None, :]] = 0.0
        cx0, cy0, cx1, cy1 = max(rx0, 0), max(ry0, 0), min(rx1, width), min(ry1, height)
        if cx0 >= cx1 or cy0 >= cy1:
            continue
        a = alpha[cy0 - ry0:cy1 - ry0, cx0 - rx0:cx1 - rx0, None].astype(np.float32)
        src = crop[cy0 - ry0:cy1 - ry0, cx0 - rx0:cx1 - rx0].astype(np.float32)
        out[cy0:cy1, cx0:cx1] = a * src + (1.0 - a) * out[cy0:cy1, cx0:cx1]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
