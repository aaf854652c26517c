"""`sodtool eval --mtgan`: test-time ROI rescoring, the comparison table and the figures.

A tiny synthetic split (3 images of 192 px, 3 classes), test-mode ROI stores made by the real
`crop-rois` (from a detections JSON, and from a tiny random detector for the direct-path
check), and a tiny MTGAN model.pt in the layout `train mtgan` writes (light generator,
ResNet-18 discriminator, HR 32 / LR 8).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sodtool.errors import InputError

HR, K = 32, 3


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


def save_mtgan(path: Path, categories: list[dict], *, seed: int = 0, zero_reg: bool = False,
               reg_branch: bool = True, hr_size: int = HR) -> Path:
    """A randomly initialised MTGAN model.pt with the keys `train mtgan` writes."""
    from sodtool.checkpoint import save as save_checkpoint
    from sodtool.models.networks import Discriminator, Generator, discriminator_checkpoint, generator_checkpoint

    torch.manual_seed(seed)
    g = Generator(channels=8, up_channels=8, num_blocks=1)
    d = Discriminator(len(categories), arch="resnet18", reg_branch=reg_branch)
    if zero_reg:
        with torch.no_grad():
            d.reg_head.weight.zero_()
            d.reg_head.bias.zero_()
    save_checkpoint({**generator_checkpoint(g), **discriminator_checkpoint(d), "categories": categories,
                     "hr_size": hr_size, "lr_size": hr_size // 4, "stage": "train-mtgan", "step": 0}, path)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Dataset, a detections JSON, test/train ROI stores (+ LR twin), MTGAN runs with loss logs."""
    from sodtool.stages.downsample import DownsampleConfig, downsample
    from sodtool.stages.crop_rois import CropRoisConfig, crop_rois
    from sodtool.stages.synth import SynthConfig, synthesize

    root = tmp_path_factory.mktemp("rescore")
    data = root / "data"
    synthesize(SynthConfig(out=data, train_images=1, val_images=1, minival_images=3, image_size=192, classes=K,
                           objects_per_image=(4, 6), distractors_per_image=(0, 1), seed=3))
    ann = json.loads((data / "annotations" / "instances_minival.json").read_text())
    cats = [{"id": c["id"], "name": c["name"]} for c in ann["categories"]]
    # Detections: every ground truth box, shifted, with its class and a descending score, plus
    # a wrong-class copy; enough ROIs per image to exercise NMS and the top-k.
    rng = np.random.default_rng(0)
    dets = []
    for a in ann["annotations"]:
        x, y, w, h = a["bbox"]
        for j, cid in enumerate((a["category_id"], cats[(a["category_id"]) % K]["id"])):
            dx, dy = rng.normal(0, 0.1 * w), rng.normal(0, 0.1 * h)
            dets.append({"image_id": a["image_id"], "category_id": cid,
                         "bbox": [max(0.0, x + dx), max(0.0, y + dy), w, h],
                         "score": float(np.clip(0.9 - 0.5 * j - rng.uniform(0, 0.3), 0.06, 1.0))})
    # Two tiny ROIs per image: crop windows (6 px) no wider than the 8 px LR crop, which go
    # through G; every other ROI here is read from its HR crop (rescoring.reads_hr).
    for im in ann["images"]:
        for j in range(2):
            dets.append({"image_id": im["id"], "category_id": cats[j]["id"], "bbox": [20.0 + 40 * j, 150.0, 4.0, 3.0],
                         "score": 0.3 + 0.1 * j})
    det_path = root / "dets.json"
    det_path.write_text(json.dumps(dets))
    run = root / "run"
    common = dict(data=data, split="minival", detections=det_path, hr_size=HR, context=1.5)
    crop_rois(CropRoisConfig(out=run / "rois_minival.h5", mode="test", **common))
    crop_rois(CropRoisConfig(out=run / "rois_train.h5", mode="train", **common))
    downsample(DownsampleConfig(src=run / "rois_minival.h5"))
    mtgan = run / "mtgan"
    mtgan.mkdir()
    save_mtgan(mtgan / "model.pt", cats)
    (mtgan / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "g_mse": 0.05 / s, "g_adv": 0.69, "g_total": 0.05 / s + 0.0007,
                    "d_adv_real": 0.0007, "d_cls_hr": 0.011 - 0.0001 * s, "lr_g": 1e-4, "crops_per_s": 10.0}) + "\n"
        for s in range(1, 21)) + json.dumps({"step": 20, "split": "val", "val_sr_psnr_rgb": 25.0}) + "\n")
    (run / "sr").mkdir()
    (run / "sr" / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "g_mse": 0.02 + 0.01 / s, "lr": 1e-4}) + "\n" for s in range(5, 50, 5)))
    abl = run / "mtgan_noreg"
    abl.mkdir()
    save_mtgan(abl / "model.pt", cats, seed=1, reg_branch=False)
    return {"root": root, "data": data, "ann": ann, "cats": cats, "dets": dets, "run": run,
            "rois": run / "rois_minival.h5", "rois_train": run / "rois_train.h5", "mtgan": mtgan, "abl": abl}


def _cfg(world, out: Path, **kw):
    from sodtool.stages.eval_mtgan import RescoreConfig

    base = dict(mtgan=world["mtgan"], data=world["data"], split="minival", rois=world["rois"], out=out,
                device="cpu", batch_size=16)
    base.update(kw)
    return RescoreConfig(**base)


def _valid_png(path: Path) -> tuple[int, int]:
    assert path.is_file(), path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


@pytest.fixture(scope="module")
def evaluated(world):
    """One full rescoring run through the CLI, with an ablation and figures."""
    from typer.testing import CliRunner

    from sodtool.cli import app

    out = world["root"] / "eval"
    res = CliRunner().invoke(app, ["eval", "--split", "minival", "--data", str(world["data"]), "--rois",
                                   str(world["rois"]), "--mtgan", str(world["mtgan"]), "--out", str(out),
                                   "--ablation", f"noreg={world['abl']}", "--batch-size", "16", "--device", "cpu"])
    assert res.exit_code == 0, (res.stderr, res.exception)
    assert res.stdout == ""  # stdout is for machine-readable output; tables and logs go to stderr
    assert "SOD-MTGAN" in res.stderr and "AP_S" in res.stderr  # the comparison table
    return out


# --------------------------------------------------------------------------------------------
# Results files, metrics, table, figures
# --------------------------------------------------------------------------------------------


def test_results_are_well_formed(world, evaluated):
    gt_images = {im["id"] for im in world["ann"]["images"]}
    cat_ids = {c["id"] for c in world["cats"]}
    rois_per_image = {i: sum(d["image_id"] == i for d in world["dets"]) for i in gt_images}
    for name in ("baseline", "mtgan", "mtgan_fused", "bicubic", "bicubic_fused", "noreg", "noreg_fused"):
        results = json.loads((evaluated / f"{name}.json").read_text())
        assert results, name
        per_image: dict[int, int] = {}
        for r in results:
            assert set(r) == {"image_id", "category_id", "bbox", "score"}
            assert r["image_id"] in gt_images and r["category_id"] in cat_ids
            x, y, w, h = r["bbox"]
            assert w >= 0 and h >= 0 and x >= 0 and y >= 0 and x + w <= 192 + 1e-3 and y + h <= 192 + 1e-3
            assert 0.0 <= r["score"] <= 1.0
            per_image[r["image_id"]] = per_image.get(r["image_id"], 0) + 1
        by_img: dict[int, list[float]] = {}
        for r in results:
            by_img.setdefault(r["image_id"], []).append(r["score"])
        assert all(s == sorted(s, reverse=True) for s in by_img.values()), name
        if name != "baseline":
            # D scores every ROI for every class: more candidates than ROIs survive the per-class NMS.
            assert all(per_image[i] > rois_per_image[i] for i in gt_images), (name, per_image, rois_per_image)


def test_baseline_results_are_the_rois(world, evaluated):
    """baseline.json holds the input detections (clipped, float32, top 100), with their scores and classes."""
    base = json.loads((evaluated / "baseline.json").read_text())
    want = sorted((d["image_id"], d["category_id"], round(d["score"], 5)) for d in world["dets"])
    got = sorted((r["image_id"], r["category_id"], round(r["score"], 5)) for r in base)
    assert got == want


def test_metrics_table_and_manifest(world, evaluated):
    from sodtool.evaluate import STAT_NAMES

    m = json.loads((evaluated / "metrics.json").read_text())
    assert [r["name"] for r in m["rows"]] == list(("baseline", "mtgan", "mtgan_fused", "bicubic", "bicubic_fused", "noreg", "noreg_fused"))
    assert m["score_modes"] == ["disc", "fused"] and m["figure_score"] == "fused"
    from sodtool.coco import SplitPaths, load_split
    from sodtool.evaluate import coco_evaluate

    # Every row is COCOeval of its own results file, exactly as `eval --results` computes it
    # (a row given another row's numbers, or a stat under the wrong name, fails here), and its
    # delta is its value minus the baseline's.
    split = load_split(SplitPaths(world["data"] / "annotations" / "instances_minival.json",
                                  world["data"] / "images" / "minival"))
    base = m["rows"][0]
    assert all(v in (0.0, None) for v in base["delta"].values())
    for r in m["rows"]:
        ref = coco_evaluate(split.coco, json.loads((evaluated / f"{r['name']}.json").read_text()))
        assert {k: r[k] for k in STAT_NAMES} == {k: ref[k] for k in STAT_NAMES}, r["name"]
        assert set(r["delta"]) == set(STAT_NAMES)
        if r is not base:
            for k in STAT_NAMES:
                want = None if -1.0 in (r[k], base[k]) else r[k] - base[k]
                assert r["delta"][k] == want, (r["name"], k)
    # The rows differ: the rescored rows are not the baseline's detections under another name.
    assert len({json.dumps({k: r[k] for k in STAT_NAMES}) for r in m["rows"][:2]}) == 2
    table = (evaluated / "table.md").read_text()
    lines = [ln for ln in table.splitlines() if ln.startswith("| ")]
    assert lines[0] == "| Method | AP | AP50 | AP75 | AP_S | AP_M | AP_L | ROIs via SR |"
    # How many ROIs went through G (or bicubic): none for the baseline, those not read from their
    # HR crop for every ungated rescored row.
    via_lr = m["rois"] - m["crops"]["rois_read_from_hr"]
    assert [r["rois_through_sr"] for r in m["rows"]] == [0] + [via_lr] * (len(m["rows"]) - 1)
    assert [ln.split(" | ")[-1] for ln in lines[2:4]] == [f"0 of {m['rois']:,} |", f"{via_lr:,} of {m['rois']:,} |"]
    titles = [ln.split(" | ")[0][2:] for ln in lines[2:9]]
    assert titles == ["Baseline detector", "SOD-MTGAN, D score", "SOD-MTGAN, fused score",
                      "Bicubic control (D on bicubic), D score", "Bicubic control (D on bicubic), fused score",
                      "noreg, D score", "noreg, fused score"]
    # The verdict line: this MTGAN was saved without its run's manifest, so D's accuracy is unknown.
    assert table.splitlines()[-1].startswith("D's held-out accuracy is unknown")
    ap_cell = lines[2].split(" | ")[1]
    assert ap_cell == f"{100 * m['rows'][0]['AP']:.1f}"
    manifest = json.loads((evaluated / "manifest.json").read_text())
    assert manifest["stage"] == "eval-mtgan"
    assert {"baseline.json", "mtgan.json", "mtgan_fused.json", "bicubic.json", "bicubic_fused.json", "noreg.json",
            "noreg_fused.json", "metrics.json", "table.md", "figures"} <= set(manifest["outputs"])
    assert manifest["inputs"]["rois_lr"] is not None and manifest["inputs"]["ablation_noreg"] is not None


def test_figures_are_pngs(evaluated):
    fig = evaluated / "figures"
    # No ground-truth object here has a ROI narrow enough to go through G (8 px LR crops): the SR
    # figure says so (test_sr_figure_shows_ground_truth_small_objects has some).
    w, h = _valid_png(fig / "sr_triplets.png")
    assert h < 100
    w, h = _valid_png(fig / "detections.png")
    assert w >= 2 * 2 * 192  # baseline beside MTGAN, 192 px images enlarged 2x
    _valid_png(fig / "loss_mtgan.png")
    _valid_png(fig / "loss_sr.png")


def test_figures_draw_the_fused_row_and_ground_truth_small_objects(world, tmp_path, monkeypatch):
    """detections.png: the baseline beside mtgan_fused, each image's top k, k = its ground-truth
    count. sr_triplets.png: ground-truth small objects whose ROI (IoU >= 0.5) went through G (all
    ROIs do with --sr-only), each with D's verdict on its four views. The results are those of a
    run without figures."""
    from sodtool import figures, reports
    from sodtool.coco import SplitPaths, load_split
    from sodtool.stages.eval_mtgan import rescore_eval

    seen: dict = {}
    draw_dets, draw_sr = figures.detections_figure, reports.sr_figure

    def spy_dets(images, gts, dets, path, **kw):
        seen["dets"], seen["gts"] = dets, gts
        return draw_dets(images, gts, dets, path, **kw)

    def spy_sr(examples, path, names):
        seen["sr"] = examples
        return draw_sr(examples, path, names)

    monkeypatch.setattr(figures, "detections_figure", spy_dets)
    monkeypatch.setattr(reports, "sr_figure", spy_sr)
    rescore_eval(_cfg(world, tmp_path / "f", sr_only=True, fig_images=2, fig_triplets=3))
    rescore_eval(_cfg(world, tmp_path / "n", sr_only=True, figures=False))
    for name in ("baseline", "mtgan", "mtgan_fused", "bicubic"):
        assert (tmp_path / "f" / f"{name}.json").read_text() == (tmp_path / "n" / f"{name}.json").read_text()
    assert list(seen["dets"]) == ["Baseline detector [baseline]", "SOD-MTGAN, fused score [mtgan_fused]"]
    assert len(seen["dets"]["SOD-MTGAN, fused score [mtgan_fused]"][0]["scores"]) > len(seen["gts"][0]["boxes"])

    split = load_split(SplitPaths(world["data"] / "annotations" / "instances_minival.json",
                                  world["data"] / "images" / "minival"))
    examples = seen["sr"]
    assert 1 <= len(examples) <= 3
    from torchvision.ops import box_iou

    for e in examples:
        t = split.targets(e.image_id)
        g = [i for i, b in enumerate(t["boxes"]) if np.array_equal(b, e.gt_box)]
        assert len(g) == 1 and t["areas"][g[0]] < 32 ** 2 and t["labels"][g[0]] == e.gt_label
        assert float(box_iou(torch.from_numpy(e.roi[None]), torch.from_numpy(e.gt_box[None]))) >= 0.5
        for p in (e.d_nearest, e.d_bicubic, e.d_sr, e.d_hr):
            assert p.shape == (K + 1,) and abs(float(p.sum()) - 1) < 1e-4
        assert e.lr.shape == (3, HR // 4, HR // 4) and e.sr.shape == e.hr.shape == e.bicubic.shape == (3, HR, HR)
    # D's verdict on G's output is what eval scored the ROI with: D(G(lr)) of its LR crop.
    from sodtool.models.mtgan import load_mtgan

    m = load_mtgan(world["mtgan"], torch.device("cpu"))
    with torch.no_grad():
        lr = torch.from_numpy(np.stack([e.lr for e in examples])).float() / 255
        want = torch.softmax(m.discriminator(m.generator(lr)).cls, dim=1).numpy()
    assert np.allclose(np.stack([e.d_sr for e in examples]), want, atol=1e-5)
    w, h = _valid_png(tmp_path / "f" / "figures" / "sr_triplets.png")
    assert w >= 4 * 160 and h >= len(examples) * 160


# --------------------------------------------------------------------------------------------
# Scoring pieces
# --------------------------------------------------------------------------------------------


def test_zero_deltas_give_the_rois_squares(world, tmp_path):
    """D's deltas are relative to each ROI's square (what the crop shows): zero deltas give the
    square, clipped; a square ROI stays where it was."""
    from sodtool import boxes as B
    from sodtool.rescoring import refine_boxes
    from sodtool.stages.eval_mtgan import rescore_eval

    rois = torch.tensor([[10.0, 20.0, 30.0, 50.0], [300.5, 1.5, 400.0, 80.0]])
    squares = torch.tensor([[5.0, 20.0, 35.0, 50.0], [300.5, -9.0, 400.0, 90.5]])
    assert torch.equal(refine_boxes(rois, torch.zeros(2, 4), 1000, 1000), B.clip(squares, 1000, 1000))
    assert torch.equal(refine_boxes(rois, None, 1000, 1000), rois)  # no regression branch: the ROIs
    sq = torch.tensor([[10.0, 20.0, 40.0, 50.0]])
    assert torch.equal(refine_boxes(sq, torch.zeros(1, 4), 1000, 1000), sq)
    # D's deltas are in BOX_WEIGHTS scale (10, 10, 5, 5): reg dx = 10 is a shift of one square side.
    moved = refine_boxes(sq, torch.tensor([[10.0, 0, 0, 0]]), 1000, 1000)
    assert moved[0].tolist() == pytest.approx([40.0, 20.0, 70.0, 50.0])
    wider = refine_boxes(sq + 100, torch.tensor([[0, 0, 5.0, 0]]), 1000, 1000)
    assert (wider[0, 2] - wider[0, 0]).item() == pytest.approx(30 * np.e, rel=1e-5)  # dw = log(e)
    assert refine_boxes(sq, torch.tensor([[0, 0, 5.0, 0]]), 50, 50)[0].tolist() == [0.0, 20.0, 50.0, 50.0]  # clipped

    zero = tmp_path / "mtgan_zero"
    zero.mkdir()
    save_mtgan(zero / "model.pt", world["cats"], zero_reg=True)
    out = tmp_path / "eval"
    rescore_eval(_cfg(world, out, mtgan=zero, figures=False))
    base = json.loads((out / "baseline.json").read_text())
    size = {im["id"]: (im["width"], im["height"]) for im in world["ann"]["images"]}
    want = set()
    for r in base:
        x, y, w, h = r["bbox"]
        sq_box = B.clip(B.reference_squares(torch.tensor([[x, y, x + w, y + h]], dtype=torch.float32)),
                        *size[r["image_id"]])[0].tolist()
        want.add((r["image_id"], tuple(round(v) for v in sq_box)))
    for name in ("mtgan", "bicubic", "mtgan_fused"):
        res = json.loads((out / f"{name}.json").read_text())
        got = {(r["image_id"], tuple(round(v) for v in (r["bbox"][0], r["bbox"][1], r["bbox"][0] + r["bbox"][2],
                                                       r["bbox"][1] + r["bbox"][3]))) for r in res}
        assert res and got <= want, name


def test_class_scores_fused_and_disc():
    from sodtool.rescoring import class_scores

    probs = torch.tensor([[0.1, 0.6, 0.2, 0.1], [0.7, 0.1, 0.1, 0.1]])
    s = torch.tensor([0.8, 0.4])
    lab = torch.tensor([2, 1])
    assert torch.equal(class_scores(probs, s, lab, "disc"), probs[:, 1:])
    f = class_scores(probs, s, lab, "fused")
    # q = s for the baseline class, (1 - s) / K for the others.
    assert f[0, 1] == pytest.approx(np.sqrt(0.2 * 0.8))
    assert f[0, 0] == pytest.approx(np.sqrt(0.6 * 0.2 / 3))
    assert f[1, 0] == pytest.approx(np.sqrt(0.1 * 0.4))
    assert f[1, 2] == pytest.approx(np.sqrt(0.1 * 0.6 / 3))


def test_size_gate_keeps_the_baselines_detection_for_large_rois():
    from sodtool.rescoring import keep_baseline_above

    rois = torch.tensor([[0.0, 0, 10, 10], [0.0, 0, 40, 40], [5.0, 5, 37, 37]])  # areas 100, 1600, 1024
    boxes = rois + 1.0
    scores = torch.tensor([[0.1, 0.6, 0.2], [0.5, 0.3, 0.1], [0.2, 0.2, 0.2]])
    base_s, base_l = torch.tensor([0.9, 0.7, 0.4]), torch.tensor([1, 3, 2])
    b, c = keep_baseline_above(rois, boxes, scores, base_s, base_l, 1024.0)
    # ROI 0 (below the gate) unchanged; ROIs 1 and 2 (area >= 1024): their own box, their
    # baseline class with the baseline's score, no other class.
    assert torch.equal(b[0], boxes[0]) and torch.equal(c[0], scores[0])
    assert torch.equal(b[1:], rois[1:])
    assert c[1].tolist() == pytest.approx([0.0, 0.0, 0.7]) and c[2].tolist() == pytest.approx([0.0, 0.4, 0.0])
    assert torch.equal(scores[1], torch.tensor([0.5, 0.3, 0.1]))  # the inputs are not modified
    b, c = keep_baseline_above(rois, boxes, scores, base_s, base_l, 1e9)
    assert b is boxes and c is scores


def test_size_gated_rows_are_the_baseline_above_the_gate_and_rescored_below(world, tmp_path):
    """eval --small-area writes NAME_small rows from the same pass: a gate above every ROI gives
    the ungated rows, a gate below every ROI gives back the baseline row exactly (every row goes
    through the same `select_detections`; the property itself: the test after this one)."""
    from sodtool.stages.eval_mtgan import rescore_eval

    big = rescore_eval(_cfg(world, tmp_path / "big", figures=False, small_area=1e9))
    names = [r["name"] for r in big["rows"]]
    assert names == ["baseline", "mtgan", "mtgan_fused", "bicubic", "bicubic_fused",
                     "mtgan_small", "mtgan_fused_small", "bicubic_small", "bicubic_fused_small"]
    assert big["rows"][5]["title"] == "SOD-MTGAN, D score, ROIs < 1e+09 px² only"
    for name in ("mtgan", "mtgan_fused", "bicubic_fused"):
        assert (tmp_path / "big" / f"{name}_small.json").read_text() == (tmp_path / "big" / f"{name}.json").read_text()
    via = {r["name"]: r["rois_through_sr"] for r in big["rows"]}
    assert via["mtgan_small"] == via["mtgan"] == big["rois"] - big["crops"]["rois_read_from_hr"] > 0
    tiny = rescore_eval(_cfg(world, tmp_path / "tiny", figures=False, small_area=1.0))
    # A gate below every ROI rescores none: no ROI of those rows went through G.
    assert {r["name"]: r["rois_through_sr"] for r in tiny["rows"]}["mtgan_fused_small"] == 0
    assert tiny["rows"][6]["title"] == "SOD-MTGAN, fused score, ROIs < 1 px² (1²) only" and tiny["small_area"] == 1.0
    base = (tmp_path / "tiny" / "baseline.json").read_text()
    assert json.loads(base)
    for name in ("mtgan_small", "mtgan_fused_small", "bicubic_small", "bicubic_fused_small"):
        assert (tmp_path / "tiny" / f"{name}.json").read_text() == base, name
    assert "| Bicubic control (D on bicubic), fused score, ROIs < 1 px² (1²) only |" in (
        tmp_path / "tiny" / "table.md").read_text()


def _clustered_rois(gen: torch.Generator, r: int) -> torch.Tensor:
    """[r, 4] xyxy boxes on integer pixels around 4 centres, so that many same-class pairs overlap
    (integer coordinates keep every IoU exact in float32, away from the NMS threshold's rounding)."""
    centres = torch.randint(20, 80, (4, 2), generator=gen)[torch.randint(0, 4, (r,), generator=gen)]
    half = torch.randint(4, 12, (r, 2), generator=gen)
    jitter = torch.randint(-3, 4, (r, 2), generator=gen)
    return torch.cat([centres + jitter - half, centres + jitter + half], dim=1).float()


def _np_nms_per_class(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, iou: float) -> np.ndarray:
    """Greedy per-class NMS in float64, written here (not torchvision): indices kept, by score descending."""
    kept: list[int] = []
    for i in np.argsort(-scores, kind="stable"):
        for j in kept:
            if labels[j] != labels[i]:
                continue
            x1, y1 = np.maximum(boxes[i, :2], boxes[j, :2])
            x2, y2 = np.minimum(boxes[i, 2:], boxes[j, 2:])
            inter = max(x2 - x1, 0.0) * max(y2 - y1, 0.0)
            area = lambda b: (b[2] - b[0]) * (b[3] - b[1])  # noqa: E731
            if inter / (area(boxes[i]) + area(boxes[j]) - inter) > iou:
                break
        else:
            kept.append(int(i))
    return np.array(kept, dtype=np.int64)


@pytest.mark.parametrize("seed, min_score, max_per_image", [(0, 0.05, 100), (1, 0.05, 7), (2, 0.0, 100), (3, 0.3, 5)])
def test_a_gate_that_keeps_every_roi_is_the_baseline_exactly(seed, min_score, max_per_image):
    """keep_baseline with every ROI kept, through select_detections, is exactly the baseline's own
    detections (one-hot [R, K] scores, built here) through the same select_detections; and for
    ROIs that already came out of per-class NMS at that IoU, sorted, it is the ROIs themselves."""
    from sodtool.rescoring import keep_baseline, select_detections

    gen = torch.Generator().manual_seed(seed)
    r, k = 60, 3
    rois = _clustered_rois(gen, r)
    base_s = torch.rand(r, generator=gen)
    base_s[:6] = torch.tensor([0.5, 0.5, 0.5, 0.02, 0.04, 0.9])  # ties, and scores below min_score 0.05
    base_l = torch.randint(1, k + 1, (r,), generator=gen)
    boxes = rois + torch.randn(r, 4, generator=gen) * 3  # the second stage's refined boxes
    cs = torch.rand(r, k, generator=gen)  # and its class scores
    sel = dict(nms_iou=0.5, max_per_image=max_per_image, min_score=min_score)

    b, c = keep_baseline(rois, boxes, cs, base_s, base_l, torch.ones(r, dtype=torch.bool))
    got = select_detections(b, c, **sel)
    one_hot = torch.zeros(r, k)
    one_hot[torch.arange(r), base_l - 1] = base_s
    want = select_detections(rois, one_hot, **sel)
    for key in ("boxes", "scores", "labels"):
        assert np.array_equal(got[key], want[key]), key
    # The data exercise what the property is about: same-class overlaps that NMS removes, and
    # (small max_per_image) the top-k cut.
    above = int((base_s >= min_score).sum()) + (0 if min_score > 0 else r * (k - 1))
    assert len(want["scores"]) < min(above, 100)

    # ROIs that are a detector's output already (per-class NMS at 0.5, sorted): they come back as they are.
    np_rois, np_s, np_l = rois.double().numpy(), base_s.double().numpy(), base_l.numpy()
    idx = _np_nms_per_class(np_rois, np_s, np_l, 0.5)
    idx = idx[np_s[idx] >= max(min_score, 1e-6)]
    assert 5 < len(idx) < r
    det_rois, det_s, det_l = rois[idx], base_s[idx], base_l[idx]
    b, c = keep_baseline(det_rois, det_rois + 2.0, torch.rand(len(idx), k, generator=gen), det_s, det_l,
                         torch.ones(len(idx), dtype=torch.bool))
    got = select_detections(b, c, **{**sel, "min_score": max(min_score, 1e-6)})
    top = slice(0, max_per_image)
    assert np.array_equal(got["boxes"], det_rois[top].numpy())
    assert np.array_equal(got["scores"], det_s[top].numpy())
    assert np.array_equal(got["labels"], det_l[top].numpy())


def test_keep_baseline_gives_the_marked_rois_their_baseline_detection():
    from sodtool.rescoring import keep_baseline

    rois = torch.tensor([[0.0, 0, 10, 10], [0.0, 0, 40, 40], [5.0, 5, 9, 9]])
    boxes = rois + 1.0
    scores = torch.tensor([[0.1, 0.6, 0.2], [0.5, 0.3, 0.1], [0.2, 0.2, 0.2]])
    base_s, base_l = torch.tensor([0.9, 0.7, 0.4]), torch.tensor([1, 3, 2])
    b, c = keep_baseline(rois, boxes, scores, base_s, base_l, torch.tensor([False, True, True]))
    # Marked by the mask, not by size: ROI 2 is the smallest.
    assert torch.equal(b[0], boxes[0]) and torch.equal(c[0], scores[0])
    assert torch.equal(b[1:], rois[1:])
    assert c[1].tolist() == pytest.approx([0.0, 0.0, 0.7]) and c[2].tolist() == pytest.approx([0.0, 0.4, 0.0])
    b, c = keep_baseline(rois, boxes, scores, base_s, base_l, torch.zeros(3, dtype=torch.bool))
    assert b is boxes and c is scores


def test_row_names_are_the_results_file_stems():
    from sodtool.reports import Row, row_title

    assert Row("baseline").name == "baseline" and Row("det").name == "det"
    assert [Row("mtgan", m, g).name for g in ("", "_small", "_srgate") for m in ("disc", "fused")] == [
        "mtgan", "mtgan_fused", "mtgan_small", "mtgan_fused_small", "mtgan_srgate", "mtgan_fused_srgate"]
    assert Row("mtgan", "disc") != Row("mtgan") and {Row("bicubic", "fused"): 1}[Row("bicubic", "fused")] == 1
    assert row_title(Row("bicubic", "fused", "_small"), small_area=1024.0) == (
        "Bicubic control (D on bicubic), fused score, ROIs < 1024 px² (32²) only")
    assert row_title(Row("baseline"), "resnet50_fpn") == "Baseline detector (resnet50_fpn)"


def _hand_image():
    """3 ROIs (xyxy px) and 2 classes: ROIs 0 and 1 overlap (IoU 81/119 > 0.5), ROI 2 stands
    alone and is the only one of area >= 500; baseline: class 1 at 0.9, class 2 at 0.6, class 1 at 0.3."""
    from sodtool.testrois import ImageRois

    return ImageRois(image_id=7, width=100, height=100,
                     rois=np.array([[10, 10, 20, 20], [11, 11, 21, 21], [50, 50, 90, 90]], np.float32),
                     scores=np.array([0.9, 0.6, 0.3], np.float32), labels=np.array([1, 2, 1], np.int64),
                     hr=np.zeros((3, 3, 4, 4), np.uint8))


def test_image_detections_gives_every_rows_detections_of_one_image():
    """The pure step from one image's scores to its rows, on numbers worked out by hand: D's
    probabilities [R, K+1], per-class NMS at 0.5, the size gate and the SR gate."""
    from sodtool.reports import Row
    from sodtool.stages.eval_mtgan import image_detections

    image = _hand_image()
    probs = torch.tensor([[0.1, 0.2, 0.7], [0.5, 0.4, 0.1], [0.2, 0.7, 0.1]])  # class scores: p[:, 1:]
    outs = {"mtgan": {"probs": probs, "reg": None}, "bicubic": {"probs": probs.flip(1), "reg": torch.zeros(3, 4)}}
    hr_rows = torch.tensor([False, True, False])  # ROI 1 read from its HR crop
    sel = dict(num_classes=2, nms_iou=0.5, max_per_image=100, min_score=0.05)
    found, via = image_detections(image, outs, hr_rows, small_area=500.0, sr_gate=True, **sel)
    assert list(found) == [Row("baseline")] + [Row(m, mode, g) for m in ("mtgan", "bicubic")
                                              for mode in ("disc", "fused") for g in ("", "_small", "_srgate")]
    # Per gate, the ROIs rescored from their LR crop: 0 and 2; the size gate leaves ROI 2 to the baseline.
    assert via == {"": 2, "_small": 1, "_srgate": 2}

    def check(row, boxes, scores, labels):
        d = found[row]
        assert np.array_equal(d["boxes"], np.array([image.rois[i] for i in boxes])), row
        assert d["scores"].tolist() == pytest.approx(scores, abs=1e-6), row
        assert d["labels"].tolist() == labels, row

    # The baseline's own detections (classes differ, so ROIs 0 and 1 both stay).
    check(Row("baseline"), [0, 1, 2], [0.9, 0.6, 0.3], [1, 2, 1])
    # D's scores: ROI 1 loses class 2 to ROI 0 (0.1 < 0.7), ROI 0 loses class 1 to ROI 1 (0.2 < 0.4);
    # equal scores keep ROI order.
    check(Row("mtgan", "disc"), [0, 2, 1, 2], [0.7, 0.7, 0.4, 0.1], [2, 1, 1, 2])
    # Size gate: ROI 2 keeps its baseline detection (class 1 at 0.3, no class 2).
    check(Row("mtgan", "disc", "_small"), [0, 1, 2], [0.7, 0.4, 0.3], [2, 1, 1])
    # SR gate: ROI 1 keeps its baseline class 2 at 0.6, which ROI 0's 0.7 suppresses.
    check(Row("mtgan", "disc", "_srgate"), [0, 2, 0, 2], [0.7, 0.7, 0.2, 0.1], [2, 1, 1, 2])
    # Fused: sqrt(p * q), q = the baseline's score for its class, (1 - s) / K for the other.
    check(Row("mtgan", "fused"), [2, 0, 1, 2],
          [np.sqrt(0.7 * 0.3), np.sqrt(0.2 * 0.9), np.sqrt(0.1 * 0.6), np.sqrt(0.1 * 0.35)], [1, 1, 2, 2])
    # Zero deltas on square ROIs: the ROIs themselves.
    assert np.array_equal(found[Row("bicubic", "disc")]["boxes"][:1], image.rois[[2]])

    # Every ROI through G (--sr-only): every gate but the size gate rescored all three.
    _, via = image_detections(image, outs, None, small_area=500.0, sr_gate=False, **sel)
    assert via == {"": 3, "_small": 2}


def test_image_detections_with_a_gate_that_keeps_every_roi_is_the_baseline_row():
    from sodtool.reports import Row
    from sodtool.stages.eval_mtgan import image_detections

    image = _hand_image()
    gen = torch.Generator().manual_seed(0)
    outs = {m: {"probs": torch.softmax(torch.randn(3, 3, generator=gen), 1), "reg": reg}
            for m, reg in (("mtgan", torch.randn(3, 4, generator=gen)), ("noreg", None))}
    found, via = image_detections(image, outs, torch.ones(3, dtype=torch.bool), num_classes=2, small_area=1.0,
                                  sr_gate=True, nms_iou=0.5, max_per_image=100, min_score=0.05)
    base = found[Row("baseline")]
    gated = [row for row in found if row.gate]
    assert len(gated) == 8 and via == {"": 0, "_small": 0, "_srgate": 0}
    for row in gated:
        for key in ("boxes", "scores", "labels"):
            assert np.array_equal(found[row][key], base[key]), (row, key)
    assert not np.array_equal(found[Row("mtgan", "disc")]["scores"], base["scores"])  # the ungated rows rescored


def test_sr_gated_rows_rescore_only_the_rois_that_go_through_g(world, tmp_path):
    """eval --sr-gate writes NAME_srgate rows from the same pass: the ROIs D reads from their HR
    crop keep the baseline's detection, the ones G super-resolves are rescored (rebuilt here
    image by image from the rescoring functions); --sr-gate with --sr-only is refused."""
    from sodtool.coco import SplitPaths, load_split, to_coco_results
    from sodtool.evaluate import resolve_ground_truth
    from sodtool.models.mtgan import load_mtgan
    from sodtool.rescoring import (MtganScorer, class_scores, keep_baseline, reads_hr, refine_boxes, score_rois,
                                   select_detections)
    from sodtool.stages.eval_mtgan import rescore_eval
    from sodtool.testrois import store_rois

    got = rescore_eval(_cfg(world, tmp_path / "e", figures=False, sr_gate=True))
    assert [r["name"] for r in got["rows"]] == ["baseline", "mtgan", "mtgan_fused", "bicubic", "bicubic_fused",
                                                "mtgan_srgate", "mtgan_fused_srgate", "bicubic_srgate",
                                                "bicubic_fused_srgate"]
    assert got["sr_gate"] is True
    assert got["rows"][6]["title"] == "SOD-MTGAN, fused score, super-resolved ROIs only"
    assert "| SOD-MTGAN, D score, super-resolved ROIs only |" in (tmp_path / "e" / "table.md").read_text()

    cpu = torch.device("cpu")
    m = load_mtgan(world["mtgan"], cpu, "mtgan")
    ann, images = resolve_ground_truth(world["data"], "minival", None, None)
    split = load_split(SplitPaths(ann=ann, images=images))
    results = json.loads((tmp_path / "e" / "mtgan_srgate.json").read_text())
    n_hr = n_lr = 0
    for item in store_rois(world["rois"], "minival", split)[1]:
        r = torch.from_numpy(item.rois).float()
        s, lab = torch.from_numpy(item.scores).float(), torch.from_numpy(item.labels).long()
        on_hr = reads_hr(r, 1.5, HR // 4)
        n_hr, n_lr = n_hr + int(on_hr.sum()), n_lr + int((~on_hr).sum())
        o = score_rois([MtganScorer("mtgan", m.generator, m.discriminator)], torch.from_numpy(item.lr), cpu, 16,
                       np.zeros(0, np.int64), torch.from_numpy(item.hr), on_hr)[0]["mtgan"]
        b, c = keep_baseline(r, refine_boxes(r, o["reg"], item.width, item.height),
                             class_scores(o["probs"], s, lab, "disc"), s, lab, on_hr)
        want = to_coco_results(item.image_id, select_detections(b, c, nms_iou=0.5, max_per_image=100,
                                                                min_score=got["min_score"]), split.categories)
        have = [d for d in results if d["image_id"] == item.image_id]
        assert [d["category_id"] for d in have] == [d["category_id"] for d in want]
        assert np.allclose([d["bbox"] for d in have], [d["bbox"] for d in want], atol=1e-3)
        assert np.allclose([d["score"] for d in have], [d["score"] for d in want], atol=1e-5)
    assert n_hr > 0 and n_lr > 0  # both kinds of ROI, so the gate decides something
    assert {r["name"]: r["rois_through_sr"] for r in got["rows"]}["mtgan_srgate"] == n_lr
    for other in ("mtgan.json", "baseline.json"):
        assert json.loads((tmp_path / "e" / other).read_text()) != results, other

    with pytest.raises(InputError, match="--sr-gate"):
        rescore_eval(_cfg(world, tmp_path / "x", sr_gate=True, sr_only=True))
    assert not (tmp_path / "x").exists()


def test_reads_hr_is_a_crop_window_wider_than_the_lr_crop():
    """The window is context x the ROI's longer side (at least 1 px), as `boxes.square_windows`;
    a window exactly as wide as the LR crop still reads the LR crop (it holds every pixel)."""
    from sodtool.boxes import square_windows
    from sodtool.rescoring import reads_hr

    rois = torch.tensor([[0.0, 0, 20, 10], [0.0, 0, 10, 21.4], [5.0, 5, 5, 5], [0.0, 0, 21.4, 21.3],
                         [100.0, 100, 300, 120]])
    # windows 30, 32.1, 1.5 (a point: 1 px side), 32.1, 300 px against a 32 px LR crop
    assert reads_hr(rois, 1.5, 32).tolist() == [False, True, False, True, True]
    wide = square_windows(rois, 1.5)
    assert reads_hr(rois, 1.5, 32).tolist() == ((wide[:, 2] - wide[:, 0]) > 32).tolist()
    assert reads_hr(torch.tensor([[0.0, 0, 16, 8]]), 2.0, 32).tolist() == [False]  # exactly 32 px
    assert reads_hr(torch.tensor([[0.0, 0, 16, 8]]), 2.0, 31).tolist() == [True]


def test_score_rois_reads_flagged_rows_from_their_hr_crop(world):
    """Flagged rows: D on their HR crop, and G never sees them; the others: D(G(LR)) as without
    flags; the kept SR images are G's output of kept LR rows; a kept row that reads HR is refused."""
    from sodtool.models.mtgan import load_mtgan
    from sodtool.rescoring import BicubicControl, MtganScorer, score_rois

    cpu = torch.device("cpu")
    m = load_mtgan(world["mtgan"], cpu)
    g_rows = []
    m.generator.register_forward_hook(lambda mod, args, out: g_rows.append(args[0].shape[0]))
    gen = torch.Generator().manual_seed(0)
    lr = torch.randint(0, 256, (7, 3, HR // 4, HR // 4), dtype=torch.uint8, generator=gen)
    hr = torch.randint(0, 256, (7, 3, HR, HR), dtype=torch.uint8, generator=gen)
    flags = torch.tensor([False, True, False, True, True, False, True])
    methods = [MtganScorer("mtgan", m.generator, m.discriminator), BicubicControl("bicubic", m.discriminator)]
    keep = np.array([0, 5])
    both, kept = score_rois(methods, lr, cpu, 4, keep, hr, flags)
    assert g_rows == [2, 1]  # batches of 4 rows: rows 0, 2 then row 5
    plain, plain_kept = score_rois(methods, lr, cpu, 4, keep)
    with torch.no_grad():
        direct = m.discriminator((hr[flags].float() / 255).contiguous(memory_format=torch.channels_last))
    for name in ("mtgan", "bicubic"):
        got = both[name]
        assert got["probs"].shape == (7, K + 1) and got["reg"].shape == (7, 4)
        assert torch.allclose(got["probs"][flags], torch.softmax(direct.cls, 1), atol=1e-6)
        assert torch.allclose(got["reg"][flags], direct.reg, atol=1e-5)
        assert torch.allclose(got["probs"][~flags], plain[name]["probs"][~flags], atol=1e-6)
    assert kept.shape == (2, 3, HR, HR) and np.abs(kept.astype(int) - plain_kept.astype(int)).max() <= 1
    with pytest.raises(ValueError, match="LR crop"):
        score_rois(methods, lr, cpu, 4, np.array([1]), hr, flags)


def test_eval_says_which_rois_d_read_from_their_hr_crop(world, tmp_path):
    """metrics.json and table.md count the ROIs read from their HR crop (`reads_hr` over the
    store's ROIs); --sr-only reads none and changes the rescored rows, not the baseline."""
    import h5py

    from sodtool.rescoring import reads_hr
    from sodtool.stages.eval_mtgan import rescore_eval

    with h5py.File(world["rois"], "r") as fh:
        rois = torch.from_numpy(fh["roi"][:]).float()
    want = int(reads_hr(rois, 1.5, HR // 4).sum())
    assert 0 < want < len(rois)  # both kinds of ROI in this split
    hr = rescore_eval(_cfg(world, tmp_path / "hr", figures=False))
    assert hr["crops"] == {"sr_only": False, "lr_size": HR // 4, "context": 1.5, "rois_read_from_hr": want}
    assert (f"D reads the HR crop of the {want} ROIs whose crop window is wider than the {HR // 4} px LR crop"
            in (tmp_path / "hr" / "table.md").read_text())
    sr = rescore_eval(_cfg(world, tmp_path / "sr", figures=False, sr_only=True))
    assert sr["crops"]["sr_only"] and sr["crops"]["rois_read_from_hr"] == 0
    sr_table = (tmp_path / "sr" / "table.md").read_text()
    assert "Every ROI through G (or bicubic) from its LR crop (--sr-only)." in sr_table
    read = {p.name: p.read_text() for p in (tmp_path / "hr").glob("*.json") if p.name != "manifest.json"}
    assert read["baseline.json"] == (tmp_path / "sr" / "baseline.json").read_text()
    assert read["mtgan.json"] != (tmp_path / "sr" / "mtgan.json").read_text()


def test_select_detections_nms_per_class_and_topk():
    from sodtool.rescoring import select_detections

    boxes = torch.tensor([[0.0, 0, 10, 10], [1.0, 0, 11, 10], [50.0, 50, 60, 60]])
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.7], [0.3, 0.0005]])
    d = select_detections(boxes, scores, nms_iou=0.5, max_per_image=100, min_score=1e-3)
    # class 1: ROI 1 suppressed by ROI 0; class 2: ROI 0 suppressed by ROI 1; ROI 2 class 2 below min_score.
    assert d["labels"].tolist() == [1, 2, 1]
    assert d["scores"].tolist() == pytest.approx([0.9, 0.7, 0.3])
    assert d["boxes"][1].tolist() == [1.0, 0, 11, 10]
    d = select_detections(boxes, scores, nms_iou=0.5, max_per_image=2, min_score=0.0)
    assert len(d["scores"]) == 2
    d = select_detections(boxes, scores, nms_iou=1.0, max_per_image=100, min_score=0.0)
    assert len(d["scores"]) == 6


def test_fused_mode_and_missing_lr_twin_match(world, tmp_path):
    """Without its _lr.h5 twin the LR crops are made here: same bytes, same detections. Another
    batch size groups other ROIs into G and D's batches: the same detections up to float32
    rounding (CPU kernels pick their blocking by batch shape, so the last printed digit of a
    score may differ)."""
    import shutil

    from sodtool.stages.eval_mtgan import rescore_eval

    lone = tmp_path / "alone" / "rois_minival.h5"
    lone.parent.mkdir()
    shutil.copy(world["rois"], lone)
    a = rescore_eval(_cfg(world, tmp_path / "a", score="fused", figures=False))
    b = rescore_eval(_cfg(world, tmp_path / "b", rois=lone, score="fused", figures=False))
    c = rescore_eval(_cfg(world, tmp_path / "c", rois=lone, score="fused", figures=False, batch_size=7))
    assert b["source"]["lr"] is None and a["source"]["lr"] is not None
    for name in ("baseline", "mtgan", "mtgan_fused", "bicubic", "bicubic_fused"):
        assert (tmp_path / "a" / f"{name}.json").read_text() == (tmp_path / "b" / f"{name}.json").read_text(), name
        ra = json.loads((tmp_path / "a" / f"{name}.json").read_text())
        rc = json.loads((tmp_path / "c" / f"{name}.json").read_text())
        assert [(r["image_id"], r["category_id"]) for r in ra] == [(r["image_id"], r["category_id"]) for r in rc], name
        assert np.allclose([r["bbox"] for r in ra], [r["bbox"] for r in rc], rtol=0, atol=1e-3), name
        assert np.allclose([r["score"] for r in ra], [r["score"] for r in rc], rtol=0, atol=1e-5), name
    assert a["rows"][1]["AP"] == b["rows"][1]["AP"] == pytest.approx(c["rows"][1]["AP"], abs=1e-6)
    assert a["figure_score"] == "fused"


def test_store_and_direct_detector_give_the_same_results(world, tmp_path):
    """crop-rois --mode test + downsample + eval --rois == eval --detector (same crops, same numbers)."""
    from sodtool.models.frcnn import build_detector
    from sodtool.stages.downsample import DownsampleConfig, downsample
    from sodtool.stages.eval_mtgan import rescore_eval
    from sodtool.stages.crop_rois import CropRoisConfig, crop_rois

    det_path = save_tiny_detector(tmp_path / "detector" / "model.pt", world["cats"], build_detector)
    rois = tmp_path / "rois_minival.h5"
    # 25 ROIs per image instead of the paper's 100 keeps the test quick (a random detector fills every slot).
    crop_rois(CropRoisConfig(out=rois, data=world["data"], split="minival", mode="test", detector_weights=det_path,
                             hr_size=HR, context=1.5, device="cpu", max_rois=25))
    downsample(DownsampleConfig(src=rois))
    a = rescore_eval(_cfg(world, tmp_path / "via_store", rois=rois, figures=False, batch_size=32))
    b = rescore_eval(_cfg(world, tmp_path / "direct", rois=None, detector=det_path, context=1.5, figures=False,
                          rois_per_image=25, batch_size=32))
    assert a["rois"] == b["rois"] > 0
    for name in ("baseline", "mtgan", "bicubic"):
        ra = (tmp_path / "via_store" / f"{name}.json").read_text()
        assert ra == (tmp_path / "direct" / f"{name}.json").read_text(), name
    for ra, rb in zip(a["rows"], b["rows"]):
        assert {k: v for k, v in ra.items() if k != "title"} == {k: v for k, v in rb.items() if k != "title"}


def save_tiny_detector(path: Path, cats: list[dict], build_detector) -> Path:
    """A random ResNet-18 FPN Faster R-CNN in sodtool's model.pt format (see sodtool.models.detector_weights)."""
    from sodtool.models.detector_weights import MODEL_FORMAT
    from sodtool.models.frcnn import resolve_build

    opts = dict(min_size=192, max_size=192, fpn_channels=16, representation_size=32, rpn_pre_nms_top_n_test=200,
                rpn_post_nms_top_n_test=150)
    torch.manual_seed(0)
    model = build_detector("resnet18_fpn", len(cats) + 1, **opts)
    path.parent.mkdir(parents=True, exist_ok=True)
    build = resolve_build("resnet18_fpn", **opts)
    torch.save({"format": MODEL_FORMAT, "arch": "resnet18_fpn", "num_classes": len(cats) + 1,
                "categories": json.dumps(cats),
                "build": build, "model": model.state_dict()}, path)
    return path


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_train_mode_store_is_refused(world, cli, tmp_path):
    res = cli("eval", "--data", world["data"], "--split", "minival", "--rois", world["rois_train"],
              "--mtgan", world["mtgan"], "--out", tmp_path / "e", "--device", "cpu")
    assert res.exit_code == 2
    assert "'train'-mode ROI store" in res.stderr and "crop-rois --mode test" in res.stderr
    assert not (tmp_path / "e" / "manifest.json").exists()


def test_mismatched_categories_are_refused(world, cli, tmp_path):
    other = [{"id": c["id"], "name": c["name"] + "x"} for c in world["cats"]]
    bad = save_mtgan(tmp_path / "bad.pt", other)
    res = cli("eval", "--data", world["data"], "--rois", world["rois"], "--mtgan", bad, "--out", tmp_path / "e")
    assert res.exit_code == 2 and "categories disagree" in res.stderr and "bad.pt" in res.stderr
    fewer = save_mtgan(tmp_path / "fewer.pt", world["cats"][:2])
    res = cli("eval", "--data", world["data"], "--rois", world["rois"], "--mtgan", world["mtgan"],
              "--ablation", f"few={fewer}", "--out", tmp_path / "e")
    assert res.exit_code == 2 and "ablation 'few'" in res.stderr


def test_mode_errors(world, cli, tmp_path):
    res = cli("eval", "--results", tmp_path / "r.json", "--data", world["data"], "--mtgan", world["mtgan"],
              "--rois", world["rois"])
    assert res.exit_code == 2 and "two modes" in res.stderr
    res = cli("eval", "--data", world["data"], "--rois", world["rois"])
    assert res.exit_code == 2 and "need --mtgan" in res.stderr
    res = cli("eval", "--data", world["data"], "--mtgan", world["mtgan"])
    assert res.exit_code == 2 and "exactly one ROI source" in res.stderr
    res = cli("eval", "--data", world["data"])
    assert res.exit_code == 2 and "--results FILE" in res.stderr
    res = cli("eval", "--data", world["data"], "--rois", world["rois"], "--mtgan", world["mtgan"],
              "--ablation", "mtgan=x.pt")
    assert res.exit_code == 2 and "reserved" in res.stderr
    res = cli("eval", "--data", world["data"], "--rois", world["rois"], "--mtgan", world["mtgan"],
              "--ablation", "noreg_small=x.pt")
    assert res.exit_code == 2 and "reserved" in res.stderr
    res = cli("eval", "--data", world["data"], "--rois", world["rois"], "--mtgan", world["mtgan"], "--small-area", "-1")
    assert res.exit_code == 2 and "--small-area must be an area in px²" in res.stderr
    res = cli("eval", "--data", world["data"], "--rois", world["rois"], "--mtgan", world["mtgan"], "--score", "max")
    assert res.exit_code == 2 and "--score" in res.stderr
    res = cli("eval", "--data", world["data"], "--rois", world["rois"], "--mtgan", tmp_path)
    assert res.exit_code == 2 and "no model.pt" in res.stderr


def test_hr_size_mismatch_is_refused(world, tmp_path):
    from sodtool.stages.eval_mtgan import rescore_eval

    big = save_mtgan(tmp_path / "big.pt", world["cats"], hr_size=64)
    with pytest.raises(InputError, match="64 px crops"):
        rescore_eval(_cfg(world, tmp_path / "e", mtgan=big))


def test_verdict_line_says_whether_the_rescored_rows_can_be_trusted():
    from sodtool.reports import verdict

    weak = verdict({"val_d_cls_acc_fg_sr": 0.214, "val_d_cls_acc_fg_hr": 0.38, "val_fg_crops": 70})
    assert weak.startswith("D classifies 21% of 70 held-out object crops right on SR input (38% on HR")
    assert "pipeline runs, not what the method can do" in weak and "pipelines/bench.sh" in weak
    strong = verdict({"val_d_cls_acc_fg_sr": 0.81, "val_d_cls_acc_fg_hr": 0.9, "val_fg_crops": 300})
    assert "measure the method" in strong
    # The advice names something longer than the run's own preset: a bench D is not sent to bench.
    assert "pipelines/bench.sh" in verdict({"val_d_cls_acc_fg_sr": 0.2, "preset": "quick"})
    on_bench = verdict({"val_d_cls_acc_fg_sr": 0.45, "val_d_cls_acc_fg_hr": 0.7, "val_fg_crops": 82, "preset": "bench"})
    assert "pipelines/bench.sh" not in on_bench and "--preset paper" in on_bench
    on_paper = verdict({"val_d_cls_acc_fg_sr": 0.3, "preset": "paper"})
    assert "--preset paper" not in on_paper and "loss curves" in on_paper
    # A quick D on 128 px crops lacks only the bench schedule: the advice names it, not the crops it has.
    at_128 = verdict({"val_d_cls_acc_fg_sr": 0.49, "val_d_cls_acc_fg_hr": 0.57, "val_fg_crops": 82,
                      "preset": "quick", "hr_size": 128})
    assert "pipelines/bench.sh (" not in at_128 and "already has the paper's 128 px crops" in at_128
    assert "--preset bench" in at_128 and "--seed" in at_128
    assert "pipelines/bench.sh (" in verdict({"val_d_cls_acc_fg_sr": 0.2, "preset": "quick", "hr_size": 64})
    # A run that recorded D's accuracy on the crops eval reads is judged by that figure.
    read = verdict({"val_d_cls_acc_fg_sr": 0.36, "val_d_cls_acc_fg_hr": 0.52, "val_d_cls_acc_fg_read": 0.51,
                    "val_fg_crops": 56, "preset": "quick", "hr_size": 64})
    assert read.startswith("D classifies 51% of 56 held-out object crops right on the crops eval gives it "
                           "(HR where the window is wider than the LR crop, else SR; 36% on SR input alone, 52% on HR")
    assert "measure the method" in read


def _eval_metrics(ap_s: float, extra_row: bool = False, images: int = 500) -> dict:
    """A minimal eval metrics.json: the baseline and one MTGAN row (AP_small = ap_s)."""
    cols = {"AP": 0.4, "AP50": 0.7, "AP75": 0.4, "AP_small": ap_s, "AP_medium": 0.5, "AP_large": -1.0}
    rows = [{"name": "baseline", "title": "Baseline detector", **cols, "AP_small": 0.175},
            {"name": "mtgan", "title": "SOD-MTGAN, D score", **cols}]
    if extra_row:
        rows.append({"name": "no_adv", "title": "no_adv, D score", **cols})
    return {"split": "minival", "images": images, "rows": rows,
            "discriminator": {"val_d_cls_acc_fg_sr": ap_s}}


def test_seeds_table_gives_mean_and_sample_sd_of_the_rows_every_run_has(tmp_path):
    import subprocess
    import sys

    from sodtool.reports import seeds_markdown

    runs = [_eval_metrics(0.234, extra_row=True), _eval_metrics(0.217), _eval_metrics(0.187)]
    table = seeds_markdown(runs)
    # AP_S of seeds 23.4, 21.7, 18.7: mean 21.27, sample sd 2.38 (README's bench row 21.2 ± 2.3 is
    # the same computation on unrounded values); a constant column has sd 0; no ground truth: n/a.
    assert "| SOD-MTGAN, D score | 40.0 ± 0.0 | 70.0 ± 0.0 | 40.0 ± 0.0 | 21.3 ± 2.4 | 50.0 ± 0.0 | n/a |" in table
    assert "| Baseline detector | 40.0 ± 0.0 | 70.0 ± 0.0 | 40.0 ± 0.0 | 17.5 ± 0.0 |" in table
    assert "mean ± sd of 3 runs" in table and "per run: 23%, 22%, 19%." in table
    assert "no_adv, D score" not in table and "Rows not in every run, left out: no_adv." in table
    assert "21.7 |" in seeds_markdown(runs[1:2])  # one run: its value, no sd
    with pytest.raises(InputError, match="run 2 is on minival \\(100 images\\)"):
        seeds_markdown([runs[0], _eval_metrics(0.2, images=100)])
    # Paired differences: per run mtgan - baseline AP_S = 5.9, 4.2, 1.2 -> mean 3.77, sd 2.38; AP_L n/a.
    paired = seeds_markdown(runs, [("mtgan", "baseline")])
    assert "| mtgan − baseline | +0.0 ± 0.0 | +0.0 ± 0.0 | +0.0 ± 0.0 | +3.8 ± 2.4 | +0.0 ± 0.0 | n/a |" in paired
    assert "| mtgan − baseline | +0.0 | +0.0 | +0.0 | +5.9 | +0.0 | n/a |" in seeds_markdown(runs[:1], [("mtgan", "baseline")])
    with pytest.raises(InputError, match="no row 'no_adv' in every run"):
        seeds_markdown(runs, [("no_adv", "baseline")])
    # Runs without an MTGAN (eval --compare only) have no D to report.
    assert "D's held-out" not in seeds_markdown([{**m, "rescored": False} for m in runs])

    # The script: one table on stdout; a missing folder is one line on stderr and exit code 2.
    for i, m in enumerate(runs):
        (tmp_path / f"s{i}").mkdir()
        (tmp_path / f"s{i}" / "metrics.json").write_text(json.dumps(m))
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "seeds_table.py"
    ok = subprocess.run([sys.executable, str(script)] + [str(tmp_path / f"s{i}") for i in range(3)],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout == table
    bad = subprocess.run([sys.executable, str(script), str(tmp_path / "s0"), str(tmp_path / "missing")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stdout == "" and len(bad.stderr.strip().splitlines()) == 1
    assert bad.stderr.startswith("error: ") and "missing: not found" in bad.stderr


def test_discriminator_quality_carries_the_runs_preset(tmp_path):
    """eval's verdict reads D's held-out accuracy and the MTGAN run's preset from its manifest,
    and the HR crop side from the model."""
    from types import SimpleNamespace

    from sodtool.artefacts import write_manifest
    from sodtool.models.mtgan import discriminator_quality

    run = tmp_path / "mtgan"
    run.mkdir()
    write_manifest(run, "train-mtgan", {"preset": "bench", "seed": 0},
                   {}, {"val_d_cls_acc_fg_sr": 0.45, "val_d_cls_acc_fg_hr": 0.7, "val_fg_crops": 82, "final_g_mse": 0.1},
                   seed=0, device="cpu", wall_time_s=1.0, outputs=[])
    assert discriminator_quality(SimpleNamespace(run_dir=run, hr_size=128)) == {
        "val_d_cls_acc_fg_sr": 0.45, "val_d_cls_acc_fg_hr": 0.7, "val_fg_crops": 82, "preset": "bench", "hr_size": 128}
    assert discriminator_quality(SimpleNamespace(run_dir=tmp_path / "moved", hr_size=128)) == {}


def test_pretrained_g_control_feeds_the_mtgans_d_that_generator(world, cli, tmp_path):
    """--pretrained-g adds rows of the MTGAN's D on a `train sr` generator's output: given the
    MTGAN's own G, they are the SOD-MTGAN rows exactly; a missing generator is refused."""
    from sodtool.checkpoint import save as save_checkpoint
    from sodtool.models.networks import generator_checkpoint, generator_from_checkpoint

    sr = tmp_path / "sr"
    sr.mkdir()
    save_checkpoint(generator_checkpoint(generator_from_checkpoint(world["mtgan"] / "model.pt")), sr / "generator.pt")
    out = tmp_path / "e"
    res = cli("eval", "--data", world["data"], "--rois", world["rois"], "--mtgan", world["mtgan"], "--pretrained-g", sr,
              "--small-area", "1024", "--no-figures", "--batch-size", "16", "--device", "cpu", "--out", out)
    assert res.exit_code == 0, res.stderr
    m = json.loads((out / "metrics.json").read_text())
    names = [r["name"] for r in m["rows"]]
    assert names[:7] == ["baseline", "mtgan", "mtgan_fused", "bicubic", "bicubic_fused", "pretrained_g",
                         "pretrained_g_fused"]
    assert {"pretrained_g_small", "pretrained_g_fused_small"} <= set(names)
    for a, b in (("mtgan", "pretrained_g"), ("mtgan_fused", "pretrained_g_fused"), ("mtgan_small", "pretrained_g_small")):
        assert json.loads((out / f"{b}.json").read_text()) == json.loads((out / f"{a}.json").read_text())
    assert "Pretrained-G control (D on train sr's G), D score" in (out / "table.md").read_text()
    assert json.loads((out / "manifest.json").read_text())["inputs"]["pretrained_g"]["path"].endswith("generator.pt")

    res = cli("eval", "--data", world["data"], "--rois", world["rois"], "--mtgan", world["mtgan"],
              "--pretrained-g", tmp_path / "nowhere", "--out", tmp_path / "e2")
    assert res.exit_code == 2 and "--pretrained-g not found" in res.stderr
    assert not (tmp_path / "e2").exists()
    res = cli("eval", "--data", world["data"], "--rois", world["rois"], "--mtgan", world["mtgan"],
              "--ablation", f"pretrained_g={world['abl']}", "--out", tmp_path / "e3")
    assert res.exit_code == 2 and "reserved" in res.stderr
