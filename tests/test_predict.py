"""`sodtool predict` and sliced inference (sodtool.slicing): tiles, merging, outputs, bad files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sodtool.coco import CategoryMap
from sodtool.slicing import merge_detections, tile_grid

CATS = CategoryMap(ids=(3, 7), names=("car", "van"))


@pytest.mark.parametrize("w, h, size, overlap", [(1764, 430, 512, 0.2), (4000, 3000, 512, 0.25), (300, 200, 128, 0.0),
                                                 (513, 512, 512, 0.5)])
def test_tiles_cover_every_pixel_and_have_the_tile_size(w, h, size, overlap):
    tiles = tile_grid(w, h, size, overlap)
    covered = np.zeros((h, w), bool)
    for x1, y1, x2, y2 in tiles.astype(int):
        assert x2 - x1 == min(size, w) and y2 - y1 == min(size, h)
        assert 0 <= x1 and 0 <= y1 and x2 <= w and y2 <= h
        covered[y1:y2, x1:x2] = True
    assert covered.all()


def test_an_image_smaller_than_a_tile_is_one_tile():
    assert tile_grid(90, 70, 512, 0.2).tolist() == [[0, 0, 90, 70]]


def test_a_box_across_a_tile_border_comes_out_once_and_whole():
    """A perfect detector on each tile sees the object clipped to the tile: the merge of all
    tiles' boxes, shifted to image pixels, is the object once, at its own coordinates."""
    w, h = 600, 300
    obj = np.array([230.0, 100.0, 290.0, 140.0])  # crosses tile borders at 240 and 256 (size 256, overlap 0.0625)
    other = np.array([20.0, 20.0, 40.0, 50.0])
    tiles = tile_grid(w, h, 256, 0.0625)
    boxes, scores, labels = [], [], []
    for t in tiles:
        for b, s, lab in ((obj, 0.9, 1), (other, 0.8, 2)):
            x1, y1 = max(b[0], t[0]), max(b[1], t[1])
            x2, y2 = min(b[2], t[2]), min(b[3], t[3])
            if x2 > x1 and y2 > y1:
                # In tile pixels, then shifted back, as predict does; truncated pieces score lower.
                piece = np.array([x1, y1, x2, y2]) - np.array([t[0], t[1], t[0], t[1]])
                full = (x2 - x1) * (y2 - y1) / ((b[2] - b[0]) * (b[3] - b[1]))
                boxes.append(piece + np.array([t[0], t[1], t[0], t[1]]))
                scores.append(s * full)
                labels.append(lab)
    assert sum(1 for lab in labels if lab == 1) >= 2  # seen by several tiles
    out = merge_detections(np.array(boxes), np.array(scores), np.array(labels))
    # No tile sees the object whole here: its two pieces join into the full box.
    assert sorted(out["labels"].tolist()) == [1, 2]
    by_label = {int(lab): b for lab, b in zip(out["labels"], out["boxes"])}
    np.testing.assert_allclose(by_label[1], obj, atol=1e-4)
    np.testing.assert_allclose(by_label[2], other, atol=1e-4)


def test_merging_keeps_apart_other_classes_and_disjoint_boxes():
    boxes = np.array([[0, 0, 10, 10], [2, 2, 8, 8], [0, 0, 10, 10], [50, 50, 60, 60]], np.float32)
    out = merge_detections(boxes, np.array([0.9, 0.5, 0.7, 0.6]), np.array([1, 1, 2, 1]))
    assert out["labels"].tolist() == [1, 2, 1] and out["scores"].tolist() == pytest.approx([0.9, 0.7, 0.6])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """An untrained light SSD saved as sodtool's model.pt, and an untrained MTGAN model.pt."""
    from sodtool import checkpoint
    from sodtool.models.detector_weights import save_detector
    from sodtool.models.networks import Discriminator, Generator, discriminator_checkpoint, generator_checkpoint
    from sodtool.models.ssd import build_ssd

    d = tmp_path_factory.mktemp("predict_models")
    torch.manual_seed(0)
    model = build_ssd("ssd", CATS.num_classes, "mobilenet_v3", 128)
    save_detector(d / "model.pt", model.eval(), "mobilenet_v3", {"size": 128}, CATS, family="ssd")
    g, disc = Generator(8, 8, 1), Discriminator(CATS.num_classes, "resnet18")
    checkpoint.save({**generator_checkpoint(g), **discriminator_checkpoint(disc), "categories": CATS.to_json(),
                     "hr_size": 32, "lr_size": 8, "stage": "train-mtgan"}, d / "mtgan.pt")
    return d / "model.pt", d / "mtgan.pt"


@pytest.fixture
def photos(tmp_path) -> Path:
    """A folder of images of several sizes and modes, one in a subfolder, and one corrupt file."""
    rng = np.random.default_rng(0)
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 255, (200, 300, 3), dtype=np.uint8)).save(root / "a.png")
    Image.fromarray(rng.integers(0, 255, (70, 90), dtype=np.uint8), mode="L").save(root / "sub" / "small.png")
    Image.fromarray(rng.integers(0, 255, (260, 400, 3), dtype=np.uint8)).save(root / "c.jpg")
    (root / "broken.jpg").write_bytes(b"this is not a JPEG")
    return root


def test_predict_writes_coco_predictions_and_drawings_and_names_a_bad_file(cli, models, photos, tmp_path):
    from pycocotools.coco import COCO

    detector, mtgan = models
    out = tmp_path / "pred"
    res = cli("predict", photos, "--detector", detector, "--mtgan", mtgan, "--slice", 128, "--overlap", 0.25,
              "--slice-full", "--score-thresh", 0.0, "--out", out, "--device", "cpu")
    assert res.exit_code == 2, (res.stderr, res.exception)
    assert "broken.jpg" in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("sodtool: error: 1 of 4 inputs could not be read"), res.stderr
    pred = json.loads((out / "predictions.json").read_text())
    assert [im["file_name"] for im in pred["images"]] == ["a.png", "c.jpg", "sub/small.png"]
    assert [(im["width"], im["height"]) for im in pred["images"]] == [(300, 200), (400, 260), (90, 70)]
    assert pred["categories"] == [{"id": 3, "name": "car"}, {"id": 7, "name": "van"}]
    assert pred["annotations"] and {a["category_id"] for a in pred["annotations"]} <= {3, 7}
    for name in ("a.png", "c.jpg", "sub/small.png"):
        assert (out / "drawn" / (name + ".jpg")).is_file()
    # pycocotools takes it as a dataset, and its annotations as results.
    gt = COCO()
    gt.dataset = pred
    gt.createIndex()
    dt = gt.loadRes(pred["annotations"])
    assert len(dt.getAnnIds()) == len(pred["annotations"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["metrics"]["unreadable"] == 1 and manifest["metrics"]["images"] == 3

    # A rerun skips the finished images (only the broken one is tried again).
    (photos / "broken.jpg").unlink()
    before = (out / "predictions.json").read_bytes()
    res = cli("predict", photos, "--detector", detector, "--mtgan", mtgan, "--slice", 128, "--overlap", 0.25,
              "--slice-full", "--score-thresh", 0.0, "--out", out, "--device", "cpu")
    assert res.exit_code == 0, res.stderr
    assert json.loads((out / "manifest.json").read_text())["metrics"]["skipped_done"] == 3
    assert (out / "predictions.json").read_bytes() == before


def test_predict_without_mtgan_and_bad_model(cli, models, photos, tmp_path):
    detector, _ = models
    (photos / "broken.jpg").unlink()
    out = tmp_path / "plain"
    res = cli("predict", photos / "a.png", str(photos / "sub" / "*.png"), "--detector", detector,
              "--score-thresh", 0.0, "--max-per-image", 5, "--out", out, "--device", "cpu")
    assert res.exit_code == 0, res.stderr
    pred = json.loads((out / "predictions.json").read_text())
    assert [im["file_name"] for im in pred["images"]] == ["a.png", "small.png"]
    assert all(sum(1 for a in pred["annotations"] if a["image_id"] == i) <= 5 for i in (1, 2))
    bad = tmp_path / "bad.pt"
    bad.write_text("nope")
    res = cli("predict", photos, "--detector", bad, "--out", tmp_path / "x")
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (tmp_path / "x" / "predictions.json").exists()


def test_small_area_gate_below_every_roi_gives_the_detectors_predictions(cli, models, photos, tmp_path):
    """--small-area 1 rescores no ROI: every detection is the detector's own (box, class, score);
    --small-area 0 rescores every ROI; the default gates at 32²."""
    detector, mtgan = models
    (photos / "broken.jpg").unlink()

    def annotations(out, *extra):
        res = cli("predict", photos / "a.png", "--detector", detector, *extra, "--out", out, "--device", "cpu")
        assert res.exit_code == 0, res.stderr
        return {(a["category_id"], tuple(round(v, 2) for v in a["bbox"]), round(a["score"], 5))
                for a in json.loads((out / "predictions.json").read_text())["annotations"]}

    plain = annotations(tmp_path / "plain")
    gated = annotations(tmp_path / "gated", "--mtgan", mtgan, "--small-area", 1)
    rescored = annotations(tmp_path / "rescored", "--mtgan", mtgan, "--small-area", 0)
    assert plain and gated <= plain and len(gated) >= 0.9 * len(plain)  # NMS may drop overlapping copies
    assert rescored != plain
    annotations(tmp_path / "default", "--mtgan", mtgan)
    manifest = json.loads((tmp_path / "default" / "manifest.json").read_text())
    assert manifest["config"]["small_area"] == 1024.0
    res = cli("predict", photos, "--detector", detector, "--mtgan", mtgan, "--small-area", -5, "--out", tmp_path / "x")
    assert res.exit_code == 2 and "--small-area must be an area in px²" in res.stderr


@pytest.mark.parametrize("sr_only", [False, True])
def test_gated_rescoring_sends_only_small_rois_through_g_and_d(models, sr_only):
    """predict's gate runs D on the small ROIs only, and gives what the full pass gated
    afterwards gives (eval's `_small` rows). G sees those of them whose crop window is no wider
    than the LR crop (here none: 8 px LR crops), or all of them with sr_only."""
    from sodtool.boxes import square_windows
    from sodtool.models.mtgan import load_mtgan
    from sodtool.resample import bicubic_down
    from sodtool.rescoring import (MtganScorer, class_scores, keep_baseline_above, reads_hr, refine_boxes,
                                   score_rois, select_detections)
    from sodtool.rois import crop_windows
    from sodtool.stages.predict import PredictConfig, _rescore

    cpu = torch.device("cpu")
    m = load_mtgan(models[1], cpu, "mtgan")
    seen_g, seen_d = [], []
    scorer = MtganScorer("mtgan", m.generator, m.discriminator)
    m.generator.register_forward_hook(lambda mod, args, out: seen_g.append(args[0].shape[0]))
    m.discriminator.register_forward_hook(lambda mod, args, out: seen_d.append(args[0].shape[0]))
    img = np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    boxes = np.array([[10, 10, 20, 22], [30, 30, 90, 100], [5, 60, 25, 75], [50, 5, 150, 60]], np.float32)
    rois = {"boxes": boxes, "scores": np.array([0.9, 0.8, 0.7, 0.6], np.float32), "labels": np.array([1, 2, 1, 2])}
    cfg = PredictConfig(inputs=("x",), detector=Path("d"), out=Path("o"), small_area=1024.0, min_score=0.0,
                        sr_only=sr_only)
    got = _rescore(rois, img, scorer, cpu, 1.5, 32, CATS.num_classes, cfg)
    assert sum(seen_d) == 2  # areas 120, 4200, 300, 5500: two ROIs below 32²
    assert seen_g == ([2] if sr_only else [])  # their windows, 18 and 22.5 px, are wider than 8 px

    r = torch.from_numpy(boxes)
    hr = crop_windows(torch.from_numpy(img), square_windows(r, 1.5), 32)
    on_hr = None if sr_only else reads_hr(r, 1.5, 8)
    o = score_rois([scorer], bicubic_down(hr, 4), cpu, 256, np.zeros(0, np.int64), hr, on_hr)[0]["mtgan"]
    s, lab = torch.from_numpy(rois["scores"]), torch.from_numpy(rois["labels"])
    b, c = keep_baseline_above(r, refine_boxes(r, o["reg"], 160, 120), class_scores(o["probs"], s, lab, "fused"),
                               s, lab, 1024.0)
    want = select_detections(b, c, nms_iou=0.5, max_per_image=100, min_score=0.0)
    assert got["labels"].tolist() == want["labels"].tolist()
    assert np.allclose(got["boxes"], want["boxes"], atol=1e-3) and np.allclose(got["scores"], want["scores"], atol=1e-5)


def test_sliced_prediction_with_one_tile_is_plain_prediction_and_feeds_crop_rois_sources(models):
    """An image no larger than a tile: sliced inference is the plain one. Larger: boxes in image
    pixels; crop-rois and eval reach it through rois.ModelDetections(slicing=...)."""
    from sodtool.models.detectors import load_detector, predict, predict_sliced
    from sodtool.rois import ModelDetections

    detector, _ = models
    det = load_detector(detector, "cpu")
    rng = np.random.default_rng(1)
    small = [rng.integers(0, 255, (100, 120, 3), dtype=np.uint8)]
    a = predict(det, small, score_thresh=0.0, max_per_image=50)[0]
    b = predict_sliced(det, small, tile=128, overlap=0.2, score_thresh=0.0, max_per_image=50)[0]
    for key in ("boxes", "scores", "labels"):
        np.testing.assert_array_equal(a[key], b[key])
    big = rng.integers(0, 255, (200, 300, 3), dtype=np.uint8)
    src = ModelDetections(detector, "cpu", CATS, (96, 0.25, True))
    assert src.identity["slicing"] == {"tile": 96, "overlap": 0.25, "full": True}
    (out,) = src([1], [big], 0.0, 40)
    assert 0 < len(out["boxes"]) <= 40
    assert out["boxes"][:, 2].max() <= 300 + 1e-3 and out["boxes"][:, 3].max() <= 200 + 1e-3
    assert out["boxes"][:, 0].max() > 96  # boxes from tiles beyond the first, in image pixels
