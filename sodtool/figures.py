"""Figures of `sodtool eval`, drawn with PIL only (no matplotlib in the dependencies).

- `sr_triplets`: LR / HR / SR groups of small ROIs (the paper's Fig. 3): the LR crop upsampled
  4x nearest-neighbour for visualisation, the HR crop, the generator's output; one PNG grid.
- `detections_figure`: detections drawn over images, one column per method (baseline beside
  MTGAN), ground truth in green and detections at or above a score threshold in red (the
  paper's Fig. 4), one row per image.
- `inserted_objects_grid`: generated training images (`data generate`) beside their sources,
  the inserted boxes drawn (torchvision's `draw_bounding_boxes`).
- `loss_curves`: every named loss term of a training `metrics.jsonl` against the step, one
  panel per network (g_* terms, d_* terms, others), log-scaled y axis where the values allow.

Images are uint8 RGB; crops are uint8 [N, 3, H, W] (the ROI store layout); boxes are xyxy in
image pixels. Every function writes its PNG atomically and returns the path.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from sodtool.artefacts import atomic_path

GT_COLOUR = (0, 200, 0)
DET_COLOUR = (230, 0, 0)
BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)
GRID = (225, 225, 225)
# matplotlib's tab10, so the curves look familiar.
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
# Keys of a metrics.jsonl line that are not loss terms.
NOT_LOSSES = {"step", "epoch", "lr", "lr_g", "lr_d", "crops_per_s", "split", "time_s", "wall_time_s"}


def font(size: int = 12) -> ImageFont.ImageFont:
    """Pillow's bundled font at `size` px (the fixed bitmap font where FreeType is missing)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, f) -> tuple[int, int]:
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=f)
    return x1 - x0, y1 - y0


def _save(img: Image.Image, path: str | os.PathLike) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return path


def _chw_to_image(a: np.ndarray) -> Image.Image:
    """uint8 [3, H, W] -> PIL RGB image."""
    return Image.fromarray(np.ascontiguousarray(np.asarray(a, dtype=np.uint8).transpose(1, 2, 0)))


# ----------------------------------------------------------------------------------------------
# Fig. 3: LR / HR / SR triplets
# ----------------------------------------------------------------------------------------------

def sr_triplets(lr: np.ndarray, hr: np.ndarray, sr: np.ndarray, path: str | os.PathLike, *,
                captions: Sequence[str] | None = None, groups_per_row: int = 2,
                titles: Sequence[str] = ("LR (x4 nearest)", "HR", "SR")) -> Path:
    """A grid of (LR, HR, SR) groups, `groups_per_row` groups side by side, titles on top.

    lr: uint8 [N, 3, s, s]; hr, sr: uint8 [N, 3, S, S] with S = 4s (LR is shown upsampled 4x
    nearest so that all three have the same size, as the paper's Fig. 3). `captions[i]` is
    written under group i (e.g. class and ROI size). N = 0 writes a small "no small ROIs" image.
    """
    lr, hr, sr = (np.asarray(a, dtype=np.uint8) for a in (lr, hr, sr))
    n = len(hr)
    if not (len(lr) == len(sr) == n):
        raise ValueError(f"lr, hr and sr must have the same number of crops ({len(lr)}, {n}, {len(sr)})")
    f = font(13)
    if n == 0:
        img = Image.new("RGB", (360, 40), BACKGROUND)
        ImageDraw.Draw(img).text((10, 12), "no small ROIs to show", fill=INK, font=f)
        return _save(img, path)
    scale = hr.shape[-1] // lr.shape[-1]
    # Tiny crops (tests, light configurations) are enlarged to >= 128 px so the titles fit.
    zoom = max(1, math.ceil(128 / hr.shape[-1]))
    size = hr.shape[-1] * zoom
    gap, group_gap, title_h, cap_h = 4, 16, 22, 18 if captions else 0
    per_row = max(1, min(groups_per_row, n))
    rows = math.ceil(n / per_row)
    group_w = 3 * size + 2 * gap
    width = per_row * group_w + (per_row - 1) * group_gap + 2 * gap
    height = title_h + rows * (size + cap_h + gap) + gap
    img = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for g in range(per_row):
        for k, title in enumerate(titles):
            x = gap + g * (group_w + group_gap) + k * (size + gap)
            tw, _ = _text_size(draw, title, f)
            draw.text((x + (size - tw) // 2, 4), title, fill=INK, font=f)
    for i in range(n):
        r, g = divmod(i, per_row)
        x0 = gap + g * (group_w + group_gap)
        y0 = title_h + r * (size + cap_h + gap)
        lr_big = np.repeat(np.repeat(lr[i], scale, axis=1), scale, axis=2)
        for k, tile in enumerate((lr_big, hr[i], sr[i])):
            tile = np.repeat(np.repeat(tile, zoom, axis=1), zoom, axis=2) if zoom > 1 else tile
            img.paste(_chw_to_image(tile), (x0 + k * (size + gap), y0))
        if captions:
            draw.text((x0, y0 + size + 2), str(captions[i]), fill=INK, font=font(11))
    return _save(img, path)


# ----------------------------------------------------------------------------------------------
# Fig. 4: detections drawn on images
# ----------------------------------------------------------------------------------------------

def draw_boxes(draw: ImageDraw.ImageDraw, boxes: np.ndarray, colour, scale: float, labels: Sequence[str] | None,
                width: int, f) -> None:
    """Boxes [N, 4] xyxy pixels (times `scale`) as `width`-px outlines of `colour`, each with its
    label (if any) on a filled tag above it (below, at the top edge)."""
    for j, b in enumerate(np.asarray(boxes, dtype=np.float64).reshape(-1, 4)):
        x1, y1, x2, y2 = (float(v) * scale for v in b)
        draw.rectangle([x1, y1, max(x2, x1), max(y2, y1)], outline=colour, width=width)
        if labels is not None and labels[j]:
            tw, th = _text_size(draw, labels[j], f)
            ty = y1 - th - 3 if y1 - th - 3 >= 0 else y1 + 1
            draw.rectangle([x1, ty, x1 + tw + 2, ty + th + 2], fill=colour)
            draw.text((x1 + 1, ty), labels[j], fill=(255, 255, 255), font=f)


def detections_figure(images: Sequence[np.ndarray], ground_truth: Sequence[Mapping[str, np.ndarray]],
                      detections: Mapping[str, Sequence[Mapping[str, np.ndarray]]], path: str | os.PathLike, *,
                      class_names: Sequence[str], score_thresh: float = 0.5, captions: Sequence[str] | None = None,
                      upscale: int | None = None) -> Path:
    """One row per image, one column per method; ground truth green, detections red.

    images: RGB uint8 [H, W, 3]; ground_truth[i]: {"boxes" [G, 4] xyxy, "labels" [G] 1..K};
    detections: method title -> per image {"boxes" [N, 4] xyxy, "scores" [N], "labels" [N]
    1..K}; only detections with score >= `score_thresh` are drawn, labelled "<class> <score>".
    `class_names[k - 1]` names label k. Small images are enlarged (nearest) by `upscale`
    (default: 2 when the longer side is under 400 px) so that small boxes stay visible.
    """
    if len(images) != len(ground_truth):
        raise ValueError("one ground truth entry per image is needed")
    methods = list(detections)
    for m in methods:
        if len(detections[m]) != len(images):
            raise ValueError(f"method {m!r} has {len(detections[m])} detection sets for {len(images)} images")
    f_title, f_box = font(14), font(10)
    if not images:
        img = Image.new("RGB", (360, 40), BACKGROUND)
        ImageDraw.Draw(img).text((10, 12), "no images to show", fill=INK, font=f_title)
        return _save(img, path)
    longest = max(max(im.shape[:2]) for im in images)
    s = upscale if upscale is not None else (2 if longest < 400 else 1)
    gap, title_h, cap_h = 8, 24, 18 if captions else 0
    cell_w = max(im.shape[1] for im in images) * s
    cell_h = [im.shape[0] * s for im in images]
    width = len(methods) * cell_w + (len(methods) + 1) * gap
    height = title_h + sum(h + cap_h + gap for h in cell_h) + gap
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for c, m in enumerate(methods):
        title = f"{m} (red: score >= {score_thresh:g}; green: ground truth)" if c == 0 else m
        draw.text((gap + c * (cell_w + gap), 5), title, fill=INK, font=f_title)
    y = title_h
    for i, im in enumerate(images):
        for c, m in enumerate(methods):
            x = gap + c * (cell_w + gap)
            tile = Image.fromarray(np.asarray(im, dtype=np.uint8))
            if s != 1:
                tile = tile.resize((im.shape[1] * s, im.shape[0] * s), Image.NEAREST)
            tdraw = ImageDraw.Draw(tile)
            gt = ground_truth[i]
            draw_boxes(tdraw, gt["boxes"], GT_COLOUR, s, None, 2, f_box)
            det = detections[m][i]
            keep = np.asarray(det["scores"]) >= score_thresh
            labels = [f"{_name(class_names, int(k))} {float(sc):.2f}"
                      for k, sc in zip(np.asarray(det["labels"])[keep], np.asarray(det["scores"])[keep])]
            draw_boxes(tdraw, np.asarray(det["boxes"]).reshape(-1, 4)[keep], DET_COLOUR, s, labels, 2, f_box)
            canvas.paste(tile, (x, y))
            if captions:
                draw.text((x, y + cell_h[i] + 2), f"{captions[i]} ({int(keep.sum())} shown)", fill=INK, font=font(11))
        y += cell_h[i] + cap_h + gap
    return _save(canvas, path)


def _name(names: Sequence[str], label: int) -> str:
    return names[label - 1] if 1 <= label <= len(names) else str(label)


# ----------------------------------------------------------------------------------------------
# Loss curves
# ----------------------------------------------------------------------------------------------

def loss_series(records: Sequence[dict]) -> dict[str, tuple[list[float], list[float]]]:
    """Loss term name -> (steps, values) from the training lines (not the "split": "val" ones)."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    for rec in records:
        if "split" in rec or "step" not in rec:
            continue
        for k, v in rec.items():
            if k in NOT_LOSSES or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                continue
            xs, ys = series.setdefault(k, ([], []))
            xs.append(float(rec["step"]))
            ys.append(float(v))
    return series


def _nice_step(span: float, target: int) -> float:
    raw = span / max(target, 1)
    mag = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def _linear_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    step = _nice_step(hi - lo, target)
    first = math.ceil(lo / step - 1e-9) * step
    ticks, t = [], first
    while t <= hi + 1e-9 * step:
        ticks.append(0.0 if abs(t) < 1e-12 * step else t)
        t += step
    return ticks


def _fmt_tick(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e5 or a < 1e-3:
        return f"{v:.0e}"
    if a >= 100 or float(v).is_integer():
        return f"{v:.0f}"
    return f"{v:.3g}"


def _panel(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], title: str,
           series: Mapping[str, tuple[Sequence[float], Sequence[float]]], colours: Mapping[str, tuple],
           xlabel: str, x_range: tuple[float, float]) -> None:
    """One line plot inside box = (left, top, right, bottom) of the plot area (axes included)."""
    f, f_small = font(12), font(11)
    left, top, right, bottom = box
    ys_all = [y for _, ys in series.values() for y in ys]
    log_y = bool(ys_all) and min(ys_all) > 0 and max(ys_all) / min(ys_all) > 20
    if log_y:
        lo, hi = math.log10(min(ys_all)), math.log10(max(ys_all))
        lo, hi = math.floor(lo * 2) / 2, math.ceil(hi * 2) / 2
        if hi - lo < 1:
            hi = lo + 1
        ticks = [float(e) for e in range(math.ceil(lo), math.floor(hi) + 1)]
        tick_labels = [_fmt_tick(10 ** e) for e in ticks]
    else:
        lo, hi = (min(ys_all), max(ys_all)) if ys_all else (0.0, 1.0)
        if hi - lo < 1e-12:
            lo, hi = lo - 0.5 * (abs(lo) or 1), hi + 0.5 * (abs(hi) or 1)
        pad = 0.05 * (hi - lo)
        lo, hi = lo - pad, hi + pad
        ticks = _linear_ticks(lo, hi)
        tick_labels = [_fmt_tick(t) for t in ticks]
    x0, x1 = x_range
    if x1 <= x0:
        x1 = x0 + 1

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (right - left)

    def py(y: float) -> float:
        v = math.log10(y) if log_y else y
        return bottom - (v - lo) / (hi - lo) * (bottom - top)

    for t, lab in zip(ticks, tick_labels):
        yy = bottom - (t - lo) / (hi - lo) * (bottom - top)
        draw.line([(left, yy), (right, yy)], fill=GRID)
        tw, th = _text_size(draw, lab, f_small)
        draw.text((left - tw - 6, yy - th / 2 - 1), lab, fill=INK, font=f_small)
    for t in _linear_ticks(x0, x1):
        xx = px(t)
        draw.line([(xx, bottom), (xx, bottom + 4)], fill=INK)
        lab = _fmt_tick(t)
        tw, _ = _text_size(draw, lab, f_small)
        draw.text((xx - tw / 2, bottom + 6), lab, fill=INK, font=f_small)
    draw.rectangle([left, top, right, bottom], outline=INK)
    tw, _ = _text_size(draw, xlabel, f_small)
    draw.text(((left + right - tw) / 2, bottom + 22), xlabel, fill=INK, font=f_small)
    draw.text((left, top - 18), title + ("  (log scale)" if log_y else ""), fill=INK, font=f)
    for name, (xs, ys) in series.items():
        pts = [(px(x), py(y)) for x, y in zip(xs, ys) if not (log_y and y <= 0)]
        if len(pts) == 1:
            cx, cy = pts[0]
            draw.ellipse([cx - 2, cy - 2, cx + 2, cy + 2], fill=colours[name])
        elif pts:
            draw.line(pts, fill=colours[name], width=2)
    # Legend, right of the plot area.
    ly = top
    for name in series:
        draw.line([(right + 12, ly + 7), (right + 32, ly + 7)], fill=colours[name], width=3)
        draw.text((right + 38, ly), name, fill=INK, font=f_small)
        ly += 16


def loss_curves(records: Sequence[dict], path: str | os.PathLike, *, title: str) -> Path | None:
    """Plot every loss term of a metrics.jsonl (records) against the step; None if it has none.

    Terms are grouped into panels by network: "g_*" (generator), "d_*" (discriminator) and the
    rest; each panel has its own y axis (log scale when all values are positive and span more
    than 20x) and a legend.
    """
    series = loss_series(records)
    if not series:
        return None
    groups: dict[str, dict] = {}
    for name, s in series.items():
        key = "generator" if name.startswith("g_") else "discriminator" if name.startswith("d_") else "other"
        groups.setdefault(key, {})[name] = s
    order = [k for k in ("generator", "discriminator", "other") if k in groups]
    colours = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(series)}
    xs_all = [x for xs, _ in series.values() for x in xs]
    x_range = (min(xs_all), max(xs_all))
    panel_h, left, plot_w, legend_w, top_pad = 260, 70, 560, 170, 40
    width = left + plot_w + legend_w
    height = top_pad + len(order) * (panel_h + 60)
    img = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    draw.text((10, 8), title, fill=INK, font=font(15))
    for i, key in enumerate(order):
        t = top_pad + 24 + i * (panel_h + 60)
        _panel(draw, (left, t, left + plot_w, t + panel_h), f"{key} loss terms", groups[key], colours, "step", x_range)
    return _save(img, path)


# ----------------------------------------------------------------------------------------------
# Generated training images
# ----------------------------------------------------------------------------------------------

def inserted_objects_grid(rows: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], path: str | os.PathLike, *,
                          width: int = 640, gap: int = 8) -> Path:
    """One row per (source image, generated image, inserted boxes): the source uint8 [H, W, 3] on
    the left, the generated one on the right with its inserted boxes [k, 4] (xyxy px) in red, both
    scaled to `width` px wide."""
    import torch
    from torchvision.utils import draw_bounding_boxes

    tiles = []
    for real, generated, boxes in rows:
        scale = width / real.shape[1]
        height = max(1, round(real.shape[0] * scale))

        def fit(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.asarray(Image.fromarray(a).resize((width, height), Image.BILINEAR))).permute(2, 0, 1)

        right = fit(generated)
        if len(boxes):
            right = draw_bounding_boxes(right, torch.as_tensor(np.asarray(boxes) * scale, dtype=torch.float32),
                                        colors=DET_COLOUR, width=2)
        tiles.append(torch.cat([fit(real), torch.full((3, height, gap), 255, dtype=torch.uint8), right], dim=2))
    sep = torch.full((3, gap, 2 * width + gap), 255, dtype=torch.uint8)
    grid = torch.cat([t for tile in tiles for t in (tile, sep)][:-1], dim=1)
    return _save(_chw_to_image(grid.numpy()), path)
