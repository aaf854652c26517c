"""`train detector --extra-data / --extra-ratio` (generated images mixed into training) and
`--weights FILE --reinit-heads` (a trunk from a detector of another class count).

CPU, tiny datasets made here (64 px images, a handful of iterations), as tests/test_detector.py.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from sodtool.coco import CategoryMap, load_split, resolve_split
from sodtool.detdata import MIX_BLOCK, DetectionDataset, MixedStepBatchSampler
from sodtool.errors import InputError
from sodtool.models.detector_weights import save_detector
from sodtool.models.ssd import build_ssd
from sodtool.provenance import split_digests
from sodtool.stages.train_detector import TrainDetectorConfig, _initial_model, resolve_train_config, train_detector
from test_detector import PLAIN_CATS, TINY, make_dataset

TWO_CATS = PLAIN_CATS[:2]
# TINY as config fields, for the tests that call the stage directly.
TINY_KW = dict(min_size=64, max_size=64, fpn_channels=16, anchor_sizes=(8, 16, 32, 64), roi_batch_size=16,
               batch_size=2, device="cpu", log_every=1, eval=False)


@pytest.fixture(scope="module")
def real_ds(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("real"), PLAIN_CATS, n_train=6, n_val=2, seed=1)


@pytest.fixture(scope="module")
def extra_ds(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("extra"), PLAIN_CATS, n_train=4, n_val=1, seed=2)


@pytest.fixture(scope="module")
def extra_ds2(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("extra2"), PLAIN_CATS, n_train=3, n_val=1, seed=3)


@pytest.fixture(scope="module")
def two_class_ds(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("two"), TWO_CATS, n_train=4, n_val=2, seed=4)


def _one_line_exit_2(res, expected: str) -> None:
    assert res.exit_code == 2, (res.stdout, res.stderr, res.exception)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sodtool: error: "), res.stderr
    assert expected in lines[0], lines[0]


def _weights(run: Path) -> dict:
    return torch.load(run / "model.pt", weights_only=True)["model"]


def _rows(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(x).items() if k != "train_time_s"}
            for x in (run / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------
# The mixed sampler
# ------------------------------------------------------------------------------------------------

def _batches(sampler, n: int) -> list:
    it = iter(sampler)
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("ratio", [0.2, 0.5, 0.8])
def test_extra_share_matches_the_ratio_and_extra_before(ratio):
    n_real, n_extra, bs, steps = 6, 4, 3, 3000
    sampler = MixedStepBatchSampler(n_real, n_extra, ratio, bs, seed=0)
    batches = _batches(sampler, steps)
    slots = steps * bs
    extra = sum(i >= n_real for b in batches for i, _ in b)
    sd = (slots * ratio * (1 - ratio)) ** 0.5
    assert abs(extra - ratio * slots) < 5 * sd
    assert extra == sampler.extra_before(slots)
    # Both pools appear, in their own index ranges, and batches mix them.
    assert {i for b in batches for i, _ in b} == set(range(n_real + n_extra))
    assert any(min(i for i, _ in b) < n_real <= max(i for i, _ in b) for b in batches)


def test_each_pool_is_walked_epoch_by_epoch():
    """Each pool's images come in permutations of the pool (every image once per pass), whatever
    the interleaving."""
    n_real, n_extra = 5, 3
    batches = _batches(MixedStepBatchSampler(n_real, n_extra, 0.4, 2, seed=7), 400)
    real = [i for b in batches for i, _ in b if i < n_real]
    extra = [i - n_real for b in batches for i, _ in b if i >= n_real]
    for seq, n in ((real, n_real), (extra, n_extra)):
        whole = len(seq) // n * n
        assert whole >= 3 * n
        assert all(sorted(seq[k:k + n]) == list(range(n)) for k in range(0, whole, n))


def test_mixed_batches_are_a_function_of_the_step():
    bs = 3
    full = _batches(MixedStepBatchSampler(6, 4, 0.3, bs, seed=5, hflip=True, vflip=True, rot90=True), 3000)
    # A resumed stream starts with the batch the uninterrupted one had at that step, also past a
    # block of choices (MIX_BLOCK slots) and inside a batch that straddles one.
    for start in (1, 17, MIX_BLOCK // bs - 1, MIX_BLOCK // bs, 2 * MIX_BLOCK // bs + 1):
        later = _batches(MixedStepBatchSampler(6, 4, 0.3, bs, seed=5, start_step=start, hflip=True, vflip=True,
                                               rot90=True), 3)
        assert later == full[start:start + 3], start
    other = _batches(MixedStepBatchSampler(6, 4, 0.3, bs, seed=6), 20)
    assert other != full[:20]
    # Augmentations are drawn for the extra pool as for the real one.
    augs = {aug for b in full for i, aug in b if i >= 6}
    assert {a[0] for a in augs} == {False, True} and {a[2] for a in augs} == {0, 1, 2, 3}
    with pytest.raises(ValueError):
        MixedStepBatchSampler(6, 4, 1.0, bs, seed=0)


def test_dataset_indexes_real_then_extra(real_ds, extra_ds):
    real = load_split(resolve_split(real_ds, "train"))
    extra = load_split(resolve_split(extra_ds, "train"))
    ds = DetectionDataset(real, extra)
    assert len(ds) == len(real.image_ids) + len(extra.image_ids)
    img, target = ds[(len(real.image_ids) + 1, (False, False, 0))]
    iid = extra.image_ids[1]
    assert torch.equal(img, torch.from_numpy(extra.load_image(iid)).permute(2, 0, 1))
    assert torch.equal(target["boxes"], torch.from_numpy(extra.targets(iid)["boxes"]).reshape(-1, 4))
    assert target["image_id"] == iid
    img0, _ = ds[(0, (False, False, 0))]
    assert torch.equal(img0, DetectionDataset(real)[(0, (False, False, 0))][0])  # the real split as before


# ------------------------------------------------------------------------------------------------
# Training with extra data
# ------------------------------------------------------------------------------------------------

def test_extra_data_training_records_resumes_exactly_and_refuses_other_extra_data(real_ds, extra_ds, extra_ds2,
                                                                                  tmp_path):
    kw = dict(TINY_KW, data=real_ds, extra_data=(extra_ds, extra_ds2), extra_ratio=0.4, iterations=6,
              checkpoint_every=2, seed=0)
    a = train_detector(TrainDetectorConfig(out=tmp_path / "a", **kw))
    assert train_detector(TrainDetectorConfig(out=tmp_path / "b", stop_after=3, **kw)) == {"stopped_at": 3}
    b = train_detector(TrainDetectorConfig(out=tmp_path / "b", **kw))
    assert b["resumed_from_step"] == 3
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert _rows(tmp_path / "a") == _rows(tmp_path / "b")

    # The recorded count is the count of extra images in the batches the run was given.
    n_real, n_extra = 6, 4 + 3
    batches = _batches(MixedStepBatchSampler(n_real, n_extra, 0.4, 2, seed=0, hflip=False), 6)
    seen = [sum(i >= n_real for i, _ in bt) for bt in batches]
    assert 0 < sum(seen) < 12  # this seed draws both pools in six iterations
    assert a["extra_images_seen"] == sum(seen) and a["extra_images"] == n_extra and a["images_seen"] == 12
    assert [r["extra_images_seen"] for r in _rows(tmp_path / "a")] == list(np.cumsum(seen))
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["config"]["extra_data"] == [str(extra_ds), str(extra_ds2)]
    assert manifest["config"]["extra_ratio"] == 0.4
    assert manifest["metrics"]["extra_images_seen"] == sum(seen)
    assert manifest["inputs"]["extra_annotations_1"]["path"] == str(extra_ds2 / "annotations" / "instances_train.json")

    # trained_images.json holds the extra images too (eval refuses them as it refuses train images).
    record = json.loads((tmp_path / "a" / "trained_images.json").read_text())
    want = set()
    for d in (real_ds, extra_ds, extra_ds2):
        want |= set(split_digests(load_split(resolve_split(d, "train"))).values())
    assert set(record["sha"]) == want and record["count"] == 6 + 4 + 3

    # Resuming with other extra data (or another ratio) is refused like any other change.
    done = TrainDetectorConfig(out=tmp_path / "a", **kw)
    for change, field in (({"extra_data": (extra_ds,)}, "extra_data"), ({"extra_ratio": 0.3}, "extra_ratio"),
                          ({"extra_data": (), "extra_ratio": None}, "extra_data")):
        with pytest.raises(InputError, match=f"another configuration \\({field} "):
            train_detector(replace(done, **change))


def test_extra_ratio_defaults_to_half_and_budget_stays(real_ds, extra_ds):
    cfg = resolve_train_config(TrainDetectorConfig(data=real_ds, extra_data=(extra_ds,), **TINY_KW), 6)
    assert cfg.extra_ratio == 0.5 and cfg.extra_data == (str(extra_ds),)
    plain = resolve_train_config(TrainDetectorConfig(data=real_ds, **TINY_KW), 6)
    assert plain.extra_ratio is None and plain.iterations == cfg.iterations
    # --epochs counts passes over the real images: the extra pool does not lengthen the run.
    by_epochs = resolve_train_config(TrainDetectorConfig(data=real_ds, extra_data=(extra_ds,), epochs=2, **TINY_KW), 6)
    assert by_epochs.iterations == 6


def test_extra_data_bad_input_is_one_line_exit_2(cli, real_ds, extra_ds, two_class_ds, tmp_path):
    base = ["train", "detector", "--data", real_ds, "--iterations", "1", "--no-eval", *TINY]
    _one_line_exit_2(cli(*base, "--out", tmp_path / "r", "--extra-data", two_class_ds),
                     f"--extra-data {two_class_ds}: categories disagree")
    _one_line_exit_2(cli(*base, "--out", tmp_path / "r", "--extra-ratio", "0.3"),
                     "--extra-ratio is the share of --extra-data images: give --extra-data too")
    for bad in ("0", "1", "1.5", "-0.2", "nan"):
        _one_line_exit_2(cli(*base, "--out", tmp_path / "r", "--extra-data", extra_ds, "--extra-ratio", bad),
                         "--extra-ratio must be a share in (0, 1)")
    _one_line_exit_2(cli(*base, "--out", tmp_path / "r", "--extra-data", tmp_path / "nowhere"),
                     f"dataset folder not found: {tmp_path / 'nowhere'}")
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_extra_data_through_the_cli(cli, real_ds, extra_ds, extra_ds2, tmp_path):
    out = tmp_path / "r"
    res = cli("train", "detector", "--data", real_ds, "--out", out, "--iterations", "2", "--extra-data", extra_ds,
              "--extra-data", extra_ds2, "--extra-ratio", "0.5", "--no-eval", *TINY)
    assert res.exit_code == 0, res.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["extra_data"] == [str(extra_ds), str(extra_ds2)]
    assert manifest["metrics"]["extra_images"] == 7


# ------------------------------------------------------------------------------------------------
# --reinit-heads
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def three_class_model(real_ds, tmp_path_factory) -> Path:
    """A finished tiny 3-class run (two iterations: its heads are not at their initialisation)."""
    out = tmp_path_factory.mktemp("src") / "detector"
    train_detector(TrainDetectorConfig(data=real_ds, out=out, iterations=2, seed=3, **TINY_KW))
    return out / "model.pt"


def test_reinit_heads_loads_the_trunk_of_another_class_count_and_trains(cli, three_class_model, two_class_ds,
                                                                        tmp_path):
    src = torch.load(three_class_model, weights_only=True)["model"]
    cats = load_split(resolve_split(two_class_ds, "train")).categories
    cfg = resolve_train_config(TrainDetectorConfig(data=two_class_ds, weights=three_class_model, reinit_heads=True,
                                                   iterations=2, **TINY_KW), 4)
    torch.manual_seed(0)
    model, arch, build, info = _initial_model(cfg, cats)
    own = model.state_dict()
    trunk = [k for k in own if k.startswith("backbone.")]
    heads = [k for k in own if k.startswith(("rpn.", "roi_heads."))]
    assert trunk and heads and all(torch.equal(own[k], src[k]) for k in trunk)
    # (Weights: a bias starts at 0 in both and may not have moved in two iterations.)
    same_shape = [k for k in heads if k.endswith(".weight") and own[k].shape == src[k].shape]
    assert same_shape and not any(torch.equal(own[k], src[k]) for k in same_shape)
    assert own["roi_heads.box_predictor.cls_score.weight"].shape[0] == 3  # 2 classes + background
    assert info["weight_tensors_loaded"] == len(trunk) and info["weight_tensors_left"] == len(own) - len(trunk)

    # Without --reinit-heads the same file is refused, as before.
    base = ["train", "detector", "--data", two_class_ds, "--weights", three_class_model, "--iterations", "2",
            "--no-eval", *TINY]
    _one_line_exit_2(cli(*base, "--out", tmp_path / "refused"), "categories disagree")
    res = cli(*base, "--out", tmp_path / "r", "--reinit-heads")
    assert res.exit_code == 0, res.stderr
    saved = torch.load(tmp_path / "r" / "model.pt", weights_only=True)
    assert saved["num_classes"] == 3 and saved["arch"] == arch
    manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert manifest["config"]["reinit_heads"] is True
    assert manifest["metrics"]["weight_tensors_loaded"] == len(trunk)


def test_reinit_heads_applies_the_build_options_given(three_class_model, two_class_ds):
    cats = load_split(resolve_split(two_class_ds, "train")).categories
    src = torch.load(three_class_model, weights_only=True)
    cfg = resolve_train_config(TrainDetectorConfig(data=two_class_ds, weights=three_class_model, reinit_heads=True,
                                                   **{**TINY_KW, "anchor_sizes": (12, 24, 48, 96), "fpn_channels": 8}),
                               4)
    model, _, build, info = _initial_model(cfg, cats)
    assert build["anchor_sizes"] == [[12], [24], [48], [96]] and build["fpn_channels"] == 8
    body = [k for k in model.state_dict() if k.startswith("backbone.body.")]
    # A narrower FPN than the file's: its tensors stay new, the body is loaded.
    assert info["weight_tensors_loaded"] == len(body)
    assert all(torch.equal(model.state_dict()[k], src["model"][k]) for k in body)
    # Options not given keep the file's structure, not the preset's.
    cfg = resolve_train_config(TrainDetectorConfig(data=two_class_ds, weights=three_class_model, reinit_heads=True,
                                                   **{**TINY_KW, "fpn_channels": None, "anchor_sizes": None}), 4)
    assert cfg.fpn_channels is None and cfg.anchor_sizes is None
    _, _, build, _ = _initial_model(cfg, cats)
    assert build["fpn_channels"] == src["build"]["fpn_channels"] == 16
    assert build["anchor_sizes"] == src["build"]["anchor_sizes"]


def test_reinit_heads_takes_a_torchvision_state_dict_of_another_class_count(cli, two_class_ds, tmp_path):
    import torchvision

    f = tmp_path / "mobilenet_5.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None, num_classes=5).state_dict(), f)
    base = ["train", "detector", "--data", two_class_ds, "--weights", f, "--iterations", "1", "--no-eval",
            "--min-size", "64", "--max-size", "64", "--roi-batch-size", "16", "--batch-size", "2", "--device", "cpu"]
    _one_line_exit_2(cli(*base, "--out", tmp_path / "refused"), "box predictor has 5 classes, the dataset has 2+1")
    res = cli(*base, "--out", tmp_path / "r", "--reinit-heads")
    assert res.exit_code == 0, res.stderr
    metrics = json.loads((tmp_path / "r" / "manifest.json").read_text())["metrics"]
    assert metrics["weights"] == "torchvision" and metrics["weight_tensors_loaded"] > 0


def test_reinit_heads_one_stage_loads_the_backbone_only(cli, two_class_ds, tmp_path):
    torch.manual_seed(0)
    src_model = build_ssd("ssd", 4, "mobilenet_v3", 128)
    cats4 = CategoryMap(ids=(1, 2, 3, 4), names=("a", "b", "c", "d"))
    f = save_detector(tmp_path / "ssd4.pt", src_model, "mobilenet_v3", {"size": 128}, cats4, family="ssd")
    src = torch.load(f, weights_only=True)["model"]
    cats = load_split(resolve_split(two_class_ds, "train")).categories
    cfg = resolve_train_config(TrainDetectorConfig(data=two_class_ds, detector="ssd", weights=f, reinit_heads=True,
                                                   size=128, batch_size=2, device="cpu", eval=False), 4)
    torch.manual_seed(1)
    model, _, _, info = _initial_model(cfg, cats)
    own = model.state_dict()
    trunk = [k for k in own if k.startswith("backbone.")]
    assert all(torch.equal(own[k], src[k]) for k in trunk) and info["weight_tensors_loaded"] == len(trunk)
    # The regression head has the same shapes in both: new all the same.
    reg = [k for k in own if k.startswith("head.regression_head.") and k.endswith(".weight")
           and own[k].shape == src[k].shape]
    assert reg and not any(torch.equal(own[k], src[k]) for k in reg)
    res = cli("train", "detector", "--detector", "ssd", "--size", "128", "--data", two_class_ds, "--weights", f,
              "--reinit-heads", "--iterations", "1", "--batch-size", "2", "--no-eval", "--device", "cpu",
              "--out", tmp_path / "r")
    assert res.exit_code == 0, res.stderr


def test_reinit_heads_needs_weights(cli, two_class_ds, tmp_path):
    _one_line_exit_2(cli("train", "detector", "--data", two_class_ds, "--out", tmp_path / "r", "--reinit-heads",
                         *TINY), "--reinit-heads keeps the trunk of --weights: give --weights too")
