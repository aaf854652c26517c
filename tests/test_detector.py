"""The baseline detector: architectures, weight files, training (resume, determinism), detect.

Everything runs on CPU on tiny datasets made here (64 px images, a handful of iterations).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sodtool.coco import CategoryMap, load_split, resolve_split
from sodtool.engine import StepBatchSampler
from sodtool.errors import InputError
from sodtool.models.detector_weights import COCO_CATEGORIES, MODEL_FORMAT, infer_arch, load_backbone_weights
from sodtool.models.detectors import load_detector, predict
from sodtool.models.frcnn import ARCHS as DETECTOR_ARCHS, build_detector
from sodtool.stages.train_detector import DetectionDataset, PRESETS as DETECTOR_PRESETS, TrainDetectorConfig, _initial_model, _lr_factor, resolve_train_config

REPO = Path(__file__).resolve().parents[1]
COCO_CATS = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 18, "name": "dog"}]
PLAIN_CATS = [{"id": 1, "name": "ring"}, {"id": 2, "name": "square"}, {"id": 5, "name": "cross"}]
QUICK_ARCH = DETECTOR_PRESETS["quick"]["arch"]
# Options that make a training run take a second or two on a CPU (the quick preset's trunk).
TINY = ["--min-size", "64", "--max-size", "64", "--fpn-channels", "16", "--anchor-sizes", "8,16,32,64",
        "--roi-batch-size", "16", "--batch-size", "2", "--device", "cpu", "--log-every", "1"]


def make_dataset(root: Path, cats: list[dict], n_train: int = 6, n_val: int = 3, seed: int = 0) -> Path:
    """COCO dataset of 64x64 (one 80x64) PNGs with coloured rectangles; train image 2 has no boxes."""
    rng = np.random.default_rng(seed)
    ann_id = 1
    for split, n in (("train", n_train), ("minival", n_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        images, anns = [], []
        for i in range(1, n + 1):
            w, h = (80, 64) if i == 1 else (64, 64)
            arr = (rng.random((h, w, 3)) * 60).astype(np.uint8)
            k = 0 if (split == "train" and i == 2) else int(rng.integers(1, 4))
            for _ in range(k):
                bw, bh = (int(v) for v in rng.integers(10, 30, 2))
                x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
                c = int(rng.integers(0, len(cats)))
                arr[y:y + bh, x:x + bw] = [(200, 40, 40), (40, 200, 40), (40, 40, 200)][c % 3]
                anns.append({"id": ann_id, "image_id": i, "category_id": cats[c]["id"], "bbox": [x, y, bw, bh],
                             "area": bw * bh, "iscrowd": 0})
                ann_id += 1
            name = f"{i:04d}.png"
            Image.fromarray(arr).save(root / "images" / split / name)
            images.append({"id": i, "file_name": name, "width": w, "height": h})
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text(
            json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return root


@pytest.fixture(scope="module")
def coco_ds(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("coco_ds"), COCO_CATS)


@pytest.fixture(scope="module")
def plain_ds(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("plain_ds"), PLAIN_CATS, seed=1)


@pytest.fixture(scope="module")
def tv_coco_file(tmp_path_factory) -> Path:
    """A torchvision-format COCO detection state dict (random weights, 91 outputs = COCO ids)."""
    import torchvision

    torch.manual_seed(0)
    m = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    path = tmp_path_factory.mktemp("tv") / "fasterrcnn_resnet50_fpn_coco.pth"
    torch.save(m.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def trained(plain_ds, tmp_path_factory) -> Path:
    """A finished tiny training run (with the COCO evaluation at the end)."""
    from typer.testing import CliRunner

    from sodtool.cli import app

    out = tmp_path_factory.mktemp("run") / "detector"
    res = CliRunner().invoke(app, ["train", "detector", "--detector", "frcnn", "--data", str(plain_ds), "--out",
                                   str(out), "--iterations", "4", "--seed", "3", *TINY])
    assert res.exit_code == 0, res.stderr
    return out


# ------------------------------------------------------------------------------------------------
# Architectures
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", DETECTOR_ARCHS)
def test_every_arch_builds_trains_and_detects(arch):
    torch.manual_seed(0)
    # Few RoIs / proposals: C4's layer4 head runs once per RoI.
    model = build_detector(arch, 4, min_size=64, max_size=96, box_batch_size_per_image=32,
                             rpn_post_nms_top_n_test=50)
    model.train()
    images = [torch.rand(3, 64, 80), torch.rand(3, 64, 64)]
    targets = [{"boxes": torch.tensor([[5.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([2])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2 and out[0]["boxes"].shape[1] == 4
    assert infer_arch(model.state_dict()) == arch


@pytest.mark.parametrize("arch,tv_name", [("resnet50_fpn", "fasterrcnn_resnet50_fpn"),
                                           ("mobilenet_v3_fpn", "fasterrcnn_mobilenet_v3_large_fpn")])
def test_layout_is_torchvisions(arch, tv_name):
    import torchvision

    ours = build_detector(arch, 5).state_dict()
    theirs = getattr(torchvision.models.detection, tv_name)(weights=None, weights_backbone=None, num_classes=5).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


def test_c4_is_detectrons_layout():
    m = build_detector("resnet50_c4", 3, min_size=64, max_size=64)
    assert m.backbone.out_channels == 1024
    assert m.roi_heads.box_roi_pool.output_size == (14, 14)
    assert m.roi_heads.box_predictor.cls_score.in_features == 2048
    feats = m.backbone(torch.rand(1, 3, 64, 96))
    assert list(feats) == ["0"] and feats["0"].shape == (1, 1024, 4, 6)  # stride 16
    pooled = m.roi_heads.box_head(torch.rand(2, 1024, 14, 14))
    assert pooled.shape == (2, 2048)


def test_coco_category_table_matches_torchvision():
    from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

    names = FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]
    table = {i: n for i, n in enumerate(names) if n not in ("__background__", "N/A")}
    assert {k: v.replace(" ", "") for k, v in table.items()} == {
        k: v.replace(" ", "") for k, v in COCO_CATEGORIES.items()}


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------

def test_batch_stream_resumes_mid_epoch_with_the_same_batches():
    full = iter(StepBatchSampler(7, 3, seed=5))
    first = [next(full) for _ in range(6)]  # crosses two epoch boundaries
    later = iter(StepBatchSampler(7, 3, seed=5, start_step=4))
    assert [next(later) for _ in range(2)] == first[4:]
    epoch0 = [i for b in first[:2] for i, _ in b] + [first[2][0][0]]
    assert sorted(epoch0) == list(range(7))
    other = iter(StepBatchSampler(7, 3, seed=6))
    assert [next(other) for _ in range(6)] != first
    assert all(aug == (False, False, 0) for aug in StepBatchSampler(7, 3, seed=5, hflip=False).epoch(0)[1])
    # Switching on vflip / rot90 draws after the hflips: the permutation and the hflips stay.
    plain, more = StepBatchSampler(50, 3, seed=5).epoch(2), StepBatchSampler(50, 3, seed=5, vflip=True, rot90=True).epoch(2)
    assert plain[0] == more[0] and [a[0] for a in plain[1]] == [a[0] for a in more[1]]
    assert {a[1] for a in more[1]} == {False, True} and {a[2] for a in more[1]} == {0, 1, 2, 3}


def test_dataset_hflip_mirrors_image_and_boxes(coco_ds):
    split = load_split(resolve_split(coco_ds, "train"))
    ds = DetectionDataset(split)
    img, t = ds[(0, (False, False, 0))]
    fimg, ft = ds[(0, (True, False, 0))]
    w = img.shape[2]
    assert img.dtype == torch.uint8 and img.shape == (3, 64, 80)
    assert torch.equal(fimg, img.flip(-1))
    assert torch.allclose(ft["boxes"][:, [0, 2]], w - t["boxes"][:, [2, 0]])
    assert torch.equal(ft["boxes"][:, [1, 3]], t["boxes"][:, [1, 3]])
    empty_img, empty = ds[(1, (True, False, 0))]  # image 2 has no boxes
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)


def test_lr_schedule_warmup_and_steps():
    cfg = TrainDetectorConfig(warmup_iters=10, warmup_factor=0.1, milestones=(20, 30), gamma=0.1)
    f = _lr_factor(cfg)
    assert f(0) == pytest.approx(0.1)
    assert f(5) == pytest.approx(0.55)
    assert f(10) == 1.0 and f(19) == 1.0
    assert f(20) == pytest.approx(0.1) and f(30) == pytest.approx(0.01)


# ------------------------------------------------------------------------------------------------
# Training outputs, detect, load_detector / predict
# ------------------------------------------------------------------------------------------------

def test_training_writes_the_run_folder(trained, plain_ds):
    manifest = json.loads((trained / "manifest.json").read_text())
    assert manifest["stage"] == "train_detector"
    # The held-out numbers are COCOeval of what the saved model detects on minival (recomputed here
    # from model.pt, as `detect` + `eval --results` would), not any float.
    from sodtool.evaluate import coco_evaluate
    from sodtool.models.detectors import detect_split

    stats = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large")
    cfg, val = manifest["config"], load_split(resolve_split(plain_ds, "minival"))
    assert manifest["metrics"]["eval_split"] == "minival" and manifest["metrics"]["eval_images"] == 3
    results = detect_split(load_detector(trained / "model.pt", "cpu", val.categories), val,
                           score_thresh=cfg["eval_score_thresh"], max_per_image=100, batch_size=cfg["eval_batch_size"])
    ref = coco_evaluate(val.coco, results)
    assert results and {k: manifest["metrics"][k] for k in stats} == pytest.approx({k: ref[k] for k in stats}, abs=1e-9)
    # The same evaluation path gives known numbers for known detections: the ground truth itself
    # scores AP 1 (every box is small here: no medium or large ground truth, -1), and the ground
    # truth moved by its own width onto empty ground scores 0.
    gt = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
          for a in val.coco.dataset["annotations"]]
    perfect = coco_evaluate(val.coco, gt)
    assert [perfect[k] for k in stats] == [1.0, 1.0, 1.0, 1.0, -1.0, -1.0]
    moved = [{**d, "bbox": [d["bbox"][0] + d["bbox"][2] + 1, *d["bbox"][1:]]} for d in gt]
    assert [coco_evaluate(val.coco, moved)[k] for k in stats] == [0.0, 0.0, 0.0, 0.0, -1.0, -1.0]
    assert manifest["metrics"]["resumed_from_step"] == 0
    lines = [json.loads(x) for x in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4]
    for k in ("loss", "loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg", "lr"):
        assert all(np.isfinite(x[k]) for x in lines)
    ckpt = torch.load(trained / "model.pt", weights_only=True)
    assert ckpt["format"] == MODEL_FORMAT and ckpt["arch"] == QUICK_ARCH and ckpt["num_classes"] == 4
    assert json.loads(ckpt["categories"]) == PLAIN_CATS
    assert ckpt["build"]["min_size"] == 64 and ckpt["build"]["anchor_sizes"] == [[8], [16], [32], [64]]


def test_load_detector_and_predict_contract(trained, plain_ds):
    split = load_split(resolve_split(plain_ds, "minival"))
    det = load_detector(trained / "model.pt", "cpu", split.categories)
    assert det.arch == QUICK_ARCH and det.categories == split.categories and det.identity["sha256"]
    imgs = [split.load_image(i) for i in split.image_ids]
    outs = predict(det, imgs, score_thresh=0.0, max_per_image=7, batch_size=2)
    assert len(outs) == len(imgs)
    for o, im in zip(outs, imgs):
        assert o["boxes"].dtype == np.float32 and o["boxes"].shape == (len(o["scores"]), 4)
        assert o["scores"].dtype == np.float32 and o["labels"].dtype == np.int64
        assert len(o["scores"]) <= 7
        assert np.all(np.diff(o["scores"]) <= 0) and np.all((o["scores"] >= 0) & (o["scores"] <= 1))
        assert np.all((o["labels"] >= 1) & (o["labels"] <= 3))
        assert np.all(o["boxes"][:, 2] <= im.shape[1]) and np.all(o["boxes"][:, 3] <= im.shape[0])
    # The run folder works as well as the file; other categories are refused.
    assert load_detector(trained, "cpu").categories == split.categories
    other = CategoryMap.from_json(COCO_CATS)
    with pytest.raises(InputError, match="categories disagree"):
        load_detector(trained / "model.pt", "cpu", other)


def test_detect_writes_results_and_manifest(cli, trained, plain_ds, tmp_path):
    out = tmp_path / "dets" / "detections_minival.json"
    res = cli("detect", "--detector", trained / "model.pt", "--data", plain_ds, "--split", "minival", "--out", out,
              "--device", "cpu", "--max-per-image", "5", "--score-thresh", "0")
    assert res.exit_code == 0, res.stderr
    results = json.loads(out.read_text())
    assert results and {r["category_id"] for r in results} <= {1, 2, 5}
    per_image: dict[int, int] = {}
    for r in results:
        assert set(r) == {"image_id", "category_id", "bbox", "score"} and len(r["bbox"]) == 4
        per_image[r["image_id"]] = per_image.get(r["image_id"], 0) + 1
    assert max(per_image.values()) <= 5 and set(per_image) <= {1, 2, 3}
    manifest = json.loads((out.parent / "detections_minival.manifest.json").read_text())
    assert manifest["stage"] == "detect" and manifest["metrics"]["detections"] == len(results)
    assert manifest["inputs"]["detector"]["arch"] == QUICK_ARCH
    # The default output goes to RUN/ beside RUN/detector.
    res = cli("detect", "--detector", trained, "--data", plain_ds, "--device", "cpu", "--no-eval")
    assert res.exit_code == 0, res.stderr
    assert (trained.parent / "detections_minival.json").is_file()
    assert (trained.parent / "detections_minival.manifest.json").is_file()


# ------------------------------------------------------------------------------------------------
# torchvision weight files
# ------------------------------------------------------------------------------------------------

def test_torchvision_coco_state_dict_detects_with_dataset_ids(cli, coco_ds, tv_coco_file, tmp_path):
    out = tmp_path / "tv_dets.json"
    res = cli("detect", "--detector", "frcnn", "--weights", tv_coco_file, "--data", coco_ds, "--split", "minival",
              "--out", out, "--min-size", "64", "--max-size", "64", "--score-thresh", "0", "--device", "cpu")
    assert res.exit_code == 0, res.stderr
    results = json.loads(out.read_text())
    assert results, "a random 91-class model still scores every box above 0"
    assert {r["category_id"] for r in results} <= {1, 3, 18}
    for r in results:
        assert r["bbox"][2] >= 0 and r["bbox"][3] >= 0 and 0 <= r["score"] <= 1
    per_image = np.bincount([r["image_id"] for r in results])
    assert per_image.max() <= 100

    # predict == the raw model's outputs restricted to the dataset's COCO ids, relabelled 1..3.
    split = load_split(resolve_split(coco_ds, "minival"))
    det = load_detector(tv_coco_file, "cpu", split.categories, min_size=64, max_size=64)
    assert det.label_map[[1, 3, 18]].tolist() == [1, 2, 3] and det.label_map.sum() == 6
    img = split.load_image(split.image_ids[0])
    got = predict(det, [img], score_thresh=0.0, max_per_image=100)[0]
    det.model.roi_heads.detections_per_img = 100_000
    det.model.roi_heads.score_thresh = 0.0
    with torch.no_grad():
        raw = det.model([torch.from_numpy(img.copy()).permute(2, 0, 1).float() / 255])[0]
    keep = torch.isin(raw["labels"], torch.tensor([1, 3, 18]))
    scores = raw["scores"][keep].numpy()
    order = np.argsort(-scores, kind="stable")[:100]
    assert np.array_equal(got["scores"], scores[order])
    to_label = {1: 1, 3: 2, 18: 3}
    assert got["labels"].tolist() == [to_label[int(c)] for c in raw["labels"][keep].numpy()[order]]


def test_torchvision_coco_state_dict_trains_through_weights(cli, coco_ds, tv_coco_file, tmp_path):
    # The starting model keeps the predictor rows of background, person (1), car (3) and dog (18).
    cats = load_split(resolve_split(coco_ds, "train")).categories
    cfg = resolve_train_config(TrainDetectorConfig(weights=tv_coco_file, min_size=64, max_size=64), 6)
    model, arch, build, _ = _initial_model(cfg, cats)
    assert arch == "resnet50_fpn" and build["norm"] == "frozen_bn" and build["frozen_bn_eps"] == 0.0
    tv = torch.load(tv_coco_file, weights_only=True)
    pred = model.roi_heads.box_predictor
    assert torch.equal(pred.cls_score.weight, tv["roi_heads.box_predictor.cls_score.weight"][[0, 1, 3, 18]])
    rows = [4 * c + j for c in (0, 1, 3, 18) for j in range(4)]
    assert torch.equal(pred.bbox_pred.bias, tv["roi_heads.box_predictor.bbox_pred.bias"][rows])
    assert torch.equal(model.backbone.fpn.layer_blocks[2][0].weight, tv["backbone.fpn.layer_blocks.2.0.weight"])

    out = tmp_path / "ft" / "detector"
    res = cli("train", "detector", "--data", coco_ds, "--out", out, "--weights", tv_coco_file, "--iterations", "1",
              "--no-eval", *TINY)
    assert res.exit_code == 0, res.stderr
    ckpt = torch.load(out / "model.pt", weights_only=True)
    assert ckpt["arch"] == "resnet50_fpn" and ckpt["num_classes"] == 4 and ckpt["build"]["norm"] == "frozen_bn"


def test_weights_of_another_class_count_are_refused(cli, plain_ds, tv_coco_file, tmp_path):
    res = cli("detect", "--detector", tv_coco_file, "--data", plain_ds, "--split", "minival", "--device", "cpu",
              "--out", tmp_path / "x.json")
    assert res.exit_code == 2
    assert "fasterrcnn_resnet50_fpn_coco.pth: box predictor has 91 classes, the dataset has 3+1" in res.stderr
    assert "the dataset's category 1 is 'ring', COCO's is 'person'" in res.stderr
    assert not (tmp_path / "x.json").exists()
    res = cli("train", "detector", "--data", plain_ds, "--out", tmp_path / "r", "--weights", tv_coco_file,
              "--iterations", "1", *TINY)
    assert res.exit_code == 2 and "box predictor has 91 classes, the dataset has 3+1" in res.stderr


def test_weights_of_another_arch_are_refused(cli, plain_ds, tmp_path):
    import torchvision

    f = tmp_path / "mobilenet_5.pth"
    torch.save(torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None, num_classes=5).state_dict(), f)
    res = cli("train", "detector", "--data", plain_ds, "--out", tmp_path / "r", "--arch", "resnet18_fpn",
              "--weights", f, "--iterations", "1", *TINY)
    assert res.exit_code == 2
    assert "mobilenet_5.pth: weights are for mobilenet_v3_fpn, the model is resnet18_fpn" in res.stderr
    res = cli("detect", "--detector", f, "--data", plain_ds, "--device", "cpu", "--out", tmp_path / "d.json")
    assert res.exit_code == 2 and "mobilenet_5.pth: box predictor has 5 classes, the dataset has 3+1" in res.stderr
    assert not (tmp_path / "r" / "model.pt").exists()


def test_sodtool_model_of_another_dataset_is_refused(cli, trained, coco_ds, tmp_path):
    res = cli("detect", "--detector", trained / "model.pt", "--data", coco_ds, "--device", "cpu",
              "--out", tmp_path / "d.json")
    assert res.exit_code == 2 and "categories disagree" in res.stderr


@pytest.mark.parametrize("content,message", [
    (None, "detector weights file not found"),
    (b"not a checkpoint", "cannot be read as a weights-only torch file"),
    ([1, 2, 3], "not a state dict"),
])
def test_bad_weight_files_exit_2(cli, plain_ds, tmp_path, content, message):
    f = tmp_path / "w.pt"
    if isinstance(content, bytes):
        f.write_bytes(content)
    elif content is not None:
        torch.save(content, f)
    for args in (("detect", "--detector", "frcnn", "--weights", f, "--data", plain_ds, "--device", "cpu"),
                 ("train", "detector", "--data", plain_ds, "--out", tmp_path / "r", "--weights", f, *TINY)):
        res = cli(*args)
        assert res.exit_code == 2, res.stderr
        assert message in res.stderr and "w.pt" in res.stderr
        assert res.stderr.count("\n") == 1


def test_backbone_weights_load_and_wrong_trunk_is_refused(cli, plain_ds, tmp_path):
    import torchvision

    torch.manual_seed(0)
    r18 = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), r18)
    model = build_detector("resnet18_fpn", 4, norm="frozen_bn")
    sd = torch.load(r18, weights_only=True)
    assert load_backbone_weights(model, "resnet18_fpn", r18) == len(sd) - 2  # all but fc.weight / fc.bias
    assert torch.equal(model.backbone.body.layer3[1].conv2.weight, sd["layer3.1.conv2.weight"])
    assert torch.equal(model.backbone.body.bn1.running_var, sd["bn1.running_var"])
    res = cli("train", "detector", "--data", plain_ds, "--out", tmp_path / "r", "--arch", "resnet50_fpn",
              "--backbone-weights", r18, "--iterations", "1", *TINY, "--anchor-sizes", "8,16,32,64,128")
    assert res.exit_code == 2 and "resnet18.pth: not resnet50 ImageNet weights for resnet50_fpn" in res.stderr


def test_unknown_detector_family_and_arch(cli, plain_ds, tmp_path):
    res = cli("train", "detector", "--detector", "yolo", "--data", plain_ds, "--out", tmp_path / "r")
    assert res.exit_code == 2 and "unknown detector 'yolo' (choose from frcnn, ssd, mdssd)" in res.stderr
    res = cli("train", "detector", "--arch", "vgg16", "--data", plain_ds, "--out", tmp_path / "r")
    assert res.exit_code == 2 and "unknown frcnn architecture 'vgg16'" in res.stderr
    res = cli("train", "detector", "--detector", "mdssd", "--arch", "resnet50_fpn", "--data", plain_ds,
              "--out", tmp_path / "r")
    assert res.exit_code == 2 and "unknown mdssd architecture 'resnet50_fpn'" in res.stderr
    res = cli("train", "detector", "--detector", "ssd", "--min-size", "320", "--data", plain_ds, "--out", tmp_path / "r")
    assert res.exit_code == 2 and "--min-size is a Faster R-CNN option" in res.stderr
    res = cli("train", "detector", "--size", "320", "--data", plain_ds, "--out", tmp_path / "r")
    assert res.exit_code == 2 and "--size is the input size of --detector ssd / mdssd" in res.stderr


# ------------------------------------------------------------------------------------------------
# Reproducibility and resumption
# ------------------------------------------------------------------------------------------------

def _weights(run: Path) -> dict:
    return torch.load(run / "model.pt", weights_only=True)["model"]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_same_seed_same_weights(cli, plain_ds, tmp_path):
    runs = {}
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        res = cli("train", "detector", "--data", plain_ds, "--out", tmp_path / name, "--iterations", "3",
                  "--seed", str(seed), "--no-eval", *TINY)
        assert res.exit_code == 0, res.stderr
        runs[name] = _weights(tmp_path / name)
    assert _same(runs["a"], runs["b"])
    assert not _same(runs["a"], runs["c"])


def test_killed_run_resumes_from_its_checkpoint(cli, plain_ds, tmp_path):
    out = tmp_path / "killed"
    total = 24
    args = ["train", "detector", "--data", str(plain_ds), "--out", str(out), "--iterations", str(total),
            "--checkpoint-every", "3", "--seed", "1", "--no-eval", *TINY]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "sodtool", "--quiet", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not (out / "checkpoint.pt").exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no checkpoint within 4 minutes"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "model.pt").exists() and not (out / "manifest.json").exists()
    saved = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    assert 3 <= saved < total and saved % 3 == 0

    res = cli(*args)
    assert res.exit_code == 0, res.stderr
    said = f"resuming from {out / 'checkpoint.pt'} at iteration {saved}/{total}"
    assert "".join(said.split()) in "".join(res.stderr.split())  # rich wraps long lines
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["metrics"]["resumed_from_step"] == saved
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [x["step"] for x in lines if "loss" in x]
    assert steps == list(range(1, total + 1))  # nothing logged twice, nothing missing
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == total

    # The resumed run ends with exactly the weights and the log of an uninterrupted one.
    straight = tmp_path / "straight"
    res = cli(*[str(straight) if a == str(out) else a for a in args])
    assert res.exit_code == 0, res.stderr
    assert _same(_weights(out), _weights(straight))
    # Trained in channels_last on the CPU (faster there), model.pt is saved in the standard layout.
    trained = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    # Only kernels whose two layouts differ: a 1x1 or one-input-channel kernel is contiguous in both.
    convs = [k for k, t in trained.items() if t.dim() == 4 and t.shape[2:] != (1, 1) and t.shape[1] > 1]
    assert convs and all(trained[k].is_contiguous(memory_format=torch.channels_last) for k in convs)
    assert all(t.is_contiguous() for t in _weights(out).values())

    def rows(run):
        return [{k: v for k, v in json.loads(x).items() if k != "train_time_s"}
                for x in (run / "metrics.jsonl").read_text().splitlines()]

    assert rows(out) == rows(straight)


def test_resume_refuses_other_settings(cli, plain_ds, tmp_path):
    out = tmp_path / "r"
    base = ["train", "detector", "--data", plain_ds, "--out", out, "--no-eval", *TINY]
    assert cli(*base, "--iterations", "2").exit_code == 0
    res = cli(*base, "--iterations", "2", "--lr", "0.001")
    assert res.exit_code == 2, res.stderr
    assert "was made with another configuration (lr 0.02 -> 0.001)" in res.stderr and "--no-resume" in res.stderr
    assert (out / "model.pt").is_file() and (out / "manifest.json").is_file()  # a refusal loses nothing
    res = cli(*base, "--iterations", "2", "--lr", "0.001", "--no-resume")
    assert res.exit_code == 0, res.stderr
    assert json.loads((out / "manifest.json").read_text())["config"]["lr"] == 0.001


def test_epochs_and_multiscale_training(cli, plain_ds, tmp_path):
    out = tmp_path / "ms"
    res = cli("train", "detector", "--data", plain_ds, "--out", out, "--epochs", "1", "--train-sizes", "48,64",
              "--no-eval", *TINY)
    assert res.exit_code == 0, res.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["metrics"]["iterations"] == 3  # 6 images, batch 2
    assert manifest["config"]["train_sizes"] == [48, 64]
    det = load_detector(out, "cpu")
    assert det.model.transform.min_size == (64,)  # tests run at --min-size, not the training sizes


@pytest.mark.parametrize("hflip,vflip,turns", [(False, False, 1), (False, False, 2), (False, False, 3), (True, True, 1),
                                               (False, True, 0)])
def test_flips_and_quarter_turns_move_boxes_with_the_pixels(hflip, vflip, turns):
    from sodtool.stages.train_detector import augment

    h, w = 30, 50
    img = torch.zeros(3, h, w, dtype=torch.uint8)
    box = torch.tensor([[7.0, 4.0, 19.0, 11.0]])  # xyxy: pixels 7..18 x 4..10
    img[:, 4:11, 7:19] = 255
    out, moved = augment(img, box, hflip, vflip, turns)
    ys, xs = torch.nonzero(out[0]).unbind(1)
    assert moved.tolist() == [[xs.min().item(), ys.min().item(), xs.max().item() + 1.0, ys.max().item() + 1.0]]
    assert out.shape[1:] == ((w, h) if turns % 2 else (h, w))
