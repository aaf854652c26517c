"""SSD / MDSSD (sodtool.models.ssd): documented map shapes, the Fusion Block, default boxes for
small objects, torchvision ssd300_vgg16 state dicts, losses and detections."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torchvision.ops import box_iou

from sodtool.errors import InputError
from sodtool.models.ssd import FusionBlock, build_ssd, first_layer_anchors, load_state, map_shapes

K = 3
# (family, trunk, input size) -> (channels, height, width) of every prediction map (module docstring).
SHAPES = {
    ("ssd", "vgg16", 300): [(512, 38, 38), (1024, 19, 19), (512, 10, 10), (256, 5, 5), (256, 3, 3), (256, 1, 1)],
    ("mdssd", "vgg16", 300): [(256, 75, 75), (512, 38, 38), (1024, 19, 19), (512, 10, 10), (256, 5, 5),
                              (256, 3, 3), (256, 1, 1)],
    ("ssd", "mobilenet_v3", 320): [(40, 40, 40), (112, 20, 20), (960, 10, 10), (512, 5, 5), (256, 3, 3),
                                   (256, 2, 2)],
    ("mdssd", "mobilenet_v3", 320): [(128, 80, 80), (128, 40, 40), (128, 20, 20), (960, 10, 10), (512, 5, 5),
                                     (256, 3, 3), (256, 2, 2)],
}


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {key: build_ssd(key[0], K, key[1], key[2]) for key in SHAPES}


@pytest.mark.parametrize("key", list(SHAPES), ids=["-".join(map(str, k)) for k in SHAPES])
def test_architecture_maps_losses_and_detections(models, key):
    family, arch, size = key
    model = models[key]
    assert map_shapes(model, size) == SHAPES[key]
    assert len(model.anchor_generator.aspect_ratios) == len(SHAPES[key])
    model.train()
    torch.manual_seed(1)
    losses = model([torch.rand(3, 200, 240)], [{"boxes": torch.tensor([[20.0, 30.0, 44.0, 50.0]]),
                                                 "labels": torch.tensor([2])}])
    assert set(losses) == {"bbox_regression", "classification"}
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        (det,) = model([torch.rand(3, 200, 240)])
    n = det["boxes"].shape[0]
    assert det["boxes"].shape == (n, 4) and det["scores"].shape == (n,) and det["labels"].shape == (n,)
    if n:  # xyxy pixels of the 240 x 200 input, labels 1..K
        assert float(det["boxes"][:, 2].max()) <= 240 + 1e-3 and float(det["boxes"][:, 3].max()) <= 200 + 1e-3
        assert int(det["labels"].min()) >= 1 and int(det["labels"].max()) <= K


def test_mdssd512_has_eight_prediction_layers():
    with torch.device("meta"):  # shapes only: no weights initialised, no convolution computed
        model = build_ssd("mdssd", K, "vgg16", 512)
    shapes = map_shapes(model, 512)
    assert len(shapes) == 8 and shapes[0] == (256, 128, 128) and shapes[1] == (512, 64, 64)
    assert shapes[-1] == (256, 1, 1)


@pytest.mark.parametrize("deep, shallow", [((512, 10, 10), (256, 75, 75)), ((256, 5, 5), (512, 38, 38)),
                                           ((256, 3, 3), (1024, 19, 19)), ((64, 4, 4), (32, 32, 32))])
def test_fusion_block_output_has_the_shallow_maps_shape(deep, shallow):
    block = FusionBlock(deep[0], shallow[0], shallow[0], mid_channels=32)
    out = block(torch.rand(2, *deep), torch.rand(2, *shallow))
    assert out.shape == (2, *shallow) and bool((out >= 0).all())  # ends in a ReLU


@pytest.mark.parametrize("key", [("mdssd", "vgg16", 300), ("mdssd", "mobilenet_v3", 320)])
def test_first_layer_anchors_cover_a_16px_box(models, key):
    size = key[2]
    anchors = first_layer_anchors(models[key], size)
    centre_y = (anchors[:, 1] + anchors[:, 3]) / 2
    xs = torch.arange(0, size - 16, 3.0)
    worst = 1.0
    for y in xs.tolist():  # 16 x 16 px boxes all over the image, one row at a time
        row = torch.stack([xs, torch.full_like(xs, y), xs + 16, torch.full_like(xs, y + 16)], dim=1)
        # Only default boxes centred within 16 px of the row: leaving out others can only lower
        # the best IoU, so the check is at least as strict as against every default box.
        near = anchors[(centre_y - (y + 8)).abs() <= 16]
        worst = min(worst, float(box_iou(row, near).max(dim=1).values.min()))
    assert worst >= 0.5


def test_torchvision_ssd300_vgg16_state_dict_loads(models):
    torch.manual_seed(2)
    tv = torchvision.models.detection.ssd300_vgg16(weights=None, weights_backbone=None, num_classes=91)
    state = tv.state_dict()
    ssd = copy.deepcopy(models[("ssd", "vgg16", 300)])  # a copy: the fixture's stays at its initialisation
    loaded, left = load_state(ssd, state, "ssd300_vgg16.pth")
    # Everything but the class head, whose 91 COCO outputs do not fit K + 1.
    assert left == sorted(k for k in ssd.state_dict() if k.startswith("head.classification_head."))
    assert loaded == len(state) - len(left)
    x = torch.rand(1, 3, 300, 300)
    tv.eval(), ssd.eval()
    with torch.no_grad():
        for a, b in zip(tv.backbone(x).values(), ssd.backbone(x).values()):
            assert torch.equal(a, b)
    # MDSSD takes every trunk layer it shares with SSD (VGG16, conv4_3's scale, the extras).
    mdssd = copy.deepcopy(models[("mdssd", "vgg16", 300)])
    loaded, left = load_state(mdssd, state, "ssd300_vgg16.pth")
    assert loaded == sum(1 for k in state if k.startswith("backbone."))
    assert all(k.startswith(("backbone.fusion.", "head.")) for k in left)


def test_bad_names_and_state_dicts_are_input_errors(models):
    with pytest.raises(InputError, match="unknown detector family"):
        build_ssd("yolo", K, "vgg16", 300)
    with pytest.raises(InputError, match="unknown mdssd trunk"):
        build_ssd("mdssd", K, "resnet50", 300)
    with pytest.raises(InputError, match="300 or 512"):
        build_ssd("ssd", K, "vgg16", 320)
    with pytest.raises(InputError, match="no tensor of it fits"):
        load_state(models[("ssd", "mobilenet_v3", 320)], {"fc.weight": torch.zeros(2, 2)}, "other.pth")


# ------------------------------------------------------------------------------------------------
# The family through the stages: train detector, detect, crop-rois


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from typer.testing import CliRunner

    from sodtool.cli import app

    d = tmp_path_factory.mktemp("ssd_data") / "data"
    r = CliRunner().invoke(app, ["--quiet", "data", "synth", "--preset", "quick", "--train-images", "6", "--val-images", "1",
                                 "--minival-images", "2", "--image-size", "192", "--seed", "0", "--out", str(d)])
    assert r.exit_code == 0, r.stderr
    return d


def _rows(path):
    import json

    return [{k: v for k, v in json.loads(x).items() if k != "train_time_s"} for x in path.read_text().splitlines()]


def test_mdssd_trains_resumes_exactly_and_feeds_detect_and_crop_rois(cli, tiny_data, tmp_path):
    from sodtool.stages.train_detector import TrainDetectorConfig, train_detector

    kw = dict(data=tiny_data, detector="mdssd", size=128, iterations=5, batch_size=2, checkpoint_every=2,
              log_every=1, seed=0, eval=False, device="cpu")
    train_detector(TrainDetectorConfig(out=tmp_path / "a", **kw))
    assert train_detector(TrainDetectorConfig(out=tmp_path / "b", stop_after=3, **kw)) == {"stopped_at": 3}
    train_detector(TrainDetectorConfig(out=tmp_path / "b", **kw))
    a = torch.load(tmp_path / "a" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "model.pt", weights_only=True)
    assert a["family"] == "mdssd" and a["arch"] == "mobilenet_v3" and a["build"] == {"size": 128}
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert _rows(tmp_path / "a" / "metrics.jsonl") == _rows(tmp_path / "b" / "metrics.jsonl")

    model = tmp_path / "a" / "model.pt"
    res = cli("detect", "--detector", model, "--data", tiny_data, "--split", "minival", "--out", tmp_path / "d.json")
    assert res.exit_code == 0, res.stderr
    res = cli("crop-rois", "--detector", "mdssd", "--detector-weights", model, "--data", tiny_data, "--split",
              "minival", "--mode", "test", "--hr-size", "32", "--max-rois", "5", "--out", tmp_path / "r.h5")
    assert res.exit_code == 0, res.stderr
    res = cli("crop-rois", "--detector", "ssd", "--detector-weights", model, "--data", tiny_data, "--split",
              "minival", "--mode", "test", "--hr-size", "32", "--out", tmp_path / "r2.h5")
    assert res.exit_code == 2 and "holds a mdssd detector, not --detector ssd" in res.stderr


def test_bad_weights_for_the_family_exit_2(cli, tiny_data, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not torch")
    res = cli("train", "detector", "--detector", "ssd", "--weights", bad, "--data", tiny_data, "--out", tmp_path / "r")
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    other = tmp_path / "other.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, other)
    res = cli("detect", "--detector", "ssd", "--weights", other, "--data", tiny_data, "--split", "minival",
              "--out", tmp_path / "d.json")
    assert res.exit_code == 2 and "not a Faster R-CNN" in res.stderr, res.stderr


def test_torchvision_ssd300_file_runs_through_detect(cli, tiny_data, tmp_path):
    """A torchvision ssd300_vgg16 state dict (random weights, the dataset's 10 classes + background)
    is recognised as family ssd, trunk vgg16 at 300 px, and detects through the predict contract."""
    torch.manual_seed(3)
    tv = torchvision.models.detection.ssd300_vgg16(weights=None, weights_backbone=None, num_classes=11)
    path = tmp_path / "ssd300_vgg16_mine.pth"
    torch.save(tv.state_dict(), path)
    res = cli("detect", "--detector", "ssd", "--weights", path, "--data", tiny_data, "--split", "minival",
              "--out", tmp_path / "d.json", "--score-thresh", "0.0")
    assert res.exit_code == 0, res.stderr
    import json

    manifest = json.loads((tmp_path / "d.manifest.json").read_text())
    assert manifest["inputs"]["detector"]["family"] == "ssd" and manifest["inputs"]["detector"]["arch"] == "vgg16"
    assert manifest["metrics"]["detections"] > 0
    res = cli("detect", "--detector", "mdssd", "--weights", path, "--data", tiny_data, "--split", "minival",
              "--out", tmp_path / "d2.json")
    assert res.exit_code == 2 and "holds a ssd detector, not --detector mdssd" in res.stderr


def test_gradient_clipping_bounds_the_first_step_and_logs_the_norm(tiny_data, tmp_path):
    """With --clip-grad-norm c, the first SGD step (no momentum history, no weight decay, no
    warm-up) is the unclipped step scaled to norm lr * c, and metrics.jsonl logs the norm before
    clipping: ||w_unclipped - w_clipped|| = lr * (norm - c)."""
    from sodtool.stages.train_detector import TrainDetectorConfig, train_detector

    lr, clip = 0.01, 0.5
    kw = dict(data=tiny_data, detector="mdssd", size=128, iterations=1, batch_size=2, lr=lr, weight_decay=0.0,
              warmup_iters=0, log_every=1, seed=0, eval=False, device="cpu")
    train_detector(TrainDetectorConfig(out=tmp_path / "free", **kw))
    train_detector(TrainDetectorConfig(out=tmp_path / "clipped", clip_grad_norm=clip, **kw))
    free = torch.load(tmp_path / "free" / "model.pt", weights_only=True)["model"]
    clipped = torch.load(tmp_path / "clipped" / "model.pt", weights_only=True)["model"]
    gap = sum(float((free[k].double() - clipped[k].double()).pow(2).sum()) for k in free
              if free[k].is_floating_point()) ** 0.5
    norm = _rows(tmp_path / "clipped" / "metrics.jsonl")[0]["grad_norm_max"]
    assert norm > clip and "grad_norm_max" not in _rows(tmp_path / "free" / "metrics.jsonl")[0]
    assert gap == pytest.approx(lr * (norm - clip), rel=1e-3)


def test_clip_grad_norm_presets_and_bad_values(cli, tiny_data, tmp_path):
    from sodtool.stages.train_detector import TrainDetectorConfig, resolve_train_config

    def clip(**kw):
        return resolve_train_config(TrainDetectorConfig(**kw)).clip_grad_norm

    assert clip(detector="mdssd", preset="bench") == clip(detector="ssd", preset="bench") == 10.0
    assert clip(detector="mdssd", preset="quick") is None and clip(detector="frcnn", preset="bench") is None
    assert clip(detector="mdssd", preset="bench", clip_grad_norm=0.0) == 0.0  # 0: off
    for bad in ("-1", "nan"):
        res = cli("train", "detector", "--detector", "mdssd", "--data", tiny_data, "--out", tmp_path / "r",
                  "--clip-grad-norm", bad)
        assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert "--clip-grad-norm must be a norm >= 0" in res.stderr
    assert not (tmp_path / "r").exists()
