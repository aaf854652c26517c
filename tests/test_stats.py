"""Dataset statistics: exact counts on a hand-made split, agreement with pycocotools on COCO val2014."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sodtool.coco import SplitPaths, coco_from_dict, load_split
from sodtool.stages.stats import HIST_EDGES, bin_labels, compute_stats, histogram_text, size_histogram


def ann(aid, iid, cid, bbox, area=None, crowd=0):
    a = {"id": aid, "image_id": iid, "category_id": cid, "bbox": bbox, "iscrowd": crowd}
    if area is not None:
        a["area"] = area
    return a


# Image 3 holds only a crowd region, image 4 nothing; category 9 has no object. Areas sit on
# and next to the COCO thresholds; annotation 8's `area` (a mask area) differs from its box's
# w*h, and annotation 9 has no `area` (w*h is used).
TINY = {
    "images": [{"id": 1, "width": 100, "height": 100, "file_name": "1.png"},
               {"id": 2, "width": 200, "height": 200, "file_name": "2.png"},
               {"id": 3, "width": 50, "height": 50, "file_name": "3.png"},
               {"id": 4, "width": 60, "height": 60, "file_name": "4.png"}],
    "categories": [{"id": 1, "name": "a"}, {"id": 5, "name": "b"}, {"id": 9, "name": "c"}],
    "annotations": [
        ann(1, 1, 1, [0, 0, 4, 4], 16),                 # small, 0-8
        ann(2, 1, 1, [10, 10, 31.9, 32], 31.9 * 32),    # small (1020.8), 24-32
        ann(3, 1, 5, [20, 20, 32, 32], 1024),           # exactly 32²: medium, 32-48
        ann(4, 2, 5, [0, 0, 96, 96], 9216),             # exactly 96²: large, 96-128
        ann(5, 2, 1, [100, 100, 50, 40], 2000),         # medium, 32-48
        ann(6, 2, 1, [0, 0, 200, 200], 40000),          # large, 128-256
        ann(7, 3, 5, [0, 0, 10, 10], 100, crowd=1),     # crowd: not an object
        ann(8, 2, 5, [10, 10, 20, 20], 300),            # area 300 (box 400): small, 16-24
        ann(9, 1, 5, [20, 25, 70, 70]),                 # no area -> 4900: medium, 64-96
    ],
}


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    ds = tmp_path / "tiny"
    (ds / "annotations").mkdir(parents=True)
    (ds / "images" / "train").mkdir(parents=True)
    (ds / "annotations" / "instances_train.json").write_text(json.dumps(TINY))
    for im in TINY["images"][:3]:  # 4.png is missing on purpose
        Image.new("RGB", (im["width"], im["height"])).save(ds / "images" / "train" / im["file_name"])
    return ds


def test_tiny_exact_counts(cli, tiny_dataset, tmp_path):
    out = tmp_path / "out"
    res = cli("data", "stats", "--data", tiny_dataset, "--split", "train", "--out", out)
    assert res.exit_code == 0, res.stderr
    s = json.loads((out / "stats_train.json").read_text())
    assert (s["images"], s["categories"], s["objects"], s["crowd"]) == (4, 3, 8, 1)
    assert s["images_without_objects"] == 2
    assert s["objects_per_image"] == {"mean": 2.0, "max": 4}
    assert s["sizes"] == {"small": {"count": 3, "fraction": 3 / 8}, "medium": {"count": 3, "fraction": 3 / 8},
                          "large": {"count": 2, "fraction": 2 / 8}}
    assert s["histogram"]["labels"] == ["0-8", "8-16", "16-24", "24-32", "32-48", "48-64", "64-96", "96-128",
                                        "128-256", "256+"]
    assert s["histogram"]["counts"] == [1, 0, 1, 1, 2, 0, 1, 1, 1, 0]
    assert s["per_class"] == [
        {"id": 1, "name": "a", "objects": 4, "small": 2, "medium": 1, "large": 1, "images": 2},
        {"id": 5, "name": "b", "objects": 4, "small": 1, "medium": 2, "large": 1, "images": 2},
        {"id": 9, "name": "c", "objects": 0, "small": 0, "medium": 0, "large": 0, "images": 0},
    ]
    assert s["missing_image_files"] == 1
    assert "1 of 4 image files are missing" in res.stderr
    with Image.open(out / "sizes_train.png") as im:
        assert im.format == "PNG" and im.size == (900, 520)
        im.verify()
    with Image.open(out / "sizes_train.png") as im:
        # Bars are drawn: the plot is not blank.
        assert len(np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)) > 10
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "data-stats"
    assert sorted(manifest["outputs"]) == ["sizes_train.png", "stats_train.json"]


def test_default_out_and_ann_only(cli, tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = cli("data", "stats", "--data", tiny_dataset)
    assert res.exit_code == 0, res.stderr
    assert (tmp_path / "runs" / "stats" / "tiny_train" / "manifest.json").is_file()
    # --ann alone: no image folder, so no missing-file count.
    res = cli("-q", "data", "stats", "--ann", tiny_dataset / "annotations" / "instances_train.json",
              "--out", tmp_path / "o")
    assert res.exit_code == 0, res.stderr
    s = json.loads((tmp_path / "o" / "stats_train.json").read_text())
    assert s["objects"] == 8 and "missing_image_files" not in s and s["image_dir"] is None


def test_errors(cli, tmp_path):
    res = cli("data", "stats", "--data", tmp_path / "nope")
    assert res.exit_code == 2 and res.stderr.strip() == f"sodtool: error: dataset folder not found: {tmp_path / 'nope'}"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**TINY, "annotations": [ann(1, 1, 1, [0, 0, 0, 5], 0)]}))
    res = cli("data", "stats", "--ann", bad, "--out", tmp_path / "o")
    assert res.exit_code == 2 and "has zero or negative size" in res.stderr
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_histogram_edges_agree_with_buckets():
    # sqrt(area) bins compared on area: a box just under 32² is never put in the 32-48 bin.
    assert size_histogram([1023.9999999999999, 1024.0, 9215.999999999998, 9216.0, 0.0, 1e9]) == \
        [1, 0, 0, 1, 1, 0, 1, 1, 0, 1]
    assert len(bin_labels()) == len(HIST_EDGES)
    text = histogram_text([1, 0, 0, 1, 1, 0, 1, 1, 0, 1])
    assert "  24-32 |" in text and "1 (16.7%)" in text


def test_cocoeval_gt_agrees_with_pycocotools(shared_data):
    """Bucket counts equal the ground truth COCOeval does not ignore in each of its areaRng."""
    from pycocotools.cocoeval import COCOeval

    d = shared_data / "cocoeval"
    split = load_split(SplitPaths(d / "instances_val2014_100.json", d), check_files=False)
    s = compute_stats(split.coco)
    assert (s["objects"], s["crowd"], s["images"], s["images_without_objects"]) == (830, 9, 100, 0)
    assert {b: s["sizes"][b]["count"] for b in ("small", "medium", "large")} == {"small": 407, "medium": 240,
                                                                                 "large": 183}
    assert sum(s["histogram"]["counts"]) == 830
    assert sum(s["histogram"]["counts"][:4]) == 407 and sum(s["histogram"]["counts"][4:7]) == 240
    assert sum(c["objects"] for c in s["per_class"]) == 830

    gt = split.coco
    empty = coco_from_dict({"images": gt.dataset["images"], "categories": gt.dataset["categories"], "annotations": []})
    ev = COCOeval(gt, empty, iouType="bbox")
    ev.evaluate()
    counted = {lbl: 0 for lbl in ev.params.areaRngLbl}
    rng_to_lbl = {tuple(r): lbl for r, lbl in zip(ev.params.areaRng, ev.params.areaRngLbl)}
    for e in ev.evalImgs:
        if e is not None:
            counted[rng_to_lbl[tuple(e["aRng"])]] += int(np.sum(np.logical_not(e["gtIgnore"])))
    # pycocotools' ranges are closed at both ends; no area of this file sits on 32² or 96².
    areas = [a["area"] for a in gt.dataset["annotations"]]
    assert 32**2 not in areas and 96**2 not in areas
    assert counted == {"all": 830, "small": 407, "medium": 240, "large": 183}
