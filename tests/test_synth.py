"""The synthetic benchmark: determinism, COCO validity, size mix, atomic output, CLI errors, and the
property it exists for (a small object's class pattern does not survive 4x downsampling)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sodtool.coco import load_split, resolve_split, size_bucket
from sodtool.errors import InputError
from sodtool.stages import synth
from sodtool.stages.synth import PATTERNS, SynthConfig, render_object, synthesize

TRAIN, VAL, MINIVAL, SIZE = 40, 6, 12, 256


def _files(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under root except the manifest (it holds times)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "manifest.json"}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """One dataset made with seed 0, the same again with 2 workers, and a tiny one with seed 1."""
    base = tmp_path_factory.mktemp("synth")
    a, b, c = base / "a", base / "b", base / "c"
    m = synthesize(SynthConfig(out=a, train_images=TRAIN, val_images=VAL, minival_images=MINIVAL, image_size=SIZE, seed=0))
    synthesize(SynthConfig(out=b, train_images=TRAIN, val_images=VAL, minival_images=MINIVAL, image_size=SIZE, seed=0, workers=2))
    synthesize(SynthConfig(out=c, train_images=4, val_images=1, minival_images=2, image_size=SIZE, seed=1))
    return {"a": a, "b": b, "c": c, "metrics": m}


def test_same_seed_gives_identical_bytes_whatever_the_workers(made):
    fa, fb = _files(made["a"]), _files(made["b"])
    assert len(fa) == TRAIN + VAL + MINIVAL + 3
    assert fa == fb


def test_train_and_minival_do_not_depend_on_the_val_split(tmp_path):
    """val draws from its own seeds: its size leaves every train and minival byte unchanged, so the
    splits of the two-split benchmark are the same files as before val existed."""
    a, b = tmp_path / "a", tmp_path / "b"
    synthesize(SynthConfig(out=a, train_images=3, val_images=1, minival_images=2, image_size=192, seed=4))
    synthesize(SynthConfig(out=b, train_images=3, val_images=3, minival_images=2, image_size=192, seed=4))
    fa, fb = _files(a), _files(b)
    other = {k: v for k, v in fa.items() if k.startswith(("images/train/", "images/minival/"))
             or k in ("annotations/instances_train.json", "annotations/instances_minival.json")}
    assert len(other) == 3 + 2 + 2  # images of train and minival, their two annotation files
    assert other == {k: fb[k] for k in other}
    assert len([k for k in fb if k.startswith("images/val/")]) == 3


def test_another_seed_gives_other_annotations_and_images(made):
    for split in ("train", "minival"):
        ann = f"annotations/instances_{split}.json"
        assert (made["a"] / ann).read_bytes() != (made["c"] / ann).read_bytes()
    fa, fc = _files(made["a"]), _files(made["c"])
    first = "images/train/00000001.jpg"
    assert fa[first] != fc[first]


def test_loads_through_coco_layer_with_boxes_inside_images(made):
    for split, n in (("train", TRAIN), ("minival", MINIVAL)):
        s = load_split(resolve_split(made["a"], split))
        assert len(s.image_ids) == n
        assert s.categories.ids == tuple(range(1, 11))
        assert s.categories.names == PATTERNS[:10]
        iid = s.image_ids[0]
        assert s.load_image(iid).shape == (SIZE, SIZE, 3)
        for a in s.coco.dataset["annotations"]:
            x, y, w, h = a["bbox"]
            assert all(isinstance(v, int) for v in (x, y, w, h))
            assert w >= synth.MIN_SIDE and h >= synth.MIN_SIDE
            assert x >= 0 and y >= 0 and x + w <= SIZE and y + h <= SIZE
            assert a["area"] == w * h
            assert 0.0 <= a["occlusion"] <= synth.MAX_OCCLUSION
            assert max(w, h) <= synth.MAX_SIDE_FRACTION * SIZE
        t = s.targets(iid)
        assert t["boxes"].shape[1] == 4 and (t["labels"] >= 1).all() and (t["labels"] <= 10).all()


def test_size_mix_follows_coco_buckets(made):
    areas = []
    for split in ("train", "minival"):
        data = json.loads((made["a"] / f"annotations/instances_{split}.json").read_text())
        areas += [a["area"] for a in data["annotations"]]
    n = len(areas)
    assert n >= 300
    frac = {b: sum(size_bucket(x) == b for x in areas) / n for b in ("small", "medium", "large")}
    # 3 binomial standard deviations at n ~ 400 is about 0.075.
    tol = 3 * np.sqrt(0.4 * 0.6 / n)
    assert abs(frac["small"] - 0.40) < tol
    assert abs(frac["medium"] - 0.35) < tol
    assert abs(frac["large"] - 0.25) < tol
    sides = np.sqrt(areas)
    assert sides.min() >= 6
    # Metrics agree with the files.
    m = made["metrics"]["splits"]
    assert m["train"]["objects"] + m["minival"]["objects"] == n
    assert sum(m["train"]["sizes"].values()) == m["train"]["objects"]


def test_train_val_and_minival_are_disjoint(made):
    f = _files(made["a"])
    images = {s: {v for k, v in f.items() if k.startswith(f"images/{s}/")} for s in synth.SPLITS}
    assert {s: len(v) for s, v in images.items()} == {"train": TRAIN, "val": VAL, "minival": MINIVAL}
    ids = {}
    for split in synth.SPLITS:
        data = json.loads((made["a"] / f"annotations/instances_{split}.json").read_text())
        ids[split] = {im["id"] for im in data["images"]}
    for x, y in (("train", "val"), ("train", "minival"), ("val", "minival")):
        assert not images[x] & images[y] and not ids[x] & ids[y]


def test_manifest_is_written_and_no_temporary_folder_is_left(made):
    m = json.loads((made["a"] / "manifest.json").read_text())
    assert m["stage"] == synth.STAGE and m["seed"] == 0
    assert m["config"]["train_images"] == TRAIN and m["config"]["image_size"] == SIZE
    assert not [p for p in made["a"].parent.iterdir() if p.name.endswith(".tmp")]


def _pattern_energy_kept(kind: str, side: int, seed: int) -> float:
    """RMS of the class pattern after 4x bicubic down + up, over its RMS at full resolution."""
    body, ink = np.array([200, 60, 60], np.float32), np.array([30, 30, 30], np.float32)
    pat, _ = render_object(kind, "rectangle", side, side, np.random.default_rng(seed), body, ink)
    plain, _ = render_object(kind, "rectangle", side, side, np.random.default_rng(seed), body, body)

    def downup(x):
        return np.stack([np.asarray(Image.fromarray(x[..., c], "F").resize((side // 4, side // 4), Image.BICUBIC)
                                    .resize((side, side), Image.BICUBIC)) for c in range(3)], -1)

    m = side // 8

    def centred(x):
        x = x[m:-m, m:-m]
        return x - x.mean(axis=(0, 1))

    hr, lr = centred(pat - plain), centred(downup(pat) - downup(plain))
    return float(np.sqrt((lr**2).mean() / (hr**2).mean()))


@pytest.mark.parametrize("kind", PATTERNS)
def test_small_object_pattern_is_lost_at_low_resolution_large_one_kept(kind):
    small = np.mean([_pattern_energy_kept(kind, 16, s) for s in range(3)])
    large = np.mean([_pattern_energy_kept(kind, 128, s) for s in range(3)])
    assert small < 0.2, f"{kind}: {small:.2f} of the pattern survives 4x downsampling at 16 px"
    assert large > 0.6, f"{kind}: only {large:.2f} of the pattern survives 4x downsampling at 128 px"


def test_classes_share_colours_and_silhouettes():
    """Same draws, two classes: identical alpha and mean colour close; only the pattern differs."""
    a_col, a_alpha = render_object("stripes-h", "ellipse", 40, 30, np.random.default_rng(5))
    b_col, b_alpha = render_object("dots", "ellipse", 40, 30, np.random.default_rng(5))
    assert np.array_equal(a_alpha, b_alpha)
    assert np.abs(a_col - b_col).max() > 50  # the patterns differ
    ma = a_col.sum(axis=(0, 1)) / a_alpha.sum()
    mb = b_col.sum(axis=(0, 1)) / b_alpha.sum()
    assert np.abs(ma - mb).max() < 25  # ... their mean colour hardly does


def test_failed_run_leaves_previous_output_intact(tmp_path, monkeypatch):
    out = tmp_path / "d"
    synthesize(SynthConfig(out=out, train_images=2, val_images=1, minival_images=1, image_size=192))
    before = _files(out)
    calls = {"n": 0}
    real = synth._make_one

    def boom(job):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("killed")
        return real(job)

    monkeypatch.setattr(synth, "_make_one", boom)
    with pytest.raises(RuntimeError):
        synthesize(SynthConfig(out=out, train_images=5, val_images=1, minival_images=1, image_size=192, seed=3))
    assert _files(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_refuses_foreign_non_empty_folder_unless_overwrite(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="--overwrite"):
        synthesize(SynthConfig(out=out, train_images=1, val_images=1, minival_images=1, image_size=192))
    assert (out / "notes.txt").read_text() == "keep me"
    synthesize(SynthConfig(out=out, train_images=1, val_images=1, minival_images=1, image_size=192, overwrite=True))
    assert not (out / "notes.txt").exists() and (out / "manifest.json").is_file()
    # A previous synth output is replaced without --overwrite.
    synthesize(SynthConfig(out=out, train_images=2, val_images=1, minival_images=1, image_size=192))
    assert len(list((out / "images" / "train").iterdir())) == 2


@pytest.mark.parametrize("kw, needle", [
    ({"preset": "huge"}, "preset"),
    ({"classes": 0}, "--classes"),
    ({"classes": 13}, "--classes"),
    ({"image_size": 100}, "--image-size"),
    ({"train_images": 0}, "--train-images"),
    ({"workers": 0}, "--workers"),
    ({"seed": -1}, "--seed"),
])
def test_bad_options_are_input_errors(tmp_path, kw, needle):
    with pytest.raises(InputError, match=needle):
        synthesize(SynthConfig(out=tmp_path / "x", **kw))
    assert not (tmp_path / "x").exists()


def test_cli_writes_a_dataset(cli, tmp_path):
    out = tmp_path / "s"
    res = cli("--quiet", "data", "synth", "--out", out, "--train-images", 3, "--val-images", 2, "--minival-images", 2,
              "--image-size", 192, "--classes", 4, "--seed", 7)
    assert res.exit_code == 0, res.stderr
    data = json.loads((out / "annotations/instances_minival.json").read_text())
    assert [c["name"] for c in data["categories"]] == ["stripes-h", "stripes-v", "stripes-d", "stripes-a"]
    assert len(data["images"]) == 2
    assert json.loads((out / "manifest.json").read_text())["config"]["classes"] == 4


@pytest.mark.parametrize("args, needle", [
    (["--classes", "0"], "--classes must be between 1 and 12"),
    (["--preset", "huge"], "unknown preset 'huge'"),
])
def test_cli_bad_value_exits_2_with_one_line(cli, tmp_path, args, needle):
    res = cli("data", "synth", "--out", tmp_path / "s", *args)
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sodtool: error:") and needle in lines[0]


def test_never_replaces_the_folder_it_runs_in(tmp_path, monkeypatch):
    out = tmp_path / "proj"
    (out / "src").mkdir(parents=True)
    monkeypatch.chdir(out / "src")
    with pytest.raises(InputError, match="current or home folder"):
        synthesize(SynthConfig(out=out, train_images=1, val_images=1, minival_images=1, image_size=192, overwrite=True))
    assert (out / "src").is_dir()


def test_large_preset_keeps_the_bench_objects_at_their_pixel_sizes(tmp_path):
    """`--preset large`: 2048 px images whose objects have the bench's sizes in pixels (sides at
    most 192 = 60% of 320), about 50 per image; the quick and bench presets keep their geometry."""
    cfg = synth.resolve_config(SynthConfig(preset="large"))
    assert (cfg.image_size, cfg.objects_per_image, cfg.max_object_side) == (2048, (40, 60), 192)
    assert synth.resolve_config(SynthConfig(preset="bench")).max_object_side is None
    # A shrunken large image (same caps) draws objects no larger than the cap, in every bucket.
    out = tmp_path / "large"
    m = synthesize(SynthConfig(out=out, preset="large", train_images=2, val_images=1, minival_images=1,
                               image_size=1024, seed=0))
    split = load_split(resolve_split(out, "train"))
    sides = [max(a["bbox"][2], a["bbox"][3]) for a in split.coco.dataset["annotations"]]
    assert max(sides) <= 192 and len(sides) >= 2 * 40 - 5  # at most a few placements dropped
    assert {size_bucket(a["area"]) for a in split.coco.dataset["annotations"]} == {"small", "medium", "large"}
    assert m["splits"]["train"]["objects_per_image"] >= 35
    with pytest.raises(InputError, match="max_object_side must be at least 96"):
        synth.resolve_config(SynthConfig(max_object_side=64))
