"""COCO evaluation: exact numbers (COCO API reference, hand-made cases) and input errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sodtool.coco import coco_from_dict
from sodtool.errors import InputError
from sodtool.evaluate import STAT_NAMES, check_results, coco_evaluate

# Two images; categories with gaps (7 has no ground truth); one object of each COCO size; at
# most one object per (image, category) so that AR1 can reach 1.
GT = {
    "images": [{"id": 1, "width": 100, "height": 100, "file_name": "1.png"},
               {"id": 2, "width": 200, "height": 200, "file_name": "2.png"}],
    "categories": [{"id": 1, "name": "a"}, {"id": 3, "name": "b"}, {"id": 7, "name": "c"}],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 10, 10], "area": 100, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [40, 40, 40, 40], "area": 1600, "iscrowd": 0},
        {"id": 3, "image_id": 2, "category_id": 1, "bbox": [50, 50, 100, 100], "area": 10000, "iscrowd": 0},
    ],
}


def perfect(gt: dict) -> list[dict]:
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]), "score": 0.9}
            for a in gt["annotations"]]


@pytest.fixture
def gt_file(tmp_path: Path) -> Path:
    p = tmp_path / "gt.json"
    p.write_text(json.dumps(GT))
    return p


def write_results(tmp_path: Path, results, name: str = "results.json") -> Path:
    p = tmp_path / name
    p.write_text(results if isinstance(results, str) else json.dumps(results))
    return p


def test_cocoeval_reference_numbers_exact(shared_data, cli, tmp_path):
    """The COCO API's own fake bbox results reproduce its recorded 12 stats exactly."""
    d = shared_data / "cocoeval"
    expected = json.loads((d / "expected_bbox_stats.json").read_text())
    out = tmp_path / "ev"
    res = cli("eval", "--results", d / "instances_val2014_fakebbox100_results.json",
              "--ann", d / "instances_val2014_100.json", "--out", out)
    assert res.exit_code == 0, res.stderr
    assert res.stdout == ""  # pycocotools' chatter must not reach stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(expected["keys"]) == list(STAT_NAMES)
    for name, want in zip(expected["keys"], expected["bbox"]):
        assert metrics[name] == pytest.approx(want, abs=1e-9), name
    # Per-class AP: the mean over classes with ground truth is COCO's AP.
    per_class = [v for v in metrics["per_class_AP"].values() if v is not None]
    assert len(metrics["per_class_AP"]) == 80 and len(per_class) == 70
    assert sum(per_class) / len(per_class) == pytest.approx(metrics["AP"], abs=1e-12)
    assert metrics["counts"] == {"images": 100, "categories": 80, "gt_objects": 830, "gt_crowd": 9,
                                 "detections": 734, "images_with_detections": 99}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "eval-results" and manifest["metrics"]["AP"] == metrics["AP"]
    assert "| AP | 0.5046 |" in (out / "metrics.md").read_text()


def test_perfect_detections_give_one(cli, tmp_path, gt_file):
    results = write_results(tmp_path, perfect(GT))
    res = cli("eval", "--results", results, "--ann", gt_file)  # default --out
    assert res.exit_code == 0, res.stderr
    metrics = json.loads((tmp_path / "eval_results" / "metrics.json").read_text())
    # COCOeval averages 1.0s in floating point: 1 - 2e-16 for some entries.
    assert [metrics[k] for k in STAT_NAMES] == pytest.approx([1.0] * 12, abs=1e-12)
    assert metrics["per_class_AP"] == {"a": pytest.approx(1.0, abs=1e-12), "b": pytest.approx(1.0, abs=1e-12), "c": None}
    assert (tmp_path / "eval_results" / "manifest.json").is_file()


def test_one_hit_one_false_positive_exact():
    """One class, two objects, one found and one false alarm ranked second.

    Precision is 1 up to recall 0.5 and 0 beyond, at every IoU threshold, so COCO's 101-point
    AP is 51/101 and recall is 1/2.
    """
    gt = {
        "images": [{"id": 5, "width": 300, "height": 300, "file_name": "5.png"}],
        "categories": [{"id": 2, "name": "x"}],
        "annotations": [
            {"id": 1, "image_id": 5, "category_id": 2, "bbox": [10, 10, 50, 50], "area": 2500, "iscrowd": 0},
            {"id": 2, "image_id": 5, "category_id": 2, "bbox": [200, 200, 60, 60], "area": 3600, "iscrowd": 0},
        ],
    }
    dets = [{"image_id": 5, "category_id": 2, "bbox": [10, 10, 50, 50], "score": 0.9},
            {"image_id": 5, "category_id": 2, "bbox": [100, 100, 50, 50], "score": 0.8}]
    before = json.dumps(dets)
    m = coco_evaluate(coco_from_dict(gt), dets)
    assert json.dumps(dets) == before  # loadRes adds keys in place: the caller's list stays as it was
    for k in ("AP", "AP50", "AP75", "AP_medium"):
        assert m[k] == pytest.approx(51 / 101, abs=1e-12), k
    for k in ("AR1", "AR10", "AR100", "AR_medium"):
        assert m[k] == pytest.approx(0.5, abs=1e-12), k
    # No small or large ground truth: COCOeval's -1 ("undefined") is kept.
    assert m["AP_small"] == m["AP_large"] == m["AR_small"] == m["AR_large"] == -1.0
    assert m["per_class_AP"] == {"x": pytest.approx(51 / 101, abs=1e-12)}


def test_empty_results_give_zeros(cli, tmp_path, gt_file):
    m = coco_evaluate(coco_from_dict(json.loads(gt_file.read_text())), [])
    assert [m[k] for k in STAT_NAMES] == [0.0] * 12
    assert m["per_class_AP"] == {"a": 0.0, "b": 0.0, "c": None}
    res = cli("eval", "--results", write_results(tmp_path, []), "--ann", gt_file, "--out", tmp_path / "o")
    assert res.exit_code == 0, res.stderr
    saved = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert saved["AP"] == 0.0 and saved["counts"]["detections"] == 0


def test_data_folder_without_images(cli, tmp_path):
    """--data resolves the split's annotation file; the image folder is not needed."""
    ds = tmp_path / "ds"
    (ds / "annotations").mkdir(parents=True)
    (ds / "annotations" / "instances_minival.json").write_text(json.dumps(GT))
    results = write_results(tmp_path, perfect(GT))
    res = cli("eval", "--results", results, "--data", ds, "--out", tmp_path / "o")
    assert res.exit_code == 0, res.stderr
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["AP"] == pytest.approx(1.0, abs=1e-12)
    res = cli("eval", "--results", results, "--data", ds, "--split", "train", "--out", tmp_path / "o2")
    assert res.exit_code == 2 and "split 'train' not found" in res.stderr


def _error(cli, tmp_path, gt_file, results) -> str:
    out = tmp_path / "out"
    res = cli("eval", "--results", write_results(tmp_path, results), "--ann", gt_file, "--out", out)
    assert res.exit_code == 2, (res.exit_code, res.stderr, res.exception)
    msg = res.stderr.strip()
    assert msg.startswith("sodtool: error: ") and "\n" not in msg, msg
    assert not (out / "manifest.json").exists()
    return msg


def test_unknown_category_ids(cli, tmp_path, gt_file):
    dets = perfect(GT) + [{"image_id": 1, "category_id": c, "bbox": [0, 0, 5, 5], "score": 0.1} for c in (91, 92, 91)]
    msg = _error(cli, tmp_path, gt_file, dets)
    assert msg.endswith("results.json: 3 detections have category ids not in the ground truth: 91, 92 "
                        "(ground truth has 1..7 with gaps: 3 categories)")


def test_unknown_image_ids(cli, tmp_path, gt_file):
    dets = perfect(GT) + [{"image_id": i, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.1} for i in (9, 8, 9, 9)]
    msg = _error(cli, tmp_path, gt_file, dets)
    assert "4 detections on 2 image ids not in the ground truth: 8, 9 (ground truth has 1..2: 2 images" in msg


@pytest.mark.parametrize("entry, fragment", [
    ({"image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5]}, "detection 3 has no 'score'"),
    ({"image_id": 1, "category_id": 1, "bbox": [0, 0, 5], "score": 0.5}, "has bbox [0, 0, 5], expected [x, y, w, h]"),
    ({"image_id": 1, "category_id": 1, "bbox": [0, 0, -5, 5], "score": 0.5}, "negative width or height"),
    ({"image_id": 1, "category_id": 1, "bbox": [0, 0, 5, "5"], "score": 0.5}, "expected [x, y, w, h] of 4 finite"),
    ({"image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "score": float("nan")}, "has score nan"),
    ({"image_id": 1, "category_id": 1, "bbox": [0, 0, float("inf"), 5], "score": 0.5}, "4 finite numbers"),
    ({"image_id": "1", "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5}, "non-integer image_id '1'"),
    ({"image_id": 1, "category_id": 1.5, "bbox": [0, 0, 5, 5], "score": 0.5}, "non-integer category_id 1.5"),
    ([1, 1, [0, 0, 5, 5], 0.5], "detection 3 is not an object (list)"),
])
def test_malformed_entries(cli, tmp_path, gt_file, entry, fragment):
    msg = _error(cli, tmp_path, gt_file, perfect(GT) + [entry])
    assert "results.json: detection 3" in msg and fragment in msg, msg


def test_many_malformed_entries_counted(tmp_path, gt_file):
    bad = [{"image_id": 1}] * 4
    with pytest.raises(InputError, match=r"detection 0 has no 'category_id' \(4 malformed detections in all\)"):
        check_results(coco_from_dict(json.loads(gt_file.read_text())), bad, "r.json")


def test_not_a_list(cli, tmp_path, gt_file):
    msg = _error(cli, tmp_path, gt_file, GT)
    assert "results must be a JSON list of detections, found a JSON object (a COCO annotation file?" in msg


def test_malformed_json(cli, tmp_path, gt_file):
    msg = _error(cli, tmp_path, gt_file, '[{"image_id": 1,')
    assert "results.json is not valid JSON" in msg


def test_integer_valued_float_ids_accepted(tmp_path, gt_file):
    coco = coco_from_dict(json.loads(gt_file.read_text()))
    out = check_results(coco, [{"image_id": 1.0, "category_id": 3.0, "bbox": [1, 2, 3, 4], "score": 1}], "r")
    assert out == [{"image_id": 1, "category_id": 3, "bbox": [1.0, 2.0, 3.0, 4.0], "score": 1.0}]
    assert type(out[0]["image_id"]) is int


def test_usage_errors(cli, tmp_path, gt_file):
    res = cli("eval")
    assert res.exit_code == 2 and "give --results FILE" in res.stderr
    res = cli("eval", "--results", write_results(tmp_path, []))
    assert res.exit_code == 2 and "give a dataset folder (--data) or an annotation file (--ann)" in res.stderr
    res = cli("eval", "--results", tmp_path / "missing.json", "--ann", gt_file)
    assert res.exit_code == 2 and "results file not found" in res.stderr
    res = cli("eval", "--results", write_results(tmp_path, []), "--ann", tmp_path / "nope.json")
    assert res.exit_code == 2 and "annotation file not found" in res.stderr
