"""The HDF5 ROI store: writer, schema checks, loader (shuffling, epochs, ranks, workers), downsample."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sodtool import store as S
from sodtool.artefacts import file_identity
from sodtool.coco import CategoryMap
from sodtool.errors import InputError

CATS = [{"id": 1, "name": "car"}, {"id": 3, "name": "truck"}, {"id": 7, "name": "bus"}]


def random_rows(n: int, size: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    """Every field of an HR store, random but well-formed."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 200, (n, 2)).astype(np.float32)
    wh = rng.uniform(4, 60, (n, 2)).astype(np.float32)
    roi = np.concatenate([xy, xy + wh], 1)
    return {
        "hr": rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8),
        "label": rng.integers(0, 4, n).astype(np.int64),
        "target": rng.normal(0, 0.1, (n, 4)).astype(np.float32),
        "roi": roi,
        "gt_box": roi + rng.normal(0, 1, (n, 4)).astype(np.float32),
        "iou": rng.uniform(0, 1, n).astype(np.float32),
        "image_id": np.sort(rng.integers(1, 20, n)).astype(np.int64),
        "score": rng.uniform(0, 1, n).astype(np.float32),
        "det_label": rng.integers(0, 4, n).astype(np.int64),
        "window": roi * 1.1,
        "source": rng.integers(0, 2, n).astype(np.uint8),
    }


def hr_attrs(size: int = 16, categories=CATS) -> dict:
    return {"categories": categories, "hr_size": size, "context": 1.5, "mode": "train", "split": "train",
            "detector": {"family": "frcnn", "kind": "test"}, "annotations": {"path": "ann.json", "sha256": "x"},
            "image_dir": "images/train"}


def write_hr(path: Path, n: int = 203, size: int = 16, batches=(5, 13, 1, 30), seed: int = 0, categories=CATS,
             chunk_rows: int = S.CHUNK_ROWS) -> dict[str, np.ndarray]:
    rows = random_rows(n, size, seed)
    with S.StoreWriter(path, schema=S.SCHEMA, fields=S.hr_fields(size), attrs=hr_attrs(size, categories),
                       chunk_rows=chunk_rows) as w:
        start, k = 0, 0
        while start < n:
            b = batches[k % len(batches)]
            w.append(**{f: v[start:start + b] for f, v in rows.items()})
            start += b
            k += 1
    return rows


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path, dict]:
    """An HR store of 203 rows (16 px crops) and its LR twin."""
    from sodtool.console import set_quiet
    from sodtool.stages.downsample import DownsampleConfig, downsample

    set_quiet(True)
    d = tmp_path_factory.mktemp("pair")
    rows = write_hr(d / "rois_train.h5")
    downsample(DownsampleConfig(src=d / "rois_train.h5"))
    return d / "rois_train.h5", d / "rois_train_lr.h5", rows


# ------------------------------------------------------------------------------------------
# Writer and schema


def test_round_trip_every_field_and_attribute(tmp_path):
    path = tmp_path / "rois_train.h5"
    rows = write_hr(path)
    with S.open_store(path) as f:
        assert set(f.keys()) == set(S.hr_fields(16))
        for k, v in rows.items():
            assert f[k].dtype == v.dtype, k
            np.testing.assert_array_equal(f[k][:], v, err_msg=k)
        assert f["hr"].chunks[0] == S.CHUNK_ROWS and f["hr"].compression == "lzf"
        assert S.attr_str(f, "schema") == S.SCHEMA
        assert S.attr_json(f, "categories") == CATS
        assert int(f.attrs["hr_size"]) == 16 and float(f.attrs["context"]) == 1.5
        for k in ("mode", "split", "image_dir"):
            assert S.attr_str(f, k) == hr_attrs()[k]
        assert S.attr_json(f, "detector") == hr_attrs()["detector"]
        assert S.attr_json(f, "annotations") == hr_attrs()["annotations"]
        assert int(f.attrs["rows"]) == 203
        assert set(S.HR_ATTRS) <= set(f.attrs)
        # The digest is of the content, not of the batching.
        digests = {k: hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest() for k, v in rows.items()}
        assert S.attr_str(f, "content_sha256") == S.combine_digests(digests)
    other = tmp_path / "other.h5"
    write_hr(other, batches=(64,))
    assert S.store_info(other)["content_sha256"] == S.store_info(path)["content_sha256"]
    assert S.store_categories(path) == CategoryMap.from_json(CATS)
    info = S.store_info(path)
    assert info["num_rows"] == 203 and info["image_size"] == 16 and info["categories"] == CATS


def test_empty_store_round_trip(tmp_path):
    path = tmp_path / "empty.h5"
    with S.StoreWriter(path, schema=S.SCHEMA, fields=S.hr_fields(16), attrs=hr_attrs()):
        pass
    with S.open_store(path) as f:
        assert f["hr"].shape == (0, 3, 16, 16) and int(f.attrs["rows"]) == 0


def test_other_schema_refused(tmp_path, cli):
    bad = tmp_path / "rois_train.h5"
    with h5py.File(bad, "w") as f:
        f.attrs["schema"] = "sodtool.rois/0"
        f.create_dataset("hr", data=np.zeros((1, 3, 8, 8), np.uint8))
    with pytest.raises(InputError, match=r"rois_train\.h5 has schema 'sodtool\.rois/0', expected 'sodtool\.rois/2'"):
        S.open_store(bad)
    res = cli("downsample", bad)
    assert res.exit_code == 2
    assert "sodtool: error:" in res.stderr and str(bad) in res.stderr and "sodtool.rois/0" in res.stderr
    not_h5 = tmp_path / "notes.h5"
    not_h5.write_text("hello")
    res = cli("downsample", not_h5)
    assert res.exit_code == 2 and "not a readable HDF5 file" in res.stderr
    res = cli("downsample", tmp_path / "missing.h5")
    assert res.exit_code == 2 and "ROI store not found" in res.stderr


def test_lr_store_refused_where_hr_expected(pair, cli):
    hr, lr, _ = pair
    res = cli("downsample", lr, "--out", lr.with_name("x.h5"))
    assert res.exit_code == 2 and "sodtool.rois-lr/1" in res.stderr and "low-resolution twin" in res.stderr
    with pytest.raises(InputError, match="expected 'sodtool.rois-lr/1'"):
        S.RoiPairs(hr, hr)


def test_writer_exception_leaves_no_file_and_keeps_old(tmp_path):
    path = tmp_path / "rois_train.h5"
    write_hr(path, n=10)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    rows = random_rows(40, seed=5)
    with pytest.raises(RuntimeError):
        with S.StoreWriter(path, schema=S.SCHEMA, fields=S.hr_fields(16), attrs=hr_attrs()) as w:
            w.append(**rows)
            raise RuntimeError("killed")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rois_train.h5"]


def test_killed_writer_leaves_no_store(tmp_path):
    """SIGKILL in the middle of writing: nothing named rois_train.h5 appears."""
    path = tmp_path / "rois_train.h5"
    script = textwrap.dedent(f"""
        import time, numpy as np, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_store import random_rows, hr_attrs
        from sodtool import store as S
        with S.StoreWriter({str(path)!r}, schema=S.SCHEMA, fields=S.hr_fields(16), attrs=hr_attrs()) as w:
            while True:
                w.append(**random_rows(64))
                print("appended", flush=True)
                time.sleep(0.05)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(3):
            assert proc.stdout.readline().startswith("appended")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not path.exists()
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert all(n.startswith(".rois_train.h5.") and n.endswith(".tmp") for n in leftovers)


# ------------------------------------------------------------------------------------------
# Dataset and loader


def _epoch(loader) -> list[np.ndarray]:
    return [b["index"].numpy() for b in loader]


def test_dataset_rows_and_batches(pair):
    hr, lr, rows = pair
    ds = S.RoiPairs(hr, lr)
    assert len(ds) == 203
    item = ds[17]
    np.testing.assert_array_equal(item["hr"].numpy(), rows["hr"][17])
    assert item["lr"].shape == (3, 4, 4) and item["label"].item() == rows["label"][17]
    idx = [150, 3, 77, 4, 5, 202]
    batch = ds[idx]
    np.testing.assert_array_equal(batch["hr"].numpy(), rows["hr"][idx])
    np.testing.assert_array_equal(batch["target"].numpy(), rows["target"][idx])
    np.testing.assert_array_equal(batch["index"].numpy(), idx)
    with h5py.File(lr) as f:
        np.testing.assert_array_equal(batch["lr"].numpy(), f["lr"][:][idx])
    # Plain DataLoader with default collate goes through __getitems__.
    dl = torch.utils.data.DataLoader(ds, batch_size=7)
    first = next(iter(dl))
    np.testing.assert_array_equal(first["hr"].numpy(), rows["hr"][:7])


def test_loader_shapes_and_every_row_once(pair):
    hr, lr, rows = pair
    loader = S.make_loader(hr, lr, batch_size=16, shuffle=True, seed=3)
    assert len(loader) == 13
    batches = list(loader)
    b = batches[0]
    assert b["hr"].shape == (16, 3, 16, 16) and b["hr"].dtype == torch.uint8
    assert b["lr"].shape == (16, 3, 4, 4) and b["lr"].dtype == torch.uint8
    assert b["label"].dtype == torch.int64 and b["label"].shape == (16,)
    assert b["target"].dtype == torch.float32 and b["target"].shape == (16, 4)
    assert b["index"].dtype == torch.int64
    seen = np.concatenate([x["index"].numpy() for x in batches])
    assert sorted(seen.tolist()) == list(range(203))
    assert not np.array_equal(seen, np.arange(203))  # shuffled
    for x in batches:  # rows match their index
        i = x["index"].numpy()
        np.testing.assert_array_equal(x["hr"].numpy(), rows["hr"][i])
        np.testing.assert_array_equal(x["label"].numpy(), rows["label"][i])
    # Chunk-aware: rows are shuffled within windows of `window_chunks` consecutive chunks of the
    # shuffled chunk order; with a window of one batch, a batch of 16 reads at most 16/8 chunks
    # (+1 where it straddles windows).
    narrow = S.make_loader(hr, lr, batch_size=16, shuffle=True, seed=3, window_chunks=2)
    for x in narrow:
        assert len(np.unique(x["index"].numpy() // S.CHUNK_ROWS)) <= 16 // S.CHUNK_ROWS + 2


def test_loader_epochs_seeds_determinism(pair):
    hr, lr, _ = pair
    a = S.make_loader(hr, lr, batch_size=16, shuffle=True, seed=3)
    b = S.make_loader(hr, lr, batch_size=16, shuffle=True, seed=3)
    c = S.make_loader(hr, lr, batch_size=16, shuffle=True, seed=4)
    e0 = np.concatenate(_epoch(a))
    assert np.array_equal(e0, np.concatenate(_epoch(b)))
    assert not np.array_equal(e0, np.concatenate(_epoch(c)))
    a.set_epoch(1)
    e1 = np.concatenate(_epoch(a))
    assert sorted(e1.tolist()) == list(range(203)) and not np.array_equal(e0, e1)
    a.set_epoch(0)
    assert np.array_equal(np.concatenate(_epoch(a)), e0)
    # Resuming mid-epoch gives the rest of the same epoch.
    full = _epoch(a)
    rest = [x["index"].numpy() for x in a.iter_from(5)]
    assert len(rest) == len(full) - 5 and all(np.array_equal(p, q) for p, q in zip(rest, full[5:]))
    # No shuffle: row order.
    plain = S.make_loader(hr, lr, batch_size=50, shuffle=False, seed=0)
    assert np.array_equal(np.concatenate(_epoch(plain)), np.arange(203))


def test_loader_rank_shards(pair):
    hr, lr, _ = pair
    # Even split with drop_last: disjoint, equal, cover all but the dropped tail.
    shares = [np.concatenate(_epoch(S.make_loader(hr, lr, batch_size=4, shuffle=True, seed=1, rank=r, world_size=3,
                                                  drop_last=True))) for r in range(3)]
    assert [len(s) for s in shares] == [64, 64, 64]  # 203 // 3 = 67 rows each, whole batches of 4
    allrows = np.concatenate(shares)
    assert len(np.unique(allrows)) == len(allrows)
    # Without drop_last: every row covered, equal lengths, padding repeats at most world - 1 rows.
    shares = [np.concatenate(_epoch(S.make_loader(hr, lr, batch_size=8, shuffle=True, seed=1, rank=r,
                                                  world_size=2))) for r in range(2)]
    assert len(shares[0]) == len(shares[1]) == 102
    allrows = np.concatenate(shares)
    assert set(allrows.tolist()) == set(range(203)) and len(allrows) - len(np.unique(allrows)) == 1
    # Epoch changes each rank's share too, still disjoint.
    sh = []
    for r in range(2):
        ld = S.make_loader(hr, lr, batch_size=8, shuffle=True, seed=1, rank=r, world_size=2, indices=np.arange(200))
        ld.set_epoch(2)
        sh.append(np.concatenate(_epoch(ld)))
    assert not set(sh[0].tolist()) & set(sh[1].tolist()) and set(np.concatenate(sh).tolist()) == set(range(200))


def test_loader_indices_subset(pair):
    hr, lr, _ = pair
    idx = np.arange(0, 203, 3)
    seen = np.concatenate(_epoch(S.make_loader(hr, lr, batch_size=10, shuffle=True, seed=0, indices=idx)))
    assert sorted(seen.tolist()) == idx.tolist()
    with pytest.raises(InputError, match="indices outside"):
        S.make_loader(hr, lr, batch_size=10, shuffle=True, seed=0, indices=[0, 500])


def test_loader_with_two_workers_matches_single_process(pair):
    hr, lr, rows = pair
    single = S.make_loader(hr, lr, batch_size=16, shuffle=True, seed=9)
    multi = S.make_loader(hr, lr, batch_size=16, shuffle=True, seed=9, num_workers=2)
    multi.dataset[[0, 1]]  # the main process now holds open handles; the loader must not fork them
    for epoch in range(2):
        single.set_epoch(epoch)
        multi.set_epoch(epoch)
        got = list(multi)
        want = list(single)
        assert len(got) == len(want) == 13
        for g, w in zip(got, want):
            for k in ("hr", "lr", "label", "target", "index"):
                assert torch.equal(g[k], w[k]), k
        np.testing.assert_array_equal(got[0]["hr"].numpy(), rows["hr"][got[0]["index"].numpy()])


def test_stale_or_foreign_lr_refused(tmp_path, pair):
    hr, lr, _ = pair
    other = tmp_path / "rois_train.h5"
    write_hr(other, seed=1)  # same shape, other content
    with pytest.raises(InputError, match="was not made from"):
        S.RoiPairs(other, lr)
    cats2 = [{"id": 1, "name": "car"}, {"id": 3, "name": "lorry"}, {"id": 7, "name": "bus"}]
    hr2 = tmp_path / "h2.h5"
    write_hr(hr2, categories=cats2)
    # The LR twin of hr2 with hr's categories pasted in: refused.
    from sodtool.stages.downsample import DownsampleConfig, downsample

    downsample(DownsampleConfig(src=hr2, out=tmp_path / "h2_lr.h5"))
    with h5py.File(tmp_path / "h2_lr.h5", "a") as f:
        f.attrs["categories"] = json.dumps(CATS)
    with pytest.raises(InputError, match="categories disagree"):
        S.RoiPairs(hr2, tmp_path / "h2_lr.h5")


# ------------------------------------------------------------------------------------------
# downsample


def test_downsample_exact_bicubic_and_attributes(tmp_path, cli):
    src = tmp_path / "rois_train.h5"
    rows = write_hr(src, n=37, size=32)
    before = (hashlib.sha256(src.read_bytes()).hexdigest(), src.stat().st_mtime_ns)
    ident = file_identity(src)
    res = cli("-q", "downsample", src)
    assert res.exit_code == 0, res.stderr
    out = tmp_path / "rois_train_lr.h5"
    assert (hashlib.sha256(src.read_bytes()).hexdigest(), src.stat().st_mtime_ns) == before  # untouched
    with S.open_store(out, S.LR_SCHEMA) as f:
        lr = f["lr"][:]
        assert lr.shape == (37, 3, 8, 8) and lr.dtype == np.uint8
        assert int(f.attrs["scale"]) == 4
        assert S.attr_json(f, "source") == ident
        assert S.attr_str(f, "source_content_sha256") == S.store_info(src)["content_sha256"]
        assert S.attr_json(f, "categories") == CATS
    for i in (0, 20, 36):
        ref = F.interpolate(torch.from_numpy(rows["hr"][i:i + 1]).float(), scale_factor=0.25, mode="bicubic",
                            antialias=True, align_corners=False).round().clamp(0, 255).to(torch.uint8)
        np.testing.assert_array_equal(lr[i], ref[0].numpy())
    manifest = json.loads((tmp_path / "rois_train_lr.h5.manifest.json").read_text())
    assert manifest["stage"] == "downsample" and manifest["metrics"]["rows"] == 37
    # An existing output is refused without --overwrite.
    res = cli("downsample", src)
    assert res.exit_code == 2 and "already exists" in res.stderr


def test_downsample_interrupted_leaves_no_file(tmp_path, monkeypatch):
    from sodtool.stages import downsample as D

    src = tmp_path / "rois_train.h5"
    write_hr(src, n=100, size=32)
    calls = {"n": 0}
    real = D.bicubic_down

    def failing(hr, scale):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(hr, scale)

    monkeypatch.setattr(D, "bicubic_down", failing)
    with pytest.raises(KeyboardInterrupt):
        D.downsample(D.DownsampleConfig(src=src, batch=16, workers=0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rois_train.h5"]


def test_downsample_workers_same_bytes_and_worker_error_leaves_no_file(tmp_path, monkeypatch):
    from sodtool.stages import downsample as D

    src = tmp_path / "rois_train.h5"
    write_hr(src, n=100, size=32)
    one = D.downsample(D.DownsampleConfig(src=src, out=tmp_path / "one.h5", batch=16, workers=0))
    two = D.downsample(D.DownsampleConfig(src=src, out=tmp_path / "two.h5", batch=16, workers=2))
    assert two["workers"] == 2 and one["workers"] == 0
    assert one["content_sha256"] == two["content_sha256"]
    with S.open_store(tmp_path / "one.h5", S.LR_SCHEMA) as a, S.open_store(tmp_path / "two.h5", S.LR_SCHEMA) as b:
        np.testing.assert_array_equal(a["lr"][:], b["lr"][:])

    # A failure inside a worker process reaches the caller; no output is left.
    real = D.bicubic_down

    def failing(hr, scale):
        if hr.shape[0] < 16:  # the last, short slab
            raise RuntimeError("disk on fire")
        return real(hr, scale)

    monkeypatch.setattr(D, "bicubic_down", failing)  # before the fork: the workers inherit it
    with pytest.raises(RuntimeError, match="disk on fire"):
        D.downsample(D.DownsampleConfig(src=src, out=tmp_path / "three.h5", batch=16, workers=2))
    assert not any(p.name.startswith("three") for p in tmp_path.iterdir())


def test_downsample_wrong_scale_refused(tmp_path, cli):
    src = tmp_path / "rois_train.h5"
    write_hr(src, n=3, size=18)
    res = cli("downsample", src)
    assert res.exit_code == 2 and "not divisible by the scale 4" in res.stderr



def test_shuffled_batches_mix_many_images(tmp_path):
    # Rows are stored image by image: here 8 rows (one chunk) per image, 800 rows. A shuffled
    # batch of 32 must hold rows of many images, not 4 runs of 8 consecutive rows.
    n, per_image = 800, 8
    rows = random_rows(n, size=16, seed=4)
    rows["image_id"] = np.arange(n, dtype=np.int64) // per_image
    path = tmp_path / "rois_train.h5"
    with S.StoreWriter(path, schema=S.SCHEMA, fields=S.hr_fields(16), attrs=hr_attrs(16), chunk_rows=8) as w:
        w.append(**rows)
    loader = S.make_loader(path, None, batch_size=32, shuffle=True, seed=0, drop_last=True)
    loader.set_epoch(0)
    images_per_batch = [len(np.unique(b["index"].numpy() // per_image)) for b in loader]
    assert min(images_per_batch) >= 20, images_per_batch
    seen = np.concatenate([b["index"].numpy() for b in loader])
    assert len(np.unique(seen)) == len(seen) == n  # still every row once per epoch
    assert S.mixing_window(8, 16, 32) == 64 and S.mixing_window(8, 128, 64) == 40  # cache-bound at 128 px: 42 -> 5 batches


# ------------------------------------------------------------------------------------------
# verify: the digest covers what a store means (issue 33)


def _edited_copy(src: Path, dst: Path, edit) -> Path:
    import shutil

    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        edit(f)
    return dst


def _verify_fails(cli, path: Path, *needles: str) -> str:
    res = cli("verify", path)
    assert res.exit_code == 2, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"sodtool: error: {path} is corrupted"), res.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    with pytest.raises(InputError):
        S.verify_store(path)
    return lines[0]


def test_verify_refuses_a_store_whose_category_names_were_swapped(pair, tmp_path, cli):
    """Was: "ok" (the digest covered the datasets only)."""
    hr, _, _ = pair
    assert cli("verify", hr).exit_code == 0
    swapped = [{"id": 1, "name": "truck"}, {"id": 3, "name": "car"}, {"id": 7, "name": "bus"}]
    bad = _edited_copy(hr, tmp_path / "rois_train.h5", lambda f: f.attrs.__setitem__("categories", json.dumps(swapped)))
    assert S.store_categories(bad) != S.store_categories(hr)
    _verify_fails(cli, bad, "attributes", "metadata digest")


def test_verify_refuses_a_store_whose_hr_size_was_edited(pair, tmp_path, cli):
    """Was: "ok" for hr_size set to 64 on a store of 16 px crops."""
    hr, _, _ = pair
    bad = _edited_copy(hr, tmp_path / "rois_train.h5", lambda f: f.attrs.__setitem__("hr_size", 64))
    _verify_fails(cli, bad, "'hr_size' attribute says 64", "16 px")


def test_verify_refuses_a_store_whose_rows_attribute_was_edited(pair, tmp_path, cli):
    """Was: "ok" for `rows` changed."""
    hr, _, _ = pair
    bad = _edited_copy(hr, tmp_path / "rois_train.h5", lambda f: f.attrs.__setitem__("rows", 204))
    _verify_fails(cli, bad, "'rows' attribute says 204", "203 rows")


@pytest.mark.parametrize("edit", [
    ("context", lambda f: f.attrs.__setitem__("context", 2.0)),
    ("padding", lambda f: f.attrs.__setitem__("padding", "reflect")),
    ("crop_method", lambda f: f.attrs.__setitem__("crop_method", "nearest")),
    ("mode", lambda f: f.attrs.__setitem__("mode", "test")),
    ("split", lambda f: f.attrs.__setitem__("split", "minival")),
    ("schema kept, detector", lambda f: f.attrs.__setitem__("detector", json.dumps({"family": "ssd", "kind": "test"}))),
    ("annotations", lambda f: f.attrs.__setitem__("annotations", json.dumps({"path": "ann.json", "sha256": "y"}))),
    ("categories removed", lambda f: f.attrs.__delitem__("categories")),
    ("images record", lambda f: f["images/sha"].__setitem__(0, b"0" * 16)),
    ("images record removed", lambda f: f.__delitem__("images")),
    ("metadata digest removed", lambda f: f.attrs.__delitem__("metadata_sha256")),
    ("digest version from the future", lambda f: f.attrs.__setitem__("content_digest_version", 9)),
], ids=lambda e: e[0])
def test_verify_refuses_every_edited_meaning_attribute(tmp_path, cli, edit):
    src = tmp_path / "src.h5"
    rows = random_rows(40)
    with S.StoreWriter(src, schema=S.SCHEMA, fields=S.hr_fields(16), attrs={**hr_attrs(), "padding": "zero",
                       "crop_method": "bilinear"}) as w:
        w.append(**rows)
        w.record_images({int(i): f"{int(i):016x}" for i in np.unique(rows["image_id"])})
    assert S.verify_store(src)["digest_version"] == 2
    bad = _edited_copy(src, tmp_path / "rois_train.h5", edit[1])
    res = cli("verify", bad)
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert str(bad) in res.stderr


def test_verify_ignores_layout_and_paths(pair, tmp_path, cli):
    """What does not change the meaning of the pixels stays outside the digest: image_dir (a path),
    config, and the HDF5 layout (the same rows rewritten in other batches)."""
    hr, _, rows = pair
    moved = _edited_copy(hr, tmp_path / "rois_train.h5", lambda f: f.attrs.__setitem__("image_dir", "/elsewhere"))
    assert cli("verify", moved).exit_code == 0
    other = tmp_path / "other.h5"
    write_hr(other, batches=(64,))
    assert S.verify_store(other)["metadata_sha256"] == S.verify_store(hr)["metadata_sha256"]


def test_verify_lr_twin_covers_its_source_and_the_loader_still_checks_it(pair, tmp_path, cli):
    hr, lr, _ = pair
    res = cli("verify", hr, lr)
    assert res.exit_code == 0 and res.stdout.count(": ok,") == 2, res.stderr
    bad = _edited_copy(lr, tmp_path / "rois_train_lr.h5",
                       lambda f: f.attrs.__setitem__("source_content_sha256", "0" * 64))
    _verify_fails(cli, bad, "metadata digest")
    with pytest.raises(InputError, match="was not made from"):
        S.RoiPairs(hr, bad)
    scale = _edited_copy(lr, tmp_path / "scale_lr.h5", lambda f: f.attrs.__setitem__("scale", 2))
    _verify_fails(cli, scale, "metadata digest")
    assert S.RoiPairs(hr, lr).lr_size == 4  # the twin as written still loads


def test_stores_written_before_metadata_digests_verify_under_version_1(pair, tmp_path, cli):
    """A store without `content_digest_version` (written before it) verifies its datasets, as it
    did, and says its attributes cannot be checked; its datasets are still checked."""
    hr, _, _ = pair

    def to_v1(f):
        del f.attrs["content_digest_version"]
        del f.attrs["metadata_sha256"]
        if "images" in f:
            del f["images"]

    old = _edited_copy(hr, tmp_path / "rois_train.h5", to_v1)
    res = S.verify_store(old)
    assert res["digest_version"] == 1 and res["metadata_sha256"] is None
    assert res["content_sha256"] == S.store_info(hr)["content_sha256"]
    out = cli("verify", old)
    assert out.exit_code == 0 and ": ok," in out.stdout
    assert "digest version 1" in out.stdout + out.stderr
    # Version 1 covers the datasets: an edited crop still fails.
    flipped = _edited_copy(old, tmp_path / "flipped.h5", lambda f: f["hr"].__setitem__((0, 0, 0, 0), 255 - f["hr"][0, 0, 0, 0]))
    _verify_fails(cli, flipped, "content digest")


# ------------------------------------------------------------------------------------------
# eval --rois: identities, not ids (issue 33)


@pytest.fixture(scope="module")
def versions(tmp_path_factory) -> dict:
    """A 2-image minival split, a test-mode store cropped from it, an untrained MTGAN, and the same
    split's annotation file in another version (same image ids, one box moved by 2 px)."""
    from sodtool.console import set_quiet
    from sodtool.stages.crop_rois import CropRoisConfig, crop_rois
    from sodtool.stages.synth import SynthConfig, synthesize
    from test_rescore import save_mtgan

    set_quiet(True)
    root = tmp_path_factory.mktemp("versions")
    data = root / "data"
    synthesize(SynthConfig(out=data, train_images=1, val_images=1, minival_images=2, image_size=192, classes=3, seed=1))
    ann_path = data / "annotations" / "instances_minival.json"
    ann = json.loads(ann_path.read_text())
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
            for a in ann["annotations"]]
    (root / "dets.json").write_text(json.dumps(dets))
    store = root / "run" / "rois_minival.h5"
    crop_rois(CropRoisConfig(out=store, data=data, split="minival", mode="test", detections=root / "dets.json",
                             hr_size=32))
    cats = [{"id": c["id"], "name": c["name"]} for c in ann["categories"]]
    mtgan = root / "mtgan"
    mtgan.mkdir()
    save_mtgan(mtgan / "model.pt", cats)
    ann["annotations"][0]["bbox"][0] += 2.0
    other = root / "v2" / "instances_minival.json"
    other.parent.mkdir()
    other.write_text(json.dumps(ann))
    return {"data": data, "ann": ann_path, "other": other, "store": store, "mtgan": mtgan}


def test_eval_refuses_rois_cropped_from_another_version_of_the_annotations(versions, tmp_path, cli):
    """Was: a warning, and an evaluation of ROIs matched against other ground truth."""
    w = versions
    out = tmp_path / "eval"
    res = cli("eval", "--data", w["data"], "--split", "minival", "--ann", w["other"], "--rois", w["store"],
              "--mtgan", w["mtgan"], "--out", out, "--device", "cpu", "--no-figures")
    assert res.exit_code == 2, (res.stdout, res.stderr, res.exception)
    # eval's warnings about the provenance of the models come first (not the store's doing)
    lines = res.stderr.strip().splitlines()
    line = lines[-1]
    assert [n for n in lines if not n.startswith("warning: ")] == [line] and "Traceback" not in res.stderr, res.stderr
    assert line.startswith(f"sodtool: error: {w['store']} was cropped from another version of the annotations")
    assert str(w["ann"]) in line and str(w["other"]) in line and "sha256" in line
    assert not out.exists()


def test_store_rois_accepts_the_annotations_it_was_cropped_from_and_refuses_another_version(versions, tmp_path):
    import shutil

    from sodtool.coco import SplitPaths, load_split
    from sodtool.testrois import store_rois

    w = versions
    images = w["data"] / "images" / "minival"
    copy = tmp_path / "instances_minival.json"  # the same bytes elsewhere: the same version
    shutil.copy(w["ann"], copy)
    for ann in (w["ann"], copy):
        source, items = store_rois(w["store"], "minival", load_split(SplitPaths(ann=ann, images=images)))
        assert sum(len(it.rois) for it in items) == source.detail["rows"] > 0
    with pytest.raises(InputError, match="another version of the annotations"):
        store_rois(w["store"], "minival", load_split(SplitPaths(ann=w["other"], images=images)))
