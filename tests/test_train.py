"""`train sr` and `train mtgan` on tiny stores (HR 32 / LR 8, light widths, ResNet-18).

Covers: artefacts written, every loss term logged by name, exact resumption after a real
SIGKILL (mtgan) and after the stop-after hook (sr), non-finite loss -> exit 3 with the last
checkpoint kept, mismatched stores -> exit 2, switches recorded in the manifest.
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

from sodtool.artefacts import file_identity

HR, LR_SIZE, K = 32, 8, 3
CATS = [{"id": 3, "name": "stripes"}, {"id": 7, "name": "dots"}, {"id": 9, "name": "rings"}]
TINY_SR = ["--iterations", "6", "--batch-size", "4", "--channels", "8", "--up-channels", "8", "--num-blocks", "1",
           "--val-every", "3", "--log-every", "2", "--checkpoint-every", "3", "--device", "cpu", "--seed", "0"]


def _mtgan_args(n_iter: int, ckpt_every: int = 2, d_warmup: int = 0) -> list[str]:
    return ["--iterations", str(n_iter), "--batch-size", "4", "--disc-arch", "resnet18", "--d-lr-step", "3",
            "--d-lr", "0.01", "--d-warmup", str(d_warmup), "--log-every", "1", "--checkpoint-every", str(ckpt_every), "--sample-every", "3", "--val-every", "3",
            "--device", "cpu", "--seed", "1"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: tiny convolutions gain nothing from more, and on a loaded 2-core machine
    spinning OpenMP threads make them ~10x slower. Also keeps in- and out-of-process runs alike."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------
# Tiny stores, written with sodtool.store's writer and sodtool.stages.downsample
# --------------------------------------------------------------------------------------------


def _crops(rng: np.random.Generator, n: int, labels: np.ndarray) -> np.ndarray:
    """Smooth coloured patterns whose frequency depends on the label: [n, 3, HR, HR] uint8."""
    yy, xx = np.mgrid[0:HR, 0:HR].astype(np.float32) / HR
    out = np.empty((n, 3, HR, HR), np.uint8)
    for i in range(n):
        f = 1.0 + 2.0 * labels[i] + rng.uniform(0, 1)
        phase = rng.uniform(0, 2 * np.pi, 3)
        for c in range(3):
            v = 0.5 + 0.4 * np.sin(2 * np.pi * f * (xx + 0.5 * yy) + phase[c])
            out[i, c] = np.clip(v * 255 + rng.normal(0, 4, v.shape), 0, 255).astype(np.uint8)
    return out


def write_hr(path: Path, n: int = 48, seed: int = 0, categories=CATS, nan_row: int | None = None) -> Path:
    """An HR store of n rows; every other window is 16 px wide (< HR: an upsampled crop)."""
    from sodtool.store import SCHEMA, StoreWriter, hr_fields

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, K + 1, n).astype(np.int64)
    labels[:4] = [1, 2, 3, 0]
    roi = np.tile(np.array([[10, 10, 30, 30]], np.float32), (n, 1))
    side = np.where(np.arange(n) % 2 == 0, 16.0, 64.0).astype(np.float32)
    window = np.stack([20 - side / 2, 20 - side / 2, 20 + side / 2, 20 + side / 2], 1).astype(np.float32)
    target = rng.normal(0, 0.1, (n, 4)).astype(np.float32) * (labels[:, None] > 0)
    if nan_row is not None:
        target[nan_row] = np.nan
    attrs = {"categories": categories, "hr_size": HR, "context": 1.5, "mode": "train", "split": "train",
             "detector": {"path": "none"}, "annotations": {"path": "none"}, "image_dir": "none"}
    with StoreWriter(path, schema=SCHEMA, fields=hr_fields(HR), attrs=attrs, chunk_rows=4) as w:
        w.append(hr=_crops(rng, n, labels), label=labels, target=target, roi=roi, gt_box=roi * (labels[:, None] > 0),
                 iou=np.where(labels > 0, 0.7, 0.2).astype(np.float32), image_id=np.arange(n) // 4,
                 score=np.full(n, 0.5, np.float32), det_label=np.maximum(labels, 1), window=window,
                 source=np.zeros(n, np.uint8))
    return path


def write_lr(hr_path: Path, path: Path, categories=None) -> Path:
    """The x4 twin of an HR store: `sodtool downsample`'s, or (with `categories`) a hand-made one
    that names the right source but another category list."""
    from sodtool.stages.downsample import DownsampleConfig, downsample
    from sodtool.store import LR_SCHEMA, StoreWriter, attr_str, lr_fields, open_store

    if categories is None:
        downsample(DownsampleConfig(src=hr_path, out=path, overwrite=True))
        return path
    with open_store(hr_path) as f:
        hr = torch.from_numpy(f["hr"][:]).float()
        digest = attr_str(f, "content_sha256")
    lr = torch.nn.functional.interpolate(hr, size=(LR_SIZE, LR_SIZE), mode="bicubic", antialias=True, align_corners=False)
    attrs = {"scale": 4, "categories": categories, "source": file_identity(hr_path), "source_content_sha256": digest}
    with StoreWriter(path, schema=LR_SCHEMA, fields=lr_fields(LR_SIZE), attrs=attrs, chunk_rows=4) as w:
        w.append(lr=lr.round().clamp(0, 255).to(torch.uint8))
    return path


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("stores")
    hr = write_hr(d / "rois_train.h5")
    return hr, write_lr(hr, d / "rois_train_lr.h5")


@pytest.fixture(scope="module")
def sr_run(stores, tmp_path_factory) -> Path:
    """A finished tiny `train sr` run (in-process, through the CLI)."""
    from typer.testing import CliRunner

    from sodtool.cli import app

    hr, lr = stores
    out = tmp_path_factory.mktemp("runs") / "sr"
    res = CliRunner().invoke(app, ["train", "sr", "--hr", str(hr), "--lr", str(lr), "--out", str(out), *TINY_SR])
    assert res.exit_code == 0, (res.stdout, res.stderr, res.exception)
    return out


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_same_weights(a: Path, b: Path) -> None:
    sa, sb = _state(a), _state(b)
    for key in ("generator", "discriminator"):
        if key not in sa:
            continue
        assert sa[key].keys() == sb[key].keys()
        for k in sa[key]:
            assert torch.equal(sa[key][k], sb[key][k]), f"{key}.{k} differs"


# --------------------------------------------------------------------------------------------
# train sr
# --------------------------------------------------------------------------------------------


def test_train_sr_writes_artefacts(sr_run):
    from sodtool.models.networks import generator_from_checkpoint

    assert {"generator.pt", "checkpoint.pt", "metrics.jsonl", "manifest.json"} <= {p.name for p in sr_run.iterdir()}
    manifest = json.loads((sr_run / "manifest.json").read_text())
    assert manifest["stage"] == "train-sr" and manifest["config"]["channels"] == 8
    m = manifest["metrics"]
    # 48 rows of 12 images (4 rows each): round(0.05 * 48) = 2 wanted, one whole image held out.
    assert m["val_crops"] == 4 and m["train_crops"] == 44 and m["iterations"] == 6
    for k in ("val_sr_psnr_rgb", "val_sr_psnr_y", "val_sr_ssim_rgb", "val_sr_ssim_y", "val_bicubic_psnr_rgb"):
        assert np.isfinite(m[k]), k
    lines = _lines(sr_run / "metrics.jsonl")
    train = [x for x in lines if "g_mse" in x]
    assert [x["step"] for x in train] == [2, 4, 6] and all(x["lr"] == 1e-4 for x in train)
    assert [x["step"] for x in lines if x.get("split") == "val"] == [3, 6]
    g = generator_from_checkpoint(sr_run / "generator.pt")
    assert g(torch.rand(2, 3, LR_SIZE, LR_SIZE)).shape == (2, 3, HR, HR)


def test_train_sr_resume_is_exact_and_min_native_size(stores, tmp_path):
    from sodtool.stages.train_sr import TrainSRConfig, train_sr

    hr, lr = stores
    # 22 target rows, batch 4: 5 batches per epoch; stop after 6 = epoch 1, position 1.
    kw = dict(hr=hr, lr=lr, iterations=8, batch_size=4, channels=8, up_channels=8, num_blocks=1, val_every=5,
              log_every=1, checkpoint_every=2, device="cpu", min_native_size=32)
    full = train_sr(TrainSRConfig(out=tmp_path / "a", **kw))
    # Only windows >= 32 px are targets: the odd rows, minus held-out ones.
    assert full["train_crops"] == 22 and full["min_native_size"] == 32
    assert train_sr(TrainSRConfig(out=tmp_path / "b", stop_after=6, **kw)) == {"stopped_at": 6}
    assert _state(tmp_path / "b" / "checkpoint.pt")["stream"] == {"epoch": 1, "position": 1}
    assert not (tmp_path / "b" / "manifest.json").exists()
    train_sr(TrainSRConfig(out=tmp_path / "b", **kw))
    _assert_same_weights(tmp_path / "a" / "generator.pt", tmp_path / "b" / "generator.pt")
    drop = lambda rows: [{k: v for k, v in r.items() if k != "crops_per_s"} for r in rows]  # noqa: E731
    assert drop(_lines(tmp_path / "a" / "metrics.jsonl")) == drop(_lines(tmp_path / "b" / "metrics.jsonl"))


def test_train_sr_on_several_stores(stores, tmp_path, cli):
    """Two store pairs (other categories, one generator): interleaved batches, per-store held-out
    rows, exact resumption across an epoch, inputs named hr, lr, hr_1, lr_1."""
    from sodtool.errors import InputError
    from sodtool.store import make_loader
    from sodtool.srdata import MultiStoreLoader
    from sodtool.stages.train_sr import TrainSRConfig, train_sr

    hr, lr = stores
    cats2 = [{"id": 1, "name": "car"}, {"id": 2, "name": "truck"}, {"id": 5, "name": "bus"}]
    hr2 = write_hr(tmp_path / "b.h5", n=40, seed=3, categories=cats2)
    lr2 = write_lr(hr2, tmp_path / "b_lr.h5")
    # The loader: every batch of each store's epoch once, in a seeded interleaving; iter_from resumes.
    subs = [make_loader(h, l_, batch_size=4, shuffle=True, seed=2, drop_last=True) for h, l_ in ((hr, lr), (hr2, lr2))]
    multi = MultiStoreLoader(subs, seed=2)
    multi.set_epoch(1)
    got = list(multi)
    order = multi.order()
    assert len(got) == len(multi) == 12 + 10 and sorted(order.tolist()) == [0] * 12 + [1] * 10
    assert order[:12].tolist() != [0] * 12  # mixed, not one store after the other
    alone = []
    for s_ in subs:
        s_.set_epoch(1)
        alone.append(iter(list(s_)))
    for b, i in zip(got, order):
        assert torch.equal(b["hr"], next(alone[i])["hr"])
    multi.set_epoch(1)
    assert all(torch.equal(a["hr"], b["hr"]) for a, b in zip(list(multi.iter_from(7)), got[7:]))
    multi.set_epoch(2)
    assert not np.array_equal(multi.order(), order)
    # Training through the CLI: both stores' held-out rows, inputs and per-store counts recorded.
    out = tmp_path / "sr2"
    res = cli("train", "sr", "--hr", hr, "--lr", lr, "--hr", hr2, "--lr", lr2, "--out", out, *TINY_SR)
    assert res.exit_code == 0, (res.stderr, res.exception)
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["inputs"]) == {"hr", "lr", "hr_1", "lr_1"}
    assert manifest["config"]["hr"] == [str(hr), str(hr2)]
    m = manifest["metrics"]
    assert m["train_crops_per_store"] == [44, 36] and m["train_crops"] == 80  # one image (4 rows) held out of each
    assert m["val_crops"] == 8 and m["val_crops_per_store"] == [4, 4] and np.isfinite(m["val_sr_psnr_y"])
    # Killed mid-run (after an epoch boundary) and resumed: the same weights and log.
    kw = dict(hr=(hr, hr2), lr=(lr, lr2), iterations=13, batch_size=4, channels=8, up_channels=8, num_blocks=1,
              val_every=5, log_every=1, checkpoint_every=4, device="cpu", min_native_size=32)
    train_sr(TrainSRConfig(out=tmp_path / "a", **kw))  # 22 + 18 targets: 5 + 4 batches per epoch
    assert train_sr(TrainSRConfig(out=tmp_path / "b", stop_after=11, **kw)) == {"stopped_at": 11}
    assert _state(tmp_path / "b" / "checkpoint.pt")["stream"] == {"epoch": 1, "position": 2}
    train_sr(TrainSRConfig(out=tmp_path / "b", **kw))
    _assert_same_weights(tmp_path / "a" / "generator.pt", tmp_path / "b" / "generator.pt")
    drop = lambda rows: [{k: v for k, v in r.items() if k != "crops_per_s"} for r in rows]  # noqa: E731
    assert drop(_lines(tmp_path / "a" / "metrics.jsonl")) == drop(_lines(tmp_path / "b" / "metrics.jsonl"))
    # Resuming with another set of stores, unequal --hr/--lr counts, a store given twice: refused.
    with pytest.raises(InputError, match="trained on 2 store pair"):
        train_sr(TrainSRConfig(out=tmp_path / "b", **{**kw, "hr": hr, "lr": lr}))
    res = cli("train", "sr", "--hr", hr, "--lr", lr, "--hr", hr2, "--out", tmp_path / "x", *TINY_SR)
    assert res.exit_code == 2 and "one --lr per --hr" in res.stderr
    res = cli("train", "sr", "--hr", hr, "--lr", lr, "--hr", hr, "--lr", lr, "--out", tmp_path / "x", *TINY_SR)
    assert res.exit_code == 2 and "is given twice" in res.stderr
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------------------------
# train mtgan
# --------------------------------------------------------------------------------------------


def test_train_mtgan_end_to_end(stores, sr_run, tmp_path, cli):
    from sodtool.models.networks import discriminator_from_checkpoint, generator_from_checkpoint

    hr, lr = stores
    out = tmp_path / "mtgan"
    res = cli("train", "mtgan", "--hr", hr, "--lr", lr, "--sr", sr_run, "--out", out, *_mtgan_args(4))
    assert res.exit_code == 0, (res.stderr, res.exception)
    names = {p.name for p in out.iterdir()}
    assert {"model.pt", "checkpoint.pt", "metrics.jsonl", "manifest.json", "samples"} <= names
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["iter_0000003.png", "iter_0000004.png"]
    from PIL import Image

    grid = Image.open(out / "samples" / "iter_0000004.png")
    assert grid.size == (4 * HR + 3 * 2, 4 * HR + 3 * 2)  # 4 held-out crops; rows LR, bicubic, SR, HR
    train = [x for x in _lines(out / "metrics.jsonl") if "g_total" in x]
    assert [x["step"] for x in train] == [1, 2, 3, 4]
    expected = {"g_mse", "g_adv", "g_cls", "g_reg", "g_total", "d_adv_real", "d_adv_fake", "d_cls_real",
                "d_cls_fake", "d_reg_real", "d_reg_fake", "d_total", "lr_g", "lr_d", "step"}
    assert all(expected <= x.keys() for x in train)
    assert "g_tv" not in train[0]
    # D's SGD rate is divided by 10 after --d-lr-step 3 iterations.
    assert [x["lr_d"] for x in train] == pytest.approx([0.01, 0.01, 0.001, 0.001])
    model = _state(out / "model.pt")
    assert model["categories"] == CATS and model["loss_weights"]["alpha"] == 1e-3
    assert model["discriminator_config"] == {"num_classes": K, "arch": "resnet18", "reg_branch": True}
    d = discriminator_from_checkpoint(out / "model.pt")
    g = generator_from_checkpoint(out / "model.pt")
    o = d(g(torch.rand(2, 3, LR_SIZE, LR_SIZE)))
    assert o.cls.shape == (2, K + 1) and o.reg.shape == (2, 4)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "train-mtgan" and manifest["config"]["adv"] is True
    assert set(manifest["inputs"]) == {"hr", "lr", "sr", "imagenet_weights", "disc_init"}
    # A rerun of the finished command resumes at the end: nothing trained, same weights.
    before = _state(out / "model.pt")["generator"]
    res = cli("train", "mtgan", "--hr", hr, "--lr", lr, "--sr", sr_run, "--out", out, *_mtgan_args(4))
    assert res.exit_code == 0
    after = _state(out / "model.pt")["generator"]
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert json.loads((out / "manifest.json").read_text())["metrics"]["final_g_total"] == train[-1]["g_total"]
    # ... but not with another configuration.
    res = cli("train", "mtgan", "--hr", hr, "--lr", lr, "--sr", sr_run, "--out", out, *_mtgan_args(4), "--alpha", "0.5")
    assert res.exit_code == 2 and "another configuration" in res.stderr and "alpha" in res.stderr


def test_train_mtgan_d_warmup_trains_d_alone(stores, sr_run, tmp_path, cli):
    hr, lr = stores
    out = tmp_path / "warm"
    res = cli("train", "mtgan", "--hr", hr, "--lr", lr, "--sr", sr_run, "--out", out, *_mtgan_args(4, d_warmup=2))
    assert res.exit_code == 0, (res.stderr, res.exception)
    train = [x for x in _lines(out / "metrics.jsonl") if "d_total" in x]
    assert [("g_total" in x) for x in train] == [False, False, True, True]
    g0 = _state(sr_run / "generator.pt")["generator"]
    g2 = _state(out / "checkpoint.pt")["generator"]  # step 4 now: G trained in steps 3 and 4
    assert _state(out / "checkpoint.pt")["step"] == 4
    assert any(not torch.equal(g0[k], g2[k]) for k in g0 if g0[k].is_floating_point())
    # Stopped right after the warm-up: G is still the MSE-pretrained one, D has moved.
    res = cli("train", "mtgan", "--hr", hr, "--lr", lr, "--sr", sr_run, "--out", tmp_path / "w2",
              *_mtgan_args(4, d_warmup=2), "--stop-after", "2")
    assert res.exit_code == 0, (res.stderr, res.exception)
    ck = _state(tmp_path / "w2" / "checkpoint.pt")
    assert ck["step"] == 2
    assert all(torch.equal(g0[k], ck["generator"][k]) for k in g0)
    # A warm-up as long as the run is refused: G would never train.
    res = cli("train", "mtgan", "--hr", hr, "--lr", lr, "--sr", sr_run, "--out", tmp_path / "w3",
              *_mtgan_args(4, d_warmup=4))
    assert res.exit_code == 2 and "--d-warmup" in res.stderr


def test_train_mtgan_d_optimizer(stores, sr_run, tmp_path, cli):
    """The CPU presets train D with AdamW, --d-optimizer sgd (the paper's) with momentum; both resolved in the manifest."""
    from sodtool.stages.train_mtgan import PRESETS

    assert (PRESETS["quick"]["d_optimizer"], PRESETS["bench"]["d_optimizer"], PRESETS["paper"]["d_optimizer"]) == \
        ("adam", "adam", "sgd")
    hr, lr = stores
    for name, state_key, group_key in (("adam", "exp_avg_sq", "betas"), ("sgd", "momentum_buffer", "momentum")):
        out = tmp_path / name
        args = [] if name == "adam" else ["--d-optimizer", "sgd"]  # adam: the quick preset's own
        res = cli("train", "mtgan", "--hr", hr, "--lr", lr, "--sr", sr_run, "--out", out, *_mtgan_args(2), *args)
        assert res.exit_code == 0, (res.stderr, res.exception)
        assert json.loads((out / "manifest.json").read_text())["config"]["d_optimizer"] == name
        opt = _state(out / "checkpoint.pt")["optimizer_d"]
        assert all(state_key in st for st in opt["state"].values()) and opt["state"]
        assert group_key in opt["param_groups"][0] and opt["param_groups"][0]["lr"] == 0.01
    res = cli("train", "mtgan", "--hr", hr, "--lr", lr, "--sr", sr_run, "--out", tmp_path / "bad", *_mtgan_args(2),
              "--d-optimizer", "rmsprop")
    assert res.exit_code == 2 and "unknown --d-optimizer 'rmsprop' (choose from sgd, adam)" in res.stderr
    assert not (tmp_path / "bad").exists()


def test_train_mtgan_switches_recorded(stores, sr_run, tmp_path, cli):
    hr, lr = stores
    out = tmp_path / "ablation"
    res = cli("train", "mtgan", "--hr", hr, "--lr", lr, "--sr", sr_run, "--out", out, *_mtgan_args(2),
              "--no-reg-branch", "--no-adv", "--no-cls", "--adversarial", "nonsaturating", "--tv-weight", "0.1")
    assert res.exit_code == 0, (res.stderr, res.exception)
    cfg = json.loads((out / "manifest.json").read_text())["config"]
    assert (cfg["reg_branch"], cfg["adv"], cfg["cls"], cfg["reg"]) == (False, False, False, True)
    assert cfg["adversarial"] == "nonsaturating" and cfg["tv_weight"] == 0.1
    line = [x for x in _lines(out / "metrics.jsonl") if "g_total" in x][-1]
    assert {"g_mse", "g_tv", "d_cls_real", "d_cls_fake"} <= line.keys()
    assert not {"g_adv", "g_cls", "g_reg", "d_adv_real", "d_reg_real"} & line.keys()
    assert _state(out / "model.pt")["discriminator_config"]["reg_branch"] is False


def test_train_mtgan_killed_and_resumed_is_exact(stores, sr_run, tmp_path):
    """Uninterrupted run vs a run SIGKILLed after its first checkpoint and rerun: same weights."""
    from sodtool.stages.train_mtgan import TrainMTGANConfig, train_mtgan

    hr, lr = stores
    n = 14  # 44 training rows, batch 4: 11 batches per epoch, so the resumed run crosses an epoch
    # ... and the end of the D warm-up (5 iterations), if it is killed at the first checkpoint (3).
    args = ["train", "mtgan", "--hr", str(hr), "--lr", str(lr), "--sr", str(sr_run), "--out", str(tmp_path / "b"),
            *_mtgan_args(n, ckpt_every=3, d_warmup=5)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "sodtool", "--quiet", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = tmp_path / "b" / "checkpoint.pt"
    deadline = time.monotonic() + 120
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()
    step = _state(ckpt)["step"]
    assert 3 <= step < n and not (tmp_path / "b" / "manifest.json").exists()

    from sodtool.cli import main

    with pytest.raises(SystemExit) as e:  # the same command again resumes
        main(["--quiet", *args])
    assert e.value.code in (0, None)
    cfg = TrainMTGANConfig(hr=hr, lr=lr, sr=sr_run, out=tmp_path / "a", iterations=n, batch_size=4,
                           disc_arch="resnet18", d_lr=0.01, d_lr_step=3, d_warmup=5, log_every=1, checkpoint_every=3,
                           sample_every=3, val_every=3, device="cpu", seed=1)
    train_mtgan(cfg)
    _assert_same_weights(tmp_path / "a" / "model.pt", tmp_path / "b" / "model.pt")
    _assert_same_weights(tmp_path / "a" / "checkpoint.pt", tmp_path / "b" / "checkpoint.pt")
    a, b = _state(tmp_path / "a" / "checkpoint.pt"), _state(tmp_path / "b" / "checkpoint.pt")
    assert a["stream"] == b["stream"] and a["scheduler_d"] == b["scheduler_d"]
    drop = lambda rows: [{k: v for k, v in r.items() if k != "crops_per_s"} for r in rows]  # noqa: E731
    assert drop(_lines(tmp_path / "a" / "metrics.jsonl")) == drop(_lines(tmp_path / "b" / "metrics.jsonl"))


def test_non_finite_loss_stops_with_checkpoint_kept(tmp_path, sr_run, cli):
    """A NaN box target on a positive row of the third batch: exit 3 at iteration 3, checkpoint of 2 kept."""
    from sodtool.store import make_loader
    from sodtool.srdata import split_rows

    hr = write_hr(tmp_path / "rois_train.h5")
    train_rows, _ = split_rows(np.arange(48) // 4, 0.05, 256, 0)
    loader = make_loader(hr, None, batch_size=4, shuffle=True, seed=1, drop_last=True, indices=train_rows)
    loader.set_epoch(0)
    third = list(loader)[2]
    row = int(third["index"][third["label"] > 0][0])
    hr = write_hr(tmp_path / "rois_train.h5", nan_row=row)  # same rows, same order: only the target differs
    lr = write_lr(hr, tmp_path / "rois_train_lr.h5")
    out = tmp_path / "nan"
    res = cli("train", "mtgan", "--hr", hr, "--lr", lr, "--sr", sr_run, "--out", out, *_mtgan_args(6, ckpt_every=1))
    assert res.exit_code == 3, (res.stderr, res.exception)
    assert "non-finite loss at iteration 3" in res.stderr and "d_reg_real=nan" in res.stderr
    assert "last good checkpoint" in res.stderr
    ckpt = _state(out / "checkpoint.pt")
    assert ckpt["step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["generator"].values() if v.is_floating_point())
    assert not (out / "manifest.json").exists() and not (out / "model.pt").exists()


def test_mismatched_stores_are_refused(stores, sr_run, tmp_path, cli):
    hr, lr = stores
    other_hr = write_hr(tmp_path / "other.h5", seed=5)
    res = cli("train", "sr", "--hr", other_hr, "--lr", lr, "--out", tmp_path / "x", *TINY_SR)
    assert res.exit_code == 2 and "was not made from HR store" in res.stderr and str(lr) in res.stderr
    cats = [dict(c) for c in CATS]
    cats[1]["name"] = "zigzag"
    bad_lr = write_lr(hr, tmp_path / "bad_lr.h5", categories=cats)
    res = cli("train", "mtgan", "--hr", hr, "--lr", bad_lr, "--sr", sr_run, "--out", tmp_path / "y", *_mtgan_args(2))
    assert res.exit_code == 2 and "categories disagree" in res.stderr
    res = cli("train", "mtgan", "--hr", hr, "--lr", lr, "--sr", tmp_path, "--out", tmp_path / "z", *_mtgan_args(2))
    assert res.exit_code == 2 and "manifest.json" in res.stderr
    res = cli("train", "mtgan", "--hr", hr, "--lr", lr, "--sr", sr_run, "--out", sr_run, *_mtgan_args(2))
    assert res.exit_code == 2 and "is not a checkpoint of `sodtool train mtgan`" in res.stderr
    assert (sr_run / "manifest.json").exists()
    res = cli("train", "sr", "--hr", hr, "--lr", lr, "--out", tmp_path / "w", *TINY_SR, "--batch-size", "64")
    assert res.exit_code == 2 and "fewer than one batch" in res.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "w" / "manifest.json").exists()


def test_held_out_rows_are_whole_images():
    # Rows of one image (its ROIs, jittered copies of one ground-truth box) never fall on both
    # sides of the split; the split depends only on (image ids, fraction, cap, seed).
    from sodtool.srdata import split_rows

    rng = np.random.default_rng(3)
    image_ids = np.repeat(rng.permutation(200), rng.integers(1, 12, 200))  # 1-11 rows per image, in runs
    train, held = split_rows(image_ids, 0.05, 256, 0)
    assert len(train) + len(held) == len(image_ids) and not set(train) & set(held)
    assert not set(image_ids[train]) & set(image_ids[held])
    assert abs(len(held) - 0.05 * len(image_ids)) <= 11  # within one image of the fraction
    again = split_rows(image_ids, 0.05, 256, 0)
    assert np.array_equal(again[1], held) and np.array_equal(again[0], train)
    assert not np.array_equal(split_rows(image_ids, 0.05, 256, 1)[1], held)
    _, capped = split_rows(image_ids, 0.5, 30, 0)
    assert 0 < len(capped) <= 30
    assert len(split_rows(np.zeros(10, np.int64), 0.5, 256, 0)[1]) == 0  # one image: nothing to hold out


class _Recorder(torch.nn.Module):
    """Passes batches to `inner` and keeps each input (detached)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.seen = inner, []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.inner(x)


def _tiny_gan(seed: int = 0):
    from sodtool.models.networks import Discriminator, Generator

    torch.manual_seed(seed)
    return Generator(8, 8, 1), Discriminator(K, "resnet18")


def test_d_sees_real_and_fake_crops_as_one_batch():
    # One forward of 2B rows (HR first, then SR) in the D step and in the G step: BatchNorm
    # normalises real and fake crops with the same statistics, as at test time.
    from sodtool.losses import LossWeights
    from sodtool.stages.train_mtgan import train_step

    g, d = _tiny_gan()
    rec = _Recorder(d)
    opt_g = torch.optim.Adam(g.parameters(), 1e-4)
    d_params = [p for p in d.parameters() if p.requires_grad]
    opt_d = torch.optim.AdamW(d_params, 1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt_d, 10)
    b = 4
    x, y = torch.rand(b, 3, LR_SIZE, LR_SIZE), torch.rand(b, 3, HR, HR)
    u, v = torch.tensor([0, 1, 2, 3]), torch.zeros(b, 4)
    train_step(g, rec, d_params, opt_g, opt_d, sched, x, y, u, v, LossWeights(), torch.device("cpu"))
    assert [t.shape[0] for t in rec.seen] == [2 * b, 2 * b]
    for t in rec.seen:
        assert torch.equal(t[:b], y)


def test_validation_feeds_d_what_rescoring_feeds_it():
    # Held-out D accuracy is measured on exactly the images `eval` rescoring gives D: G's output
    # unclamped (as in training), the same bicubic upsampling, and the same memory layout
    # (channels_last, which changes the order of oneDNN's sums).
    from sodtool.rescoring import BicubicControl, MtganScorer, score_rois
    from sodtool.srdata import HeldOut
    from sodtool.stages.train_mtgan import evaluate_discriminator

    g, d = _tiny_gan(1)
    with torch.no_grad():
        g.tail.bias.fill_(0.8)  # outputs well above 1: a clamp would change them
    g.eval()
    d.eval()
    rec = _Recorder(d)
    n = 6
    lr = (torch.rand(n, 3, LR_SIZE, LR_SIZE) * 255).to(torch.uint8)
    held = HeldOut(np.arange(n), lr, torch.zeros(n, 3, HR, HR, dtype=torch.uint8), np.ones(n, bool))
    evaluate_discriminator(g, rec, held, torch.tensor([0, 1, 2, 3, 1, 2]), torch.device("cpu"), batch_size=n)
    validation = rec.seen[1:]  # [0] is the HR batch
    rec.seen = []
    score_rois([MtganScorer("mtgan", g, rec), BicubicControl("bicubic", rec)], lr, torch.device("cpu"), n,
               np.zeros(0, np.int64))
    assert len(validation) == len(rec.seen) == 2
    assert validation[0].max() > 1.0
    for a, b in zip(validation, rec.seen):
        assert torch.equal(a, b)
        assert a.is_contiguous(memory_format=torch.channels_last)
        assert b.is_contiguous(memory_format=torch.channels_last)


class _BrightIsClassOne(torch.nn.Module):
    """A stand-in D: class 1 for a crop brighter than 0.5 on average, else class 2."""

    def forward(self, x):
        from sodtool.models.networks import DiscOut

        bright = x.float().mean(dim=(1, 2, 3)) > 0.5
        cls = torch.zeros(len(x), K + 1)
        cls[bright, 1] = 1.0
        cls[~bright, 2] = 1.0
        return DiscOut(torch.zeros(len(x)), cls, torch.zeros(len(x), 4))


def test_held_out_accuracy_on_the_crops_eval_reads():
    # "read": D's answer on the HR crop for a window wider than the LR crop, on G's output for the
    # others, as `eval` rescores them (rescoring.reads_hr).
    from sodtool.srdata import HeldOut
    from sodtool.stages.train_mtgan import evaluate_discriminator

    g, _ = _tiny_gan(1)
    with torch.no_grad():
        g.tail.bias.fill_(0.8)  # SR crops bright: class 1; the HR crops below are black: class 2
    n = 4
    lr = torch.zeros(n, 3, LR_SIZE, LR_SIZE, dtype=torch.uint8)
    held = HeldOut(np.arange(n), lr, torch.zeros(n, 3, HR, HR, dtype=torch.uint8), np.ones(n, bool))
    labels = torch.tensor([1, 2, 1, 2])
    sides = np.array([LR_SIZE - 1, LR_SIZE + 1, LR_SIZE, 3.0 * LR_SIZE], np.float32)  # wide: rows 1 and 3
    res = evaluate_discriminator(g, _BrightIsClassOne(), held, labels, torch.device("cpu"), batch_size=3,
                                 window_sides=sides)
    assert res["val_d_cls_acc_fg_sr"] == 0.5 and res["val_d_cls_acc_fg_hr"] == 0.5
    assert res["val_d_cls_acc_fg_read"] == 1.0 and res["val_d_cls_acc_read"] == 1.0
    assert "val_d_cls_acc_fg_read" not in evaluate_discriminator(g, _BrightIsClassOne(), held, labels,
                                                                  torch.device("cpu"))


def test_paper_preset_is_table_1_exactly(tmp_path):
    # --preset paper builds Table 1's generator (no long skip, no bicubic residual) and the
    # paper's optimisers; the CPU presets keep both additions.
    from sodtool.models.networks import Generator, generator_config
    from sodtool.stages.train_mtgan import TrainMTGANConfig
    from sodtool.stages.train_mtgan import resolve_config as resolve_mtgan
    from sodtool.stages.train_sr import TrainSRConfig, resolve_config

    kw = dict(hr=tmp_path / "a.h5", lr=tmp_path / "a_lr.h5", out=tmp_path / "sr")
    paper = resolve_config(TrainSRConfig(preset="paper", **kw))
    assert (paper.channels, paper.up_channels, paper.num_blocks) == (64, 256, 5)
    assert paper.long_skip is False and paper.residual_bicubic is False
    g = Generator(paper.channels, paper.up_channels, paper.num_blocks, long_skip=paper.long_skip,
                  residual_bicubic=paper.residual_bicubic)
    assert generator_config(g)["long_skip"] is False and generator_config(g)["residual_bicubic"] is False
    quick = resolve_config(TrainSRConfig(preset="quick", **kw))
    assert quick.long_skip is True and quick.residual_bicubic is True
    m = resolve_mtgan(TrainMTGANConfig(preset="paper", sr=tmp_path / "sr", **{**kw, "out": tmp_path / "m"}))
    assert (m.disc_arch, m.d_optimizer, m.d_lr, m.d_lr_step, m.iterations, m.d_warmup) == \
        ("resnet50", "sgd", 0.01, 40_000, 80_000, 0)


def test_train_mtgan_d_from_the_detector(stores, sr_run, tmp_path, cli):
    # --disc-init RUN/detector/model.pt: D's trunk is the detector's, loaded from it; recorded as
    # an input; a mismatch with --imagenet-weights is refused.
    from sodtool.coco import CategoryMap
    from sodtool.models.detector_weights import save_detector
    from sodtool.models.frcnn import build_detector, resolve_build
    from sodtool.models.networks import discriminator_from_checkpoint

    hr, lr = stores
    build = resolve_build("resnet18_fpn", min_size=64, max_size=64)
    torch.manual_seed(0)
    det = build_detector("resnet18_fpn", K + 1, **build)
    det_file = save_detector(tmp_path / "detector" / "model.pt", det, "resnet18_fpn", build, CategoryMap.from_json(CATS))
    out = tmp_path / "m"
    res = cli("train", "mtgan", "--hr", hr, "--lr", lr, "--sr", sr_run, "--out", out, *_mtgan_args(2),
              "--disc-init", det_file, "--disc-arch", "resnet34")
    assert res.exit_code == 0, (res.stderr, res.exception)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["disc_arch"] == "resnet18"  # the detector's trunk decides
    assert manifest["inputs"]["disc_init"]["path"].endswith("model.pt")
    d = discriminator_from_checkpoint(out / "model.pt")
    assert d.arch == "resnet18"
    # Trained for two iterations from the detector's trunk: still close to its weights.
    w_det = det.state_dict()["backbone.body.layer3.0.conv1.weight"]
    assert (d.trunk.layer3[0].conv1.weight - w_det).abs().max() < 0.05
    res = cli("train", "mtgan", "--hr", hr, "--lr", lr, "--sr", sr_run, "--out", tmp_path / "bad", *_mtgan_args(2),
              "--disc-init", det_file, "--imagenet-weights", det_file)
    assert res.exit_code == 2 and "not both" in res.stderr


def test_training_runs_in_channels_last_on_the_cpu():
    # oneDNN's convolutions are faster in channels_last on the CPU too (README, Speed).
    from sodtool.engine import use_channels_last

    conv = torch.nn.Conv2d(3, 8, 3)
    assert use_channels_last(torch.device("cpu"), conv)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
