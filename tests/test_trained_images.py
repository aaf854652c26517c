"""`eval` refuses models trained on the images it evaluates (issue 31), by image file digest.

Real artefacts, tiny: a synthetic dataset (4 train images, 2 minival, 192 px), `train detector`
(2 iterations), `crop-rois` + `downsample` of train, `train sr` and `train mtgan` (--disc-init the
detector, 2 iterations each), and test-mode stores of train and minival. Also: eval reads no
ground-truth column of a test store (scrambling them changes no byte of its outputs).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from sodtool.errors import InputError

K, HR = 3, 32
GT_COLUMNS = ("label", "target", "gt_box", "iou")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:20]


def _split_files(data: Path, split: str) -> dict[int, Path]:
    ann = json.loads((data / "annotations" / f"instances_{split}.json").read_text())
    return {im["id"]: data / "images" / split / im["file_name"] for im in ann["images"]}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from sodtool.stages.crop_rois import CropRoisConfig, crop_rois
    from sodtool.stages.downsample import DownsampleConfig, downsample
    from sodtool.stages.synth import SynthConfig, synthesize
    from sodtool.stages.train_detector import TrainDetectorConfig, train_detector
    from sodtool.stages.train_mtgan import TrainMTGANConfig, train_mtgan
    from sodtool.stages.train_sr import TrainSRConfig, train_sr

    root = tmp_path_factory.mktemp("trained")
    data, run = root / "data", root / "run"
    synth = dict(out=data, train_images=4, minival_images=2, image_size=192, classes=K, objects_per_image=(3, 4),
                 distractors_per_image=(0, 1), seed=5)
    if "val_images" in {f.name for f in dataclasses.fields(SynthConfig)}:
        synth["val_images"] = 1
    synthesize(SynthConfig(**synth))
    train_detector(TrainDetectorConfig(data=data, out=run / "detector", iterations=2, batch_size=2, min_size=64,
                                       max_size=64, fpn_channels=16, anchor_sizes=(8, 16, 32, 64), roi_batch_size=16,
                                       device="cpu", log_every=1, eval=False))
    det = run / "detector" / "model.pt"
    crop = dict(data=data, detector_weights=det, hr_size=HR, context=1.5, device="cpu")
    crop_rois(CropRoisConfig(out=run / "rois_train.h5", split="train", mode="train", **crop))
    downsample(DownsampleConfig(src=run / "rois_train.h5"))
    test = dict(mode="test", score_thresh=0.0, max_rois=8, **crop)
    crop_rois(CropRoisConfig(out=run / "test_train.h5", split="train", **test))
    crop_rois(CropRoisConfig(out=run / "rois_minival.h5", split="minival", **test))
    pair = dict(hr=run / "rois_train.h5", lr=run / "rois_train_lr.h5")
    train_sr(TrainSRConfig(out=run / "sr", iterations=2, batch_size=4, channels=8, up_channels=8, num_blocks=1,
                           val_every=2, log_every=1, checkpoint_every=2, device="cpu", **pair))
    train_mtgan(TrainMTGANConfig(sr=run / "sr", out=run / "mtgan", iterations=2, batch_size=4, d_warmup=0,
                                 d_lr_step=3, log_every=1, checkpoint_every=2, sample_every=2, val_every=2,
                                 device="cpu", disc_init=det, **pair))
    return {"root": root, "data": data, "run": run, "det": det}


def _eval(cli, world, out: Path, split: str, *extra) -> object:
    return cli("eval", "--data", world["data"], "--split", split, "--mtgan", world["run"] / "mtgan", "--out", out,
               "--no-figures", "--batch-size", "64", "--device", "cpu", *extra)


def _error_line(stderr: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("sodtool: error:")]
    assert len(errors) == 1, stderr
    assert stderr.strip().splitlines()[-1] == errors[0] and "Traceback" not in stderr
    return errors[0]


# --------------------------------------------------------------------------------------------
# The records
# --------------------------------------------------------------------------------------------


def test_every_training_records_the_images_it_learnt_from(world):
    from sodtool.store import image_digests, verify_store

    run = world["run"]
    train = {i: _digest(p) for i, p in _split_files(world["data"], "train").items()}
    minival = {i: _digest(p) for i, p in _split_files(world["data"], "minival").items()}
    assert not set(train.values()) & set(minival.values())
    for folder in ("detector", "sr", "mtgan"):
        rec = json.loads((run / folder / "trained_images.json").read_text())
        assert rec["sha"] == sorted(set(train.values())) and rec["count"] == 4 and rec["unrecorded"] == [], folder
        assert "trained_images.json" in json.loads((run / folder / "manifest.json").read_text())["outputs"], folder
    # crop-rois: every image cropped, by id; the record is outside the content digest.
    assert image_digests(run / "rois_train.h5") == train
    assert image_digests(run / "test_train.h5") == train
    assert image_digests(run / "rois_minival.h5") == minival
    verify_store(run / "rois_minival.h5")


# --------------------------------------------------------------------------------------------
# eval
# --------------------------------------------------------------------------------------------


def test_eval_on_the_training_split_is_refused(world, cli, tmp_path):
    run = world["run"]
    out = tmp_path / "e"
    res = _eval(cli, world, out, "train", "--rois", run / "test_train.h5", "--pretrained-g", run / "sr",
                "--ablation", f"again={run / 'mtgan'}")
    assert res.exit_code == 2, (res.stderr, res.exception)
    line = _error_line(res.stderr)
    assert f"MTGAN {run / 'mtgan'} was trained on 4 of the 4 images of split 'train' being evaluated" in line
    assert "image file digests match" in line and "--allow-trained-images" in line
    # every model trained on them is named: the ablation, the pretrained G, the store's detector
    assert "ablation 'again'" in line and f"--pretrained-g {run / 'sr'}" in line and f"detector {world['det']}" in line
    assert not out.exists()


def test_a_copy_of_the_train_images_under_another_name_is_refused(world, cli, tmp_path):
    data = tmp_path / "copy"
    shutil.copytree(world["data"] / "images" / "train", data / "images" / "holdout")
    (data / "annotations").mkdir(parents=True)
    shutil.copy(world["data"] / "annotations" / "instances_train.json", data / "annotations" / "instances_holdout.json")
    out = tmp_path / "e"
    # The check comes before the detector runs: the refusal costs no inference.
    res = cli("eval", "--data", data, "--split", "holdout", "--mtgan", world["run"] / "mtgan", "--detector",
              world["det"], "--out", out, "--no-figures", "--device", "cpu")
    assert res.exit_code == 2, (res.stderr, res.exception)
    line = _error_line(res.stderr)
    assert "was trained on 4 of the 4 images of split 'holdout'" in line and f"detector {world['det']}" in line
    assert not out.exists()


def test_allow_trained_images_evaluates_and_says_so(world, cli, tmp_path):
    out = tmp_path / "e"
    res = _eval(cli, world, out, "train", "--rois", world["run"] / "test_train.h5", "--allow-trained-images")
    assert res.exit_code == 0, (res.stderr, res.exception)
    assert "--allow-trained-images: evaluating anyway" in res.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["trained_overlap"] == {"images": 4, "of": 4, "models": ["mtgan", "detector"]}
    table = (out / "table.md").read_text()
    assert "These figures include 4 of the 4 images evaluated that the models were trained on" in table


def test_a_held_out_split_is_evaluated(world, cli, tmp_path):
    out = tmp_path / "e"
    run = world["run"]
    res = _eval(cli, world, out, "minival", "--rois", run / "rois_minival.h5", "--pretrained-g", run / "sr")
    assert res.exit_code == 0, (res.stderr, res.exception)
    assert "cannot be checked" not in res.stderr and "trained on" not in res.stderr  # all recorded, none overlaps
    metrics = json.loads((out / "metrics.json").read_text())
    assert "trained_overlap" not in metrics
    assert "trained on" not in (out / "table.md").read_text()


def test_artefacts_without_a_record_only_warn(world, cli, tmp_path):
    run = world["run"]
    old = tmp_path / "mtgan_old"
    shutil.copytree(run / "mtgan", old)
    (old / "trained_images.json").unlink()
    store = tmp_path / "rois_minival.h5"
    shutil.copy(run / "rois_minival.h5", store)
    with h5py.File(store, "r+") as f:
        del f["images"]  # a store written before crop-rois recorded image identities
    from sodtool.store import image_digests

    assert image_digests(store) is None
    out = tmp_path / "e"
    res = cli("eval", "--data", world["data"], "--split", "minival", "--mtgan", old, "--rois", store, "--out", out,
              "--no-figures", "--device", "cpu")
    assert res.exit_code == 0, (res.stderr, res.exception)
    assert f"MTGAN {old} records no training images" in res.stderr and "cannot be checked" in res.stderr
    # An old store of the train split: its images' identities come from the files, and the detector's record catches it.
    train_store = tmp_path / "test_train.h5"
    shutil.copy(run / "test_train.h5", train_store)
    with h5py.File(train_store, "r+") as f:
        del f["images"]
    res = cli("eval", "--data", world["data"], "--split", "train", "--mtgan", old, "--rois", train_store,
              "--out", tmp_path / "e2", "--no-figures", "--device", "cpu")
    assert res.exit_code == 2
    assert f"detector {world['det']} (which made {train_store}) was trained on 4 of the 4 images" in _error_line(res.stderr)


def test_unit_overlap_rules():
    from sodtool.provenance import find_overlap

    evaluated = {1: "a", 2: "b", 3: "c"}
    rec = {"sha": ["b", "z"], "unrecorded": []}
    assert find_overlap(evaluated, [("m", "MTGAN m", {"sha": ["z"], "unrecorded": []})], "s", False) is None
    assert find_overlap(evaluated, [("m", "MTGAN m", None)], "s", False) is None  # no record: a warning only
    with pytest.raises(InputError, match=r"^MTGAN m was trained on 1 of the 3 images of split 's'"):
        find_overlap(evaluated, [("m", "MTGAN m", rec)], "s", False)
    two = [("m", "MTGAN m", rec), ("detector", "detector d", {"sha": ["c"], "unrecorded": []})]
    assert find_overlap(evaluated, two, "s", True) == {"images": 2, "of": 3, "models": ["m", "detector"]}


# --------------------------------------------------------------------------------------------
# eval reads no ground truth of a test store
# --------------------------------------------------------------------------------------------


def test_scrambled_ground_truth_columns_change_no_output(world, tmp_path):
    from sodtool.stages.eval_mtgan import RescoreConfig, rescore_eval
    from sodtool.store import ROW_FIELDS, combine_digests, verify_store

    src = world["run"] / "rois_minival.h5"
    scrambled = tmp_path / "rois_minival.h5"
    shutil.copy(src, scrambled)
    rng = np.random.default_rng(0)
    with h5py.File(scrambled, "r+") as f:
        n = f["label"].shape[0]
        new = {"label": rng.integers(0, K + 1, n), "target": rng.normal(0, 3, (n, 4)),
               "gt_box": rng.uniform(0, 192, (n, 4)), "iou": rng.uniform(0, 1, n)}
        for name in GT_COLUMNS:
            dtype, shape = ROW_FIELDS[name]
            value = new[name].astype(dtype).reshape(n, *shape)
            assert not np.array_equal(value, f[name][:]), name
            f[name][...] = value
        # The content digest as store.py computes it, so that the copy is a well-formed store.
        digests = {k: hashlib.sha256(np.ascontiguousarray(f[k][:])).hexdigest()
                   for k in f.keys() if isinstance(f[k], h5py.Dataset)}
        f.attrs["content_sha256"] = combine_digests(digests)
    verify_store(scrambled)
    with h5py.File(src, "r") as a, h5py.File(scrambled, "r") as b:
        assert set(a.attrs) == set(b.attrs)
        assert a.attrs["content_sha256"] != b.attrs["content_sha256"]

    outs = {}
    for tag, store in (("plain", src), ("scrambled", scrambled)):
        out = tmp_path / tag
        metrics = rescore_eval(RescoreConfig(mtgan=world["run"] / "mtgan", data=world["data"], split="minival",
                                             rois=store, out=out, figures=False, device="cpu", batch_size=64))
        outs[tag] = (out, metrics)
    (a, ma), (b, mb) = outs["plain"], outs["scrambled"]
    assert ma["rows"] == mb["rows"] and ma["rois"] == mb["rois"] > 0
    for row in ma["rows"]:
        assert (a / row["results"]).read_bytes() == (b / row["results"]).read_bytes(), row["name"]
