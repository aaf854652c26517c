"""sodtool.figures (matplotlib layout and plots, torchvision boxes) and the SR figure's picker."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sodtool import figures
from sodtool.reports import MATCH_IOU, TripletPicker, match_small_objects

RED, GREEN = list(figures.DET_COLOUR), list(figures.GT_COLOUR)
# A flat colour no text or line of a figure has: where it is, a tile is.
FLAT = (97, 131, 153)


def _png(path: Path) -> np.ndarray:
    """The PNG at `path` (checked to decode whole) as uint8 [H, W, 3]."""
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def _is(arr: np.ndarray, colour) -> np.ndarray:
    return (arr.astype(int) == list(colour)).all(axis=-1)


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) of each run of True in a 1-d mask."""
    edges = np.flatnonzero(np.diff(np.r_[0, mask.astype(np.int8), 0]))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]


def _flat_tiles(arr: np.ndarray) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """The rows and the columns of tiles drawn from an image of colour FLAT: (start, stop) runs of
    the figure's pixel rows / columns that hold it."""
    flat = _is(arr, FLAT)
    return _runs(flat.any(axis=1)), _runs(flat.any(axis=0))


def test_no_hand_drawn_axes_left():
    """Axes, ticks and text placement are matplotlib's: figures.py and stats.py draw none of their own."""
    root = Path(figures.__file__).parent
    src = (root / "figures.py").read_text()
    for name in ("_linear_ticks", "_panel", "_nice_step", "_fmt_tick", "ImageDraw", "ImageFont",
                 "import matplotlib.pyplot", "def font(", "def draw_boxes("):
        assert name not in src, name
    stats = (root / "stages" / "stats.py").read_text()
    assert "ImageDraw" not in stats and "_nice_max" not in stats and "figures.draw_size_histogram" in stats


def test_detections_figure_draws_each_methods_top_k(tmp_path):
    """k = the image's ground-truth count: with one object, only each column's best detection is
    drawn, in red, whatever its score; the ground truth in green; one tile per method, drawn 1:1."""
    img = np.full((60, 80, 3), FLAT, np.uint8)
    gt = [{"boxes": np.array([[5, 5, 20, 25]], np.float32), "labels": np.array([1])}]
    # Listed low score first: the rule sorts by score, it does not take the first ones.
    det = {"boxes": np.array([[40, 10, 60, 30], [30, 32, 70, 55]], np.float32), "scores": np.array([0.02, 0.04]),
           "labels": np.array([2, 1])}
    other = {"boxes": np.array([[40, 10, 60, 30]], np.float32), "scores": np.array([0.9]), "labels": np.array([2])}
    p = figures.detections_figure([img], gt, {"Baseline": [det], "SOD-MTGAN": [other]}, tmp_path / "d.png",
                                  class_names=["x", "y"], upscale=1, title="t", captions=["image 1"])
    arr = _png(p)
    rows, cols = _flat_tiles(arr)
    assert [b - a for a, b in rows] == [60] and [b - a for a, b in cols] == [80, 80]  # one row, two columns, 1:1
    (y0, _), ((x0, _), (x1, _)) = rows[0], cols
    base, mt = arr[y0:y0 + 60, x0:x0 + 80], arr[y0:y0 + 60, x1:x1 + 80]
    # Ground truth: green on its left edge, in both columns.
    assert _is(base[15, 5], GREEN) and _is(mt[15, 5], GREEN)
    # Baseline: its top-1 (score 0.04, the box at 30..70 x 32..55) is red at its left edge; the other
    # box, scored lower, is not drawn.
    assert _is(base[50, 30], RED) and _is(base[32, 50], RED)
    assert not _is(base[20, 40], RED).any() and not _is(base[20, 60], RED).any()
    # The second column's only detection is drawn.
    assert _is(mt[20, 40], RED) and _is(mt[20, 60], RED)
    # Without ground truth nothing is drawn (k = 0).
    p = figures.detections_figure([img], [{"boxes": np.zeros((0, 4), np.float32), "labels": np.zeros(0)}],
                                  {"Baseline": [det]}, tmp_path / "e.png", class_names=["x", "y"], upscale=1)
    assert not _is(_png(p), RED).any()


def test_top_detections():
    det = {"boxes": np.arange(16, dtype=np.float32).reshape(4, 4), "scores": np.array([0.1, 0.7, 0.3, 0.7]),
           "labels": np.array([1, 2, 3, 4])}
    top = figures.top_detections(det, 2)
    assert top["labels"].tolist() == [2, 4] and top["scores"].tolist() == [0.7, 0.7]  # ties: earlier first
    assert np.array_equal(top["boxes"], det["boxes"][[1, 3]])
    assert len(figures.top_detections(det, 0)["scores"]) == 0 and len(figures.top_detections(det, 9)["scores"]) == 4


def test_draw_detections_puts_red_on_the_box_edge():
    img = np.zeros((50, 60, 3), np.uint8)
    out = figures.draw_detections(img, np.array([[10, 12, 40, 30]]), figures.DET_COLOUR, labels=["car 0.93"],
                                  width=2)
    assert out.shape == img.shape and out.dtype == np.uint8 and out is not img
    assert _is(out[20, 10], RED) and _is(out[20, 11], RED) and _is(out[30, 25], RED)
    assert not out[5].any() and not out[45].any()  # outside the box: untouched
    assert np.array_equal(figures.draw_detections(img, np.zeros((0, 4)), figures.DET_COLOUR), img)


def test_sr_figure_shows_four_views_per_object(tmp_path):
    """LR (enlarged nearest to the HR size), bicubic, SR, HR: 4 tiles per row, one row per crop,
    each tile drawn at the same zoom (32 px crops are shown at 160 px)."""
    n, colours = 2, [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    lr = np.zeros((n, 3, 8, 8), np.uint8)
    views = [np.zeros((n, 3, 32, 32), np.uint8) for _ in range(3)]
    for a, c in zip([lr] + views, colours):
        a[:] = np.array(c, np.uint8)[None, :, None, None]
    lr[1, :, 0, 0] = (7, 200, 99)  # one LR pixel differs: shown as a 20 x 20 block (4 x 4 to HR size, 5 x zoom)
    p = figures.sr_figure(lr, *views, tmp_path / "s.png", captions=[["a", "b", "c", "d"]] * n,
                          row_labels=["object 1", "object 2"], title="D's verdict under each crop")
    arr = _png(p)
    for c in colours:
        assert _is(arr, c).sum() == n * 160 * 160 - (20 * 20 if c == colours[0] else 0), c
    assert _is(arr, (7, 200, 99)).sum() == 20 * 20
    ys, xs = np.nonzero(_is(arr, (7, 200, 99)))
    assert ys.max() - ys.min() == 19 and xs.max() - xs.min() == 19
    assert arr.shape[1] >= 4 * 160
    arr = _png(figures.sr_figure(lr[:0], *(v[:0] for v in views), tmp_path / "e.png", empty="nothing here"))
    assert arr.shape[0] < 100


def test_loss_curves_and_histogram(tmp_path):
    assert figures.loss_curves([{"step": 1, "lr": 0.1}], tmp_path / "none.png", title="x") is None
    recs = [{"step": s, "g_mse": 1.0 / s ** 2, "g_adv": 0.69, "d_total": 0.5, "aux": float(s)} for s in range(1, 30)]
    recs.append({"step": 30, "split": "val", "g_mse": 9.0})
    p = figures.loss_curves(recs, tmp_path / "l.png", title="x")
    arr = _png(p)
    assert arr.shape[1] == 900 and arr.shape[0] == round(100 * (0.7 + 2.8 * 3))  # three panels
    groups = figures.loss_groups(figures.loss_series(recs))
    assert list(groups) == ["generator", "discriminator", "other"] and list(groups["generator"]) == ["g_mse", "g_adv"]
    assert figures.log_scale([1.0 / s ** 2 for s in range(1, 30)] + [0.69]) and not figures.log_scale([0.5, 0.5])
    assert not figures.log_scale([0.0, 1.0]) and not figures.log_scale([])
    assert figures.loss_series([{"step": 2, "g_a": 1.0, "split": "val"}, {"step": 3, "g_a": 2.0, "lr": 1}]) == \
        {"g_a": ([3.0], [2.0])}
    edges = (0, 8, 16, 24, 32, 48, 64, 96, 128, 256)
    arr = _png(figures.draw_size_histogram([3, 0, 1, 1, 2, 0, 1, 1, 1, 0], edges, tmp_path / "h.png", title="t"))
    assert arr.shape == (520, 900, 3)
    for colour in figures.BUCKET_COLOURS.values():  # a bar of every bucket
        rgb = [int(colour[i:i + 2], 16) for i in (1, 3, 5)]
        assert (np.abs(arr.astype(int) - rgb).sum(axis=-1) == 0).sum() > 100, colour
    with pytest.raises(ValueError, match="expected 10 counts"):
        figures.draw_size_histogram([1, 2], edges, tmp_path / "x.png")


# --------------------------------------------------------------------------------------------
# The SR figure's objects
# --------------------------------------------------------------------------------------------


def _targets(boxes, labels) -> dict:
    b = np.asarray(boxes, np.float32).reshape(-1, 4)
    return {"boxes": b, "labels": np.asarray(labels, np.int64),
            "areas": ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).astype(np.float32)}


def test_match_small_objects():
    t = _targets([[0, 0, 10, 10], [50, 50, 150, 150]], [1, 2])  # small, large
    iou, idx = match_small_objects(np.array([[0, 0, 10, 10], [50, 50, 150, 150], [0, 0, 10, 20]], np.float32),
                                   t["boxes"], t["areas"])
    assert idx.tolist() == [0, 0, 0] and iou[0] == pytest.approx(1.0) and iou[1] == 0.0  # the large one never
    assert iou[2] == pytest.approx(0.5)
    iou, idx = match_small_objects(np.zeros((2, 4), np.float32), t["boxes"][1:], t["areas"][1:])
    assert idx.tolist() == [-1, -1] and iou.tolist() == [0.0, 0.0]


def test_picker_takes_ground_truth_small_objects_not_background_rois():
    """Was: the two best-scored small ROIs per image, so the figure showed background ROIs the
    detector had mislabelled. Now: the ROI that best matches a ground-truth small object (IoU >=
    0.5), among those that go through G."""
    t = _targets([[20, 20, 36, 32], [100, 100, 200, 200], [60, 60, 70, 70]], [2, 1, 3])  # small, large, small
    rois = np.array([[150, 10, 170, 26],    # 0: background, the best score
                     [20, 20, 36, 33],      # 1: the first small object, IoU 0.92, read from HR (not eligible)
                     [21, 21, 36, 32],      # 2: the first small object, IoU 0.86
                     [18, 19, 36, 34],      # 3: the first small object, IoU 0.71
                     [100, 100, 200, 200],  # 4: the large object
                     [64, 64, 74, 74]],     # 5: the second small object, IoU 0.22: no match
                    np.float32)
    scores = np.array([0.99, 0.5, 0.4, 0.9, 0.9, 0.8], np.float32)
    labels = np.array([1, 2, 2, 2, 1, 3])
    eligible = np.array([True, False, True, True, True, True])
    picker = TripletPicker(16)
    picks = picker.wanted(rois, scores, labels, np.zeros(6, np.int64), [7], [t], eligible)
    assert [(e.row, e.image_id, e.gt_label) for e in picks] == [(2, 7, 2)]
    e = picks[0]
    assert e.iou == pytest.approx(15 * 11 / (16 * 12)) and e.iou >= MATCH_IOU
    assert np.array_equal(e.gt_box, t["boxes"][0]) and (e.det_label, e.det_score) == (2, pytest.approx(0.4))
    # At most 2 objects per image, and `n` in all: then nothing more is asked for.
    many = _targets([[10 * i, 0, 10 * i + 8, 8] for i in range(5)], [1] * 5)
    picker = TripletPicker(3)
    first = picker.wanted(many["boxes"], np.ones(5), np.ones(5, np.int64), np.zeros(5, np.int64), [1], [many])
    assert [e.row for e in first] == [0, 1] and picker.needs
    two = np.concatenate([many["boxes"], many["boxes"]])
    second = picker.wanted(two, np.ones(10), np.ones(10, np.int64), np.repeat([0, 1], 5), [2, 3], [many, many])
    assert [(e.image_id, e.row) for e in second] == [(2, 0)] and not picker.needs
    assert picker.wanted(two, np.ones(10), np.ones(10, np.int64), np.repeat([0, 1], 5), [4, 5], [many, many]) == []


def test_picker_judges_each_view_with_d():
    """`judge` gives D's probabilities on the nearest-enlarged LR crop and the HR crop, and the
    bicubic crop as shown."""
    from sodtool.models.networks import Discriminator

    torch.manual_seed(0)
    d = Discriminator(3, arch="resnet18").eval()
    t = _targets([[0, 0, 8, 8]], [1])
    picker = TripletPicker(2)
    (e,) = picker.wanted(t["boxes"], np.ones(1), np.ones(1, np.int64), np.zeros(1, np.int64), [1], [t])
    rng = np.random.default_rng(0)
    lr = rng.integers(0, 256, (3, 8, 8), dtype=np.uint8)
    hr = rng.integers(0, 256, (3, 32, 32), dtype=np.uint8)
    p = np.full(4, 0.25, np.float32)
    picker.add(e, lr=lr, hr=hr, sr=hr, d_sr=p, d_bicubic=p)
    picker.judge(d, torch.device("cpu"))
    (j,) = picker.examples
    assert j.bicubic.shape == (3, 32, 32) and j.bicubic.dtype == np.uint8
    with torch.no_grad():
        want = torch.softmax(d(torch.from_numpy(hr)[None].float() / 255).cls, dim=1)[0].numpy()
    assert np.allclose(j.d_hr, want, atol=1e-6) and j.d_nearest.shape == (4,)
    assert j.d_nearest.sum() == pytest.approx(1.0, abs=1e-5)
