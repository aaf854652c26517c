"""`sodtool data import-yolo`: real YOLO data (kit-aerial, coco128) and every kind of bad input."""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sodtool.coco import load_split, resolve_split
from sodtool.errors import InputError
from sodtool.stages.import_yolo import ImportYoloConfig, import_yolo, read_classes


def _coco(path: Path):
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def _label_lines(label_dir: Path, stems: set[str] | None = None) -> int:
    """Non-blank lines of the label files (only those whose stem is in `stems`, if given)."""
    n = 0
    for p in label_dir.rglob("*.txt"):
        if stems is None or p.stem in stems:
            n += sum(1 for ln in p.read_text().splitlines() if ln.strip())
    return n


def make_yolo(root: Path, labels: dict[str, str], sizes: dict[str, tuple[int, int]] | None = None,
              classes: str = "cat\ndog\nbird\n", ext: str = ".png") -> Path:
    """A small YOLO dataset: one image per key of `labels` (value = label file text, None = no file)."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rng = np.random.default_rng(0)
    for stem, text in labels.items():
        w, h = (sizes or {}).get(stem, (40, 30))
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "images" / f"{stem}{ext}")
        if text is not None:
            (root / "labels" / f"{stem}.txt").write_text(text)
    (root / "classes.txt").write_text(classes)
    return root


def _ten(root: Path) -> Path:
    return make_yolo(root, {f"im{i:02d}": f"{i % 3} 0.5 0.5 0.5 0.5\n" for i in range(10)})


# --------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def kit(shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("kit") / "kit-aerial"
    metrics = import_yolo(ImportYoloConfig(src=shared_data / "kit-aerial", out=out, seed=0))
    return out, metrics


def test_kit_aerial_label_files_hold_1847_boxes(shared_data):
    assert _label_lines(shared_data / "kit-aerial" / "labels") == 1847


def test_kit_aerial_import(kit, shared_data):
    out, metrics = kit
    assert (out / "manifest.json").is_file()
    names = (shared_data / "kit-aerial" / "classes.txt").read_text().split()
    total_boxes, image_ids = 0, set()
    for split in ("train", "minival"):
        gt = _coco(out / "annotations" / f"instances_{split}.json")
        assert [c["name"] for c in gt.loadCats(gt.getCatIds())] == names
        assert gt.getCatIds() == [1, 2, 3, 4, 5]
        total_boxes += len(gt.anns)
        assert not image_ids & set(gt.imgs)  # image ids unique across the splits
        image_ids |= set(gt.imgs)
        for img in gt.imgs.values():
            assert (out / "images" / split / img["file_name"]).is_file()
        for a in gt.anns.values():
            x, y, w, h = a["bbox"]
            img = gt.imgs[a["image_id"]]
            assert w > 0 and h > 0 and x >= 0 and y >= 0
            assert x + w <= img["width"] + 0.01 and y + h <= img["height"] + 0.01
            assert a["area"] == pytest.approx(w * h, abs=1e-3) and a["iscrowd"] == 0
        assert sorted(gt.anns) == list(range(1, len(gt.anns) + 1))
    assert total_boxes == 1847 == metrics["boxes"]
    assert len(image_ids) == 45 == metrics["images"]
    assert metrics["train_images"] == 36 and metrics["minival_images"] == 9  # round(0.2 * 45)
    assert metrics["small"] + metrics["medium"] + metrics["large"] == 1847
    assert metrics["small"] / 1847 > 0.8  # the README: 85% of the boxes are small


def test_kit_aerial_box_matches_label_line(kit, shared_data):
    """The first line of MOS155.txt, converted by hand, is the first box of its image."""
    out, _ = kit
    line = (shared_data / "kit-aerial" / "labels" / "MOS155.txt").read_text().splitlines()[0].split()
    cls, xc, yc, w, h = int(line[0]), *map(float, line[1:])
    with Image.open(shared_data / "kit-aerial" / "images" / "MOS155.png") as im:
        W, H = im.size
    for split in ("train", "minival"):
        s = load_split(resolve_split(out, split))
        ids = [i for i in s.image_ids if s.image_info(i)["file_name"] == "MOS155.png"]
        if ids:
            ann = s.annotations(ids[0])[0]
            assert ann["category_id"] == cls + 1
            assert ann["bbox"] == pytest.approx([(xc - w / 2) * W, (yc - h / 2) * H, w * W, h * H], abs=0.01)
            assert s.load_image(ids[0]).shape == (H, W, 3)
            return
    pytest.fail("MOS155.png not imported")


@pytest.fixture(scope="module")
def coco128(shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("c128") / "coco128"
    metrics = import_yolo(ImportYoloConfig(src=shared_data / "coco128", out=out, skip_orphan_labels=True))
    return out, metrics


def test_coco128_orphan_labels_fail_by_default(shared_data, tmp_path, cli):
    """coco128 as distributed holds two label files whose images are missing."""
    res = cli("--quiet", "data", "import-yolo", shared_data / "coco128", "--out", tmp_path / "c")
    assert res.exit_code == 2
    assert "label file without an image" in res.stderr and "000000000656.txt" in res.stderr
    assert "--skip-orphan-labels" in res.stderr
    assert list(tmp_path.iterdir()) == []


def test_coco128_keeps_coco_category_ids(coco128, shared_data):
    out, metrics = coco128
    ids, names = read_classes(shared_data / "coco128" / "classes.txt")
    assert (ids[0], names[0]) == (1, "person") and (ids[-1], names[-1]) == (90, "toothbrush")
    src_images = {p.stem for p in (shared_data / "coco128" / "images").rglob("*.jpg")}
    used = set()
    for p in (shared_data / "coco128" / "labels").rglob("*.txt"):
        if p.stem in src_images:
            used |= {ids[int(ln.split()[0])] for ln in p.read_text().splitlines() if ln.strip()}
    assert 90 in used  # a toothbrush is labelled in coco128
    seen = set()
    boxes = 0
    for split in ("train", "minival"):
        s = load_split(resolve_split(out, split))
        assert s.categories.ids == tuple(ids) and s.categories.names == tuple(names)
        seen |= {a["category_id"] for a in s.coco.anns.values()}
        boxes += len(s.coco.anns)
        assert s.categories.to_label(1) == 1 and s.categories.to_label(90) == 80
    assert seen == used
    assert boxes == _label_lines(shared_data / "coco128" / "labels", src_images) == metrics["boxes"]
    assert metrics["images"] == 128 and metrics["orphan_labels"] == 2
    assert metrics["images_without_objects"] == 2  # 000000000250.jpg, 000000000508.jpg


def test_coco128_greyscale_image_loads_as_rgb(coco128, shared_data):
    out, _ = coco128
    with Image.open(shared_data / "coco128" / "images" / "train2017" / "000000000086.jpg") as im:
        assert im.mode == "L"
        W, H = im.size
    for split in ("train", "minival"):
        s = load_split(resolve_split(out, split))
        for i in s.image_ids:
            if s.image_info(i)["file_name"] == "000000000086.jpg":
                arr = s.load_image(i)
                assert arr.shape == (H, W, 3) and arr.dtype == np.uint8
                assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
                return
    pytest.fail("000000000086.jpg not imported")


def test_kit_aerial_through_cli_is_deterministic(shared_data, tmp_path, cli, kit):
    out = tmp_path / "again"
    res = cli("--quiet", "data", "import-yolo", shared_data / "kit-aerial", "--out", out, "--seed", "0")
    assert res.exit_code == 0, res.stderr
    for split in ("train", "minival"):
        name = f"annotations/instances_{split}.json"
        assert (out / name).read_bytes() == (kit[0] / name).read_bytes()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "import-yolo" and manifest["metrics"]["boxes"] == 1847


# --------------------------------------------------------------------------- splits


def _split_names(out: Path, split: str) -> list[str]:
    data = json.loads((out / "annotations" / f"instances_{split}.json").read_text())
    return sorted(im["file_name"] for im in data["images"])


def test_seeded_split_is_deterministic(tmp_path):
    src = _ten(tmp_path / "src")
    a = import_yolo(ImportYoloConfig(src=src, out=tmp_path / "a", seed=3, val_fraction=0.3))
    import_yolo(ImportYoloConfig(src=src, out=tmp_path / "b", seed=3, val_fraction=0.3))
    import_yolo(ImportYoloConfig(src=src, out=tmp_path / "c", seed=4, val_fraction=0.3))
    assert a["minival_images"] == 3 and a["train_images"] == 7
    for split in ("train", "minival"):
        name = f"annotations/instances_{split}.json"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        assert sorted(p.name for p in (tmp_path / "a" / "images" / split).iterdir()) == _split_names(tmp_path / "a", split)
    assert _split_names(tmp_path / "a", "minival") != _split_names(tmp_path / "c", "minival")
    assert set(_split_names(tmp_path / "a", "train")).isdisjoint(_split_names(tmp_path / "a", "minival"))


def test_zero_val_fraction_gives_an_empty_minival_that_loads(tmp_path):
    src = _ten(tmp_path / "src")
    m = import_yolo(ImportYoloConfig(src=src, out=tmp_path / "o", val_fraction=0.0))
    assert (m["train_images"], m["minival_images"]) == (10, 0)
    s = load_split(resolve_split(tmp_path / "o", "minival"))
    assert s.image_ids == []


def test_explicit_lists(tmp_path):
    src = _ten(tmp_path / "src")
    (tmp_path / "train.txt").write_text("im00.png\n./images/im01.png\nimages/im02.png\n" + f"{src / 'images' / 'im03.png'}\n"
                                        "src/images/im06.png\n")  # the last relative to the list's folder
    (tmp_path / "val.txt").write_text("# minival\nim04.png\n\nim05.png\n")
    m = import_yolo(ImportYoloConfig(src=src, out=tmp_path / "o", train_list=tmp_path / "train.txt",
                                     minival_list=tmp_path / "val.txt"))
    assert _split_names(tmp_path / "o", "train") == ["im00.png", "im01.png", "im02.png", "im03.png", "im06.png"]
    assert _split_names(tmp_path / "o", "minival") == ["im04.png", "im05.png"]
    assert m["unlisted_images"] == 3 and m["images"] == 7
    # one list: the other split is the rest
    m = import_yolo(ImportYoloConfig(src=src, out=tmp_path / "p", minival_list=tmp_path / "val.txt"))
    assert _split_names(tmp_path / "p", "minival") == ["im04.png", "im05.png"]
    assert len(_split_names(tmp_path / "p", "train")) == 8 and m["unlisted_images"] == 0


@pytest.mark.parametrize("train, val, message", [
    ("im00.png\nnope.png\n", "im04.png\n", "'nope.png' is not an image"),
    ("im00.png\nim04.png\n", "im04.png\n", "in both --train-list and --minival-list"),
    ("im00.png\nim00.png\n", "im04.png\n", "listed twice"),
])
def test_bad_lists(tmp_path, cli, train, val, message):
    src = _ten(tmp_path / "src")
    (tmp_path / "train.txt").write_text(train)
    (tmp_path / "val.txt").write_text(val)
    res = cli("--quiet", "data", "import-yolo", src, "--out", tmp_path / "o", "--train-list", tmp_path / "train.txt",
              "--minival-list", tmp_path / "val.txt")
    assert res.exit_code == 2 and message in res.stderr
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- the val split (issue 31)

# sha256 of kit-aerial's annotation files as `import-yolo --seed 0` wrote them before the val
# split existed: without --holdout-fraction / --val-list the output must not change by a byte.
KIT_SHA256 = {"train": "c488ead52ecd61878ad05380a9ad633f05576ea67e58560e87ff38bcba221c70",
              "minival": "d12dba761f747b0fb586217fd0b1e220355ab6c7fc7b335836c7c679c83ab80c"}


def test_kit_aerial_without_val_options_is_byte_identical_to_before(kit):
    import hashlib

    out, metrics = kit
    for split, digest in KIT_SHA256.items():
        assert hashlib.sha256((out / "annotations" / f"instances_{split}.json").read_bytes()).hexdigest() == digest
    assert not (out / "annotations" / "instances_val.json").exists() and not (out / "images" / "val").exists()
    assert "val_images" not in metrics and "val_boxes" not in metrics


def test_kit_aerial_holdout_carves_val_from_train(shared_data, tmp_path, cli, kit):
    out = tmp_path / "kv"
    res = cli("--quiet", "data", "import-yolo", shared_data / "kit-aerial", "--out", out, "--seed", "0",
              "--holdout-fraction", "0.2", "--link", "symlink")
    assert res.exit_code == 0, res.stderr
    # minival is exactly the no-val run's, to the byte; val and train split the no-val train
    name = "annotations/instances_minival.json"
    assert (out / name).read_bytes() == (kit[0] / name).read_bytes()
    old_train = set(_split_names(kit[0], "train"))
    train, val = set(_split_names(out, "train")), set(_split_names(out, "val"))
    assert train | val == old_train and not train & val
    assert sorted(p.name for p in (out / "images" / "val").iterdir()) == sorted(val)
    metrics = json.loads((out / "manifest.json").read_text())["metrics"]
    assert (metrics["train_images"], metrics["val_images"], metrics["minival_images"]) == (27, 9, 9)  # round(0.2 * 45)
    assert metrics["train_boxes"] + metrics["val_boxes"] + metrics["minival_boxes"] == metrics["boxes"] == 1847
    gt = _coco(out / "annotations" / "instances_val.json")
    assert len(gt.anns) == metrics["val_boxes"] and sorted(gt.anns) == list(range(1, len(gt.anns) + 1))
    assert load_split(resolve_split(out, "val")).image_ids == sorted(gt.imgs)


def test_holdout_fraction_writes_a_disjoint_deterministic_val_split(tmp_path):
    src = _ten(tmp_path / "src")
    plain = import_yolo(ImportYoloConfig(src=src, out=tmp_path / "plain", seed=3, val_fraction=0.2))
    zero = import_yolo(ImportYoloConfig(src=src, out=tmp_path / "zero", seed=3, val_fraction=0.2, holdout_fraction=0.0))
    assert zero == plain
    for split in ("train", "minival"):
        name = f"annotations/instances_{split}.json"
        assert (tmp_path / "zero" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes()
    assert sorted(p.name for p in (tmp_path / "zero" / "annotations").iterdir()) == ["instances_minival.json",
                                                                                     "instances_train.json"]
    assert sorted(p.name for p in (tmp_path / "zero" / "images").iterdir()) == ["minival", "train"]

    m = import_yolo(ImportYoloConfig(src=src, out=tmp_path / "a", seed=3, val_fraction=0.2, holdout_fraction=0.3))
    import_yolo(ImportYoloConfig(src=src, out=tmp_path / "b", seed=3, val_fraction=0.2, holdout_fraction=0.3))
    import_yolo(ImportYoloConfig(src=src, out=tmp_path / "c", seed=4, val_fraction=0.2, holdout_fraction=0.3))
    assert (m["images"], m["train_images"], m["val_images"], m["minival_images"]) == (10, 5, 3, 2)
    assert m["val_boxes"] == 3 and m["boxes"] == 10
    names = {s: set(_split_names(tmp_path / "a", s)) for s in ("train", "val", "minival")}
    assert sum(len(v) for v in names.values()) == 10 == len(set().union(*names.values()))  # disjoint, all there
    assert names["minival"] == set(_split_names(tmp_path / "plain", "minival"))
    assert names["train"] | names["val"] == set(_split_names(tmp_path / "plain", "train"))
    for split in ("train", "val", "minival"):
        name = f"annotations/instances_{split}.json"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        assert sorted(p.name for p in (tmp_path / "a" / "images" / split).iterdir()) == _split_names(tmp_path / "a", split)
    assert _split_names(tmp_path / "a", "val") != _split_names(tmp_path / "c", "val")
    ids = [im["id"] for s in ("train", "val", "minival")
           for im in json.loads((tmp_path / "a" / "annotations" / f"instances_{s}.json").read_text())["images"]]
    assert sorted(ids) == list(range(1, 11))  # image ids unique across the three splits
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["config"]["holdout_fraction"] == 0.3 and manifest["metrics"]["val_images"] == 3
    # with --val-fraction 0 val still comes out of train, and minival is empty
    m = import_yolo(ImportYoloConfig(src=src, out=tmp_path / "d", val_fraction=0.0, holdout_fraction=0.1))
    assert (m["train_images"], m["val_images"], m["minival_images"]) == (9, 1, 0)


def test_val_list(tmp_path):
    src = _ten(tmp_path / "src")
    (tmp_path / "val.txt").write_text("im01.png\nim07.png\n")
    (tmp_path / "train.txt").write_text("im00.png\nim02.png\nim03.png\n")
    (tmp_path / "minival.txt").write_text("im04.png\n")
    # alone: minival is drawn by --val-fraction from the other images, train is the rest
    m = import_yolo(ImportYoloConfig(src=src, out=tmp_path / "a", val_fraction=0.25, val_list=tmp_path / "val.txt"))
    assert _split_names(tmp_path / "a", "val") == ["im01.png", "im07.png"]
    assert (m["train_images"], m["val_images"], m["minival_images"]) == (6, 2, 2)  # round(0.25 * 8)
    names = [set(_split_names(tmp_path / "a", s)) for s in ("train", "val", "minival")]
    assert len(set().union(*names)) == 10 and sum(map(len, names)) == 10
    # with --train-list: the unlisted rest is minival
    import_yolo(ImportYoloConfig(src=src, out=tmp_path / "b", train_list=tmp_path / "train.txt",
                                 val_list=tmp_path / "val.txt"))
    assert _split_names(tmp_path / "b", "minival") == ["im04.png", "im05.png", "im06.png", "im08.png", "im09.png"]
    # with --minival-list: the unlisted rest is train
    import_yolo(ImportYoloConfig(src=src, out=tmp_path / "c", minival_list=tmp_path / "minival.txt",
                                 val_list=tmp_path / "val.txt"))
    assert len(_split_names(tmp_path / "c", "train")) == 7
    # all three: the rest is left out
    m = import_yolo(ImportYoloConfig(src=src, out=tmp_path / "d", train_list=tmp_path / "train.txt",
                                     minival_list=tmp_path / "minival.txt", val_list=tmp_path / "val.txt"))
    assert (m["train_images"], m["val_images"], m["minival_images"], m["unlisted_images"]) == (3, 2, 1, 4)
    # lists plus a val share: val is carved out of the train list
    m = import_yolo(ImportYoloConfig(src=src, out=tmp_path / "e", train_list=tmp_path / "train.txt",
                                     minival_list=tmp_path / "minival.txt", holdout_fraction=0.25))
    assert (m["train_images"], m["val_images"], m["minival_images"]) == (2, 1, 1)
    assert set(_split_names(tmp_path / "e", "val")) < {"im00.png", "im02.png", "im03.png"}


@pytest.mark.parametrize("args, message", [
    (["--holdout-fraction", "1"], "--holdout-fraction must be in [0, 1), got 1.0"),
    (["--holdout-fraction", "-0.1"], "--holdout-fraction must be in [0, 1), got -0.1"),
    (["--holdout-fraction", "nan"], "--holdout-fraction must be in [0, 1), got nan"),
    (["--val-fraction", "0.5", "--holdout-fraction", "0.5"], "--val-fraction + --holdout-fraction must be below 1"),
    (["--holdout-fraction", "0.2", "--val-list", "{val}"], "give --holdout-fraction or --val-list, not both"),
    (["--val-list", "{tmp}/missing.txt"], "image list not found"),
    (["--val-list", "{val}", "--train-list", "{val}"], "image im04.png is in both --train-list and --val-list"),
    (["--val-list", "{val}", "--minival-list", "{val}"], "image im04.png is in both --minival-list and --val-list"),
    (["--val-list", "{tmp}/bad.txt"], "'nope.png' is not an image"),
])
def test_bad_val_options_exit_2_with_one_line(tmp_path, cli, args, message):
    src = _ten(tmp_path / "src")
    (tmp_path / "val.txt").write_text("im04.png\n")
    (tmp_path / "bad.txt").write_text("nope.png\n")
    args = [a.format(val=tmp_path / "val.txt", tmp=tmp_path) for a in args]
    res = cli("--quiet", "data", "import-yolo", src, "--out", tmp_path / "o", *args)
    assert res.exit_code == 2, (res.stdout, res.stderr, res.exception)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sodtool: error: ") and message in lines[0], res.stderr
    assert not (tmp_path / "o").exists()


def test_holdout_needs_images_left_for_train(tmp_path, cli):
    src = make_yolo(tmp_path / "src", {"a": None, "b": None})
    res = cli("--quiet", "data", "import-yolo", src, "--out", tmp_path / "o", "--val-fraction", "0.5",
              "--holdout-fraction", "0.1")
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "--holdout-fraction 0.1: the train split has 1 image(s), too few to carve a val split from" in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


# --------------------------------------------------------------------------- conversions


def test_images_without_labels_are_kept_and_boxes_are_pixels(tmp_path):
    src = make_yolo(tmp_path / "src", {"a": "0 0.5 0.5 0.5 0.5\n2 0.25 0.25 0.1 0.2\n", "b": None, "c": "\n"},
                    sizes={"a": (200, 100)})
    m = import_yolo(ImportYoloConfig(src=src, out=tmp_path / "o", val_fraction=0.0))
    assert m["images_without_objects"] == 2 and m["boxes"] == 2
    data = json.loads((tmp_path / "o" / "annotations" / "instances_train.json").read_text())
    assert [im["file_name"] for im in data["images"]] == ["a.png", "b.png", "c.png"]
    assert [im["id"] for im in data["images"]] == [1, 2, 3]
    assert data["annotations"] == [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [50.0, 25.0, 100.0, 50.0], "area": 5000.0, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [40.0, 15.0, 20.0, 20.0], "area": 400.0, "iscrowd": 0},
    ]
    assert data["categories"][0]["id"] == 1 and [c["name"] for c in data["categories"]] == ["cat", "dog", "bird"]


def test_tiny_overshoot_is_clipped(tmp_path):
    src = make_yolo(tmp_path / "src", {"a": "0 0.502 0.5 1.0 0.5\n"}, sizes={"a": (100, 100)})
    m = import_yolo(ImportYoloConfig(src=src, out=tmp_path / "o", val_fraction=0.0))
    assert m["clipped_boxes"] == 1
    s = load_split(resolve_split(tmp_path / "o", "train"))
    assert s.coco.anns[1]["bbox"] == [0.2, 25.0, 99.8, 50.0]


def test_exif_rotated_image_records_displayed_size(tmp_path):
    """Orientation 6: stored 40x30, displayed 30x40; YOLO coordinates refer to the displayed image."""
    src = make_yolo(tmp_path / "src", {"r": None})
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = np.zeros((30, 40, 3), np.uint8)
    stored[:, :20] = 255  # left half white -> top half white once rotated 90 degrees clockwise
    Image.fromarray(stored).save(src / "images" / "r.png", exif=exif)
    (src / "labels" / "r.txt").write_text("1 0.5 0.25 1.0 0.5\n")
    import_yolo(ImportYoloConfig(src=src, out=tmp_path / "o", val_fraction=0.0))
    s = load_split(resolve_split(tmp_path / "o", "train"))
    info = s.image_info(1)
    assert (info["width"], info["height"]) == (30, 40)
    assert s.coco.anns[1]["bbox"] == [0.0, 0.0, 30.0, 20.0]
    arr = s.load_image(1)
    assert arr.shape == (40, 30, 3)
    assert (arr[:20] == 255).all() and (arr[20:] == 0).all()


def test_classes_with_ids_keep_them(tmp_path):
    src = make_yolo(tmp_path / "src", {"a": "1 0.5 0.5 0.2 0.2\n"}, classes="3 car\n7 traffic light\n\n")
    import_yolo(ImportYoloConfig(src=src, out=tmp_path / "o", val_fraction=0.0))
    s = load_split(resolve_split(tmp_path / "o", "train"))
    assert s.categories.ids == (3, 7) and s.categories.names == ("car", "traffic light")
    assert s.coco.anns[1]["category_id"] == 7


def test_classes_file_in_labels_folder_is_found_and_not_a_label(tmp_path):
    src = make_yolo(tmp_path / "src", {"a": "0 0.5 0.5 0.2 0.2\n"})
    (src / "classes.txt").rename(src / "labels" / "classes.txt")
    m = import_yolo(ImportYoloConfig(src=src, out=tmp_path / "o", val_fraction=0.0))
    assert m["categories"] == 3 and m["orphan_labels"] == 0


def test_nested_folders_flatten_unless_names_collide(tmp_path):
    src = tmp_path / "src"
    make_yolo(src, {})
    rng = np.random.default_rng(0)
    for sub in ("train", "val"):
        (src / "images" / sub).mkdir()
        (src / "labels" / sub).mkdir()
        for stem in ("x", f"only_{sub}"):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(src / "images" / sub / f"{stem}.jpg")
            (src / "labels" / sub / f"{stem}.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    import_yolo(ImportYoloConfig(src=src, out=tmp_path / "o", val_fraction=0.0))
    assert _split_names(tmp_path / "o", "train") == ["train/only_train.jpg", "train/x.jpg", "val/only_val.jpg", "val/x.jpg"]
    load_split(resolve_split(tmp_path / "o", "train"))  # every file_name resolves
    (tmp_path / "l.txt").write_text("train/x.jpg\nonly_val.jpg\n")
    (tmp_path / "l2.txt").write_text("images/train/only_train.jpg\n")
    import_yolo(ImportYoloConfig(src=src, out=tmp_path / "p", train_list=tmp_path / "l.txt",
                                 minival_list=tmp_path / "l2.txt"))
    assert _split_names(tmp_path / "p", "train") == ["only_val.jpg", "x.jpg"]  # unique names: flat
    assert _split_names(tmp_path / "p", "minival") == ["only_train.jpg"]


@pytest.mark.parametrize("link", ["hardlink", "symlink"])
def test_link_modes(tmp_path, link):
    src = _ten(tmp_path / "src")
    import_yolo(ImportYoloConfig(src=src, out=tmp_path / "o", link=link, val_fraction=0.0))
    dst = tmp_path / "o" / "images" / "train" / "im00.png"
    if link == "hardlink":
        assert dst.stat().st_ino == (src / "images" / "im00.png").stat().st_ino
    else:
        assert dst.is_symlink() and os.readlink(dst) == str((src / "images" / "im00.png").resolve())
    load_split(resolve_split(tmp_path / "o", "train")).load_image(1)


def test_existing_output_is_refused_then_replaced_with_overwrite(tmp_path, cli):
    src = _ten(tmp_path / "src")
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = cli("--quiet", "data", "import-yolo", src, "--out", out)
    assert res.exit_code == 2 and "exists and is not empty" in res.stderr and "--overwrite" in res.stderr
    assert (out / "keep.txt").read_text() == "mine"
    res = cli("--quiet", "data", "import-yolo", src, "--out", out, "--overwrite")
    assert res.exit_code == 0, res.stderr
    assert not (out / "keep.txt").exists() and (out / "manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o", "src"]  # no temp or old folder left


def test_output_must_not_contain_the_source(tmp_path, cli):
    src = _ten(tmp_path / "src")
    for out in (src, tmp_path):
        res = cli("--quiet", "data", "import-yolo", src, "--out", out, "--overwrite")
        assert res.exit_code == 2 and "would contain the source" in res.stderr
    assert (src / "images" / "im00.png").is_file()


def test_default_output_folder(tmp_path, monkeypatch):
    src = _ten(tmp_path / "my-set")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    import_yolo(ImportYoloConfig(src=src))
    assert (work / "data" / "my-set" / "manifest.json").is_file()


# --------------------------------------------------------------------------- bad input


def _corrupt(kind: str, src: Path) -> None:
    lab = src / "labels"
    if kind == "fields":
        (lab / "im01.txt").write_text("0 0.5 0.5 0.5\n")
    elif kind == "segment":
        (lab / "im01.txt").write_text("0 0.1 0.1 0.2 0.1 0.2 0.2\n")
    elif kind == "non-numeric":
        (lab / "im01.txt").write_text("0 0.5 abc 0.5 0.5\n")
    elif kind == "class-float":
        (lab / "im01.txt").write_text("1.5 0.5 0.5 0.5 0.5\n")
    elif kind == "class-range":
        (lab / "im01.txt").write_text("0 0.5 0.5 0.5 0.5\n3 0.5 0.5 0.5 0.5\n")
    elif kind == "class-negative":
        (lab / "im01.txt").write_text("-1 0.5 0.5 0.5 0.5\n")
    elif kind == "pixels":
        (lab / "im01.txt").write_text("0 120 80 30 20\n")
    elif kind == "outside":
        (lab / "im01.txt").write_text("0 0.95 0.5 0.3 0.2\n")
    elif kind == "nan":
        (lab / "im01.txt").write_text("0 nan 0.5 0.3 0.2\n")
    elif kind == "zero":
        (lab / "im01.txt").write_text("0 0.5 0.5 0 0.2\n")
    elif kind == "negative":
        (lab / "im01.txt").write_text("0 0.5 0.5 0.2 -0.1\n")
    elif kind == "orphan":
        (lab / "ghost.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    elif kind == "text-image":
        (src / "images" / "im09.png").write_text("not an image")
    elif kind == "truncated":
        data = (src / "images" / "im09.png").read_bytes()
        (src / "images" / "im09.png").write_bytes(data[: len(data) // 2])
    elif kind == "two-images-one-label":
        (src / "images" / "im01.jpg").write_bytes((src / "images" / "im01.png").read_bytes())
    elif kind.startswith("classes:"):
        (src / "classes.txt").write_text(kind.split(":", 1)[1])
    elif kind == "no-classes":
        (src / "classes.txt").unlink()
    elif kind == "no-labels":
        for p in lab.iterdir():
            p.unlink()
        lab.rmdir()
    elif kind == "no-images":
        for p in (src / "images").iterdir():
            p.unlink()
    else:  # pragma: no cover
        raise AssertionError(kind)


BAD_INPUTS = [
    ("fields", "im01.txt line 1: expected 5 fields"),
    ("segment", "expected 5 fields 'class xc yc w h', got 7"),
    ("non-numeric", "im01.txt line 1: non-numeric field"),
    ("class-float", "class '1.5' is not an integer"),
    ("class-range", "im01.txt line 2: class index 3 outside 0..2"),
    ("class-negative", "class index -1 outside 0..2"),
    ("pixels", "box reaches outside the image"),
    ("outside", "box reaches outside the image"),
    ("nan", "non-finite coordinate"),
    ("zero", "box of zero or negative size"),
    ("negative", "box of zero or negative size"),
    ("orphan", "label file without an image"),
    ("text-image", "image file unreadable"),
    ("truncated", "image file unreadable"),
    ("two-images-one-label", "two images share the label name im01.txt"),
    ("classes:", "is empty"),
    ("classes:car\n\ndog\n", "line 2 is empty"),
    ("classes:1 car\n1 dog\n", "duplicate category id 1"),
    ("classes:0 car\n1 dog\n2 bird\n", "category id 0 must be >= 1"),
    ("classes:car\ndog\ncar\n", "duplicate class name 'car'"),
    ("classes:car\n", "class index 1 outside 0..0"),
    ("no-classes", "no classes file"),
    ("no-labels", "label folder not found"),
    ("no-images", "no images"),
]


@pytest.mark.parametrize("kind, message", BAD_INPUTS, ids=[k.split(":")[0] + str(i) for i, (k, _) in enumerate(BAD_INPUTS)])
def test_bad_input_exits_2_with_one_line_and_leaves_nothing(tmp_path, cli, kind, message):
    src = _ten(tmp_path / "src")
    _corrupt(kind, src)
    res = cli("--quiet", "data", "import-yolo", src, "--out", tmp_path / "out", "--val-fraction", "0")
    assert res.exit_code == 2, (res.stdout, res.stderr, res.exception)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sodtool: error: "), res.stderr
    assert message in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no output, no temp folder
    # the same through the function
    with pytest.raises(InputError, match="."):
        import_yolo(ImportYoloConfig(src=src, out=tmp_path / "out", val_fraction=0.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_bad_options(tmp_path, cli):
    src = _ten(tmp_path / "src")
    res = cli("--quiet", "data", "import-yolo", src, "--out", tmp_path / "o", "--link", "move")
    assert res.exit_code == 2 and "--link must be one of copy, hardlink, symlink" in res.stderr
    res = cli("--quiet", "data", "import-yolo", src, "--out", tmp_path / "o", "--val-fraction", "1")
    assert res.exit_code == 2 and "--val-fraction must be in [0, 1)" in res.stderr
    res = cli("--quiet", "data", "import-yolo", tmp_path / "missing")
    assert res.exit_code == 2 and "YOLO dataset folder not found" in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
