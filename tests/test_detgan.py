"""DetectorGAN (`sodtool.models.detgan`, `sodtool train detgan`): networks, the unroll, resumption.

CPU, tiny inputs: the 64 px dataset and the tiny MobileNetV3-FPN detector of test_detector.py,
64 px patches and 8-channel networks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_detector import PLAIN_CATS, TINY, make_dataset
from test_fsr import TINY_BUILD

from sodtool.models import detgan
from sodtool.models.frcnn import build_detector

REPO = Path(__file__).resolve().parents[1]
GAN_TINY = ["--patch", "64", "--batch-size", "2", "--channels", "8", "--blocks", "1", "--d-channels", "8",
            "--log-every", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def ds(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("detgan_ds"), PLAIN_CATS, seed=1)


@pytest.fixture(scope="module")
def detector(ds, tmp_path_factory) -> Path:
    from typer.testing import CliRunner

    from sodtool.cli import app

    root = tmp_path_factory.mktemp("detgan_det")
    res = CliRunner().invoke(app, ["train", "detector", "--data", str(ds), "--out", str(root / "detector"),
                                   "--iterations", "4", "--seed", "3", "--no-eval", *TINY])
    assert res.exit_code == 0, res.stderr
    return root / "detector" / "model.pt"


def test_network_shapes_and_receptive_fields():
    g = detgan.PatchGenerator(3, channels=8, blocks=2)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    boxes = torch.tensor([[10.0, 12.0, 30.0, 22.0], [40.0, 40.0, 60.0, 63.5]])
    inp, mask = detgan.generator_input(x, boxes, torch.tensor([1, 3]), 3, torch.Generator().manual_seed(0), margin=2)
    assert inp.shape == (2, 7, 64, 64) and mask.shape == (2, 1, 64, 64)
    # The noised region is the box grown by the margin, on whole pixels: x 8..32, y 10..24.
    assert mask[0, 0].sum() == 24 * 14 and mask[0, 0, 10:24, 8:32].all()
    # Class planes: label 1 -> plane 0, label 3 -> plane 2, each equal to the mask.
    assert torch.equal(inp[0, 4], mask[0, 0]) and inp[0, 5:].abs().sum() == 0 and torch.equal(inp[1, 6], mask[1, 0])
    # Outside the box G's input is the patch itself.
    assert torch.equal(inp[:, :3] * (1 - mask), x * (1 - mask))
    out = g(inp)
    assert out.shape == (2, 3, 64, 64) and out.abs().max() <= 1
    fake = detgan.composite(x, out, mask)
    assert torch.equal(fake * (1 - mask), x * (1 - mask))
    assert detgan.receptive_field(3) == 70 and detgan.receptive_field(2) == 34
    assert detgan.PatchDiscriminator(8, 3)(fake).shape == (2, 1, 6, 6)
    crops = detgan.object_crops(fake, boxes, 32)
    assert crops.shape == (2, 3, 32, 32) and detgan.PatchDiscriminator(8, 2)(crops).shape == (2, 1, 6, 6)


def test_insert_objects_changes_only_the_box():
    torch.manual_seed(0)
    g = detgan.PatchGenerator(2, channels=8, blocks=1).eval()
    patches = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    boxes = torch.tensor([[5.0, 5.0, 20.0, 15.0], [30.0, 30.0, 50.0, 40.0], [0.0, 40.0, 12.0, 64.0]])
    out = detgan.insert_objects(g, patches, boxes, torch.tensor([1, 2, 1]), torch.Generator().manual_seed(1))
    assert out.dtype == torch.uint8 and out.shape == patches.shape
    mask = detgan.box_masks(boxes, 64, 2).bool().expand(-1, 3, -1, -1)
    assert torch.equal(out[~mask], patches[~mask]) and not torch.equal(out[mask], patches[mask])


def _loop_inputs(seed: int = 0):
    torch.manual_seed(seed)
    det = build_detector("mobilenet_v3_fpn", 3, **TINY_BUILD)
    detgan.freeze_trunk(det)
    g = detgan.PatchGenerator(2, channels=8, blocks=1)
    real = torch.rand(2, 3, 64, 64) * 2 - 1
    boxes = torch.tensor([[10.0, 10.0, 30.0, 24.0], [30.0, 28.0, 50.0, 44.0]])
    labels = torch.tensor([1, 2])
    targets = [{"boxes": boxes[i:i + 1], "labels": labels[i:i + 1]} for i in range(2)]
    inp, mask = detgan.generator_input(real, boxes, labels, 2, torch.Generator().manual_seed(0))
    fake = detgan.composite(real, g(inp), mask)
    return det, g, real, fake, targets


def test_unrolled_real_loss_reaches_the_generator():
    det, g, real, fake, targets = _loop_inputs()
    torch.manual_seed(5)
    real_in = detgan.detector_inputs(det, ((real + 1) / 2), targets)
    syn_in = detgan.detector_inputs(det, (fake + 1) / 2, targets)
    l_unrolled, l_real, l_syn, grads = detgan.unrolled_real_loss(det, real_in, syn_in, lr=0.5)
    got = torch.autograd.grad(l_unrolled, list(g.parameters()), allow_unused=True)
    assert any(x is not None and x.abs().sum() > 0 for x in got)
    # The trunk is frozen: the detector's own step moves only the RoI heads.
    assert set(grads) == set(detgan.head_parameters(det)) and not any(p.requires_grad for p in det.backbone.parameters())


def test_a_cut_unroll_gives_the_generator_nothing():
    """The same W' with the inner gradient detached (no create_graph): L_real(W') no longer depends
    on G, so this is what the test above would see if the unroll were cut."""
    det, g, real, fake, targets = _loop_inputs()
    torch.manual_seed(5)
    real_in = detgan.detector_inputs(det, ((real + 1) / 2), targets)
    syn_in = detgan.detector_inputs(det, (fake + 1) / 2, targets)
    params = detgan.head_parameters(det)
    loss = detgan.detection_loss(det, real_in) + detgan.detection_loss(det, syn_in)
    grads = torch.autograd.grad(loss, list(params.values()))
    stepped = {n: p - 0.5 * gr for (n, p), gr in zip(params.items(), grads)}
    l_cut = detgan.detection_loss(det, real_in, stepped)
    got = torch.autograd.grad(l_cut, list(g.parameters()), allow_unused=True)
    assert all(x is None for x in got)


def _weights(run: Path) -> dict:
    return torch.load(run / "model.pt", weights_only=True)["generator"]


def _rows(run: Path) -> list[dict]:
    timing = {"patches_per_s", "detector_s"}
    return [{k: v for k, v in json.loads(x).items() if k not in timing}
            for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_train_phases_and_outputs(cli, ds, detector, tmp_path):
    out = tmp_path / "gan"
    res = cli("train", "detgan", "--detector", detector, "--data", ds, "--out", out, "--iterations", "4",
              "--pretrain-iterations", "2", "--sample-every", "2", "--seed", "1", *GAN_TINY)
    assert res.exit_code == 0, res.stderr
    rows = _rows(out)
    assert [r["phase"] for r in rows] == ["pretrain", "pretrain", "joint", "joint"]
    assert "det_unrolled" not in rows[1] and {"det_unrolled", "det_real", "det_syn"} <= set(rows[2])
    assert (out / "samples" / "iter_0000004.png").is_file() and (out / "trained_images.json").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "train-detgan" and manifest["metrics"]["iterations"] == 4
    g, info = detgan.load_model(out)
    assert info["patch"] == 64 and [c["name"] for c in info["categories"]] == [c["name"] for c in PLAIN_CATS]
    # --no-unroll: the same run without Eq. 3's term, everything else alike.
    res = cli("train", "detgan", "--detector", detector, "--data", ds, "--out", tmp_path / "flat", "--iterations", "4",
              "--pretrain-iterations", "2", "--seed", "1", "--no-unroll", *GAN_TINY)
    assert res.exit_code == 0, res.stderr
    flat = _rows(tmp_path / "flat")
    assert "det_unrolled" not in flat[2] and flat[1] == rows[1]  # phase 1 identical
    assert not all(torch.equal(a, b) for a, b in zip(_weights(out).values(), _weights(tmp_path / "flat").values()))


def test_killed_run_resumes_bit_identical(cli, ds, detector, tmp_path):
    out, total = tmp_path / "killed", 12
    args = ["train", "detgan", "--detector", str(detector), "--data", str(ds), "--out", str(out), "--iterations",
            str(total), "--pretrain-iterations", "4", "--pool-size", "3", "--checkpoint-every", "2", "--seed", "2",
            *GAN_TINY]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
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
    assert 2 <= saved < total

    # The resumed and the uninterrupted run in this process, with the subprocess's thread count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = cli(*args)
        assert res.exit_code == 0, res.stderr
        straight = tmp_path / "straight"
        res = cli(*[str(straight) if a == str(out) else a for a in args])
        assert res.exit_code == 0, res.stderr
    finally:
        torch.set_num_threads(threads)
    assert json.loads((out / "manifest.json").read_text())["metrics"]["resumed_from_step"] == saved
    a, b = _weights(out), _weights(straight)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ca, cb = (torch.load(r / "checkpoint.pt", weights_only=True) for r in (out, straight))
    for part in ("d_global", "d_local", "detector"):
        assert all(torch.equal(ca[part][k], cb[part][k]) for k in ca[part]), part
    assert torch.equal(ca["pool"]["images"], cb["pool"]["images"])
    assert _rows(out) == _rows(straight) and [r["step"] for r in _rows(out)] == list(range(1, total + 1))


@pytest.mark.parametrize("extra,needle", [
    (["--patch", "30"], "--patch must be a multiple of 4"),
    (["--pretrain-iterations", "9", "--iterations", "4"], "--pretrain-iterations (9) exceeds --iterations (4)"),
    (["--syn-weight", "-1"], "--syn-weight must be a number >= 0"),
    (["--min-visibility", "0"], "--min-visibility must be in (0, 1]"),
    (["--patch", "32", "--margin", "12"], "cannot hold the split's largest object"),
])
def test_bad_options_exit_2_one_line(cli, ds, detector, tmp_path, extra, needle):
    res = cli("train", "detgan", "--detector", detector, "--data", ds, "--out", tmp_path / "x", "--iterations", "1",
              "--pretrain-iterations", "0", *GAN_TINY, *extra)
    assert res.exit_code == 2, res.stderr
    assert needle in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x" / "model.pt").exists()


def test_refuses_a_detector_of_other_categories(cli, tmp_path, detector):
    other = make_dataset(tmp_path / "other", [{"id": 7, "name": "x"}, {"id": 9, "name": "y"}], seed=2)
    res = cli("train", "detgan", "--detector", detector, "--data", other, "--out", tmp_path / "x", *GAN_TINY)
    assert res.exit_code == 2 and "categor" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_end_to_end_generate_and_train_on_generated(cli, tmp_path):
    """train detector -> train detgan -> data generate --method detgan -> train detector
    --extra-data, tiny, on test_generate's road images (where the insertion rule finds places)."""
    from test_generate import BOXES, _dataset

    from sodtool.coco import load_split, resolve_split

    ds = _dataset(tmp_path / "src", BOXES)
    res = cli("train", "detector", "--data", ds, "--out", tmp_path / "base", "--iterations", "2", "--no-eval", *TINY)
    assert res.exit_code == 0, res.stderr
    detector = tmp_path / "base" / "model.pt"
    res = cli("train", "detgan", "--detector", detector, "--data", ds, "--out", tmp_path / "gan", "--iterations", "3",
              "--pretrain-iterations", "1", "--seed", "0", *GAN_TINY)
    assert res.exit_code == 0, res.stderr
    gen = tmp_path / "gen"
    res = cli("data", "generate", "--method", "detgan", "--detgan", tmp_path / "gan", "--data", ds, "--count", "4",
              "--per-image", "2", "--seed", "0", "--out", gen)
    assert res.exit_code == 0, res.stderr
    data = json.loads((gen / "annotations" / "instances_train.json").read_text())
    assert len(data["images"]) == 4 and all(im["generated"] and im["method"] == "detgan" for im in data["images"])
    inserted = [a for a in data["annotations"] if a["inserted"]]
    assert inserted, "the insertion rule placed nothing on the tiny images"
    assert (gen / "preview.png").is_file()
    split = load_split(resolve_split(gen, "train"))
    source = load_split(resolve_split(ds, "train"))
    assert split.categories == source.categories
    # Outside the inserted boxes (grown by the margin) every pixel is the source image's.
    for im in data["images"]:
        new = split.load_image(im["id"]).astype(int)
        old = source.load_image(im["source_image_id"]).astype(int)
        boxes = [a["bbox"] for a in inserted if a["image_id"] == im["id"]]
        if not boxes:
            assert (new == old).all()
            continue
        xyxy = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in boxes])
        mask = detgan.box_masks(xyxy, max(new.shape[:2]), 2).amax(0)[0].bool().numpy()[:new.shape[0], :new.shape[1]]
        assert (new[~mask] == old[~mask]).all() and (new[mask] != old[mask]).any()
    # Again with the same seed: the same bytes.
    res = cli("data", "generate", "--method", "detgan", "--detgan", tmp_path / "gan", "--data", ds, "--count", "4",
              "--per-image", "2", "--seed", "0", "--out", tmp_path / "gen2")
    assert res.exit_code == 0, res.stderr
    for f in sorted((gen / "images" / "train").iterdir()):
        assert f.read_bytes() == (tmp_path / "gen2" / "images" / "train" / f.name).read_bytes()
    res = cli("train", "detector", "--data", ds, "--extra-data", gen, "--extra-ratio", "0.5", "--out",
              tmp_path / "det", "--iterations", "2", "--no-eval", *TINY)
    assert res.exit_code == 0, res.stderr
