"""`sodtool data slice`: tiles of a dataset with their boxes (clipped, kept by visibility), mapped
back exactly by their recorded offsets; bad options are one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sodtool.coco import SplitPaths, load_split
from sodtool.slicing import tile_grid
from sodtool.stages.slice_data import tile_boxes

CATS = [{"id": 3, "name": "car", "supercategory": ""}, {"id": 7, "name": "van", "supercategory": ""}]


def _dataset(root: Path, boxes_per_image: list[list[list[float]]], size=(300, 200), split="train") -> Path:
    """A dataset in sodtool's layout: random-pixel PNG images of `size` (w, h), boxes xywh px."""
    rng = np.random.default_rng(0)
    (root / "images" / split).mkdir(parents=True)
    (root / "annotations").mkdir(exist_ok=True)
    images, anns = [], []
    for i, boxes in enumerate(boxes_per_image, 1):
        w, h = size
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "images" / split / f"im{i}.png")
        images.append({"id": i, "file_name": f"im{i}.png", "width": w, "height": h})
        for b in boxes:
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": 3 if len(anns) % 2 == 0 else 7,
                         "bbox": b, "area": b[2] * b[3], "iscrowd": 0})
    (root / "annotations" / f"instances_{split}.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": CATS}))
    return root


def test_tile_boxes_clip_and_keep_by_visibility():
    tile = np.array([100.0, 0.0, 200.0, 100.0])
    boxes = np.array([
        [110, 10, 130, 30],   # inside: kept whole
        [90, 10, 110, 30],    # half inside (10 of 20 px): kept at 0.5, clipped to x 100..110
        [85, 40, 105, 60],    # a quarter inside: dropped at 0.5
        [195, 50, 215, 70],   # a quarter inside, at the right edge: dropped
        [300, 0, 310, 10],    # elsewhere
    ], np.float64)
    idx, clipped, was_clipped = tile_boxes(boxes, tile, 0.5)
    assert idx.tolist() == [0, 1]
    np.testing.assert_allclose(clipped, [[10, 10, 30, 30], [0, 10, 10, 30]])
    assert was_clipped.tolist() == [False, True]
    # A lower threshold keeps the quarter-visible boxes too; 1.0 keeps only whole boxes.
    assert tile_boxes(boxes, tile, 0.25)[0].tolist() == [0, 1, 2, 3]
    assert tile_boxes(boxes, tile, 1.0)[0].tolist() == [0]
    # A clipped box under 1 px wide is no box, whatever the threshold.
    assert tile_boxes(np.array([[199.5, 0, 260, 10]]), tile, 0.001)[0].tolist() == []


def test_slice_writes_tiles_whose_boxes_map_back_to_the_source(cli, tmp_path):
    boxes = [[[10, 10, 20, 20], [140, 60, 30, 30], [250, 150, 40, 40], [95, 95, 12, 12]],
             [[5, 150, 25, 25]],
             []]
    src = _dataset(tmp_path / "src", boxes)
    out = tmp_path / "tiles"
    res = cli("data", "slice", "--data", src, "--size", "128", "--overlap", "0.25", "--empty-ratio", "0",
              "--out", out)
    assert res.exit_code == 0, res.stderr
    split = load_split(SplitPaths(out / "annotations" / "instances_train.json", out / "images" / "train"))
    source = load_split(SplitPaths(src / "annotations" / "instances_train.json", src / "images" / "train"))
    assert split.coco.dataset["categories"] == CATS  # the source's ids and names
    whole = set()
    for iid in split.image_ids:
        info = split.coco.imgs[iid]
        t = info["tile"]
        x0, y0 = t["offset"]
        # The tile is one of the grid's, and its pixels are the source image's.
        grid = tile_grid(300, 200, 128, 0.25).tolist()
        assert [x0, y0, x0 + info["width"], y0 + info["height"]] in grid
        src_pixels = source.load_image(t["source_image_id"])
        assert np.array_equal(split.load_image(iid), src_pixels[y0:y0 + info["height"], x0:x0 + info["width"]])
        assert split.annotations(iid), "--empty-ratio 0 keeps no empty tile"
        for a in split.annotations(iid):
            s = source.coco.anns[a["source_annotation_id"]]
            assert s["image_id"] == t["source_image_id"] and s["category_id"] == a["category_id"]
            back = [a["bbox"][0] + x0, a["bbox"][1] + y0, a["bbox"][2], a["bbox"][3]]
            if not a["clipped"]:
                np.testing.assert_allclose(back, s["bbox"], atol=1e-4)  # kept whole: the source box exactly
                whole.add(s["id"])
            else:  # clipped: inside the source box, at least half of it
                assert back[0] >= s["bbox"][0] - 1e-4 and back[0] + back[2] <= s["bbox"][0] + s["bbox"][2] + 1e-4
                assert back[2] * back[3] >= 0.5 * s["bbox"][2] * s["bbox"][3] - 1e-3
    # With a 0.25 overlap of 128 px tiles every box up to 32 px lies whole in some tile.
    assert whole == {1, 2, 3, 4, 5}
    manifest = json.loads((out / "manifest.json").read_text())
    m = manifest["metrics"]["train"]
    assert manifest["stage"] == "data-slice" and "train_annotations" in manifest["inputs"]
    assert m["source_images"] == 3 and m["source_boxes"] == 5 and m["empty_tiles_kept"] == 0
    assert m["tiles"] == m["tiles_with_objects"] == len(split.image_ids)
    # An existing output is refused, and left whole.
    res = cli("data", "slice", "--data", src, "--size", "128", "--out", out)
    assert res.exit_code == 2 and "already exists" in res.stderr
    assert (out / "manifest.json").is_file()


def test_slice_keeps_empty_tiles_up_to_the_ratio_and_repeats_for_a_seed(cli, tmp_path):
    src = _dataset(tmp_path / "src", [[[10, 10, 20, 20]], [], []], size=(256, 256))
    runs = []
    for name, ratio in (("a", "2"), ("b", "2"), ("c", "0.5")):
        res = cli("data", "slice", "--data", src, "--size", "64", "--overlap", "0", "--empty-ratio", ratio,
                  "--seed", "1", "--out", tmp_path / name)
        assert res.exit_code == 0, res.stderr
        runs.append(json.loads((tmp_path / name / "annotations" / "instances_train.json").read_text()))
    # One tile holds the box; 47 of the 48 tiles are empty; ratio 2 keeps 2 of them, 0.5 none.
    assert len(runs[0]["images"]) == 3 and len(runs[2]["images"]) == 1
    assert runs[0] == runs[1]


@pytest.mark.parametrize("extra,message", [
    (["--size", "8"], "--size must be at least 16 px, got 8"),
    (["--overlap", "1"], "--overlap must be in [0, 1), got 1.0"),
    (["--overlap", "-0.1"], "--overlap must be in [0, 1), got -0.1"),
    (["--min-visibility", "0"], "--min-visibility must be in (0, 1], got 0.0"),
    (["--empty-ratio", "-1"], "--empty-ratio must be a number >= 0, got -1.0"),
    (["--split", "train", "--split", "train"], "--split given twice: train, train"),
    (["--split", "nosuch"], "nosuch"),
])
def test_slice_refuses_bad_options_in_one_line(cli, tmp_path, extra, message):
    src = _dataset(tmp_path / "src", [[[10, 10, 20, 20]]])
    res = cli("data", "slice", "--data", src, "--out", tmp_path / "out", *extra)
    assert res.exit_code == 2 and message in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_tiles_ground_truth_merged_back_reproduces_the_full_image_ground_truth(cli, tmp_path):
    """data slice's tile boxes, used as predictions, shifted by their offsets and merged across
    tiles as sliced inference merges (only boxes of different tiles), evaluate to AP 100
    against the full images: pieces cut by tile borders join their whole box."""
    from collections import defaultdict

    from sodtool.evaluate import coco_evaluate
    from sodtool.slicing import merge_detections

    boxes = [[[10, 10, 20, 20], [120, 60, 30, 30], [250, 150, 40, 40], [90, 90, 24, 24], [60, 150, 14, 30]],
             [[5, 150, 25, 25], [100, 100, 60, 50]]]
    src = _dataset(tmp_path / "src", boxes)
    out = tmp_path / "tiles"
    res = cli("data", "slice", "--data", src, "--size", "128", "--overlap", "0.25", "--min-visibility", "0.2",
              "--out", out)
    assert res.exit_code == 0, res.stderr
    tiles = json.loads((out / "annotations" / "instances_train.json").read_text())
    info = {im["id"]: im["tile"] for im in tiles["images"]}
    per_image = defaultdict(list)
    for a in tiles["annotations"]:
        t = info[a["image_id"]]
        x, y, w, h = a["bbox"]
        x0, y0 = t["offset"]
        per_image[t["source_image_id"]].append(([x + x0, y + y0, x + x0 + w, y + y0 + h], a["category_id"],
                                                a["image_id"], 0.5 if a["clipped"] else 1.0))
    assert any(c == 0.5 for rows in per_image.values() for *_, c in rows), "some boxes are cut by a border"
    results = []
    for iid, rows in per_image.items():
        m = merge_detections(np.array([r[0] for r in rows]), np.array([r[3] for r in rows]),
                             np.array([r[1] for r in rows]), groups=np.array([r[2] for r in rows]))
        results += [{"image_id": iid, "category_id": int(c), "score": float(s),
                     "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]}
                    for b, s, c in zip(m["boxes"], m["scores"], m["labels"])]
    source = load_split(SplitPaths(src / "annotations" / "instances_train.json", src / "images" / "train"))
    stats = coco_evaluate(source.coco, results)
    assert len(results) == 7 and stats["AP"] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------
# Train and test scales that agree: the detector records how it was trained, sliced inference follows
# ------------------------------------------------------------------------------------------------

TINY_DET = ["--min-size", "64", "--max-size", "64", "--fpn-channels", "16", "--anchor-sizes", "8,16,32,64",
            "--batch-size", "2", "--iterations", "1", "--no-eval", "--device", "cpu"]


def test_train_detector_records_its_training_scale_and_tiles(cli, tmp_path):
    import torch

    src = _dataset(tmp_path / "src", [[[10, 10, 30, 20], [150, 80, 40, 30]], [[60, 60, 20, 20]]], size=(256, 128))
    res = cli("--quiet", "data", "slice", "--data", src, "--split", "train", "--size", "64", "--overlap", "0",
              "--out", tmp_path / "tiles")
    assert res.exit_code == 0, res.stderr
    res = cli("--quiet", "train", "detector", "--data", tmp_path / "tiles", "--out", tmp_path / "on_tiles", *TINY_DET)
    assert res.exit_code == 0, res.stderr
    assert torch.load(tmp_path / "on_tiles" / "model.pt", weights_only=True)["trained_at"] == {"scale": 1.0, "tile": 64}
    # Whole 256 x 128 images into a 64 / 64 px input: shrunk to a quarter (the long side is capped).
    res = cli("--quiet", "train", "detector", "--data", src, "--out", tmp_path / "whole", *TINY_DET)
    assert res.exit_code == 0, res.stderr
    assert torch.load(tmp_path / "whole" / "model.pt", weights_only=True)["trained_at"] == {"scale": 0.25, "tile": None}
    # Scale jitter: the middle of --train-sizes (short side 128 -> 96, under the long side's cap of 512).
    res = cli("--quiet", "train", "detector", "--data", src, "--out", tmp_path / "jitter", *TINY_DET,
              "--max-size", "512", "--train-sizes", "64,96,128")
    assert res.exit_code == 0, res.stderr
    assert torch.load(tmp_path / "jitter" / "model.pt", weights_only=True)["trained_at"] == {"scale": 0.75, "tile": None}


def _tiny_loaded(trained_at: dict):
    import torch

    from sodtool.coco import CategoryMap
    from sodtool.models.detectors import LoadedDetector
    from sodtool.models.frcnn import build_detector

    torch.manual_seed(0)
    model = build_detector("mobilenet_v3_fpn", 3, min_size=64, max_size=64, fpn_channels=16,
                           returned_layers=[2, 3, 4], anchor_sizes=[[8], [16], [32], [64]]).eval()
    cats = CategoryMap.from_json(CATS)
    return LoadedDetector(model=model, categories=cats, arch="mobilenet_v3_fpn", identity={}, trained_at=trained_at)


def _input_sides(det, image, **kw) -> list[tuple[int, int]]:
    """The (h, w) of every image the detector's transform resized, in the order it ran them."""
    from sodtool.models.detectors import predict_sliced

    seen: list[tuple[int, int]] = []
    t = det.model.transform
    orig = t.resize

    def spy(img, target=None):
        out = orig(img, target)
        seen.append(tuple(out[0].shape[-2:]))
        return out

    t.resize = spy
    try:
        predict_sliced(det, [image], **kw)
    finally:
        del t.resize
    return seen


def test_sliced_inference_feeds_tiles_at_the_recorded_scale():
    image = np.random.default_rng(0).integers(0, 256, (128, 192, 3), dtype=np.uint8)
    # Trained at half size: 64 px tiles run at 32 px, whatever the 64 px input of whole images.
    assert _input_sides(_tiny_loaded({"scale": 0.5}), image, tile=64, overlap=0.0) == [(32, 32)] * 6
    # No record (older files): the detector's own input size, as before.
    assert _input_sides(_tiny_loaded({}), image, tile=64, overlap=0.0) == [(64, 64)] * 6
    # The whole-image pass (--slice-full) keeps the detector's own size (long side 64).
    sides = _input_sides(_tiny_loaded({"scale": 1.0}), image, tile=64, overlap=0.0, full=True)
    assert sides == [(64, 64)] * 6 + [(42, 64)]  # 128 x 192 shrunk by 64 / 192, floored


def test_a_detector_trained_on_tiles_slices_at_its_tile_size_by_default(capsys):
    from sodtool.console import set_quiet
    from sodtool.models.detectors import resolve_slicing

    set_quiet(False)  # an earlier `--quiet` command in this process leaves the console quiet
    tiled, whole = _tiny_loaded({"scale": 1.0, "tile": 256}), _tiny_loaded({"scale": 1.0, "tile": None})
    assert resolve_slicing(tiled, None, "m.pt") == (256, 0.2, False)
    assert resolve_slicing(tiled, (None, 0.3, True), "m.pt") == (256, 0.3, True)
    assert "trained on 256 px tiles" in capsys.readouterr().err
    assert resolve_slicing(tiled, (0, 0.2, False), "m.pt") is None
    assert "--slice 0 runs it on whole images" in capsys.readouterr().err
    assert resolve_slicing(tiled, (512, 0.2, False), "m.pt") == (512, 0.2, False)
    assert resolve_slicing(whole, (None, 0.2, False), "m.pt") is None
    assert resolve_slicing(whole, (0, 0.2, False), "m.pt") is None and capsys.readouterr().err == ""
