"""The COCO data layer (`sodtool.coco`): validated loading, bad input, image decoding, split
resolution and the category map. Datasets are made in tmp_path; bad input is checked through the
functions and, where a command reads it, through the CLI (exit 2, one line on stderr)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sodtool.coco import (
    CategoryMap,
    SplitPaths,
    load_split,
    read_image_rgb,
    resolve_split,
    size_bucket,
    validate_coco_dict,
    xywh_to_xyxy,
    xyxy_to_xywh,
)
from sodtool.errors import InputError

# Categories with COCO-like gaps: labels 1..3 <-> ids 1, 3, 90.
CATS = [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}]


def make_dataset(root: Path, split: str = "train") -> tuple[SplitPaths, dict]:
    """Three PNG images (sizes 64x48, 32x32, 40x30) and four boxes, in sodtool's layout."""
    img_dir = root / "images" / split
    img_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = []
    for iid, (w, h) in zip((7, 3, 12), ((64, 48), (32, 32), (40, 30))):
        name = f"img{iid}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(img_dir / name)
        images.append({"id": iid, "file_name": name, "width": w, "height": h})
    anns = [
        {"id": 1, "image_id": 7, "category_id": 90, "bbox": [10, 5, 20, 10], "area": 200.0, "iscrowd": 0},
        {"id": 2, "image_id": 7, "category_id": 1, "bbox": [0, 0, 64, 48], "area": 3072.0, "iscrowd": 0},
        {"id": 5, "image_id": 3, "category_id": 3, "bbox": [1.5, 2.5, 4, 6], "iscrowd": 0},
        {"id": 9, "image_id": 3, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100.0, "iscrowd": 1},
    ]
    data = {"images": images, "annotations": anns, "categories": copy.deepcopy(CATS)}
    return write_ann(root, split, data), data


def write_ann(root: Path, split: str, data) -> SplitPaths:
    ann = root / "annotations" / f"instances_{split}.json"
    ann.parent.mkdir(parents=True, exist_ok=True)
    ann.write_text(json.dumps(data))
    return SplitPaths(ann=ann, images=root / "images" / split)


def stats_cli(cli, paths: SplitPaths, tmp_path: Path):
    """`sodtool data stats` on an annotation file: a command that loads a split through load_split."""
    return cli("--quiet", "data", "stats", "--ann", paths.ann, "--out", tmp_path / "stats_out")


def assert_one_line_error(res, message: str) -> None:
    assert res.exit_code == 2, (res.stdout, res.stderr, res.exception)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sodtool: error: ") and message in lines[0], res.stderr


# --------------------------------------------------------------------------- a valid split


def test_load_split_and_targets(tmp_path):
    paths, _ = make_dataset(tmp_path)
    s = load_split(paths)
    assert s.image_ids == [3, 7, 12]
    assert s.categories.ids == (1, 3, 90) and s.categories.names == ("person", "car", "toothbrush")
    t = s.targets(7)
    assert t["boxes"].dtype == np.float32 and t["boxes"].shape == (2, 4)
    np.testing.assert_array_equal(t["boxes"], [[10, 5, 30, 15], [0, 0, 64, 48]])
    np.testing.assert_array_equal(t["labels"], [3, 1])
    assert t["labels"].dtype == np.int64
    np.testing.assert_array_equal(t["areas"], [200, 3072])
    t = s.targets(3)  # the crowd region is left out; a missing area is w * h
    np.testing.assert_array_equal(t["boxes"], [[1.5, 2.5, 5.5, 8.5]])
    np.testing.assert_array_equal(t["labels"], [2])
    np.testing.assert_array_equal(t["areas"], [24.0])
    np.testing.assert_array_equal(s.targets(3, include_crowd=True)["ann_ids"], [5, 9])
    assert s.targets(12)["boxes"].shape == (0, 4) and s.targets(12)["labels"].shape == (0,)
    img = s.load_image(7)
    assert img.shape == (48, 64, 3) and img.dtype == np.uint8
    assert s.skipped == {}


def test_box_conversions_and_size_buckets():
    assert xywh_to_xyxy([1, 2, 3, 4]) == [1, 2, 4, 6]
    assert xyxy_to_xywh([1, 2, 4, 6]) == [1, 2, 3, 4]
    assert [size_bucket(a) for a in (0, 1023.9, 1024, 9215.9, 9216)] == ["small", "small", "medium", "medium", "large"]


def test_real_coco_ground_truth_validates(shared_data):
    d = shared_data / "cocoeval"
    s = load_split(SplitPaths(d / "instances_val2014_100.json", d), check_files=False)
    assert len(s.image_ids) == 100 and s.categories.num_classes == 80
    assert s.categories.ids[0] == 1 and s.categories.ids[-1] == 90


# --------------------------------------------------------------------------- bad files and images


def test_missing_image_file(tmp_path):
    paths, _ = make_dataset(tmp_path)
    (paths.images / "img12.png").unlink()
    with pytest.raises(InputError, match=r"image file missing: .*img12\.png"):
        load_split(paths)
    s = load_split(paths, check_files=False)  # statistics and evaluation need no images
    with pytest.raises(InputError, match=r"image file missing: .*img12\.png"):
        s.load_image(12)


def test_two_missing_images_are_counted(tmp_path):
    paths, _ = make_dataset(tmp_path)
    (paths.images / "img12.png").unlink()
    (paths.images / "img3.png").unlink()
    with pytest.raises(InputError, match=r"img3\.png and 1 more"):
        load_split(paths)


@pytest.mark.parametrize("kind", ["text", "truncated-jpeg", "truncated-png", "empty"])
def test_unreadable_image(tmp_path, kind):
    paths, data = make_dataset(tmp_path)
    target = paths.images / "img7.png"
    if kind == "text":
        target.write_text("this is not an image\n")
    elif kind == "truncated-jpeg":
        jpg = paths.images / "img7.jpg"
        Image.fromarray(np.random.default_rng(1).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(jpg, quality=90)
        jpg.write_bytes(jpg.read_bytes()[:600])
        data["images"][0]["file_name"] = "img7.jpg"
        write_ann(tmp_path, "train", data)
        target = jpg
    elif kind == "truncated-png":
        target.write_bytes(target.read_bytes()[:200])
    else:
        target.write_bytes(b"")
    s = load_split(paths)  # the files exist; decoding is what fails
    with pytest.raises(InputError, match=rf"image file unreadable: .*{target.name}") as e:
        s.load_image(7)
    assert "\n" not in str(e.value)


def test_image_size_disagrees_with_json(tmp_path):
    paths, data = make_dataset(tmp_path)
    data["images"][0]["width"] = 65
    paths = write_ann(tmp_path, "train", data)
    s = load_split(paths)
    with pytest.raises(InputError, match=r"img7\.png is 64x48 but its annotation says 65x48"):
        s.load_image(7)


def test_malformed_json(tmp_path, cli):
    paths, _ = make_dataset(tmp_path)
    paths.ann.write_text('{"images": [], "annotations": [')
    with pytest.raises(InputError, match="is not valid JSON"):
        load_split(paths)
    assert_one_line_error(stats_cli(cli, paths, tmp_path), "is not valid JSON")
    assert not (tmp_path / "stats_out").exists()


def test_annotation_file_missing(tmp_path):
    with pytest.raises(InputError, match="annotation file not found"):
        load_split(SplitPaths(tmp_path / "nope.json", tmp_path))


@pytest.mark.parametrize("data, message", [
    ([], "top level is not a JSON object"),
    ({"images": [], "annotations": []}, "missing 'categories' list"),
    ({"images": [], "categories": [{"id": 1, "name": "a"}]}, "missing 'annotations' list"),
    ({"images": {}, "annotations": [], "categories": []}, "'images' is not a list"),
    ({"images": [], "annotations": [], "categories": []}, "no categories"),
    ({"images": [{"id": 1, "file_name": "a.png"}], "annotations": [], "categories": CATS}, "image entry needs"),
    ({"images": [{"id": 1, "file_name": "a.png", "width": 0, "height": 5}], "annotations": [], "categories": CATS},
     "invalid size 0x5"),
    ({"images": [], "annotations": [], "categories": [{"id": 1}]}, "category entry needs"),
])
def test_json_that_is_not_coco(tmp_path, data, message):
    paths = write_ann(tmp_path, "train", data)
    with pytest.raises(InputError, match=message):
        load_split(paths, check_files=False)


def test_not_coco_through_cli(tmp_path, cli):
    paths = write_ann(tmp_path, "train", {"info": {}, "images": []})
    assert_one_line_error(stats_cli(cli, paths, tmp_path), "missing 'annotations' list (not a COCO detection file?)")


def _edit(data: dict, kind: str) -> str:
    """Break a valid dataset dict in one way; return the expected message."""
    anns = data["annotations"]
    if kind == "outside":
        anns[0]["bbox"] = [50, 5, 20, 10]  # x2 = 70 > 64 + 1
        return r"annotation 1 box \[50.0, 5.0, 20.0, 10.0\] reaches outside its 64x48 image"
    if kind == "negative-origin":
        anns[0]["bbox"] = [-3, 5, 20, 10]
        return "annotation 1 box .* reaches outside its 64x48 image"
    if kind == "zero":
        anns[0]["bbox"] = [10, 5, 0, 10]
        return "annotation 1 box .* has zero or negative size"
    if kind == "negative":
        anns[0]["bbox"] = [10, 5, 20, -1]
        return "annotation 1 box .* has zero or negative size"
    if kind == "bbox-short":
        anns[0]["bbox"] = [10, 5, 20]
        return "annotation needs integer id/image_id/category_id and bbox"
    if kind == "bbox-string":
        anns[0]["bbox"] = "1234"
        return "annotation needs integer id/image_id/category_id and bbox"
    if kind == "unknown-category":
        anns[0]["category_id"] = 2
        return r"annotation 1 has unknown category id 2 \(known: \[1, 3, 90\]\)"
    if kind == "unknown-image":
        anns[0]["image_id"] = 99
        return "annotation 1 refers to unknown image id 99"
    if kind == "dup-image":
        data["images"][1]["id"] = 7
        return "duplicate image id 7"
    if kind == "dup-annotation":
        anns[1]["id"] = 1
        return "duplicate annotation id 1"
    if kind == "dup-category":
        data["categories"].append({"id": 3, "name": "truck"})
        return "duplicate category id 3"
    if kind == "string-image-id":
        data["images"][0]["id"] = "7"
        return "image entry needs an integer id"
    if kind == "float-annotation-image-id":
        anns[0]["image_id"] = 7.5
        return "annotation needs integer id"
    raise AssertionError(kind)


BAD_JSON = ["outside", "negative-origin", "zero", "negative", "bbox-short", "bbox-string", "unknown-category",
            "unknown-image", "dup-image", "dup-annotation", "dup-category", "string-image-id",
            "float-annotation-image-id"]


@pytest.mark.parametrize("kind", BAD_JSON)
def test_bad_annotations(tmp_path, kind):
    paths, data = make_dataset(tmp_path)
    message = _edit(data, kind)
    paths = write_ann(tmp_path, "train", data)
    with pytest.raises(InputError, match=message) as e:
        load_split(paths)
    assert "\n" not in str(e.value) and str(paths.ann) in str(e.value)


@pytest.mark.parametrize("kind", ["outside", "zero", "unknown-category", "unknown-image", "dup-image",
                                  "dup-annotation", "dup-category"])
def test_bad_annotations_through_cli(tmp_path, cli, kind):
    paths, data = make_dataset(tmp_path)
    message = _edit(data, kind).split(" .*")[0].replace("\\", "")
    paths = write_ann(tmp_path, "train", data)
    assert_one_line_error(stats_cli(cli, paths, tmp_path), message)
    assert not (tmp_path / "stats_out").exists()


def test_skip_invalid_drops_bad_boxes_and_counts_them(tmp_path):
    paths, data = make_dataset(tmp_path)
    data["annotations"][0]["bbox"] = [50, 5, 20, 10]  # outside
    data["annotations"][1]["bbox"] = [0, 0, 0, 48]  # zero width
    data["annotations"][2]["bbox"] = [1, 1, -2, 3]  # negative width
    data["annotations"].append({"id": 11, "image_id": 12, "category_id": 3, "bbox": [0, 0, float("nan"), 3]})
    paths = write_ann(tmp_path, "train", data)
    with pytest.raises(InputError, match="--skip-invalid"):
        load_split(paths)
    s = load_split(paths, skip_invalid=True)
    assert s.skipped == {"outside_image": 1, "zero_or_negative_size": 3}
    assert sorted(s.coco.anns) == [9]
    assert s.targets(7)["boxes"].shape == (0, 4)


def test_small_overshoot_is_tolerated(tmp_path):
    """COCO's own boxes overshoot the image by rounding; up to one pixel is accepted."""
    paths, data = make_dataset(tmp_path)
    data["annotations"][0]["bbox"] = [-0.9, -0.5, 64.8, 48.9]
    paths = write_ann(tmp_path, "train", data)
    assert 1 in load_split(paths).coco.anns


def test_validate_accepts_numpy_and_tuples():
    data = {"images": [{"id": np.int64(1), "file_name": "a", "width": 10, "height": 10}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": (np.float32(1), 1, 2, 2)}],
            "categories": [{"id": 1, "name": "a"}]}
    out = validate_coco_dict(data, "mem")
    assert out["annotations"][0]["area"] == 4.0 and out["_skipped"] == {}


# --------------------------------------------------------------------------- image decoding


def _save(tmp_path: Path, name: str, im: Image.Image, **kw) -> Path:
    p = tmp_path / name
    im.save(p, **kw)
    return p


def _base() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)


@pytest.mark.parametrize("mode, ext", [("L", ".png"), ("L", ".jpg"), ("P", ".png"), ("P", ".gif"), ("RGBA", ".png"),
                                       ("LA", ".png"), ("CMYK", ".jpg"), ("CMYK", ".tif"), ("1", ".png"),
                                       ("RGB", ".bmp"), ("RGB", ".webp")])
def test_read_image_rgb_modes(tmp_path, mode, ext):
    src = Image.fromarray(_base()).convert(mode)
    p = _save(tmp_path, f"x{ext}", src)
    with Image.open(p) as check:
        assert check.mode == mode  # the file really is stored in that mode
    arr = read_image_rgb(p, expect_size=(40, 30))
    assert arr.shape == (30, 40, 3) and arr.dtype == np.uint8
    if mode in ("P", "RGBA", "CMYK") and ext in (".png", ".gif", ".tif"):
        np.testing.assert_array_equal(arr, np.asarray(src.convert("RGB")))
    if mode in ("L", "LA", "1"):
        assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 0] == arr[..., 2]).all()


def test_read_image_rgb_rgba_drops_alpha(tmp_path):
    rgba = np.zeros((4, 5, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 0  # fully transparent red
    arr = read_image_rgb(_save(tmp_path, "a.png", Image.fromarray(rgba)))
    assert (arr[..., 0] == 200).all() and (arr[..., 1:] == 0).all()


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_read_image_rgb_16_bit_greyscale(tmp_path, mode):
    grey = (np.arange(30 * 40).reshape(30, 40) * 50).astype(np.uint16)  # up to 59950
    raw = grey.astype(">u2" if mode == "I;16B" else "<u2").tobytes()
    p = _save(tmp_path, "g.tif" if mode == "I;16B" else "g.png", Image.frombytes(mode, (40, 30), raw))
    with Image.open(p) as check:
        assert check.mode == mode
    arr = read_image_rgb(p)
    assert arr.shape == (30, 40, 3) and arr.dtype == np.uint8
    assert (arr[..., 0] == arr[..., 2]).all()
    # scaled, not clipped at 255: the order of the grey levels survives
    assert arr[0, 0, 0] == 0 and arr[-1, -1, 0] == 255
    assert np.all(np.diff(arr[..., 0].ravel().astype(int)) >= 0) and len(np.unique(arr)) > 200


def _exif_rotated(tmp_path: Path, ext: str = ".png") -> tuple[Path, np.ndarray]:
    """Stored 40x30 (W x H) with EXIF orientation 6 (display rotated 90 degrees clockwise)."""
    stored = _base()
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(tmp_path, f"r{ext}", Image.fromarray(stored), exif=exif), stored


def test_exif_orientation_applied_when_json_has_displayed_size(tmp_path):
    p, stored = _exif_rotated(tmp_path)
    for expect in (None, (30, 40)):
        arr = read_image_rgb(p, expect_size=expect)
        assert arr.shape == (40, 30, 3)
        np.testing.assert_array_equal(arr, np.rot90(stored, k=-1))  # clockwise


def test_exif_orientation_ignored_when_json_matches_stored_pixels(tmp_path):
    p, stored = _exif_rotated(tmp_path)
    arr = read_image_rgb(p, expect_size=(40, 30))
    assert arr.shape == (30, 40, 3)
    np.testing.assert_array_equal(arr, stored)


def test_exif_orientation_size_matching_neither(tmp_path):
    p, _ = _exif_rotated(tmp_path, ".jpg")
    with pytest.raises(InputError, match="is 30x40 but its annotation says 41x30"):
        read_image_rgb(p, expect_size=(41, 30))


def test_exif_rotated_image_in_a_split(tmp_path):
    paths, data = make_dataset(tmp_path)
    p, stored = _exif_rotated(paths.images)
    data["images"].append({"id": 20, "file_name": p.name, "width": 30, "height": 40})
    data["annotations"].append({"id": 20, "image_id": 20, "category_id": 1, "bbox": [0, 0, 30, 40]})
    s = load_split(write_ann(tmp_path, "train", data))
    assert s.load_image(20).shape == (40, 30, 3)


def test_read_image_rgb_missing_file(tmp_path):
    with pytest.raises(InputError, match="image file missing"):
        read_image_rgb(tmp_path / "none.png")


# --------------------------------------------------------------------------- resolve_split


def test_resolve_split_sodtool_layout(tmp_path):
    paths, _ = make_dataset(tmp_path, "minival")
    assert resolve_split(tmp_path, "minival") == paths


def _coco2017(root: Path) -> Path:
    for stem in ("train2017", "val2017"):
        (root / stem).mkdir(parents=True)
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"instances_{stem}.json").write_text("{}")
    return root


def test_resolve_split_coco2017_layout(tmp_path):
    root = _coco2017(tmp_path / "coco")
    assert resolve_split(root, "train") == SplitPaths(root / "annotations" / "instances_train2017.json", root / "train2017")
    assert resolve_split(root, "minival") == SplitPaths(root / "annotations" / "instances_val2017.json", root / "val2017")


NO_VAL = "COCO 2017 has no val split apart from val2017, which is minival here"


def test_resolve_split_coco2017_val_is_not_val2017(tmp_path, cli):
    """val (where settings are chosen) never falls back to val2017 (minival, reported only)."""
    root = _coco2017(tmp_path / "coco")
    with pytest.raises(InputError, match=NO_VAL + r": give --ann/--images for a held-out subset of train2017"):
        resolve_split(root, "val")
    other = tmp_path / "held_out.json"
    other.write_text("{}")
    with pytest.raises(InputError, match=NO_VAL):  # --ann alone: no image folder of a val split either
        resolve_split(root, "val", ann=other)
    with pytest.raises(InputError, match=NO_VAL):
        resolve_split(root, "val", images=root / "train2017")
    # half a layout (only val2017/ and its annotations) is recognised too
    (root / "annotations" / "instances_train2017.json").unlink()
    (root / "train2017").rmdir()
    with pytest.raises(InputError, match=NO_VAL):
        resolve_split(root, "val")
    assert_one_line_error(cli("--quiet", "data", "stats", "--data", root, "--split", "val",
                              "--out", tmp_path / "stats"), NO_VAL)
    assert not (tmp_path / "stats").exists()


def test_resolve_split_coco2017_val_supplied(tmp_path):
    """A COCO 2017 user gives val explicitly: --ann/--images on a train2017 subset, or sodtool's layout."""
    root = _coco2017(tmp_path / "coco")
    held = tmp_path / "instances_val_holdout.json"
    held.write_text("{}")
    assert resolve_split(root, "val", ann=held, images=root / "train2017") == SplitPaths(held, root / "train2017")
    assert resolve_split(None, "val", ann=held, images=root / "train2017") == SplitPaths(held, root / "train2017")
    paths, _ = make_dataset(root, "val")
    assert resolve_split(root, "val") == paths
    assert resolve_split(root, "val", ann=held) == SplitPaths(held, root / "images" / "val")
    assert resolve_split(root, "minival").images == root / "val2017"


def test_resolve_split_val_elsewhere_is_the_plain_not_found(tmp_path):
    (tmp_path / "annotations").mkdir()
    with pytest.raises(InputError, match=r"split 'val' not found in .* \(looked for .*instances_val\.json\)$"):
        resolve_split(tmp_path, "val")


def test_resolve_split_prefers_sodtool_layout(tmp_path):
    root = _coco2017(tmp_path / "coco")
    paths, _ = make_dataset(root, "train")
    assert resolve_split(root, "train") == paths


def test_resolve_split_explicit_overrides(tmp_path):
    root = _coco2017(tmp_path / "coco")
    other = tmp_path / "elsewhere"
    other.mkdir()
    ann = other / "gt.json"
    ann.write_text("{}")
    assert resolve_split(None, "whatever", ann=ann, images=other) == SplitPaths(ann, other)
    assert resolve_split(root, "train", images=other) == SplitPaths(root / "annotations" / "instances_train2017.json", other)
    # only --ann: the image folder comes from the layout that exists (COCO 2017 here)
    assert resolve_split(root, "minival", ann=ann) == SplitPaths(ann, root / "val2017")


@pytest.mark.parametrize("args, message", [
    ((None, "train"), "give a dataset folder"),
    (("missing", "train"), "dataset folder not found"),
    (("{root}", "test"), r"split 'test' not found in .* \(looked for .*instances_test\.json\)"),
    (("{root}", "train"), r"looked for .*instances_train\.json, .*instances_train2017\.json"),
])
def test_resolve_split_errors(tmp_path, args, message):
    (tmp_path / "annotations").mkdir()
    args = tuple(str(a).format(root=tmp_path) if a is not None else None for a in args)
    if args[0] == "missing":
        args = (tmp_path / "missing", args[1])
    with pytest.raises(InputError, match=message):
        resolve_split(*args)


def test_resolve_split_missing_image_folder_and_annotation(tmp_path):
    paths, _ = make_dataset(tmp_path)
    for p in paths.images.iterdir():
        p.unlink()
    paths.images.rmdir()
    with pytest.raises(InputError, match="image folder not found"):
        resolve_split(tmp_path, "train")
    with pytest.raises(InputError, match="annotation file not found"):
        resolve_split(None, "train", ann=tmp_path / "no.json", images=tmp_path)


# --------------------------------------------------------------------------- CategoryMap


def test_category_map_round_trip_on_coco_ids(shared_data):
    cats = json.loads((shared_data / "cocoeval" / "instances_val2014_100.json").read_text())["categories"]
    cm = CategoryMap.from_json(list(reversed(cats)))  # order of the file does not matter
    assert cm.num_classes == 80
    assert cm.ids == tuple(sorted(c["id"] for c in cats))
    assert max(cm.ids) == 90 and set(range(1, 91)) - set(cm.ids) == {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}
    assert CategoryMap.from_json(cm.to_json()) == cm
    assert json.loads(json.dumps(cm.to_json())) == cm.to_json()
    for label in range(1, 81):
        assert cm.to_label(cm.to_category_id(label)) == label
    assert cm.to_label(1) == 1 and cm.to_label(13) == 12 and cm.to_label(90) == 80
    labels = np.arange(1, 81)
    np.testing.assert_array_equal(cm.labels_to_ids(labels), cm.ids)
    assert cm.labels_to_ids(labels).dtype == np.int64
    with pytest.raises(InputError, match="unknown category id 12"):
        cm.to_label(12)
    for bad in (0, 81):
        with pytest.raises(ValueError):
            cm.to_category_id(bad)
    cm.check_same(CategoryMap.from_json(cats), "store")
    with pytest.raises(InputError, match="store: categories disagree"):
        cm.check_same(CategoryMap.from_json(cats[:-1]), "store")
    renamed = [dict(c, name="x") if c["id"] == 90 else c for c in cats]
    with pytest.raises(InputError, match="categories disagree"):
        cm.check_same(CategoryMap.from_json(renamed), "store")
