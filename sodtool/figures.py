"""Figures: matplotlib lays them out and draws plots, torchvision's `draw_bounding_boxes` draws boxes.

- `sr_figure`: ground-truth small objects as the second stage sees them (the paper's Fig. 3):
  per object the LR crop (nearest x4), its bicubic x4 upsampling, the generator's output and
  the HR crop, each with a caption (eval writes D's verdict there); one PNG grid.
- `detections_figure`: detections drawn over images (the paper's Fig. 4), one row per image,
  one column per method; ground truth green, each method's top k detections of an image red,
  k = that image's ground-truth count.
- `draw_detections`: boxes (and their labels) drawn into one image (`predict`'s drawn images).
- `inserted_objects_grid`: generated training images (`data generate`) beside their sources,
  the inserted boxes drawn.
- `loss_curves`: every named loss term of a training `metrics.jsonl` against the step, one
  panel per network (g_* terms, d_* terms, others), log-scaled y axis where the values allow.
- `draw_size_histogram`: `data stats`' sqrt(area) histogram, bars coloured by COCO size bucket.

matplotlib is used through `matplotlib.figure.Figure` on an Agg canvas, never through pyplot:
no backend is chosen and no global state a user's own plotting relies on is touched. Images
are uint8 RGB [H, W, 3]; crops are uint8 [N, 3, H, W] (the ROI store layout); boxes are xyxy in
image pixels. Every function that writes a PNG writes it atomically and returns the path.
"""

from __future__ import annotations

import inspect
import math
import os
import textwrap
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
from PIL import Image

from sodtool.artefacts import atomic_path
from sodtool.coco import size_bucket

GT_COLOUR = (0, 200, 0)
DET_COLOUR = (230, 0, 0)
BUCKET_COLOURS = {"small": "#d6604d", "medium": "#f4a582", "large": "#4393c3"}
# Keys of a metrics.jsonl line that are not loss terms.
NOT_LOSSES = {"step", "epoch", "lr", "lr_g", "lr_d", "crops_per_s", "split", "time_s", "wall_time_s"}
DPI = 100
# Text of the image grids, in points, and the pixels one line of it takes at DPI.
FONT_PT = 10
LINE_PX = round(FONT_PT * DPI / 72 * 1.45)
# Average width of a character at FONT_PT, in pixels, to wrap text to a tile's width.
CHAR_PX = 7.5


# ----------------------------------------------------------------------------------------------
# matplotlib plumbing
# ----------------------------------------------------------------------------------------------

def _figure(width_in: float, height_in: float, **kw):
    """A matplotlib Figure on its own Agg canvas (no pyplot, no backend switch)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=DPI, **kw)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        # No "Software" entry: the same figure gives the same bytes whatever matplotlib wrote it.
        fig.savefig(tmp, format="png", dpi=DPI, facecolor="white", metadata={"Software": None})
    return path


def _message(path: str | os.PathLike, text: str) -> Path:
    """A small PNG holding one line of text (a figure with nothing to show says why)."""
    fig = _figure(max(3.6, 0.075 * len(text) + 0.4), 0.5)
    fig.text(0.02, 0.5, text, va="center", ha="left", fontsize=FONT_PT)
    return _save(fig, path)


def label_font() -> Optional[str]:
    """A TrueType font file for box labels: matplotlib's bundled DejaVu Sans (None: PIL's default)."""
    import matplotlib

    f = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    return str(f) if f.is_file() else None


def _wrap(text: str, width_px: float) -> list[str]:
    return [ln for part in str(text).split("\n")
            for ln in (textwrap.wrap(part, max(8, int(width_px / CHAR_PX))) or [""])]


def _tile_grid(tiles: Sequence[Sequence[np.ndarray]], path: str | os.PathLike, *, col_titles: Sequence[str],
               title: str = "", row_labels: Optional[Sequence[str]] = None,
               captions: Optional[Sequence[Sequence[str]]] = None, gap: int = 10) -> Path:
    """Images in a grid, each drawn one image pixel to one figure pixel (no resampling).

    tiles[r][c]: uint8 [h, w, 3], row r, column c; `col_titles[c]` above column c, `title` above
    everything, `row_labels[r]` above row r, `captions[r][c]` under tile (r, c). Text is wrapped
    to the width it has. Each tile is an axes of exactly its pixel size, so what is drawn in the
    tiles (boxes, crops) reaches the PNG unchanged.
    """
    n_rows, n_cols = len(tiles), len(col_titles)
    col_w = [max(t[c].shape[1] for t in tiles) for c in range(n_cols)]
    row_h = [max(t.shape[0] for t in row) for row in tiles]
    width = sum(col_w) + gap * (n_cols + 1)
    title_lines = _wrap(title, width - 2 * gap) if title else []
    head = [_wrap(t, w) for t, w in zip(col_titles, col_w)]
    label = [_wrap(row_labels[r], width - 2 * gap) if row_labels else [] for r in range(n_rows)]
    cap = [[_wrap(captions[r][c], col_w[c]) for c in range(n_cols)] if captions else [[]] * n_cols
           for r in range(n_rows)]
    cap_h = [max(len(x) for x in cap[r]) * LINE_PX for r in range(n_rows)]
    top = gap + len(title_lines) * LINE_PX + (gap // 2 if title_lines else 0) + max(len(h) for h in head) * LINE_PX
    height = top + sum(len(label[r]) * LINE_PX + row_h[r] + cap_h[r] + gap for r in range(n_rows)) + gap // 2
    fig = _figure(width / DPI, height / DPI)

    def text(x: float, y: float, lines: Sequence[str], **kw) -> None:
        if lines:
            fig.text(x / width, 1 - y / height, "\n".join(lines), va="top", ha="left", fontsize=FONT_PT,
                     linespacing=1.2, **kw)

    text(gap, gap, title_lines)
    xs = [gap + sum(col_w[:c]) + gap * c for c in range(n_cols)]
    for c in range(n_cols):
        text(xs[c], top - len(head[c]) * LINE_PX, head[c])
    y = top
    for r in range(n_rows):
        text(gap, y, label[r])
        y += len(label[r]) * LINE_PX
        for c in range(n_cols):
            t = np.asarray(tiles[r][c], dtype=np.uint8)
            h, w = t.shape[:2]
            ax = fig.add_axes((xs[c] / width, 1 - (y + h) / height, w / width, h / height))
            ax.imshow(t, interpolation="nearest", extent=(0, w, h, 0))
            ax.set_axis_off()
            text(xs[c], y + h + 2, cap[r][c])
        y += row_h[r] + cap_h[r] + gap
    return _save(fig, path)


def _enlarge(a: np.ndarray, zoom: int) -> np.ndarray:
    """uint8 [H, W, 3] -> [zoom H, zoom W, 3], each pixel repeated (nearest)."""
    return np.repeat(np.repeat(a, zoom, axis=0), zoom, axis=1) if zoom > 1 else a


def _hwc(a: np.ndarray) -> np.ndarray:
    """uint8 [3, H, W] -> uint8 [H, W, 3]."""
    return np.ascontiguousarray(np.asarray(a, dtype=np.uint8).transpose(1, 2, 0))


# ----------------------------------------------------------------------------------------------
# Boxes
# ----------------------------------------------------------------------------------------------

def draw_detections(image: np.ndarray, boxes: np.ndarray, colour: tuple[int, int, int], *,
                    labels: Optional[Sequence[str]] = None, width: int = 2,
                    font_size: Optional[int] = None) -> np.ndarray:
    """`image` uint8 [H, W, 3] with `boxes` [N, 4] (xyxy pixels) drawn as `width`-px outlines of
    `colour` (torchvision's `draw_bounding_boxes`), `labels[i]` written inside box i's top-left
    corner at `font_size` px (default 10). Returns a new uint8 [H, W, 3] array."""
    img = np.asarray(image, dtype=np.uint8)
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    if not len(b):
        return img.copy()
    import torch
    from torchvision.utils import draw_bounding_boxes

    h, w = img.shape[:2]
    b = b.copy()
    b[:, [0, 2]] = b[:, [0, 2]].clip(0, w - 1)
    b[:, [1, 3]] = b[:, [1, 3]].clip(0, h - 1)
    b[:, 2:] = np.maximum(b[:, 2:], b[:, :2])  # draw_bounding_boxes refuses x2 < x1
    font = label_font() if labels is not None else None
    extra = {}
    if labels is not None and "fill_labels" in inspect.signature(draw_bounding_boxes).parameters:
        # White text on a tag of the box's colour reads on any background (torchvision >= 0.21;
        # older ones write the label in the box's colour).
        extra = {"fill_labels": True, "label_colors": (255, 255, 255)}
    out = draw_bounding_boxes(torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))), torch.from_numpy(b),
                              labels=list(labels) if labels is not None else None, colors=colour, width=width,
                              font=font, font_size=(font_size or 10) if font else None, **extra)
    return np.ascontiguousarray(out.numpy().transpose(1, 2, 0))


def top_detections(det: Mapping[str, np.ndarray], k: int) -> dict[str, np.ndarray]:
    """The `k` highest-scoring detections of one image: {"boxes" [k, 4], "scores" [k], "labels"
    [k]}, by score descending (ties: the earlier detection first)."""
    scores = np.asarray(det["scores"], dtype=np.float64).reshape(-1)
    order = np.argsort(-scores, kind="stable")[:max(int(k), 0)]
    return {"boxes": np.asarray(det["boxes"], dtype=np.float32).reshape(-1, 4)[order],
            "scores": scores[order], "labels": np.asarray(det["labels"]).reshape(-1)[order]}


def _name(names: Sequence[str], label: int) -> str:
    return names[label - 1] if 1 <= label <= len(names) else str(label)


# ----------------------------------------------------------------------------------------------
# Fig. 3: small objects through the second stage
# ----------------------------------------------------------------------------------------------

SR_COLUMNS = ("LR (nearest x4)", "bicubic x4", "SR (G)", "HR")


def sr_figure(lr: np.ndarray, bicubic: np.ndarray, sr: np.ndarray, hr: np.ndarray, path: str | os.PathLike, *,
              captions: Optional[Sequence[Sequence[str]]] = None, row_labels: Optional[Sequence[str]] = None,
              title: str = "", col_titles: Sequence[str] = SR_COLUMNS,
              empty: str = "no small objects to show") -> Path:
    """One row per object, four columns: the LR crop enlarged nearest-neighbour to the HR size,
    its bicubic upsampling, G's output and the HR crop.

    lr: uint8 [N, 3, s, s]; bicubic, sr, hr: uint8 [N, 3, S, S] with S a multiple of s.
    captions[i][c]: text under column c of row i (e.g. D's verdict on that crop); row_labels[i]:
    text above row i. Crops under 160 px are enlarged (nearest) by an integer factor so that
    the text fits. N = 0 writes a one-line PNG saying `empty`.
    """
    lr, bicubic, sr, hr = (np.asarray(a, dtype=np.uint8) for a in (lr, bicubic, sr, hr))
    n = len(hr)
    if not (len(lr) == len(bicubic) == len(sr) == n):
        raise ValueError(f"lr, bicubic, sr and hr must hold as many crops ({len(lr)}, {len(bicubic)}, {len(sr)}, {n})")
    if n == 0:
        return _message(path, empty)
    scale = hr.shape[-1] // lr.shape[-1]
    zoom = max(1, math.ceil(160 / hr.shape[-1]))
    tiles = [[_enlarge(_hwc(np.repeat(np.repeat(lr[i], scale, axis=1), scale, axis=2)), zoom)]
             + [_enlarge(_hwc(a[i]), zoom) for a in (bicubic, sr, hr)] for i in range(n)]
    return _tile_grid(tiles, path, col_titles=col_titles, title=title, row_labels=row_labels, captions=captions)


# ----------------------------------------------------------------------------------------------
# Fig. 4: detections drawn on images
# ----------------------------------------------------------------------------------------------

def detections_figure(images: Sequence[np.ndarray], ground_truth: Sequence[Mapping[str, np.ndarray]],
                      detections: Mapping[str, Sequence[Mapping[str, np.ndarray]]], path: str | os.PathLike, *,
                      class_names: Sequence[str], title: str = "", captions: Optional[Sequence[str]] = None,
                      upscale: Optional[int] = None) -> Path:
    """One row per image, one column per method; ground truth green, detections red.

    images: uint8 [H, W, 3]; ground_truth[i]: {"boxes" [G, 4] xyxy px, "labels" [G] 1..K};
    detections: column title -> per image {"boxes" [N, 4] xyxy px, "scores" [N], "labels" [N]
    1..K}. Each column shows, per image, its top k detections with k = the number of ground-truth
    boxes of that image (`top_detections`): a rule without a score threshold, so that methods
    whose scores live on different scales are shown alike. Labels read "<class> <score>";
    `class_names[k - 1]` names label k. Small images are enlarged (nearest) by `upscale`
    (default: 2 when the longer side is under 400 px) so that small boxes stay visible.
    """
    if len(images) != len(ground_truth):
        raise ValueError("one ground truth entry per image is needed")
    methods = list(detections)
    for m in methods:
        if len(detections[m]) != len(images):
            raise ValueError(f"method {m!r} has {len(detections[m])} detection sets for {len(images)} images")
    if not images:
        return _message(path, "no images to show")
    longest = max(max(im.shape[:2]) for im in images)
    s = upscale if upscale is not None else (2 if longest < 400 else 1)
    tiles, caps = [], []
    for i, im in enumerate(images):
        base = _enlarge(np.asarray(im, dtype=np.uint8), s)
        gt = np.asarray(ground_truth[i]["boxes"], dtype=np.float32).reshape(-1, 4)
        base = draw_detections(base, gt * s, GT_COLOUR, width=2)
        row, row_caps = [], []
        for m in methods:
            det = top_detections(detections[m][i], len(gt))
            labels = [f"{_name(class_names, int(k))} {float(sc):.2f}" for k, sc in zip(det["labels"], det["scores"])]
            row.append(draw_detections(base, det["boxes"] * s, DET_COLOUR, labels=labels, width=2))
            row_caps.append(f"{captions[i]}; top {len(det['scores'])} shown" if captions
                            else f"top {len(det['scores'])} shown")
        tiles.append(row)
        caps.append(row_caps)
    return _tile_grid(tiles, path, col_titles=methods, title=title, captions=caps)


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


def loss_groups(series: Mapping[str, tuple]) -> dict[str, dict[str, tuple]]:
    """The panels of `loss_curves`: "generator" (g_* terms), "discriminator" (d_*), "other", in
    that order, each holding its series."""
    groups: dict[str, dict] = {}
    for name, s in series.items():
        key = "generator" if name.startswith("g_") else "discriminator" if name.startswith("d_") else "other"
        groups.setdefault(key, {})[name] = s
    return {k: groups[k] for k in ("generator", "discriminator", "other") if k in groups}


def log_scale(values: Sequence[float]) -> bool:
    """Whether a panel's y axis is logarithmic: every value positive and spanning more than 20x."""
    return bool(values) and min(values) > 0 and max(values) / min(values) > 20


def loss_curves(records: Sequence[dict], path: str | os.PathLike, *, title: str) -> Optional[Path]:
    """Plot every loss term of a metrics.jsonl (records) against the step; None if it has none.

    One panel per network (`loss_groups`), each with its own y axis (`log_scale`) and legend; a
    term keeps its colour across panels.
    """
    series = loss_series(records)
    if not series:
        return None
    groups = loss_groups(series)
    colours = {name: f"C{i % 10}" for i, name in enumerate(series)}
    fig = _figure(9.0, 0.7 + 2.8 * len(groups), layout="constrained")
    axes = fig.subplots(len(groups), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (key, group) in zip(axes, groups.items()):
        log_y = log_scale([y for _, ys in group.values() for y in ys])
        for name, (xs, ys) in group.items():
            ax.plot(xs, ys, color=colours[name], label=name, linewidth=1.5, marker="o" if len(xs) == 1 else None)
        if log_y:
            ax.set_yscale("log")
        ax.set_title(f"{key} loss terms" + (" (log scale)" if log_y else ""), fontsize=FONT_PT, loc="left")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    axes[-1].set_xlabel("step")
    fig.suptitle(title, fontsize=FONT_PT + 1)
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------
# Dataset statistics
# ----------------------------------------------------------------------------------------------

def draw_size_histogram(counts: Sequence[int], edges: Sequence[int], path: str | os.PathLike, *,
                        title: str = "") -> Path:
    """`data stats`' histogram of sqrt(box area) in px: counts[i] objects in [edges[i], edges[i+1])
    (the last bin open), bars coloured by the COCO size bucket of their bin, dashed lines at
    the 32 and 96 px thresholds (bin edges by construction), 900 x 520 px."""
    counts, edges = list(counts), list(edges)
    if len(counts) != len(edges):
        raise ValueError(f"expected {len(edges)} counts, got {len(counts)}")
    from matplotlib.patches import Patch

    labels = [f"{a}-{b}" for a, b in zip(edges[:-1], edges[1:])] + [f"{edges[-1]}+"]
    buckets = [size_bucket(float(lo) ** 2) for lo in edges]
    fig = _figure(9.0, 5.2)
    ax = fig.add_axes((0.08, 0.17, 0.9, 0.72))
    x = np.arange(len(counts))
    bars = ax.bar(x, counts, width=0.76, color=[BUCKET_COLOURS[b] for b in buckets], edgecolor="0.25")
    ax.bar_label(bars, fontsize=9)
    ax.set_xticks(x)
    ax.set_xticklabels(labels, fontsize=9)
    ax.set_xlim(-0.6, len(counts) - 0.4)
    ax.set_ylim(0, max(max(counts, default=0) * 1.12, 5))
    ax.set_ylabel("objects")
    ax.set_xlabel("sqrt(box area) in pixels  (COCO: small < 32, medium 32-96, large >= 96)")
    for thr in (32, 96):
        if thr in edges:
            xt = edges.index(thr) - 0.5
            ax.axvline(xt, color="0.1", linestyle="--", linewidth=1.5)
            ax.annotate(f"{thr} px", (xt, 1.0), xycoords=("data", "axes fraction"), xytext=(0, 3),
                        textcoords="offset points", ha="center", va="bottom", fontsize=9)
    ax.legend(handles=[Patch(facecolor=BUCKET_COLOURS[b], edgecolor="0.25", label=b) for b in BUCKET_COLOURS],
              loc="upper right", fontsize=9)
    if title:
        fig.text(0.08, 0.965, title, fontsize=13, va="top", ha="left")
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------
# Generated training images
# ----------------------------------------------------------------------------------------------

def inserted_objects_grid(rows: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], path: str | os.PathLike, *,
                          width: int = 640, gap: int = 8) -> Path:
    """One row per (source image, generated image, inserted boxes): the source uint8 [H, W, 3] on
    the left, the generated one on the right with its inserted boxes [k, 4] (xyxy px) in red, both
    scaled to `width` px wide."""
    tiles = []
    for real, generated, boxes in rows:
        scale = width / real.shape[1]
        height = max(1, round(real.shape[0] * scale))

        def fit(a: np.ndarray) -> np.ndarray:
            return np.asarray(Image.fromarray(a).resize((width, height), Image.BILINEAR))

        right = draw_detections(fit(generated), np.asarray(boxes, dtype=np.float32).reshape(-1, 4) * scale,
                                DET_COLOUR, width=2)
        tiles.append(np.concatenate([fit(real), np.full((height, gap, 3), 255, np.uint8), right], axis=1))
    sep = np.full((gap, 2 * width + gap, 3), 255, np.uint8)
    grid = np.concatenate([t for tile in tiles for t in (tile, sep)][:-1], axis=0)
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")
    return path
