"""Noh et al.'s feature-level super-resolution (`sodtool.models.fsr`, `sodtool train fsr`).

CPU, tiny inputs: the 64 px dataset and the tiny MobileNetV3-FPN detector of test_detector.py.
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
import torch.nn.functional as F
from test_detector import PLAIN_CATS, TINY, make_dataset
from test_rescore import save_mtgan

from sodtool.models import fsr
from sodtool.models.frcnn import build_detector

REPO = Path(__file__).resolve().parents[1]
# The tiny detector's build (TINY's options): 64 px input, 16-channel FPN on strides 8..32.
TINY_BUILD = dict(min_size=64, max_size=64, fpn_channels=16, returned_layers=[2, 3, 4],
                  anchor_sizes=[[8], [16], [32], [64]], box_batch_size_per_image=16)
# `train fsr` options that make a run take seconds: small proposals below 16² px of the 64 px input.
FSR_TINY = ["--batch-size", "2", "--small-size", "16", "--device", "cpu", "--log-every", "1"]


def tiny_fsr(arch: str = "mobilenet_v3_fpn", **options) -> fsr.FSRFasterRCNN:
    torch.manual_seed(0)
    base = build_detector(arch, 4, **(TINY_BUILD if arch == "mobilenet_v3_fpn" else
                                      dict(min_size=64, max_size=64, box_batch_size_per_image=8,
                                           rpn_post_nms_top_n_test=30)))
    return fsr.from_detector(base, arch, **{"small_size": 16, **options}).eval()


@pytest.fixture(scope="module")
def ds(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("fsr_ds"), PLAIN_CATS, seed=1)


@pytest.fixture(scope="module")
def runs(ds, tmp_path_factory) -> Path:
    """A tiny base detector (4 iterations) and an fsr model trained from it (4 GAN + 2 fine-tuning steps)."""
    from typer.testing import CliRunner

    from sodtool.cli import app

    root = tmp_path_factory.mktemp("fsr_runs")
    res = CliRunner().invoke(app, ["train", "detector", "--data", str(ds), "--out", str(root / "detector"),
                                   "--iterations", "4", "--seed", "3", "--no-eval", *TINY])
    assert res.exit_code == 0, res.stderr
    res = CliRunner().invoke(app, ["train", "fsr", "--detector", str(root / "detector" / "model.pt"), "--data", str(ds),
                                   "--out", str(root / "fsr"), "--iterations", "6", "--finetune-iterations", "2",
                                   "--seed", "1", *FSR_TINY])
    assert res.exit_code == 0, res.stderr
    return root


# ------------------------------------------------------------------------------------------------
# The SR target extractor
# ------------------------------------------------------------------------------------------------

def _receptive_field(backbone, rate: int, level: str, size: int, pool: str = "max") -> tuple[int, tuple]:
    """Width in image px of the pixels that reach the centre cell of a trunk level (gradient
    support, SE gates held constant), and that level's shape."""
    torch.manual_seed(0)
    support = torch.zeros(size, dtype=torch.bool)
    for _ in range(2):  # the union of two random images: a ReLU may block a border pixel of one
        x = torch.randn(1, 3, size, size, requires_grad=True)
        feats, _ = fsr.run_trunk(backbone, x, rate=rate, pool=pool, hold_se=True, fpn=False)
        f = feats[level]
        f[0, :, f.shape[-2] // 2, f.shape[-1] // 2].sum().backward()
        support |= x.grad.abs().sum((0, 1, 2)) > 0
    cols = torch.where(support)[0]
    return int(cols.max() - cols.min() + 1), tuple(f.shape)


@pytest.mark.parametrize("arch,level,size,rf_backbone,overhang", [
    # MobileNetV3: stride 8 (features.4) and 16 (features.7). Backbone RF by hand: 3x3/2 stem 3,
    # dw 3x3 +4 -> 7, dw 3x3/2 +4 -> 11, dw 3x3 +8 -> 19, dw 5x5/2 +16 -> 35; then two dw 5x5 at
    # stride 8 and a dw 3x3/2 -> 115. The extractor's pooling windows (Fig. 4c) add one cell of
    # the map they pool at each stride after the first: 2 + 4 px (stride 8), 2 + 4 + 8 (stride 16).
    ("mobilenet_v3_fpn", "0", 192, 35, 6),
    ("mobilenet_v3_fpn", "1", 384, 115, 14),
    # ResNet-18 layer1 (stride 4): 7x7/2 stem 7, 3x3/2 max pool -> 11, four 3x3 at stride 4 -> 43.
    ("resnet18_fpn", "0", 128, 43, 2),
])
@pytest.mark.parametrize("pool", fsr.POOLS)
def test_extractor_receptive_field_is_twice_the_backbones(arch, level, size, rf_backbone, overhang, pool):
    backbone = tiny_fsr(arch).backbone
    rf_b, shape_b = _receptive_field(backbone, 1, level, size)
    rf_e, shape_e = _receptive_field(backbone, fsr.RATE, level, size, pool)
    assert rf_b == rf_backbone
    # The backbone on the 0.5x image sees 2 x rf_b image px per cell (each of its pixels is two):
    # the extractor on the full image matches that relative receptive field, plus the pooling
    # windows' overhang, at the backbone's own stride on the full image (same map size).
    assert rf_e == 2 * rf_b + overhang
    assert 2.0 <= rf_e / rf_b <= 2.2
    assert shape_e == shape_b
    # The plain backbone on the full image (the unmatched target) sees half of that.
    half_rf, _ = _receptive_field(backbone, 1, level, size // 2)
    assert half_rf == rf_b
    # Without holding the SE gates constant, every output sees every pixel (global pooling).
    if arch.startswith("mobilenet"):
        x = torch.randn(1, 3, size, size, requires_grad=True)
        f = fsr.run_trunk(backbone, x, fpn=False)[0][level]
        f[0, :, f.shape[-2] // 2, f.shape[-1] // 2].sum().backward()
        assert bool((x.grad.abs().sum((0, 1)) > 0).all())


def test_extractor_shares_the_backbones_parameters(monkeypatch):
    model = tiny_fsr()
    backbone = model.backbone
    own = {p.data_ptr(): name for name, p in backbone.named_parameters()}
    used: list[int] = []
    real_conv = F.conv2d

    def recording_conv(x, weight, *args, **kwargs):
        used.append(weight.data_ptr())
        return real_conv(x, weight, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "conv2d", recording_conv)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        target = model.target_features(x)
    monkeypatch.undo()
    convs = [m for m in [*backbone.body.modules(), *backbone.fpn.modules()] if isinstance(m, torch.nn.Conv2d)]
    # Every convolution of the trunk and FPN ran, each with the backbone's own weight tensor.
    assert used and set(used) <= set(own) and set(used) == {m.weight.data_ptr() for m in convs}
    # The model holds no copy: its parameters are the base detector's plus the small branch and G.
    extra = {k for k, _ in model.named_parameters() if not k.startswith(("backbone.", "rpn.", "roi_heads.box_"))}
    assert all(k.startswith(("roi_heads.small_head.", "roi_heads.small_predictor.", "roi_heads.generator."))
               for k in extra)
    # A change to a backbone weight is a change to the extractor.
    w = backbone.body["0"][0].weight
    with torch.no_grad():
        w.mul_(2.0)
        changed = model.target_features(x)
        w.div_(2.0)
    assert not torch.equal(changed["0"], target["0"])
    # The small head and predictor are copies: equal values, separate tensors.
    heads = model.roi_heads
    for a, b in zip(heads.small_head.parameters(), heads.box_head.parameters()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()


def test_plain_run_is_the_backbone_and_pooling_is_torchvisions():
    model = tiny_fsr()
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        ref = model.backbone(x)
        feats, sub = model.features(x)
        assert list(ref) == list(feats) and all(torch.equal(ref[k], feats[k]) for k in ref)
        assert model.fsr_options["sub_layer"] == "3" and sub.shape == (2, 24, 16, 24)  # stride 4, one octave finer
        boxes = [torch.tensor([[2.0, 3.0, 12.0, 11.0], [5.0, 5.0, 60.0, 50.0]]), torch.tensor([[30.0, 1.0, 90.0, 63.0]])]
        sizes = [(64, 96), (64, 96)]
        pooler = model.roi_heads.box_roi_pool
        expected = pooler(feats, boxes, sizes)
        rois = fsr.as_rois(boxes)
        scales = fsr.level_scales(feats, list(pooler.featmap_names), sizes)
        got = fsr.pool_rois(pooler, feats, rois, fsr.roi_levels(pooler, rois, scales), scales)
    assert torch.equal(got, expected)


# ------------------------------------------------------------------------------------------------
# Generator, discriminator, the detector at initialisation
# ------------------------------------------------------------------------------------------------

def test_generator_and_discriminator_shapes():
    torch.manual_seed(0)
    g = fsr.FeatureGenerator(16, 24, blocks=2, width=8)
    f, f_sub = torch.randn(5, 16, 7, 7), torch.randn(5, 24, 7, 7)
    s = g(f, f_sub)
    assert s.shape == (5, 16, 7, 7)
    assert torch.equal(s, f)  # the identity at initialisation (each block's last convolution is 0)
    assert [tuple(b.conv1.weight.shape) for b in g.blocks] == [(8, 40, 3, 3)] * 2
    with torch.no_grad():
        g.blocks[0].conv2.weight.normal_()
    assert not torch.equal(g(f, f_sub), f)  # F_sub enters the result through the blocks
    d = fsr.FeatureDiscriminator(16 * 7 * 7, hidden=32)
    assert d(s).shape == (5,)
    assert [m.out_features for m in d.modules() if isinstance(m, torch.nn.Linear)] == [32, 32, 1]
    # Sized for a model's pooled features: C x 7 x 7 (FPN), C x 14 x 14 for the C4 head.
    assert fsr.discriminator_for(tiny_fsr(), 8).net[1].in_features == 16 * 7 * 7


@pytest.mark.parametrize("control", fsr.CONTROLS)
def test_at_initialisation_the_fsr_model_detects_what_its_base_detector_does(control):
    torch.manual_seed(0)
    base = build_detector("mobilenet_v3_fpn", 4, **TINY_BUILD).eval()
    images = [torch.rand(3, 64, 80), torch.rand(3, 64, 64)]
    base.roi_heads.score_thresh = 0.0
    with torch.no_grad():
        expected = base(images)
    model = fsr.from_detector(base, "mobilenet_v3_fpn", control=control, small_size=16).eval()
    assert (model.roi_heads.generator is None) == (control == "small-head")
    with torch.no_grad():
        got = model(images)
    for e, g in zip(expected, got):
        assert torch.equal(e["labels"], g["labels"])
        assert torch.allclose(e["boxes"], g["boxes"], atol=1e-4) and torch.allclose(e["scores"], g["scores"], atol=1e-6)
    counts = model.roi_heads.sr_counts
    assert 0 < counts["small"] < counts["proposals"]  # both branches ran


def test_resnet_trunks_build_and_run_on_a_tiny_input():
    images = [torch.rand(3, 64, 64)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 16.0, 18.0], [10.0, 10.0, 50.0, 60.0]]), "labels": torch.tensor([1, 2])}]
    for arch, sub_layer, pooled in (("resnet50_c4", "layer2", (1024, 14, 14)), ("resnet18_fpn", "relu", (256, 7, 7))):
        model = tiny_fsr(arch, gen_blocks=1, gen_width=8, small_size=48)  # most of a 64 px image's RoIs
        assert model.fsr_options["sub_layer"] == sub_layer
        x = torch.rand(1, 3, 64, 64)
        with torch.no_grad():
            plain, target = model.features(x)[0], model.target_features(x)
            assert {k: v.shape for k, v in target.items()} == {k: v.shape for k, v in plain.items() if k != "pool"}
            out = model(images)
        assert out[0]["boxes"].shape[1] == 4
        model.train()
        s = fsr.sample(model, images, targets)
        pairs = fsr.pair_features(model, s, 4, 96)
        assert pairs is not None and pairs.lr.shape[1:] == pooled and pairs.target.shape == pairs.lr.shape
        sr = model.roi_heads.generator(pairs.lr, pairs.lr_sub)
        d = fsr.discriminator_for(model, 8)
        losses = [fsr.content_loss(sr, pairs.target), fsr.generator_adv_loss(d(sr)),
                  *fsr.small_losses(model, s, train_generator=True).values()]
        assert all(torch.isfinite(v) for v in losses)
        sum(losses).backward()
        assert model.roi_heads.generator.blocks[0].conv2.weight.grad.abs().sum() > 0


def test_unmatched_target_control_takes_the_plain_backbones_features():
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        matched, unmatched = tiny_fsr().target_features(x), tiny_fsr(control="unmatched-target").target_features(x)
        plain = tiny_fsr().features(x)[0]
    assert torch.equal(unmatched["0"], plain["0"]) and not torch.equal(matched["0"], plain["0"])


# ------------------------------------------------------------------------------------------------
# train fsr -> detect, eval, crop-rois, predict
# ------------------------------------------------------------------------------------------------

def test_training_writes_an_fsr_detector(runs):
    out = runs / "fsr"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "train_fsr" and manifest["config"]["control"] == "none"
    m = manifest["metrics"]
    assert m["gan_iterations"] == 4 and m["finetune_iterations"] == 2 and m["eval_images"] == 3
    assert 0 < m["eval_small_proposals"] <= m["eval_proposals"]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4, 5, 6]
    assert [x["phase"] for x in lines] == ["gan"] * 4 + ["finetune"] * 2
    gan_terms = {"loss", "loss_content", "loss_adv", "loss_small_classifier", "loss_small_box_reg", "loss_disc"}
    assert all(gan_terms <= set(x) for x in lines[:4])
    assert all({"loss", "loss_small_classifier", "loss_large_classifier", "loss_large_box_reg"} <= set(x)
               for x in lines[4:])
    assert all(np.isfinite(v) for x in lines for k, v in x.items() if k.startswith("loss"))
    saved = torch.load(out / "model.pt", weights_only=True)
    assert saved["family"] == "fsr" and saved["build"]["fsr"]["control"] == "none"
    assert saved["build"]["min_size"] == 64 and saved["build"]["fsr"]["small_size"] == 16
    # The record covers the train images and everything the base detector learnt from.
    rec = json.loads((out / "trained_images.json").read_text())
    base = json.loads((runs / "detector" / "trained_images.json").read_text())
    assert set(base["sha"]) <= set(rec["sha"]) and rec["count"] == 6
    # The trunk and RPN are the base detector's, unchanged; the heads moved.
    base_sd = torch.load(runs / "detector" / "model.pt", weights_only=True)["model"]
    assert all(torch.equal(saved["model"][k], v) for k, v in base_sd.items() if k.startswith(("backbone.", "rpn.")))
    assert not torch.equal(saved["model"]["roi_heads.small_predictor.cls_score.weight"],
                           base_sd["roi_heads.box_predictor.cls_score.weight"])


def test_detect_eval_and_crop_rois_take_the_fsr_model(cli, runs, ds, tmp_path):
    from sodtool.models.detectors import load_detector

    model_pt = runs / "fsr" / "model.pt"
    det = load_detector(model_pt, "cpu")
    assert det.family == "fsr" and isinstance(det.model, fsr.FSRFasterRCNN)
    out = tmp_path / "dets.json"
    res = cli("detect", "--detector", model_pt, "--data", ds, "--split", "minival", "--out", out, "--device", "cpu",
              "--score-thresh", "0")
    assert res.exit_code == 0, res.stderr
    results = json.loads(out.read_text())
    assert results and {r["category_id"] for r in results} <= {1, 2, 5}
    assert json.loads((tmp_path / "dets.manifest.json").read_text())["inputs"]["detector"]["family"] == "fsr"
    res = cli("eval", "--results", out, "--data", ds, "--split", "minival", "--out", tmp_path / "ev")
    assert res.exit_code == 0, res.stderr
    # eval --detector: the fsr model's detections are the ROIs that an MTGAN rescores.
    mtgan = save_mtgan(tmp_path / "mtgan.pt", PLAIN_CATS, hr_size=32)
    res = cli("eval", "--split", "minival", "--data", ds, "--detector", model_pt, "--mtgan", mtgan,
              "--out", tmp_path / "ev2", "--device", "cpu")
    assert res.exit_code == 0, res.stderr
    res = cli("crop-rois", "--detector", "fsr", "--detector-weights", model_pt, "--data", ds, "--split", "minival",
              "--mode", "test", "--hr-size", "32", "--out", tmp_path / "rois.h5", "--device", "cpu")
    assert res.exit_code == 0, res.stderr
    res = cli("crop-rois", "--detector", "frcnn", "--detector-weights", model_pt, "--data", ds, "--split", "minival",
              "--mode", "test", "--hr-size", "32", "--out", tmp_path / "rois2.h5", "--device", "cpu")
    assert res.exit_code == 2 and "holds a fsr detector, not --detector frcnn" in res.stderr


def test_eval_compare_puts_detectors_beside_the_baseline(cli, runs, ds, tmp_path):
    base, model_pt = runs / "detector" / "model.pt", runs / "fsr" / "model.pt"
    ev = tmp_path / "ev"
    res = cli("eval", "--split", "minival", "--data", ds, "--detector", base, "--compare", f"same={base}",
              "--compare", f"fsr={model_pt}", "--out", ev, "--device", "cpu")
    assert res.exit_code == 0, res.stderr
    m = json.loads((ev / "metrics.json").read_text())
    rows = {r["name"]: r for r in m["rows"]}
    assert list(rows) == ["baseline", "same", "fsr"] and m["rescored"] is False
    # The baseline's own detector as a --compare row is the baseline row, detection for detection.
    assert json.loads((ev / "same.json").read_text()) == json.loads((ev / "baseline.json").read_text())
    assert rows["same"]["AP"] == rows["baseline"]["AP"] and rows["same"]["rois_through_sr"] == 0
    assert rows["same"]["sr_of"] is None and rows["baseline"]["rois_through_sr"] == 0
    # The fsr row counts the proposals G super-resolved: those train fsr's own evaluation counted.
    trained = json.loads((runs / "fsr" / "manifest.json").read_text())["metrics"]
    assert rows["fsr"]["rois_through_sr"] == trained["eval_small_proposals"] > 0
    assert rows["fsr"]["sr_of"] == trained["eval_proposals"]
    table = (ev / "table.md").read_text()
    assert table.startswith("# Detector comparison on minival")
    assert "| Feature SR (Noh et al.), avg pooling in the extractor [fsr] |" in table
    assert " proposals |" in table and "D score" not in table
    manifest = json.loads((ev / "manifest.json").read_text())
    assert {"compare_same", "compare_fsr"} <= set(manifest["inputs"]) and "mtgan" not in manifest["inputs"]
    # Beside an MTGAN's rows, last.
    mtgan = save_mtgan(tmp_path / "mtgan.pt", PLAIN_CATS, hr_size=32)
    res = cli("eval", "--split", "minival", "--data", ds, "--detector", base, "--mtgan", mtgan,
              "--compare", f"fsr={model_pt}", "--out", tmp_path / "ev2", "--device", "cpu", "--no-figures")
    assert res.exit_code == 0, res.stderr
    names = [r["name"] for r in json.loads((tmp_path / "ev2" / "metrics.json").read_text())["rows"]]
    assert names[:2] == ["baseline", "mtgan"] and names[-1] == "fsr"


@pytest.mark.parametrize("extra, message", [
    ([], "give --out: without --mtgan"),
    (["--out", "OUT", "--compare", "fsr=MODEL"], "name(s) given twice: fsr"),
    (["--out", "OUT", "--compare", "baseline=MODEL"], "--compare name 'baseline' is reserved"),
    (["--out", "OUT", "--compare", "x=nowhere.pt"], "--compare x: detector file not found: nowhere.pt"),
    (["--out", "OUT", "--pretrained-g", "MODEL"], "--pretrained-g adds rows of the MTGAN's rescoring: give --mtgan"),
])
def test_eval_compare_refuses_bad_input(cli, runs, ds, tmp_path, extra, message):
    model_pt = str(runs / "fsr" / "model.pt")
    extra = [x.replace("MODEL", model_pt).replace("OUT", str(tmp_path / "ev")) for x in extra]
    res = cli("eval", "--split", "minival", "--data", ds, "--detector", runs / "detector" / "model.pt",
              "--compare", f"fsr={model_pt}", *extra, "--device", "cpu")
    assert res.exit_code == 2 and message in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "ev").exists()


def test_predict_runs_the_fsr_model(cli, runs, ds, tmp_path):
    res = cli("predict", ds / "images" / "minival", "--detector", runs / "fsr" / "model.pt", "--score-thresh", 0.0,
              "--max-per-image", 5, "--out", tmp_path / "pred", "--device", "cpu")
    assert res.exit_code == 0, res.stderr
    pred = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert len(pred["images"]) == 3 and pred["annotations"]
    assert {a["category_id"] for a in pred["annotations"]} <= {1, 2, 5}
    assert all(sum(1 for a in pred["annotations"] if a["image_id"] == im["id"]) <= 5 for im in pred["images"])


def test_controls_train_and_save_their_kind(runs, ds, tmp_path):
    from sodtool.stages.train_fsr import TrainFSRConfig, train_fsr

    for control in ("small-head", "unmatched-target"):
        out = tmp_path / control
        train_fsr(TrainFSRConfig(detector=runs / "detector" / "model.pt", data=ds, out=out, control=control,
                                 iterations=3, finetune_iterations=1, batch_size=2, small_size=16, device="cpu",
                                 eval=False))
        saved = torch.load(out / "model.pt", weights_only=True)
        assert saved["build"]["fsr"]["control"] == control
        has_g = any(k.startswith("roi_heads.generator.") for k in saved["model"])
        assert has_g == (control != "small-head")
        terms = set().union(*(json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()))
        assert ("loss_content" in terms) == (control != "small-head")


# ------------------------------------------------------------------------------------------------
# Resumption, errors
# ------------------------------------------------------------------------------------------------

def test_killed_run_resumes_bit_identical(cli, runs, ds, tmp_path):
    out = tmp_path / "killed"
    total = 10
    args = ["train", "fsr", "--detector", str(runs / "detector" / "model.pt"), "--data", str(ds), "--out", str(out),
            "--iterations", str(total), "--finetune-iterations", "4", "--checkpoint-every", "2", "--seed", "2",
            "--no-eval", *FSR_TINY]
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
    assert 2 <= saved < total and saved % 2 == 0

    res = cli(*args)
    assert res.exit_code == 0, res.stderr
    assert json.loads((out / "manifest.json").read_text())["metrics"]["resumed_from_step"] == saved
    straight = tmp_path / "straight"
    res = cli(*[str(straight) if a == str(out) else a for a in args])
    assert res.exit_code == 0, res.stderr

    def weights(run):
        return torch.load(run / "model.pt", weights_only=True)["model"]

    a, b = weights(out), weights(straight)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ca, cb = (torch.load(r / "checkpoint.pt", weights_only=True) for r in (out, straight))
    assert all(torch.equal(ca["disc"][k], cb["disc"][k]) for k in ca["disc"])

    def rows(run):
        return [{k: v for k, v in json.loads(x).items() if k != "train_time_s"}
                for x in (run / "metrics.jsonl").read_text().splitlines()]

    assert rows(out) == rows(straight) and [r["step"] for r in rows(out)] == list(range(1, total + 1))


def test_resume_refuses_other_settings_and_no_resume_starts_over(cli, runs, ds, tmp_path):
    import shutil

    out = tmp_path / "fsr"
    shutil.copytree(runs / "fsr", out)
    base = ["train", "fsr", "--detector", runs / "detector" / "model.pt", "--data", ds, "--out", out,
            "--iterations", "6", "--finetune-iterations", "2", "--seed", "1", "--no-eval", *FSR_TINY]
    res = cli(*base, "--adv-weight", "0.5")
    assert res.exit_code == 2, res.stderr
    assert "was made with another configuration (adv_weight 0.01 -> 0.5)" in res.stderr and "--no-resume" in res.stderr
    assert (out / "model.pt").is_file() and (out / "manifest.json").is_file()  # a refusal loses nothing
    res = cli(*base, "--adv-weight", "0.5", "--no-resume")
    assert res.exit_code == 0, res.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["adv_weight"] == 0.5 and manifest["metrics"]["resumed_from_step"] == 0


def test_non_finite_loss_stops_with_the_checkpoint_kept(cli, runs, ds, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = fsr.content_loss

    def failing(sr, target):
        calls["n"] += 1
        loss = real(sr, target)
        return loss * float("nan") if calls["n"] >= 3 else loss

    monkeypatch.setattr(fsr, "content_loss", failing)
    out = tmp_path / "nan"
    res = cli("train", "fsr", "--detector", runs / "detector" / "model.pt", "--data", ds, "--out", out,
              "--iterations", "5", "--finetune-iterations", "1", "--checkpoint-every", "1", "--no-eval", *FSR_TINY)
    assert res.exit_code == 3, res.stderr
    assert "loss is not finite at step 3" in res.stderr and "loss_content=nan" in res.stderr
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2
    assert not (out / "model.pt").exists() and not (out / "manifest.json").exists()


@pytest.mark.parametrize("extra,message", [
    (["--control", "bicubic"], "--control must be one of none, small-head, unmatched-target"),
    (["--pool", "median"], "--pool must be one of max, avg"),
    (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["--g-lr", "inf"], "--g-lr must be a finite number > 0, got inf"),
    (["--adv-weight", "-1"], "--adv-weight must be a finite number >= 0"),
    (["--content-weight", "nan"], "--content-weight must be a finite number >= 0"),
    (["--momentum", "1.5"], "--momentum must be in [0, 1)"),
    (["--eval-score-thresh", "2"], "--eval-score-thresh must be a score in [0, 1]"),
    (["--small-size", "0"], "--small-size must be at least 1 px"),
    (["--iterations", "3", "--finetune-iterations", "4"], "--finetune-iterations (4) must be at most --iterations (3)"),
    (["--small-size", "8", "--pair-min-size", "16"], "--pair-min-size must be below 2 x --small-size (16 px)"),
    (["--preset", "huge"], "unknown preset 'huge' for train fsr"),
])
def test_bad_options_are_one_line_errors(cli, runs, ds, tmp_path, extra, message):
    res = cli("train", "fsr", "--detector", runs / "detector" / "model.pt", "--data", ds, "--out", tmp_path / "x",
              "--device", "cpu", *extra)
    assert res.exit_code == 2, res.stderr
    assert message in res.stderr and res.stderr.count("\n") == 1
    assert not (tmp_path / "x").exists()


def test_bad_detectors_are_one_line_errors(cli, runs, ds, tmp_path):
    for detector, message in ((tmp_path / "none.pt", "detector weights file not found"),
                              (runs / "fsr" / "checkpoint.pt", "is a training checkpoint"),
                              (runs / "fsr" / "model.pt", "holds a fsr detector; train fsr starts from a Faster R-CNN")):
        res = cli("train", "fsr", "--detector", detector, "--data", ds, "--out", tmp_path / "x", "--device", "cpu")
        assert res.exit_code == 2, res.stderr
        assert message in res.stderr and res.stderr.count("\n") == 1
