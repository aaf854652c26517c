"""`sodtool data generate` and sodtool.insertion: windows around a box, the insertion rule
(inside, clear of every box, beside its anchor along the anchor's long axis, on ground like the
ground under the real objects), copy-paste with a feathered edge, and the generated dataset
(loadable, marked, repeatable for a seed); bad options are one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sodtool.coco import SplitPaths, load_split
from sodtool.insertion import (CONTEXT_PX, EDGE_PX, GAP_PX, JITTER, SHIFT_RANGE, ObjectPool, crop_window,
                               looks_like_surface, object_crop, paste_objects, paste_window,
                               sample_insertion_boxes, surface_reference, transform_crop, window_around)

CATS = [{"id": 3, "name": "car", "supercategory": ""}, {"id": 7, "name": "van", "supercategory": ""}]


def _road(h: int, w: int, seed: int = 0, level: int = 110) -> np.ndarray:
    """Asphalt, uint8 [h, w, 3]: grey brightening from top to bottom by 20 levels (the ground's
    colour varies across an image), with a little noise."""
    rng = np.random.default_rng(seed)
    ramp = level + 20.0 * np.arange(h)[:, None, None] / h
    return np.clip(ramp + rng.normal(0, 3, (h, w, 3)), 0, 255).astype(np.uint8)


def _paint_cars(image: np.ndarray, boxes, seed: int = 1) -> None:
    """Fill each xyxy box with a striped coloured pattern (a 'car'), in place, with a bright
    line just above it and a shadow just below (outside the box, as a real car's edge)."""
    rng = np.random.default_rng(seed)
    for x0, y0, x1, y1 in np.asarray(boxes, int):
        colour = rng.integers(0, 256, 3)
        image[y0 - 1, x0:x1] = np.clip(image[y0 - 1, x0:x1].astype(int) + 40, 0, 255)
        image[y1, x0:x1] = np.clip(image[y1, x0:x1].astype(int) - 40, 0, 255)
        image[y0:y1, x0:x1] = colour
        image[y0:y1:3, x0:x1] = 255 - colour


def _pool(boxes, labels) -> ObjectPool:
    boxes = np.asarray(boxes, np.float64)
    return ObjectPool(boxes=boxes, labels=np.asarray(labels, np.int64), image_ids=np.ones(len(boxes), np.int64),
                      ann_ids=np.arange(1, len(boxes) + 1, dtype=np.int64))


# --------------------------------------------------------------------------- windows


def test_window_around_holds_the_box_inside_the_image():
    hw = (50, 80)
    box = [30.0, 10.0, 40.0, 20.0]
    x0, y0 = window_around(box, hw, 32)
    assert (x0, y0) == (19, 0)  # centred on x 35; y would start at -1: clamped to the image
    rng = np.random.default_rng(0)
    seen = {window_around(box, hw, 32, rng) for _ in range(400)}
    for x, y in seen:
        assert x <= 30 and x + 32 >= 40 and y <= 10 and y + 32 >= 20  # the box whole
        assert 0 <= x <= 80 - 32 and 0 <= y <= 50 - 32  # the image whole
    # Every position that holds the box is drawn: x in [8, 30], y in [0, 10].
    assert {x for x, _ in seen} == set(range(8, 31)) and {y for _, y in seen} == set(range(0, 11))
    # An axis shorter than the window starts at 0; a box longer than the window is centred on.
    assert window_around(box, (20, 80), 32) == (19, 0)
    assert window_around([10.0, 5.0, 70.0, 15.0], (50, 100), 32) == (24, 0)


def test_crop_and_paste_window_round_trip():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    patch = crop_window(image, 10, 5, 32)
    assert patch.shape == (32, 32, 3) and np.array_equal(patch, image[5:37, 10:42])
    assert np.array_equal(paste_window(image, patch, 10, 5), image)
    # Leaving the image: reflected (the edge pixel not repeated), and the in-image part pasted back only.
    patch = crop_window(image, 45, -3, 32)
    assert patch.shape == (32, 32, 3)
    assert np.array_equal(patch[3:, :15], image[:29, 45:60])
    assert np.array_equal(patch[3:, 15], image[:29, 58]) and np.array_equal(patch[2, :15], image[1, 45:60])
    assert np.array_equal(paste_window(image, patch, 45, -3), image)
    changed = paste_window(image, np.zeros_like(patch), 45, -3)
    assert not changed[:29, 45:].any() and np.array_equal(changed[:, :45], image[:, :45])
    assert np.array_equal(changed[29:], image[29:])
    # A window bigger than the image: the whole image, reflected around it.
    small = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    x0, y0 = window_around([5, 5, 10, 10], small.shape[:2], 32)
    assert (x0, y0) == (0, 0)
    big = crop_window(small, x0, y0, 32)
    assert np.array_equal(big[:20, :30], small) and np.array_equal(paste_window(small, big, 0, 0), small)


# --------------------------------------------------------------------------- the rule


def _row_scene():
    """A 200x300 road with 'cars': horizontal ones (24x12) in a row, vertical ones (12x24)."""
    image = _road(200, 300)
    gt = np.array([[40, 40, 64, 52], [150, 40, 174, 52], [60, 120, 72, 144], [220, 130, 232, 154]], np.float64)
    _paint_cars(image, gt)
    return image, gt


def test_inserted_boxes_follow_the_rule():
    image, gt = _row_scene()
    pool = _pool(gt, [1, 2, 1, 2])
    sizes = pool.sizes
    found = sample_insertion_boxes(image, gt, pool, 6, np.random.default_rng(3))
    boxes = found["boxes"]
    assert 0 < len(boxes) <= 6
    assert found["tried"] == len(boxes) + sum(found["rejected"].values())
    h, w = image.shape[:2]
    assert (boxes[:, :2] >= EDGE_PX).all() and (boxes[:, 2] <= w - EDGE_PX).all() and (boxes[:, 3] <= h - EDGE_PX).all()
    grown = boxes + np.array([-GAP_PX, -GAP_PX, GAP_PX, GAP_PX])
    for i, g in enumerate(grown):
        others = np.concatenate([gt, np.delete(boxes, i, axis=0)])
        inter_w = np.minimum(g[2], others[:, 2]) - np.maximum(g[0], others[:, 0])
        inter_h = np.minimum(g[3], others[:, 3]) - np.maximum(g[1], others[:, 1])
        assert not np.any((inter_w > 0) & (inter_h > 0)), "overlaps a real or inserted box"
    for box, label, s, a, turns in zip(boxes, found["labels"], found["source"], found["anchor"], found["turns"]):
        assert label == pool.labels[s]
        anchor = gt[a]
        aw, ah = anchor[2:] - anchor[:2]
        sw, sh = sizes[s]
        # Turned a quarter exactly when the source's long side would lie across the anchor's.
        assert turns == int((sw >= sh) != (aw >= ah))
        assert tuple(box[2:] - box[:2]) == ((sh, sw) if turns else (sw, sh))
        off = (box[:2] + box[2:]) / 2 - (anchor[:2] + anchor[2:]) / 2
        along, across, length, short = (off[0], off[1], aw, ah) if aw >= ah else (off[1], off[0], ah, aw)
        assert SHIFT_RANGE[0] * length - 0.5 <= abs(along) <= SHIFT_RANGE[1] * length + 0.5
        assert abs(across) <= JITTER * short + 0.5
    # Deterministic for a seed.
    again = sample_insertion_boxes(image, gt, pool, 6, np.random.default_rng(3))
    assert all(np.array_equal(found[k], again[k]) for k in ("boxes", "labels", "source", "turns", "hflip", "vflip"))
    # No anchors or no pool: no places, no candidates.
    none = sample_insertion_boxes(image, np.zeros((0, 4)), pool, 4, np.random.default_rng(0))
    assert len(none["boxes"]) == 0 and none["tried"] == 0


def test_surface_check_takes_the_ground_and_refuses_texture_and_odd_colour():
    rng = np.random.default_rng(0)
    image = _road(120, 400)
    image[:, 200:] = rng.integers(0, 256, (120, 200, 3))  # texture (a roof, foliage)
    image[80:120, 0:60] = (40, 160, 40)  # a flat patch of another colour (a lawn)
    gt = np.array([[100, 20, 124, 32], [130, 60, 154, 72], [90, 90, 114, 102], [150, 95, 174, 107]], np.float64)
    _paint_cars(image, gt)
    ref = surface_reference(image, gt)
    assert looks_like_surface(image, [20, 54, 44, 66], ref)  # the ground beside the cars
    assert not looks_like_surface(image, [260, 40, 284, 52], ref)  # texture
    assert not looks_like_surface(image, [10, 90, 34, 102], ref)  # flat but the wrong colour
    assert not looks_like_surface(image, [20, 54, 44, 66], None)  # no rings measured: nothing passes
    # Through the rule: shifts to the right land on the texture and are refused; every box kept is on the ground.
    pool = _pool(gt, [1, 1, 1, 1])
    found = sample_insertion_boxes(image, gt, pool, 8, np.random.default_rng(1))
    assert len(found["boxes"]) > 0 and found["rejected"]["not_surface"] > 0
    assert (found["boxes"][:, 2] <= 200).all()
    assert not any((b[0] < 60 and b[3] > 80) for b in found["boxes"])


# --------------------------------------------------------------------------- copy-paste


def test_copy_paste_puts_the_transformed_object_in_the_box_and_nothing_elsewhere():
    rng = np.random.default_rng(0)
    source = _road(60, 80, seed=5, level=90)
    src_box = np.array([20.0, 20.0, 44.0, 32.0])  # 24 x 12
    source[20:32, 20:44] = rng.integers(0, 256, (12, 24, 3))
    crop = object_crop(source, src_box, CONTEXT_PX, turns=1, hflip=True, vflip=False)
    assert crop.shape == (24 + 2 * CONTEXT_PX, 12 + 2 * CONTEXT_PX, 3)
    target = _road(100, 120, seed=6)
    keep = np.array([[80.0, 30.0, 100.0, 50.0]])
    target[30:50, 80:100] = 7
    box = np.array([[60.0, 40.0, 72.0, 64.0]])  # the turned object: 12 x 24
    out = paste_objects(target, box, [crop], keep=keep)
    # The box holds the source object, turned then flipped, pixel for pixel (weight 1 there).
    expected = transform_crop(source[20:32, 20:44], 1, True, False)
    assert np.array_equal(out[40:64, 60:72], expected)
    # The context ring is a blend: between target and source.
    ring = out[40:64, 59].astype(int)
    lo = np.minimum(target[40:64, 59], crop[CONTEXT_PX:-CONTEXT_PX, CONTEXT_PX - 1]).astype(int)
    hi = np.maximum(target[40:64, 59], crop[CONTEXT_PX:-CONTEXT_PX, CONTEXT_PX - 1]).astype(int)
    assert ((ring >= lo - 1) & (ring <= hi + 1)).all()
    # Far from the box, and inside a box to keep, nothing changes.
    far = np.ones(target.shape[:2], bool)
    far[40 - CONTEXT_PX:64 + CONTEXT_PX, 60 - CONTEXT_PX:72 + CONTEXT_PX] = False
    assert np.array_equal(out[far], target[far])
    assert (out[30:50, 80:100] == 7).all()
    # A crop of another size is resized to the box: the centre is still the object's.
    half = crop[::2, ::2]
    out2 = paste_objects(target, box, [half])
    centre = out2[48:56, 63:69].astype(int)
    assert np.abs(centre - expected[8:16, 3:9].astype(int)).mean() < 60
    assert np.array_equal(out2[far], target[far])


# --------------------------------------------------------------------------- the stage


def _dataset(root: Path, boxes_per_image: list[list[list[float]]], size=(240, 160)) -> Path:
    """A dataset in sodtool's layout: road images with painted cars, boxes xywh px."""
    (root / "images" / "train").mkdir(parents=True)
    (root / "annotations").mkdir()
    images, anns = [], []
    w, h = size
    for i, boxes in enumerate(boxes_per_image, 1):
        image = _road(h, w, seed=i)
        _paint_cars(image, [[x, y, x + bw, y + bh] for x, y, bw, bh in boxes], seed=i)
        Image.fromarray(image).save(root / "images" / "train" / f"im{i}.png")
        images.append({"id": i, "file_name": f"im{i}.png", "width": w, "height": h})
        for b in boxes:
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": 3 if len(anns) % 2 == 0 else 7,
                         "bbox": b, "area": b[2] * b[3], "iscrowd": 0})
    (root / "annotations" / "instances_train.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": CATS}))
    return root


BOXES = [[[40, 40, 24, 12], [120, 40, 24, 12], [60, 100, 12, 24]],
         [[100, 60, 24, 12], [30, 20, 12, 24]],
         []]


def test_generate_writes_a_marked_loadable_dataset_repeatable_for_a_seed(cli, tmp_path):
    from pycocotools.coco import COCO

    src = _dataset(tmp_path / "src", BOXES)
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        res = cli("--quiet", "data", "generate", "--data", src, "--count", "5", "--per-image", "3", "--seed", "1",
                  "--out", out)
        assert res.exit_code == 0, res.stderr
    ann_file = outs[0] / "annotations" / "instances_train.json"
    gen = load_split(SplitPaths(ann_file, outs[0] / "images" / "train"))
    source = load_split(SplitPaths(src / "annotations" / "instances_train.json", src / "images" / "train"))
    assert COCO(str(ann_file)).getCatIds() == [3, 7]
    assert gen.coco.dataset["categories"] == CATS
    assert len(gen.image_ids) == 5
    assert {gen.coco.imgs[i]["source_image_id"] for i in gen.image_ids} == {1, 2, 3}  # cycled over the split
    n_inserted = 0
    for iid in gen.image_ids:
        info = gen.coco.imgs[iid]
        assert info["generated"] is True and info["method"] == "copy-paste"
        sid = info["source_image_id"]
        assert info["source_file_name"] == source.coco.imgs[sid]["file_name"]
        anns = gen.annotations(iid)
        real = [a for a in anns if not a["inserted"]]
        assert [(a["bbox"], a["category_id"]) for a in real] == [(a["bbox"], a["category_id"]) for a in source.annotations(sid)]
        pixels, before = gen.load_image(iid), source.load_image(sid)
        touched = np.zeros(pixels.shape[:2], bool)
        for a in anns:
            if not a["inserted"]:
                continue
            n_inserted += 1
            copied = source.coco.anns[a["source_annotation_id"]]
            assert copied["category_id"] == a["category_id"] and a["source_image_id"] == copied["image_id"]
            assert source.coco.anns[a["anchor_annotation_id"]]["image_id"] == sid
            x, y, w, h = (int(v) for v in a["bbox"])
            assert a["area"] == w * h
            t = a["transform"]
            obj = object_crop(source.load_image(copied["image_id"]), [copied["bbox"][0], copied["bbox"][1],
                              copied["bbox"][0] + copied["bbox"][2], copied["bbox"][1] + copied["bbox"][3]],
                              0, t["turns"], t["hflip"], t["vflip"])
            assert np.array_equal(pixels[y:y + h, x:x + w], obj)
            touched[y - CONTEXT_PX:y + h + CONTEXT_PX, x - CONTEXT_PX:x + w + CONTEXT_PX] = True
        assert np.array_equal(pixels[~touched], before[~touched])
    manifest = json.loads((outs[0] / "manifest.json").read_text())
    m = manifest["metrics"]
    assert manifest["stage"] == "data-generate" and "train_annotations" in manifest["inputs"]
    assert m["images"] == 5 and m["inserted"] == n_inserted > 0
    assert m["images_without_insertions"] >= 1  # the image without objects has no anchor
    assert m["candidates_tried"] == m["inserted"] + m["rejected_candidates"]
    # Same seed, same bytes.
    a_files = sorted(p.relative_to(outs[0]) for p in outs[0].rglob("*") if p.is_file() and p.name != "manifest.json")
    b_files = sorted(p.relative_to(outs[1]) for p in outs[1].rglob("*") if p.is_file() and p.name != "manifest.json")
    assert a_files == b_files and all((outs[0] / f).read_bytes() == (outs[1] / f).read_bytes() for f in a_files)
    # An existing output is refused and left whole; --overwrite replaces it.
    res = cli("data", "generate", "--data", src, "--count", "1", "--out", outs[0])
    assert res.exit_code == 2 and "already exists" in res.stderr
    assert len(json.loads(ann_file.read_text())["images"]) == 5
    res = cli("--quiet", "data", "generate", "--data", src, "--count", "1", "--out", outs[0], "--overwrite")
    assert res.exit_code == 0 and len(json.loads(ann_file.read_text())["images"]) == 1


@pytest.mark.parametrize("extra,message", [
    (["--count", "0"], "--count must be at least 1, got 0"),
    (["--per-image", "0"], "--per-image must be at least 1, got 0"),
    (["--method", "gan"], "--method must be one of copy-paste, detgan, got 'gan'"),
    (["--method", "detgan"], "--method detgan needs --detgan"),
    (["--method", "detgan", "--detgan", "runs/x/detgan"], "no DetectorGAN model (run `sodtool train detgan` first)"),
    (["--detgan", "runs/x/detgan"], "--detgan is for --method detgan"),
    (["--split", "nosuch"], "nosuch"),
])
def test_generate_refuses_bad_options_in_one_line(cli, tmp_path, extra, message):
    src = _dataset(tmp_path / "src", BOXES[:1])
    res = cli("data", "generate", "--data", src, "--out", tmp_path / "out", *extra)
    assert res.exit_code == 2 and message in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_generate_refuses_missing_data(cli, tmp_path):
    res = cli("data", "generate", "--data", tmp_path / "missing", "--out", tmp_path / "out")
    assert res.exit_code == 2 and "dataset folder not found" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not any(tmp_path.iterdir())


def test_generate_on_kit_aerial(cli, shared_data, tmp_path):
    """Three crossroads images imported and two images generated: cars go in, the output loads."""
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "train.txt").write_text("MOS74.png\nMOS75.png\nMOS76.png\n")
    (lists / "minival.txt").write_text("MOS155.png\n")
    data = tmp_path / "kit"
    res = cli("--quiet", "data", "import-yolo", shared_data / "kit-aerial", "--out", data, "--train-list",
              lists / "train.txt", "--minival-list", lists / "minival.txt")
    assert res.exit_code == 0, res.stderr
    out = tmp_path / "gen"
    res = cli("--quiet", "data", "generate", "--data", data, "--count", "2", "--per-image", "4", "--out", out)
    assert res.exit_code == 0, res.stderr
    split = load_split(SplitPaths(out / "annotations" / "instances_train.json", out / "images" / "train"))
    inserted = [a for a in split.coco.dataset["annotations"] if a["inserted"]]
    assert len(split.image_ids) == 2 and len(inserted) > 0
    source = load_split(SplitPaths(data / "annotations" / "instances_train.json", data / "images" / "train"))
    assert all(a["category_id"] == source.coco.anns[a["source_annotation_id"]]["category_id"] for a in inserted)
