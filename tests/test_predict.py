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


def test_merging_with_tiles_fuses_only_boxes_of_different_tiles():
    # Two neighbouring objects of one class, overlapping by more than half the smaller box.
    boxes = np.array([[0, 0, 10, 10], [4, 0, 14, 10], [0, 0, 10, 10]], np.float32)
    scores, labels = np.array([0.9, 0.8, 0.7]), np.array([1, 1, 1])
    # Without tiles the greedy merge fuses all three into one box.
    assert len(merge_detections(boxes, scores, labels)["boxes"]) == 1
    # Seen by one tile (the detector's NMS kept both apart), the two neighbours stay apart;
    # the third box, the same object seen by another tile, joins the first.
    out = merge_detections(boxes, scores, labels, groups=np.array([0, 0, 1]))
    np.testing.assert_allclose(out["boxes"], [[0, 0, 10, 10], [4, 0, 14, 10]])
    assert out["scores"].tolist() == pytest.approx([0.9, 0.8])
    # Whole-image detections passed as one tile come out unchanged (sorted by score).
    one = merge_detections(boxes[::-1], scores[::-1], labels, groups=np.zeros(3))
    np.testing.assert_allclose(one["boxes"], boxes)
    with pytest.raises(ValueError, match="groups has 2 entries for 3 boxes"):
        merge_detections(boxes, scores, labels, groups=np.zeros(2))


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


# ----------------------------------------------------------------------------------------------
# Issue 33: predict's output folder, resume, inputs, batching, options, full disk, messages
# ----------------------------------------------------------------------------------------------

def _files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, hidden ones included, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


def _metrics(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())["metrics"]


@pytest.fixture(scope="module")
def other_models(tmp_path_factory):
    """A second light SSD and a second MTGAN (other weights, same classes): the bytes that
    replace a model file."""
    from sodtool import checkpoint
    from sodtool.models.detector_weights import save_detector
    from sodtool.models.networks import Discriminator, Generator, discriminator_checkpoint, generator_checkpoint
    from sodtool.models.ssd import build_ssd

    d = tmp_path_factory.mktemp("predict_other_models")
    torch.manual_seed(1)
    save_detector(d / "model.pt", build_ssd("ssd", CATS.num_classes, "mobilenet_v3", 128).eval(), "mobilenet_v3",
                  {"size": 128}, CATS, family="ssd")
    g, disc = Generator(8, 8, 1), Discriminator(CATS.num_classes, "resnet18")
    checkpoint.save({**generator_checkpoint(g), **discriminator_checkpoint(disc), "categories": CATS.to_json(),
                     "hr_size": 32, "lr_size": 8, "stage": "train-mtgan"}, d / "mtgan.pt")
    return d / "model.pt", d / "mtgan.pt"


@pytest.fixture(scope="module")
def frcnn(tmp_path_factory):
    """A tiny untrained Faster R-CNN as sodtool's model.pt, and the same as a plain torchvision state
    dict. Unlike the SSD (one fixed input size) it pads the images of a batch to a common size."""
    from sodtool.models.detector_weights import save_detector
    from sodtool.models.frcnn import build_detector

    d = tmp_path_factory.mktemp("predict_frcnn")
    build = {"min_size": 96, "max_size": 160, "representation_size": 64, "fpn_channels": 32}
    torch.manual_seed(0)
    model = build_detector("mobilenet_v3_fpn", CATS.num_classes + 1, **build).eval()
    save_detector(d / "model.pt", model, "mobilenet_v3_fpn", build, CATS)
    torch.save(model.state_dict(), d / "state_dict.pt")
    return d / "model.pt", d / "state_dict.pt"


@pytest.fixture
def good_photos(photos) -> Path:
    (photos / "broken.jpg").unlink()
    return photos


def _predict(cli, inputs, detector, out, *extra):
    return cli("-q", "predict", *([inputs] if not isinstance(inputs, (list, tuple)) else inputs), "--detector",
               detector, "--score-thresh", 0.0, "--out", out, "--device", "cpu", *extra)


# 1. predict writes its folder the way every other stage does --------------------------------

def test_predict_refuses_the_finished_run_of_another_stage_and_a_foreign_predictions_json(cli, models, good_photos,
                                                                                         tmp_path):
    """Was: `--out` at a `train detector` run or at a folder holding another predictions.json
    overwrote its manifest.json and predictions.json without --overwrite."""
    detector, _ = models
    run = tmp_path / "detector_run"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"stage": "train-detector", "metrics": {"AP": 38.0}}))
    (run / "predictions.json").write_text('{"theirs": 1}')
    (run / "model.pt").write_bytes(b"weights")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "predictions.json").write_text('{"theirs": 2}')
    for out, what in ((run, "stage 'train-detector'"), (theirs, "predictions.json")):
        before = _files(out)
        res = _predict(cli, good_photos, detector, out)
        assert res.exit_code == 2, (res.stderr, res.exception)
        line = _last_line(res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1 and line.startswith("sodtool: error: "), res.stderr
        assert what in line and "--overwrite" in line, line
        assert _files(out) == before
    # --overwrite replaces it, once the new output is complete.
    res = _predict(cli, good_photos, detector, run, "--overwrite")
    assert res.exit_code == 0, res.stderr
    assert json.loads((run / "manifest.json").read_text())["stage"] == "predict"
    assert not (run / "model.pt").exists() and _metrics(run)["images"] == 3
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_predict_refuses_a_non_empty_folder_it_did_not_make_and_resumes_its_own_unfinished_one(cli, models,
                                                                                               good_photos, tmp_path):
    """Was: into a non-empty folder it did not create, predict wrote silently. Its own folder, even
    killed before manifest.json, is resumed; an empty folder is written into."""
    detector, _ = models
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    res = _predict(cli, good_photos, detector, mine)
    assert res.exit_code == 2 and "notes.txt" in _last_line(res.stderr), res.stderr
    assert _files(mine) == {"notes.txt": b"keep"}

    empty = tmp_path / "empty"
    empty.mkdir()
    assert _predict(cli, good_photos, detector, empty).exit_code == 0
    whole = (empty / "predictions.json").read_bytes()
    # Killed before the end: no manifest, no predictions.json, one part missing.
    (empty / "manifest.json").unlink()
    (empty / "predictions.json").unlink()
    sorted((empty / "parts").iterdir())[0].unlink()
    res = _predict(cli, good_photos, detector, empty)
    assert res.exit_code == 0, res.stderr
    assert _metrics(empty)["skipped_done"] == 2 and _metrics(empty)["processed_now"] == 1
    assert (empty / "predictions.json").read_bytes() == whole
    # A rerun of a finished one resumes it too, and changes nothing.
    res = _predict(cli, good_photos, detector, empty)
    assert res.exit_code == 0 and _metrics(empty)["skipped_done"] == 3
    assert (empty / "predictions.json").read_bytes() == whole
    # With a file of the user's beside it, and its manifest gone (a rerun that failed), its parts
    # still make it predict's; a parts/ folder of other files does not.
    (empty / "notes.txt").write_text("mine")
    (empty / "manifest.json").unlink()
    res = _predict(cli, good_photos, detector, empty)
    assert res.exit_code == 0 and _metrics(empty)["skipped_done"] == 3, res.stderr
    other = tmp_path / "other"
    (other / "parts").mkdir(parents=True)
    (other / "parts" / "chapter1.json").write_text("{}")
    res = _predict(cli, good_photos, detector, other)
    assert res.exit_code == 2 and "without predict's parts/" in _last_line(res.stderr), res.stderr


# 2. resume only where the inputs are the same --------------------------------------------------

def _annotations_of(out: Path, file_name: str) -> list:
    pred = json.loads((out / "predictions.json").read_text())
    (iid,) = [im["id"] for im in pred["images"] if im["file_name"] == file_name]
    return [(a["category_id"], a["bbox"], a["score"]) for a in pred["annotations"] if a["image_id"] == iid]


def test_resume_redoes_an_input_image_replaced_by_another(cli, models, good_photos, tmp_path):
    """Was: an image replaced by another kept its old detections ("2 already done")."""
    detector, _ = models
    out = tmp_path / "pred"
    assert _predict(cli, good_photos, detector, out).exit_code == 0
    old = _annotations_of(out, "a.png")
    Image.fromarray(np.random.default_rng(7).integers(0, 255, (150, 220, 3), dtype=np.uint8)).save(
        good_photos / "a.png")
    res = _predict(cli, good_photos, detector, out)
    assert res.exit_code == 0, res.stderr
    assert _metrics(out)["skipped_done"] == 2 and _metrics(out)["processed_now"] == 1
    fresh = tmp_path / "fresh"
    assert _predict(cli, good_photos / "a.png", detector, fresh).exit_code == 0
    assert _annotations_of(out, "a.png") == _annotations_of(fresh, "a.png") != old
    assert json.loads((out / "predictions.json").read_text())["images"][0]["width"] == 220


def test_resume_redoes_every_image_when_the_detector_file_is_replaced_and_not_when_it_is_moved(
        cli, models, other_models, good_photos, tmp_path):
    """Was: a replaced --detector file kept the old detector's detections while manifest.json
    recorded the new one's digest. The same bytes at another path are the same detector."""
    import shutil

    det = tmp_path / "det.pt"
    shutil.copy(models[0], det)
    out = tmp_path / "pred"
    assert _predict(cli, good_photos, det, out).exit_code == 0
    shutil.copy(other_models[0], det)
    res = _predict(cli, good_photos, det, out)
    assert res.exit_code == 0, res.stderr
    assert _metrics(out)["skipped_done"] == 0 and _metrics(out)["processed_now"] == 3
    fresh = tmp_path / "fresh"
    assert _predict(cli, good_photos, other_models[0], fresh).exit_code == 0
    assert (out / "predictions.json").read_bytes() == (fresh / "predictions.json").read_bytes()
    import hashlib
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"]["detector"]["sha256"] == hashlib.sha256(other_models[0].read_bytes()).hexdigest()
    moved = tmp_path / "moved.pt"
    det.rename(moved)
    res = _predict(cli, good_photos, moved, out)
    assert res.exit_code == 0 and _metrics(out)["skipped_done"] == 3, res.stderr


def test_resume_redoes_every_image_when_the_mtgan_file_is_replaced(cli, models, other_models, good_photos,
                                                                   tmp_path):
    import shutil

    detector, mtgan = models
    mt = tmp_path / "mtgan.pt"
    shutil.copy(mtgan, mt)
    out = tmp_path / "pred"
    args = ("--mtgan", mt, "--small-area", 0)
    assert _predict(cli, good_photos, detector, out, *args).exit_code == 0
    shutil.copy(other_models[1], mt)
    res = _predict(cli, good_photos, detector, out, *args)
    assert res.exit_code == 0, res.stderr
    assert _metrics(out)["skipped_done"] == 0
    fresh = tmp_path / "fresh"
    assert _predict(cli, good_photos, detector, fresh, "--mtgan", other_models[1], "--small-area", 0).exit_code == 0
    assert (out / "predictions.json").read_bytes() == (fresh / "predictions.json").read_bytes()


@pytest.mark.parametrize("damage", ["short_box", "box_of_strings", "scores_not_a_list", "label_out_of_range",
                                    "nan_score", "box_outside", "fewer_scores", "not_an_object", "width_text"])
def test_a_malformed_part_is_redone_not_trusted(cli, models, good_photos, tmp_path, damage):
    """Was: a part rewritten as valid JSON with a malformed box crashed the rerun with a traceback
    (reshape error in predict.py)."""
    detector, _ = models
    out = tmp_path / "pred"
    assert _predict(cli, good_photos, detector, out).exit_code == 0
    whole = (out / "predictions.json").read_bytes()
    part_file = next(p for p in sorted((out / "parts").iterdir())
                     if len(json.loads(p.read_text())["boxes"]) > 1)
    part = json.loads(part_file.read_text())
    if damage == "short_box":
        part["boxes"][0] = part["boxes"][0][:3]
    elif damage == "box_of_strings":
        part["boxes"][1] = ["a", "b", "c", "d"]
    elif damage == "scores_not_a_list":
        part["scores"] = "high"
    elif damage == "label_out_of_range":
        part["labels"][0] = 9
    elif damage == "nan_score":
        part["scores"][0] = float("nan")
    elif damage == "box_outside":
        part["boxes"][0] = [0, 0, part["width"] + 50, 10]
    elif damage == "fewer_scores":
        part["scores"] = part["scores"][:-1]
    elif damage == "not_an_object":
        part = [part]
    elif damage == "width_text":
        part["width"] = str(part["width"])
    part_file.write_text(json.dumps(part))
    res = _predict(cli, good_photos, detector, out)
    assert res.exit_code == 0, (res.stderr, res.exception)
    assert _metrics(out)["skipped_done"] == 2 and _metrics(out)["processed_now"] == 1
    assert (out / "predictions.json").read_bytes() == whole


# 3. outputs are never inputs ---------------------------------------------------------------------

def test_an_output_folder_inside_the_input_folder_is_not_read_as_input(cli, models, good_photos):
    """Was: `predict DIR --out DIR/pred` run twice took its own drawn/*.jpg as inputs and nested
    pred/drawn/pred/drawn/... deeper on every rerun."""
    detector, _ = models
    out = good_photos / "pred"
    for _ in range(3):
        res = _predict(cli, good_photos, detector, out)
        assert res.exit_code == 0, res.stderr
    pred = json.loads((out / "predictions.json").read_text())
    assert [im["file_name"] for im in pred["images"]] == ["a.png", "c.jpg", "sub/small.png"]
    assert not (out / "drawn" / "pred").exists()
    assert sorted(p.relative_to(out / "drawn").as_posix() for p in (out / "drawn").rglob("*.jpg")) == [
        "a.png.jpg", "c.jpg.jpg", "sub/small.png.jpg"]
    # A glob over the input folder skips it too; an explicit file in it is refused.
    res = _predict(cli, str(good_photos / "**" / "*.jpg"), detector, out)
    assert res.exit_code == 0, res.stderr
    res = _predict(cli, out / "drawn" / "a.png.jpg", detector, out)
    assert res.exit_code == 2 and "output folder" in _last_line(res.stderr), res.stderr


# 4. outputs do not depend on batching --------------------------------------------------------------

@pytest.mark.parametrize("sliced", [(), ("--slice", 96, "--overlap", 0.25, "--slice-full")], ids=["whole", "sliced"])
def test_results_do_not_depend_on_the_batch_size_or_on_a_kill_and_rerun(cli, frcnn, good_photos, tmp_path, sliced):
    """Was: --batch-size 1 and 4 gave scores about 1e-6 apart, and so did a rerun after a kill: a
    batch pads its images to a common size, and batched kernels round differently."""
    detector, _ = frcnn
    runs = {}
    for bs in (1, 3, 8):
        out = tmp_path / f"bs{bs}"
        res = _predict(cli, good_photos, detector, out, "--batch-size", bs, *sliced)
        assert res.exit_code == 0, res.stderr
        runs[bs] = (out / "predictions.json").read_bytes()
    assert json.loads(runs[1])["annotations"]
    assert runs[1] == runs[3] == runs[8]
    # Killed after the first image (alone in its batch), then rerun over all of them.
    out = tmp_path / "killed"
    assert _predict(cli, good_photos / "a.png", detector, out, "--batch-size", 8, *sliced).exit_code == 0
    res = _predict(cli, good_photos, detector, out, "--batch-size", 8, *sliced)
    assert res.exit_code == 0 and _metrics(out)["skipped_done"] == 1, res.stderr
    assert (out / "predictions.json").read_bytes() == runs[1]


# 5. options are checked ---------------------------------------------------------------------------

# Every float option of predict: (config field, CLI option, values to refuse besides nan and ±inf).
FLOAT_OPTIONS = {
    "small_area": ("--small-area", [-5.0]),
    "overlap": ("--overlap", [1.0, -0.5]),
    "context": ("--context", [0.5]),
    "score_thresh": ("--score-thresh", [-0.1, 1.5]),
    "merge_ios": ("--merge-ios", [0.0, 2.0]),
    "nms_iou": ("--nms-iou", [-0.1, 1.5]),
    "min_score": ("--min-score", [-0.1, 1.5]),
    "draw_threshold": ("--draw-threshold", [-1.0, 1.5]),
}


def test_the_float_option_table_covers_every_float_field_of_predict():
    import dataclasses
    import typing

    from sodtool.stages.predict import PredictConfig

    hints = typing.get_type_hints(PredictConfig)
    floats = {f.name for f in dataclasses.fields(PredictConfig)
              if hints[f.name] is float or float in typing.get_args(hints[f.name])}
    assert floats == set(FLOAT_OPTIONS)


@pytest.mark.parametrize("field, option, value", [(f, o, v) for f, (o, bad) in FLOAT_OPTIONS.items()
                                                  for v in (float("nan"), float("inf"), float("-inf"), *bad)])
def test_a_float_option_that_is_not_finite_or_out_of_range_is_refused(field, option, value, tmp_path):
    """Was: --score-thresh nan and --nms-iou nan exited 0 and wrote NaN into manifest.json;
    --draw-threshold nan and --merge-ios 2 were accepted."""
    from sodtool.errors import InputError
    from sodtool.stages.predict import PredictConfig, predict_images

    cfg = PredictConfig(inputs=(str(tmp_path),), detector=tmp_path / "d.pt", out=tmp_path / "out",
                        **{field: value})
    with pytest.raises(InputError) as e:
        predict_images(cfg)
    assert option in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option, value", [("--score-thresh", "nan"), ("--nms-iou", "nan"),
                                           ("--draw-threshold", "nan"), ("--merge-ios", "2"),
                                           ("--min-score", "inf")])
def test_the_float_options_of_the_issue_exit_2_in_one_line_and_write_nothing(cli, models, good_photos, tmp_path,
                                                                             option, value):
    out = tmp_path / "out"
    res = cli("predict", good_photos, "--detector", models[0], "--out", out, "--device", "cpu", option, value)
    assert res.exit_code == 2, (res.stderr, res.exception)
    assert len(res.stderr.strip().splitlines()) == 1 and option in res.stderr, res.stderr
    assert not out.exists()


# 6. a full disk while drawing ---------------------------------------------------------------------

def _full_after(budget: int):
    """An `open` for predict's raw image writes on a disk with `budget` bytes free: writes beyond
    it are short, then fail with ENOSPC, as on a full filesystem."""
    import errno
    import io
    import os

    left = {"bytes": budget}

    class Disk(io.FileIO):
        def write(self, b) -> int:
            view = memoryview(b).cast("B")
            if left["bytes"] <= 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            k = min(len(view), left["bytes"])
            left["bytes"] -= k
            return super().write(view[:k])

    def fake_open(path, mode="r", buffering=-1, **kw):
        assert "b" in mode and buffering == 0, (mode, buffering)
        return Disk(path, mode.replace("b", ""))

    return fake_open


def _complete_jpegs(folder: Path) -> list[str]:
    """The drawn images, each checked to decode whole (a truncated JPEG raises)."""
    names = []
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            with Image.open(p) as im:
                im.load()
            names.append(p.relative_to(folder).as_posix())
    return names


def test_a_full_disk_while_drawing_leaves_no_truncated_image_injected(cli, models, good_photos, tmp_path,
                                                                     monkeypatch):
    """Was: the right one line, but a truncated drawn/NAME.jpg.jpg left behind. The disk fills in
    the middle of the second drawn image."""
    import errno
    import os

    import sodtool.stages.predict as P

    detector, _ = models
    out = tmp_path / "pred"
    first = (tmp_path / "first")
    assert _predict(cli, good_photos / "a.png", detector, first).exit_code == 0
    size_first = (first / "drawn" / "a.png.jpg").stat().st_size
    monkeypatch.setattr(P, "open", _full_after(size_first + 5000), raising=False)
    res = _predict(cli, good_photos, detector, out)
    assert res.exit_code == 2, (res.stderr, res.exception)
    assert res.stderr.strip().splitlines() == [
        f"sodtool: error: {os.strerror(errno.ENOSPC)}: {out / 'drawn' / 'c.jpg.jpg'}"], res.stderr
    assert _complete_jpegs(out / "drawn") == ["a.png.jpg"]  # no temporary, nothing truncated
    assert len(list((out / "parts").iterdir())) == 1 and not (out / "manifest.json").exists()
    monkeypatch.undo()
    res = _predict(cli, good_photos, detector, out)
    assert res.exit_code == 0 and _metrics(out)["skipped_done"] == 1, res.stderr
    assert _complete_jpegs(out / "drawn") == ["a.png.jpg", "c.jpg.jpg", "sub/small.png.jpg"]


@pytest.fixture
def small_fs(tmp_path):
    """An empty folder on a 32 KB tmpfs; skips where none can be mounted (not root, no mount(8))."""
    import os
    import shutil
    import subprocess

    d = tmp_path / "small"
    d.mkdir()
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a small filesystem needs root and mount(8); the injected variant covers the rest")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32k", "tmpfs", str(d)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield d
    if subprocess.run(["umount", str(d)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def test_a_full_small_filesystem_while_drawing_leaves_no_truncated_image(cli, models, good_photos, small_fs):
    """On a real 32 KB filesystem the first drawn image (about 55 KB) does not fit. PIL's own save
    ended without an error on the short write, and the truncated image was renamed into place."""
    import errno
    import os

    detector, _ = models
    out = small_fs / "pred"
    res = _predict(cli, good_photos / "a.png", detector, out)
    assert res.exit_code == 2, (res.stderr, res.exception)
    assert _complete_jpegs(out) == []  # nothing left but empty folders: no temporary, nothing truncated
    assert not (out / "manifest.json").exists()
    assert res.stderr.strip().splitlines() == [
        f"sodtool: error: {os.strerror(errno.ENOSPC)}: {out / 'drawn' / 'a.png.jpg'}"], res.stderr


# 7. messages that name what is wrong ---------------------------------------------------------------

def test_a_torchvision_state_dict_without_class_names_names_an_option_predict_has(cli, frcnn, good_photos, tmp_path):
    """Was: "... give the dataset it was trained on", an option predict does not have."""
    res = cli("predict", good_photos, "--detector", frcnn[1], "--out", tmp_path / "out", "--device", "cpu")
    assert res.exit_code == 2, (res.stderr, res.exception)
    line = res.stderr.strip()
    assert len(line.splitlines()) == 1 and "no category names" in line and "--detector" in line, line
    assert "dataset" not in line


def test_an_explicit_fifo_folder_or_dangling_symlink_says_what_it_is(cli, models, tmp_path):
    """Was: "input not found" for a FIFO."""
    import os

    detector, _ = models
    os.mkfifo(tmp_path / "pipe.jpg")
    (tmp_path / "folder.jpg").mkdir()
    (tmp_path / "link.jpg").symlink_to(tmp_path / "gone.jpg")
    for name, what in (("pipe.jpg", "is a FIFO"), ("folder.jpg", "is a folder without image files"),
                       ("link.jpg", "is a dangling symlink to")):
        res = cli("predict", tmp_path / name, "--detector", detector, "--out", tmp_path / "out", "--device", "cpu")
        assert res.exit_code == 2, (res.stderr, res.exception)
        assert len(res.stderr.strip().splitlines()) == 1 and what in res.stderr and name in res.stderr, res.stderr


def test_a_dangling_symlink_in_an_input_folder_is_named(cli, models, good_photos, tmp_path):
    """Was: skipped without being named (exit 0). Now named on stderr, counted as unreadable, and
    the other images written."""
    detector, _ = models
    (good_photos / "gone.jpg").symlink_to(tmp_path / "deleted.jpg")
    out = tmp_path / "out"
    res = _predict(cli, good_photos, detector, out)
    assert res.exit_code == 2, (res.stderr, res.exception)
    assert "gone.jpg: a dangling symlink" in res.stderr, res.stderr
    assert _last_line(res.stderr).startswith("sodtool: error: 1 of 4 inputs could not be read"), res.stderr
    assert _metrics(out)["images"] == 3 and _metrics(out)["unreadable"] == 1
