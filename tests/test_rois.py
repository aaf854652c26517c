"""crop-rois: crop geometry, Fast R-CNN train sampling, test mode, sharding + merge, atomicity, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sodtool import boxes as B
from sodtool import store as S
from sodtool.errors import InputError
from sodtool.rois import crop_windows, jitter_boxes
from sodtool.stages.crop_rois import CropRoisConfig, crop_rois, merge_shards


# ------------------------------------------------------------------------------------------
# Fixtures: data and stand-in detections


def gt_jittered_detections(ann_path: Path, seed: int = 0, per_gt: int = 12, clutter: int = 40) -> list[dict]:
    """A COCO results list standing in for a detector: jittered ground truth (IoU spread from ~0 to ~1,
    so both positives and backgrounds occur) plus random clutter boxes, with random scores."""
    ann = json.loads(Path(ann_path).read_text())
    rng = np.random.default_rng(seed)
    cat_ids = [c["id"] for c in ann["categories"]]
    out = []
    for a in ann["annotations"]:
        x, y, w, h = a["bbox"]
        for _ in range(per_gt):
            dx, dy = rng.normal(0, 0.35, 2) * [w, h]
            sw, sh = np.exp(rng.normal(0, 0.35, 2))
            out.append({"image_id": a["image_id"], "category_id": int(rng.choice(cat_ids)),
                        "bbox": [float(x + dx), float(y + dy), float(w * sw), float(h * sh)],
                        "score": float(rng.uniform(0.02, 1.0))})
    for im in ann["images"]:
        for _ in range(clutter):
            w, h = rng.uniform(6, 80, 2)
            out.append({"image_id": im["id"], "category_id": int(rng.choice(cat_ids)),
                        "bbox": [float(rng.uniform(0, im["width"] - w)), float(rng.uniform(0, im["height"] - h)),
                                 float(w), float(h)], "score": float(rng.uniform(0.0, 0.6))})
    return out


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    """A small synthetic dataset (sodtool data synth) with stand-in detections for train and minival."""
    from sodtool.console import set_quiet
    from sodtool.stages.synth import SynthConfig, synthesize

    set_quiet(True)
    root = tmp_path_factory.mktemp("synth")
    data = root / "data"
    synthesize(SynthConfig(out=data, train_images=6, val_images=1, minival_images=3, image_size=256, seed=2))
    for split in ("train", "minival"):
        dets = gt_jittered_detections(data / "annotations" / f"instances_{split}.json")
        (root / f"dets_{split}.json").write_text(json.dumps(dets))
    return root


@pytest.fixture(scope="module")
def kit(tmp_path_factory, shared_data) -> Path:
    """kit-aerial imported with `sodtool data import-yolo`, with stand-in detections for its train split."""
    from sodtool.console import set_quiet
    from sodtool.stages.import_yolo import ImportYoloConfig, import_yolo

    set_quiet(True)
    root = tmp_path_factory.mktemp("kit")
    import_yolo(ImportYoloConfig(src=shared_data / "kit-aerial", out=root / "data", link="symlink", seed=0))
    dets = gt_jittered_detections(root / "data" / "annotations" / "instances_train.json", per_gt=8, clutter=100)
    (root / "dets_train.json").write_text(json.dumps(dets))
    return root


def read_store(path: Path) -> dict[str, np.ndarray]:
    with S.open_store(path) as f:
        return {k: f[k][:] for k in f.keys() if k != S.IMAGES_GROUP}  # the per-row datasets


def check_train_invariants(rows: dict, cfg: CropRoisConfig, ann_path: Path) -> None:
    """Every rule of train-mode sampling that holds row by row."""
    from sodtool.coco import CategoryMap

    ann = json.loads(Path(ann_path).read_text())
    cats = CategoryMap.from_json(ann["categories"])
    images = {im["id"]: im for im in ann["images"]}
    pos = rows["label"] > 0
    det = rows["source"] == 0
    gtr = rows["source"] == 1
    assert (rows["iou"][pos] >= cfg.fg_iou).all()
    assert ((rows["iou"][~pos] >= cfg.bg_low) & (rows["iou"][~pos] < cfg.fg_iou)).all()
    assert (rows["target"][~pos] == 0).all()
    # Decoding a positive's stored target on its ROI gives its stored ground-truth box.
    dec = B.decode_target(torch.from_numpy(rows["roi"][pos]).double(), torch.from_numpy(rows["target"][pos]).double())
    np.testing.assert_allclose(dec.numpy(), rows["gt_box"][pos], atol=1e-4, rtol=0)
    # Jittered ground truth: positive, IoU >= jitter_iou, no baseline score or class.
    assert pos[gtr].all() and (rows["iou"][gtr] >= cfg.jitter_iou).all()
    assert (rows["score"][gtr] == 0).all() and (rows["det_label"][gtr] == 0).all()
    assert (rows["det_label"][det] >= 1).all()
    # Labels are the class of the matched ground truth (which is one of the image's boxes).
    by_image: dict[int, list] = {}
    for a in ann["annotations"]:
        x, y, w, h = a["bbox"]
        by_image.setdefault(a["image_id"], []).append(([x, y, x + w, y + h], cats.to_label(a["category_id"])))
    for r in np.flatnonzero(pos)[:200]:
        gts = by_image[int(rows["image_id"][r])]
        k = int(np.argmin([np.abs(np.array(g) - rows["gt_box"][r]).max() for g, _ in gts]))
        np.testing.assert_allclose(gts[k][0], rows["gt_box"][r], atol=1e-3)
        assert gts[k][1] == rows["label"][r]
    # Geometry: ROIs inside their image, windows = square_windows(roi, context).
    for r in range(0, len(rows["roi"]), 7):
        im = images[int(rows["image_id"][r])]
        x1, y1, x2, y2 = rows["roi"][r]
        assert 0 <= x1 < x2 <= im["width"] and 0 <= y1 < y2 <= im["height"]
    win = B.square_windows(torch.from_numpy(rows["roi"]), cfg.context).numpy()
    np.testing.assert_allclose(rows["window"], win, rtol=1e-6, atol=1e-4)
    # Images in ascending id order, each image's rows contiguous.
    ids = rows["image_id"]
    assert (np.diff(ids) >= 0).all()


# ------------------------------------------------------------------------------------------
# Crop geometry


def pattern_image(h: int = 300, w: int = 420, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_crop_integer_window_is_an_exact_copy():
    img = pattern_image()
    win = torch.tensor([[37.0, 12.0, 37 + 128, 12 + 128], [200.0, 150.0, 328.0, 278.0]])
    crops = crop_windows(img, win, 128)
    assert crops.shape == (2, 3, 128, 128) and crops.dtype == torch.uint8
    np.testing.assert_array_equal(crops[0].permute(1, 2, 0).numpy(), img[12:140, 37:165])
    np.testing.assert_array_equal(crops[1].permute(1, 2, 0).numpy(), img[150:278, 200:328])


def test_crop_outside_the_image_is_zero_padded():
    img = pattern_image()
    # 64 px window hanging 20 px off the left and 10 px off the top, output 64: exact copy inside, zeros outside.
    crops = crop_windows(img, torch.tensor([[-20.0, -10.0, 44.0, 54.0]]), 64)[0].permute(1, 2, 0).numpy()
    assert (crops[:, :20] == 0).all() and (crops[:10, :] == 0).all()
    np.testing.assert_array_equal(crops[10:, 20:], img[0:54, 0:44])
    # Entirely outside: all zeros. Off the bottom-right corner: zeros beyond the image.
    far = crop_windows(img, torch.tensor([[500.0, 400.0, 600.0, 500.0]]), 32)
    assert (far == 0).all()
    br = crop_windows(img, torch.tensor([[400.0, 280.0, 432.0, 312.0]]), 32)[0].permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(br[:20, :20], img[280:300, 400:420])
    assert (br[20:] == 0).all() and (br[:, 20:] == 0).all()


@pytest.mark.parametrize("factor", [2, 4])
def test_crop_large_window_is_the_block_mean(factor):
    """A factor*S window at multiples of factor: the exact area average (no aliasing)."""
    img = pattern_image()
    s = 32
    x0, y0 = 8 * factor, 4 * factor
    crop = crop_windows(img, torch.tensor([[x0, y0, x0 + factor * s, y0 + factor * s]], dtype=torch.float32), s)
    block = img[y0:y0 + factor * s, x0:x0 + factor * s].astype(np.float64)
    ref = block.reshape(s, factor, s, factor, 3).mean(axis=(1, 3))
    got = crop[0].permute(1, 2, 0).numpy().astype(np.float64)
    # Exact, except that a mean ending in .5 may round either way (float32 sampling weights).
    off = got != np.round(ref)
    assert off.mean() < 0.2
    assert (np.abs(got - ref)[off] == 0.5).all()


@pytest.mark.parametrize("side,ratio", [(192, 0.6), (240, 0.3)])
def test_crop_between_levels_is_antialiased(side, ratio):
    """Pixel-period stripes over smooth content: an antialiased downscale averages the stripes out
    (the answer is the smooth part); plain bilinear sampling aliases them into the crop."""
    h, w = 300, 420
    yy, xx = np.mgrid[0:h, 0:w]
    smooth = 100 + 60 * np.sin(xx / 23.0) * np.cos(yy / 31.0)
    stripes = np.where(xx % 2 == 0, 40, -40)
    img = np.repeat((smooth + stripes)[..., None], 3, axis=2).clip(0, 255).astype(np.uint8)
    win = torch.tensor([[50.0, 40.0, 50.0 + side, 40.0 + side]])
    crop = crop_windows(img, win, 128)[0, 0].numpy().astype(np.float64)
    ideal = F.interpolate(torch.from_numpy(smooth[None, None, 40:40 + side, 50:50 + side]), size=(128, 128),
                          mode="area")[0, 0].numpy()
    naive = F.grid_sample(torch.from_numpy(img).permute(2, 0, 1)[None].float(), _grid(win, 128, h, w),
                          align_corners=False)[0, 0].numpy()
    inner = (slice(4, -4), slice(4, -4))
    err, err_naive = np.abs(crop - ideal)[inner].mean(), np.abs(naive - ideal)[inner].mean()
    assert err < ratio * err_naive, (err, err_naive)


def test_crop_upsampling_is_bilinear():
    # Upsampling a 32 px window to 128: bilinear, as F.interpolate(bilinear) away from the border.
    img2 = pattern_image(seed=3)
    up = crop_windows(img2, torch.tensor([[100.0, 60.0, 132.0, 92.0]]), 128)[0].float()
    ref2 = F.interpolate(torch.from_numpy(img2[60:92, 100:132]).permute(2, 0, 1)[None].float(), size=(128, 128),
                         mode="bilinear", align_corners=False)[0]
    assert (up - ref2)[:, 2:-2, 2:-2].abs().max() <= 0.5 + 1e-3  # equal up to the final rounding


def _grid(win, n, h, w):
    t = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    x0, y0, x1, y1 = win[0].double()
    gx = ((x0 + t * (x1 - x0)) / w * 2 - 1).float()
    gy = ((y0 + t * (y1 - y0)) / h * 2 - 1).float()
    return torch.stack([gx[None, :].expand(n, n), gy[:, None].expand(n, n)], -1)[None]


def test_jittered_boxes_keep_iou():
    gt = np.array([[10, 10, 40, 30], [100, 50, 103, 54], [0, 0, 20, 20]], np.float32)
    rng = np.random.default_rng(0)
    jit = jitter_boxes(gt, 3, rng, 120, 80, min_iou=0.7)
    assert jit.shape == (9, 4)
    from sodtool.rois import box_iou

    iou = box_iou(jit, gt)
    own = iou[np.arange(9), np.repeat(np.arange(3), 3)]
    assert (own >= 0.7).all() and (own < 1).sum() >= 7  # jittered, not copies
    assert (jit[:, 0::2] >= 0).all() and (jit[:, 0::2] <= 120).all() and (jit[:, 1::2] <= 80).all()


# ------------------------------------------------------------------------------------------
# Train and test mode


def test_train_mode_on_synthetic_data(synth, tmp_path):
    data = synth / "data"
    out = tmp_path / "run" / "rois_train.h5"
    cfg = CropRoisConfig(out=out, data=data, split="train", detections=synth / "dets_train.json", seed=0)
    m = crop_rois(cfg)
    rows = read_store(out)
    n = len(rows["label"])
    assert m["rows"] == n > 0 and m["images"] == 6 and m["images_without_rows"] == 0
    check_train_invariants(rows, CropRoisConfig(out=out), data / "annotations" / "instances_train.json")
    pos = rows["label"] > 0
    # Enough positives and backgrounds in every image here: one in four, and >= 64 rows per image.
    assert abs(pos.mean() - 0.25) < 0.03, pos.mean()
    _, counts = np.unique(rows["image_id"], return_counts=True)
    assert (counts >= 64).all()
    assert (rows["source"] == 0)[pos].any()  # detector positives too, not only ground truth
    ann = json.loads((data / "annotations" / "instances_train.json").read_text())
    assert (rows["source"] == 1).sum() == 2 * len(ann["annotations"])
    # The stored crops are crop_windows of the image at the stored windows.
    from sodtool.coco import load_split, resolve_split

    split = load_split(resolve_split(data, "train"))
    first = rows["image_id"][0]
    sel = rows["image_id"] == first
    again = crop_windows(split.load_image(int(first)), torch.from_numpy(rows["window"][sel]), 128)
    assert torch.equal(again, torch.from_numpy(rows["hr"][sel]))
    # Attributes and the sidecar manifest.
    info = S.store_info(out)
    assert info["schema"] == S.SCHEMA and info["mode"] == "train" and info["split"] == "train"
    assert info["hr_size"] == 128 and info["context"] == 1.5 and info["padding"] == "zero"
    assert info["categories"] == [{"id": c["id"], "name": c["name"]} for c in ann["categories"]]
    assert info["annotations"]["sha256"] and info["image_dir"] == str(data / "images" / "train")
    assert info["detector"]["kind"] == "detections-json"
    man = json.loads((tmp_path / "run" / "rois_train.h5.manifest.json").read_text())
    assert man["stage"] == "crop-rois" and man["metrics"]["rows"] == n
    assert man["config"]["score_thresh"] == 0.01 and man["config"]["max_rois"] == 300
    assert man["inputs"]["detections"]["sha256"]
    # Same seed: same store; another seed: another sample.
    again_out = tmp_path / "again.h5"
    m2 = crop_rois(CropRoisConfig(out=again_out, data=data, detections=synth / "dets_train.json", seed=0))
    assert m2["content_sha256"] == m["content_sha256"]
    m3 = crop_rois(CropRoisConfig(out=tmp_path / "seed1.h5", data=data, detections=synth / "dets_train.json", seed=1))
    assert m3["content_sha256"] != m["content_sha256"]


def test_train_mode_on_kit_aerial(kit, tmp_path):
    """Real aerial images with ~40 small cars each: every box is added, backgrounds keep 1 in 4."""
    data = kit / "data"
    out = tmp_path / "rois_train.h5"
    cfg = CropRoisConfig(out=out, data=data, detections=kit / "dets_train.json", shard="0/6", gt_jitters=1)
    m = crop_rois(cfg)
    shard = tmp_path / "rois_train.shard-0-of-6.h5"
    assert not out.exists() and shard.exists()
    rows = read_store(shard)
    check_train_invariants(rows, cfg, data / "annotations" / "instances_train.json")
    pos = rows["label"] > 0
    assert abs(pos.mean() - 0.25) < 0.03, pos.mean()
    ann = json.loads((data / "annotations" / "instances_train.json").read_text())
    ids = sorted(im["id"] for im in ann["images"])[0::6]
    assert sorted(set(rows["image_id"].tolist())) == ids and m["images"] == len(ids)
    n_gt = sum(1 for a in ann["annotations"] if a["image_id"] in set(ids))
    assert (rows["source"] == 1).sum() == n_gt
    # Mostly small objects: most crops were upsampled from windows below 128 px.
    side = rows["window"][:, 2] - rows["window"][:, 0]
    assert np.median(side[pos]) < 64


def test_test_mode_keeps_top_detections_and_scores(synth, tmp_path):
    data = synth / "data"
    out = tmp_path / "rois_minival.h5"
    m = crop_rois(CropRoisConfig(out=out, data=data, split="minival", mode="test",
                                 detections=synth / "dets_minival.json"))
    rows = read_store(out)
    dets = json.loads((synth / "dets_minival.json").read_text())
    assert S.store_info(out)["mode"] == "test" and m["gt_rows"] == 0
    for iid in np.unique(rows["image_id"]):
        sel = rows["image_id"] == iid
        mine = sorted((d["score"] for d in dets if d["image_id"] == iid and d["score"] >= 0.05), reverse=True)
        assert sel.sum() == min(100, len(mine)) <= 100
        np.testing.assert_allclose(rows["score"][sel], mine[:100], rtol=1e-6)
    assert (rows["source"] == 0).all() and (rows["det_label"] >= 1).all()
    pos = rows["label"] > 0
    assert (rows["iou"][pos] >= 0.5).all() and (rows["iou"][~pos] < 0.5).all() and pos.any() and (~pos).any()
    dec = B.decode_target(torch.from_numpy(rows["roi"][pos]).double(), torch.from_numpy(rows["target"][pos]).double())
    np.testing.assert_allclose(dec.numpy(), rows["gt_box"][pos], atol=1e-4, rtol=0)
    # --max-rois and --score-thresh override the mode's defaults.
    crop_rois(CropRoisConfig(out=tmp_path / "top5.h5", data=data, split="minival", mode="test", max_rois=5,
                             score_thresh=0.5, detections=synth / "dets_minival.json"))
    top = read_store(tmp_path / "top5.h5")
    _, counts = np.unique(top["image_id"], return_counts=True)
    assert (counts <= 5).all() and (top["score"] >= 0.5).all()


# ------------------------------------------------------------------------------------------
# Sharding, merging, atomicity


def test_shards_merged_equal_the_unsharded_store(synth, tmp_path, cli):
    data, dets = synth / "data", synth / "dets_train.json"
    full = tmp_path / "full" / "rois_train.h5"
    crop_rois(CropRoisConfig(out=full, data=data, detections=dets, seed=5))
    shard_dir = tmp_path / "sharded"
    for i in range(3):
        res = cli("-q", "crop-rois", "--data", data, "--detections", dets, "--seed", 5, "--shard", f"{i}/3",
                  "--out", shard_dir / "rois_train.h5")
        assert res.exit_code == 0, res.stderr
    shards = [shard_dir / f"rois_train.shard-{i}-of-3.h5" for i in (2, 0, 1)]
    res = cli("-q", "crop-rois", "merge", shard_dir / "rois_train.h5", *shards)
    assert res.exit_code == 0, res.stderr
    merged = shard_dir / "rois_train.h5"
    a, b = read_store(full), read_store(merged)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    ia, ib = S.store_info(full), S.store_info(merged)
    assert ia["content_sha256"] == ib["content_sha256"]
    assert S.image_digests(merged) == S.image_digests(full) and len(S.image_digests(full)) == 6  # every image cropped
    for k in ("categories", "hr_size", "context", "mode", "split", "detector", "annotations", "image_dir",
              "num_images", "rows"):
        assert ia[k] == ib[k], k
    assert "shard" not in ib
    assert json.loads((shard_dir / "rois_train.h5.manifest.json").read_text())["stage"] == "crop-rois-merge"
    # Refusals: a missing shard, a shard of another run, a non-shard.
    res = cli("crop-rois", "merge", tmp_path / "m2.h5", *shards[:2])
    assert res.exit_code == 2 and "not exactly 0/3 .. 2/3" in res.stderr
    other = tmp_path / "other" / "rois_train.h5"
    crop_rois(CropRoisConfig(out=other, data=data, detections=dets, seed=5, context=2.0, shard="1/3"))
    res = cli("crop-rois", "merge", tmp_path / "m3.h5", shards[1], other.with_name("rois_train.shard-1-of-3.h5"),
              shards[0])
    assert res.exit_code == 2 and "'context'" in res.stderr
    res = cli("crop-rois", "merge", tmp_path / "m4.h5", full)
    assert res.exit_code == 2 and "is not a shard" in res.stderr
    assert not (tmp_path / "m2.h5").exists() and not (tmp_path / "m3.h5").exists()


def test_merge_refuses_other_categories(synth, tmp_path):
    data, dets = synth / "data", synth / "dets_train.json"
    for i in range(2):
        crop_rois(CropRoisConfig(out=tmp_path / "rois_train.h5", data=data, detections=dets, shard=f"{i}/2"))
    s1 = tmp_path / "rois_train.shard-1-of-2.h5"
    with h5py.File(s1, "a") as f:
        cats = json.loads(f.attrs["categories"])
        cats[0]["name"] = "renamed"
        f.attrs["categories"] = json.dumps(cats)
    with pytest.raises(InputError, match="categories disagree"):
        merge_shards(tmp_path / "merged.h5", [tmp_path / "rois_train.shard-0-of-2.h5", s1])


def test_interrupted_crop_rois_leaves_nothing_and_keeps_old(synth, tmp_path):
    """A corrupt image met half way: InputError, no new store, the previous store untouched."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(synth / "data", data)
    out = tmp_path / "rois_train.h5"
    out.write_bytes(b"a previous store")  # stands for any earlier output: it must survive
    (tmp_path / "rois_train.h5.manifest.json").write_text("{}")
    before = out.read_bytes()
    manifest_before = (tmp_path / "rois_train.h5.manifest.json").read_bytes()
    fourth = sorted((data / "images" / "train").iterdir())[3]  # three images are cropped before it
    fourth.write_bytes(fourth.read_bytes()[:200])
    with pytest.raises(InputError, match="unreadable"):
        crop_rois(CropRoisConfig(out=out, data=data, detections=synth / "dets_train.json", overwrite=True,
                                 batch_images=1))
    assert out.read_bytes() == before
    assert (tmp_path / "rois_train.h5.manifest.json").read_bytes() == manifest_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "rois_train.h5", "rois_train.h5.manifest.json"]


# ------------------------------------------------------------------------------------------
# CLI


def test_cli_crop_then_downsample_then_loader(synth, tmp_path, cli):
    out = tmp_path / "run" / "rois_minival.h5"
    res = cli("-q", "crop-rois", "--data", synth / "data", "--split", "minival", "--mode", "test",
              "--detections", synth / "dets_minival.json", "--hr-size", 64, "--out", out)
    assert res.exit_code == 0, res.stderr
    res = cli("-q", "downsample", out)
    assert res.exit_code == 0, res.stderr
    lr = tmp_path / "run" / "rois_minival_lr.h5"
    loader = S.make_loader(out, lr, batch_size=32, shuffle=True, seed=0)
    b = next(iter(loader))
    assert b["hr"].shape[1:] == (3, 64, 64) and b["lr"].shape[1:] == (3, 16, 16)
    res = cli("crop-rois", "--data", synth / "data", "--detections", synth / "dets_minival.json", "--out", out)
    assert res.exit_code == 2 and "already exists" in res.stderr


@pytest.mark.parametrize("args,message", [
    (["--detector", "yolo"], "not a detector family (frcnn, ssd, mdssd, fsr)"),
    (["--mode", "eval"], "--mode must be train or test"),
    (["--detector-weights", "model.pt"], "exactly one of --detector-weights"),
    (["--shard", "3/3"], "--shard must be i/n"),
    (["--bg-low", "0.6"], "--bg-low must be in"),
])
def test_cli_bad_options(synth, tmp_path, cli, args, message):
    res = cli("crop-rois", "--data", synth / "data", "--detections", synth / "dets_train.json",
              "--out", tmp_path / "r.h5", *args)
    assert res.exit_code == 2 and message in res.stderr, res.stderr
    assert not (tmp_path / "r.h5").exists()


def test_cli_detections_for_another_split_refused(synth, tmp_path, cli):
    res = cli("crop-rois", "--data", synth / "data", "--split", "train", "--detections", synth / "dets_minival.json",
              "--out", tmp_path / "r.h5")
    assert res.exit_code == 2 and "not in the ground truth" in res.stderr


# ------------------------------------------------------------------------------------------
# ROIs from a detector checkpoint (sodtool.models.detectors)


@pytest.fixture(scope="module")
def model_file(synth) -> Path:
    """An untrained but real, small Faster R-CNN in sodtool's model.pt format: random detections."""
    from sodtool.models.detector_weights import MODEL_FORMAT
    from sodtool.models.frcnn import build_detector, resolve_build
    from sodtool.coco import load_split, resolve_split

    cats = load_split(resolve_split(synth / "data", "train")).categories
    torch.manual_seed(0)
    build = resolve_build("resnet18_fpn", min_size=256, max_size=256, fpn_channels=32, representation_size=64)
    model = build_detector("resnet18_fpn", cats.num_classes + 1, **build)
    path = synth / "detector" / "model.pt"
    path.parent.mkdir(exist_ok=True)
    torch.save({"format": MODEL_FORMAT, "arch": "resnet18_fpn", "num_classes": cats.num_classes + 1,
                "categories": json.dumps(cats.to_json()), "build": build, "model": model.state_dict()}, path)
    return path


def test_rois_from_detector_checkpoint(synth, model_file, tmp_path, cli):
    data = synth / "data"
    out = tmp_path / "rois_minival.h5"
    res = cli("-q", "crop-rois", "--detector", "frcnn", "--detector-weights", model_file, "--data", data,
              "--split", "minival", "--mode", "test", "--device", "cpu", "--out", out)
    assert res.exit_code == 0, res.stderr
    rows = read_store(out)
    info = S.store_info(out)
    assert info["detector"]["kind"] == "checkpoint" and info["detector"]["arch"] == "resnet18_fpn"
    assert info["detector"]["file"]["sha256"]
    ids, counts = np.unique(rows["image_id"], return_counts=True)
    assert len(ids) == 3 and (counts <= 100).all()
    for iid in ids:
        s = rows["score"][rows["image_id"] == iid]
        assert (np.diff(s) <= 0).all() and (s >= 0.05).all()
    # Train mode from the same detector (a third of the images, for time): the sampling rules hold.
    cfg = CropRoisConfig(out=tmp_path / "rois_train.h5", data=data, detector_weights=model_file, device="cpu",
                         shard="1/3")
    m = crop_rois(cfg)
    assert m["images"] == 2 and m["rows"] > 0
    check_train_invariants(read_store(tmp_path / "rois_train.shard-1-of-3.h5"), cfg,
                           data / "annotations" / "instances_train.json")


def test_detector_of_other_categories_refused(synth, model_file, tmp_path, cli):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(synth / "data", data)
    ann_path = data / "annotations" / "instances_minival.json"
    ann = json.loads(ann_path.read_text())
    ann["categories"][0]["name"] = "something-else"
    ann_path.write_text(json.dumps(ann))
    res = cli("crop-rois", "--detector-weights", model_file, "--data", data, "--split", "minival",
              "--mode", "test", "--device", "cpu", "--out", tmp_path / "r.h5")
    assert res.exit_code == 2 and "categories disagree" in res.stderr
    assert not (tmp_path / "r.h5").exists()


def test_sample_train_counts():
    """The per-image budget: fg quota, 3 backgrounds per positive, at least rois_per_image rows."""
    from sodtool.rois import sample_train

    rng = np.random.default_rng(0)
    w = h = 1000
    gt_boxes = np.array([[100, 100, 200, 200], [500, 500, 600, 650]], np.float32)
    gt = {"boxes": gt_boxes, "labels": np.array([2, 5])}

    def dets(n_pos, n_bg, n_far):
        b = []
        for _ in range(n_pos):  # IoU >= 0.5 with the first box
            b.append(gt_boxes[0] + rng.uniform(-8, 8, 4))
        for _ in range(n_bg):  # IoU in [0.1, 0.5): shifted by half a box
            b.append(gt_boxes[1] + [50, 60, 50, 60] + rng.uniform(-5, 5, 4))
        for _ in range(n_far):  # no overlap
            x, y = rng.uniform(700, 900, 2)
            b.append([x, y, x + 50, y + 50])
        b = np.array(b, np.float32).reshape(-1, 4)
        return {"boxes": b, "scores": np.linspace(1, 0.02, len(b)).astype(np.float32),
                "labels": np.full(len(b), 1, np.int64)}

    cfg = CropRoisConfig(out=Path("x.h5"))
    rows = sample_train(dets(40, 200, 30), gt, w, h, cfg, np.random.default_rng(1))
    pos = rows["label"] > 0
    assert pos.sum() == 16 and (~pos).sum() == 48  # 4 jittered GT + 12 detector positives; 3 bg each
    assert (rows["source"] == 1).sum() == 4 and set(rows["label"][pos].tolist()) <= {2, 5}
    # Few positives: backgrounds fill up to rois_per_image (Fast R-CNN).
    rows = sample_train(dets(2, 200, 0), gt, w, h, cfg, np.random.default_rng(1))
    assert (rows["label"] > 0).sum() == 6 and len(rows["label"]) == 64
    # Far ROIs (IoU < bg_low) are never used; with bg_low 0 they are backgrounds.
    rows = sample_train(dets(0, 0, 30), gt, w, h, cfg, np.random.default_rng(1))
    assert len(rows["label"]) == 4
    cfg0 = CropRoisConfig(out=Path("x.h5"), bg_low=0.0)
    rows = sample_train(dets(0, 0, 30), {"boxes": np.zeros((0, 4), np.float32), "labels": np.zeros(0, np.int64)},
                        w, h, cfg0, np.random.default_rng(1))
    assert len(rows["label"]) == 30 and (rows["label"] == 0).all() and (rows["gt_box"] == 0).all()
    # Crowded image: 40 objects x 2 jitters = 80 positives, so 240 backgrounds when there are that many.
    many = np.array([[20 * i, 20 * j, 20 * i + 12, 20 * j + 12] for i in range(8) for j in range(5)], np.float32)
    crowd = {"boxes": many, "labels": np.ones(40, np.int64)}
    bgs = many + np.array([5, 5, 5, 5], np.float32)  # IoU ~0.2 with their box
    d = {"boxes": np.repeat(bgs, 8, axis=0) + rng.uniform(-1, 1, (320, 4)).astype(np.float32),
         "scores": np.full(320, 0.5, np.float32), "labels": np.ones(320, np.int64)}
    rows = sample_train(d, crowd, w, h, cfg, np.random.default_rng(1))
    assert (rows["label"] > 0).sum() == 80 and (rows["label"] == 0).sum() == 240


# ------------------------------------------------------------------------------------------
# Ground-truth-only ROIs (--gt-only: no detector)


def test_gt_only_store(synth, tmp_path, cli):
    """Positives are exactly the jittered ground truth (IoU >= jitter_iou, targets decode to the GT);
    the rest are random backgrounds (IoU < fg_iou, label 0, zero targets); provenance says 'ground truth'."""
    from sodtool.coco import CategoryMap

    data = synth / "data"
    out = tmp_path / "run" / "rois_gt.h5"
    res = cli("-q", "crop-rois", "--gt-only", "--data", data, "--split", "train", "--hr-size", 64, "--out", out)
    assert res.exit_code == 0, res.stderr
    rows = read_store(out)
    ann = json.loads((data / "annotations" / "instances_train.json").read_text())
    cats = CategoryMap.from_json(ann["categories"])
    images = {im["id"]: im for im in ann["images"]}
    src, pos = rows["source"], rows["label"] > 0
    assert set(np.unique(src).tolist()) == {1, 2}
    assert (pos == (src == 1)).all() and pos.sum() == 2 * len(ann["annotations"])
    assert (rows["iou"][pos] >= 0.7).all()
    assert (rows["iou"][~pos] < 0.5).all() and (rows["target"][~pos] == 0).all()
    assert (rows["score"] == 0).all() and (rows["det_label"] == 0).all()
    dec = B.decode_target(torch.from_numpy(rows["roi"][pos]).double(), torch.from_numpy(rows["target"][pos]).double())
    np.testing.assert_allclose(dec.numpy(), rows["gt_box"][pos], atol=1e-4, rtol=0)
    by_image: dict[int, list] = {}
    for a in ann["annotations"]:
        x, y, w, h = a["bbox"]
        by_image.setdefault(a["image_id"], []).append(([x, y, x + w, y + h], cats.to_label(a["category_id"])))
    for r in np.flatnonzero(pos):
        gts = by_image[int(rows["image_id"][r])]
        k = int(np.argmin([np.abs(np.array(g) - rows["gt_box"][r]).max() for g, _ in gts]))
        np.testing.assert_allclose(gts[k][0], rows["gt_box"][r], atol=1e-3)
        assert gts[k][1] == rows["label"][r]
    for r in range(len(rows["roi"])):
        im = images[int(rows["image_id"][r])]
        x1, y1, x2, y2 = rows["roi"][r]
        assert 0 <= x1 < x2 <= im["width"] and 0 <= y1 < y2 <= im["height"]
    np.testing.assert_allclose(rows["window"], B.square_windows(torch.from_numpy(rows["roi"]), 1.5).numpy(),
                               rtol=1e-6, atol=1e-4)
    _, counts = np.unique(rows["image_id"], return_counts=True)
    assert len(counts) == 6 and (counts >= 64).all()  # train mode's budget: at least rois_per_image rows
    info = S.store_info(out)
    assert info["mode"] == "train" and info["detector"]["family"] == "ground truth"
    assert info["detector"]["file"]["sha256"] == info["annotations"]["sha256"]
    man = json.loads((tmp_path / "run" / "rois_gt.h5.manifest.json").read_text())
    assert man["config"]["gt_only"] is True and man["inputs"]["detector"]["family"] == "ground truth"
    assert "detections" not in man["inputs"] and "detector_weights" not in man["inputs"]
    # Seeded per image: a shard holds exactly the unsharded store's rows of its images.
    cfg = CropRoisConfig(out=tmp_path / "s.h5", data=data, gt_only=True, hr_size=64, shard="1/2")
    crop_rois(cfg)
    part = read_store(tmp_path / "s.shard-1-of-2.h5")
    sel = np.isin(rows["image_id"], part["image_id"])
    for k in ("roi", "label", "target", "source", "hr"):
        assert np.array_equal(part[k], rows[k][sel]), k


def test_random_backgrounds_avoid_the_ground_truth():
    from sodtool.rois import box_iou, random_backgrounds

    gt = np.array([[0, 0, 300, 200], [310, 0, 400, 100]], np.float32)
    bg = random_backgrounds(gt, 50, np.random.default_rng(0), 400, 300, 0.5)
    assert bg.shape == (50, 4) and bg.dtype == np.float32
    assert (box_iou(bg, gt).max(axis=1) < 0.5).all()
    assert (bg[:, 0] >= 0).all() and (bg[:, 2] <= 400).all() and (bg[:, 1] >= 0).all() and (bg[:, 3] <= 300).all()
    assert ((bg[:, 2] > bg[:, 0]) & (bg[:, 3] > bg[:, 1])).all()
    # No ground truth: no scale to draw from, no boxes; an image filled by one object: none fit.
    assert random_backgrounds(gt[:0], 10, np.random.default_rng(0), 400, 300, 0.5).shape == (0, 4)
    full = np.array([[0, 0, 40, 40]], np.float32)
    assert len(random_backgrounds(full, 10, np.random.default_rng(0), 40, 40, 0.01)) < 10


@pytest.mark.parametrize("args,message", [
    (["--gt-only", "--mode", "test"], "--gt-only samples training ROIs (--mode train)"),
    (["--gt-only", "--detections", "DETS"], "--gt-only takes its ROIs from the ground truth: drop --detections"),
    (["--gt-only", "--detector-weights", "model.pt"], "drop --detector-weights"),
    ([], "or --gt-only"),
])
def test_cli_gt_only_errors(synth, tmp_path, cli, args, message):
    args = [str(synth / "dets_train.json") if a == "DETS" else a for a in args]
    res = cli("crop-rois", "--data", synth / "data", "--out", tmp_path / "r.h5", *args)
    assert res.exit_code == 2 and message in res.stderr, res.stderr
    assert not (tmp_path / "r.h5").exists()


def test_box_target_is_what_the_crop_shows():
    # Two ROIs with the same centre and longer side have the same crop window, so D sees the
    # same picture: their targets onto the same ground truth must be equal (relative to the
    # ROI's square), and decode back to that ground truth. Deltas relative to the ROI's own
    # width and height (schema /1) differ here: the short side is not in the picture.
    from sodtool.rois import match

    wide = np.array([[100.0, 145.0, 140.0, 155.0]], np.float32)  # 40 x 10
    squareish = np.array([[100.0, 135.0, 140.0, 165.0]], np.float32)  # 40 x 30, same square
    gt = np.array([[102.0, 138.0, 141.0, 160.0]], np.float32)
    assert torch.equal(B.square_windows(torch.from_numpy(wide), 1.5), B.square_windows(torch.from_numpy(squareish), 1.5))
    t_wide = match(wide, gt, np.array([3]), fg_iou=0.0)["target"]
    t_sq = match(squareish, gt, np.array([3]), fg_iou=0.0)["target"]
    np.testing.assert_allclose(t_wide, t_sq, rtol=0, atol=1e-6)
    for roi, t in ((wide, t_wide), (squareish, t_sq)):
        back = B.decode_target(torch.from_numpy(roi).double(), torch.from_numpy(t).double())
        np.testing.assert_allclose(back.numpy(), gt, atol=1e-3)
    # The refinement at test time decodes the same way.
    from sodtool.rescoring import refine_boxes

    reg = torch.from_numpy(t_wide) * torch.tensor(B.BOX_WEIGHTS)
    np.testing.assert_allclose(refine_boxes(torch.from_numpy(wide), reg, 640, 480).numpy(), gt, atol=1e-3)


def test_store_of_the_old_target_schema_is_refused(tmp_path):
    p = tmp_path / "old.h5"
    with h5py.File(p, "w") as f:
        f.attrs["schema"] = "sodtool.rois/1"
    with pytest.raises(InputError, match="relative to the ROI itself: crop the ROIs again"):
        S.open_store(p)
