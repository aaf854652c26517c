"""A full disk in every stage that writes HDF5 stores or checkpoints: one line on stderr, exit 2,
no temporary left, the previous output intact, and never a segmentation fault.

Two ways to fill a disk: a real small filesystem (a tmpfs of a few hundred KB, mounted where the
tests run as root and `mount` works; skipped otherwise), and, always, an injected one: the raw
file that the store writer (`sodtool.store.open`) or the checkpoint writer
(`sodtool.checkpoint.open`) opens takes a budget of bytes and then fails with ENOSPC, as a disk
does. On the real filesystem the stages run as `python -m sodtool` in a subprocess, so that a
crash shows as exit code 139 (HDF5 used to end in a segmentation fault after a failed write).
(`predict`'s drawn images and the other JSON writers are covered by their own tests.)
"""

from __future__ import annotations

import errno
import gc
import hashlib
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sodtool import checkpoint, engine
from sodtool import store as S

ENOSPC_LINE = f"sodtool: error: {os.strerror(errno.ENOSPC)}: "


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _listing(folder: Path) -> dict[str, str]:
    """Every file under `folder`, hidden ones included, with its digest."""
    return {str(p.relative_to(folder)): _sha(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


@pytest.fixture
def small_fs(tmp_path):
    """small_fs(size) -> an empty folder on a tmpfs of `size` (e.g. "600k"); skips the test where
    no filesystem can be mounted (not root, no `mount`, a container without the capability)."""
    mounted: list[Path] = []

    def make(size: str) -> Path:
        d = tmp_path / f"small{len(mounted)}"
        d.mkdir()
        if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("a small filesystem needs root and mount(8); the injected variants cover the rest")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], capture_output=True,
                           text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        mounted.append(d)
        return d

    yield make
    for d in mounted:
        if subprocess.run(["umount", str(d)], capture_output=True).returncode != 0:
            gc.collect()  # a file a failed write left open (the old torch writer did) keeps it busy
            if subprocess.run(["umount", str(d)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(d)], capture_output=True)


def _disk(budget: int):
    """An `open` for raw binary files on a disk with `budget` bytes free: writes beyond it are
    short, then fail with ENOSPC, as on a full filesystem."""
    left = {"bytes": budget}

    class Disk(io.FileIO):
        def write(self, b) -> int:
            view = memoryview(b).cast("B")
            if left["bytes"] <= 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            k = min(len(view), left["bytes"])
            left["bytes"] -= k
            return super().write(view[:k])

    def fake_open(path, mode="r", buffering=-1, **kw):
        assert "b" in mode and buffering == 0, (mode, buffering)
        return Disk(path, mode.replace("b", ""))

    return fake_open


def _sodtool(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "sodtool", "-q", *[str(a) for a in args]], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=600)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A synthetic dataset: 6 train images of 256 px."""
    from sodtool.console import set_quiet
    from sodtool.stages.synth import SynthConfig, synthesize

    set_quiet(True)
    d = tmp_path_factory.mktemp("full_disk") / "data"
    synthesize(SynthConfig(out=d, train_images=6, val_images=1, minival_images=2, image_size=256, seed=0))
    return d


def _crop_args(data: Path, out: Path, hr_size: int, compression: str = "lzf") -> list:
    """crop-rois of the 6 train images: 16 px crops make a store of about 400 KB, 128 px ones 3 to 5 MB."""
    return ["crop-rois", "--gt-only", "--data", data, "--split", "train", "--hr-size", hr_size, "--rois-per-image",
            16, "--compression", compression, "--out", out]


# --------------------------------------------------------------------------------------------
# crop-rois
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def old_store(data, tmp_path_factory) -> Path:
    """The output a failed run must leave intact: a finished 16 px store and its sidecar manifest."""
    from sodtool.stages.crop_rois import CropRoisConfig, crop_rois

    out = tmp_path_factory.mktemp("old") / "rois_train.h5"
    crop_rois(CropRoisConfig(out=out, data=data, gt_only=True, hr_size=16, rois_per_image=16))
    return out


def _put(store: Path, folder: Path, name: str) -> Path:
    """Copy a store and its sidecar manifest into `folder` as `name`."""
    shutil.copy(store, folder / name)
    shutil.copy(S.manifest_path(store), S.manifest_path(folder / name))
    return folder / name


@pytest.mark.parametrize("compression", ["none", "lzf", "gzip"])
def test_crop_rois_on_a_full_filesystem_is_one_line_and_keeps_the_old_store(data, old_store, small_fs, tmp_path,
                                                                           compression):
    """Was: a segmentation fault (exit 139) after hundreds of h5py lines, `.rois_train.h5.PID.tmp` left."""
    small = small_fs("1m")
    out = _put(old_store, small, "rois_train.h5")
    before = _listing(small)
    r = _sodtool(*_crop_args(data, out, 128, compression), "--overwrite", cwd=tmp_path)
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert _one_line(r.stderr) == f"{ENOSPC_LINE}{out}"
    assert _listing(small) == before  # no temporary, the old store and its sidecar untouched
    S.verify_store(out)


def test_crop_rois_full_disk_injected_is_one_line_and_keeps_the_old_store(data, old_store, tmp_path, cli,
                                                                         monkeypatch):
    out = _put(old_store, tmp_path, "rois_train.h5")
    before = _listing(out.parent)
    monkeypatch.setattr(S, "open", _disk(300_000), raising=False)
    res = cli("-q", *_crop_args(data, out, 128, "lzf"), "--overwrite")
    assert res.exit_code == 2 and res.exception is None, (res.stderr, res.exception)
    assert _one_line(res.stderr) == f"{ENOSPC_LINE}{out}"
    assert _listing(out.parent) == before
    S.verify_store(out)


def test_store_writer_stops_at_the_first_failed_write_and_hdf5_closes_cleanly(tmp_path, monkeypatch):
    """Whatever byte the disk fills at (in the crops, the metadata, or the final close), the writer
    raises ENOSPC naming the store, leaves nothing, and HDF5 stays usable in this process."""
    rng = np.random.default_rng(0)
    rows = {"hr": rng.integers(0, 256, (200, 3, 16, 16), dtype=np.uint8), "label": np.zeros(200, np.int64),
            "target": np.zeros((200, 4), np.float32), "roi": np.zeros((200, 4), np.float32),
            "gt_box": np.zeros((200, 4), np.float32), "iou": np.zeros(200, np.float32),
            "image_id": np.arange(200, dtype=np.int64), "score": np.zeros(200, np.float32),
            "det_label": np.zeros(200, np.int64), "window": np.zeros((200, 4), np.float32),
            "source": np.zeros(200, np.uint8)}
    attrs = {"categories": [{"id": 1, "name": "car"}], "hr_size": 16, "context": 1.5, "mode": "train",
             "split": "train", "detector": {}, "annotations": {}, "image_dir": "x"}
    path = tmp_path / "rois_train.h5"
    with S.StoreWriter(path, schema=S.SCHEMA, fields=S.hr_fields(16), attrs=attrs) as w:
        w.append(**rows)
    size = path.stat().st_size
    for budget in (0, 100, 3_000, 40_000, size // 2, size - 2_000, size - 1):
        monkeypatch.setattr(S, "open", _disk(budget), raising=False)
        with pytest.raises(OSError) as e:
            with S.StoreWriter(tmp_path / "new.h5", schema=S.SCHEMA, fields=S.hr_fields(16), attrs=attrs) as w:
                for i in range(0, 200, 7):
                    w.append(**{k: v[i:i + 7] for k, v in rows.items()})
        assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "new.h5"), budget
        assert sorted(p.name for p in tmp_path.iterdir()) == ["rois_train.h5"], budget
    monkeypatch.setattr(S, "open", _disk(10 * size), raising=False)
    with S.StoreWriter(tmp_path / "new.h5", schema=S.SCHEMA, fields=S.hr_fields(16), attrs=attrs) as w:
        w.append(**rows)
    assert S.verify_store(tmp_path / "new.h5")["content_sha256"] == S.verify_store(path)["content_sha256"]


# --------------------------------------------------------------------------------------------
# downsample
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hr_stores(data, tmp_path_factory) -> tuple[Path, Path]:
    """A 16 px HR store with its twin rois_16_lr.h5 (30 KB), and a 128 px one (its twin at scale 2: 5 MB)."""
    from sodtool.stages.crop_rois import CropRoisConfig, crop_rois
    from sodtool.stages.downsample import DownsampleConfig, downsample

    d = tmp_path_factory.mktemp("hr")
    for size in (16, 128):
        crop_rois(CropRoisConfig(out=d / f"rois_{size}.h5", data=data, gt_only=True, hr_size=size,
                                 rois_per_image=64))
    downsample(DownsampleConfig(src=d / "rois_16.h5", workers=0))
    return d / "rois_16.h5", d / "rois_128.h5"


@pytest.mark.parametrize("workers", [0, 2])
def test_downsample_on_a_full_filesystem_is_one_line_and_keeps_the_old_twin(hr_stores, small_fs, tmp_path, workers):
    """Was: a segmentation fault (exit 139), with or without worker processes."""
    small = small_fs("1m")
    out = _put(hr_stores[0].with_name("rois_16_lr.h5"), small, "rois_train_lr.h5")
    before = _listing(small)
    r = _sodtool("downsample", hr_stores[1], "--scale", 2, "--workers", workers, "--out", out, "--overwrite",
                 cwd=tmp_path)
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert _one_line(r.stderr) == f"{ENOSPC_LINE}{out}"
    assert _listing(small) == before
    S.verify_store(out)


def test_downsample_full_disk_injected_is_one_line_and_keeps_the_old_twin(hr_stores, tmp_path, cli, monkeypatch):
    out = _put(hr_stores[0].with_name("rois_16_lr.h5"), tmp_path, "rois_train_lr.h5")
    before = _listing(tmp_path)
    monkeypatch.setattr(S, "open", _disk(200_000), raising=False)
    res = cli("-q", "downsample", hr_stores[1], "--scale", 2, "--workers", 0, "--out", out, "--overwrite")
    assert res.exit_code == 2 and res.exception is None, (res.stderr, res.exception)
    assert _one_line(res.stderr) == f"{ENOSPC_LINE}{out}"
    assert _listing(tmp_path) == before
    S.verify_store(out)


# --------------------------------------------------------------------------------------------
# Checkpoints (train detector, train sr and train mtgan save through engine.save_training_state
# and checkpoint.save)
# --------------------------------------------------------------------------------------------


def _state(mb: float, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"model": {"w": torch.randn(int(mb * 262144), generator=g)}, "optimizer": {"state": {}}}


def _save_state(path: Path, state: dict, step: int) -> Path:
    from sodtool.stages.train_detector import TrainDetectorConfig

    return engine.save_training_state(path, state, step=step, cfg=TrainDetectorConfig(data=path.parent),
                                      inputs={}, stage="train-detector", elapsed_s=1.0)


def _check_failed_checkpoint(e: pytest.ExceptionInfo, ckpt: Path, before: dict, step: int) -> None:
    assert isinstance(e.value, OSError) and e.value.errno == errno.ENOSPC, e.value
    assert e.value.filename == str(ckpt) and len(str(e.value).splitlines()) == 1
    assert _listing(ckpt.parent) == before
    assert checkpoint.load_dict(ckpt)["step"] == step


def test_training_checkpoint_on_a_full_filesystem_raises_enospc_and_keeps_the_last(small_fs):
    """Was: RuntimeError from torch's inline_container.cc (a 63-line traceback in `train detector`)."""
    small = small_fs("3m")
    ckpt = small / "detector" / "checkpoint.pt"
    ckpt.parent.mkdir()
    _save_state(ckpt, _state(1.0, 0), step=1)
    before = _listing(ckpt.parent)
    with pytest.raises(Exception) as e:
        _save_state(ckpt, _state(4.0, 1), step=2)
    _check_failed_checkpoint(e, ckpt, before, step=1)


def test_training_checkpoint_full_disk_injected_raises_enospc_and_keeps_the_last(tmp_path, monkeypatch):
    ckpt = tmp_path / "detector" / "checkpoint.pt"
    ckpt.parent.mkdir()
    _save_state(ckpt, _state(1.0, 0), step=1)
    before = _listing(ckpt.parent)
    for budget in (0, 10, 100_000, 1_000_000):  # the zip header, a record, the end of the file
        monkeypatch.setattr(checkpoint, "open", _disk(budget), raising=False)
        with pytest.raises(Exception) as e:
            _save_state(ckpt, _state(1.0, 1), step=2)
        _check_failed_checkpoint(e, ckpt, before, step=1)


def _train_detector_args(data: Path, out: Path) -> list:
    return ["train", "detector", "--preset", "quick", "--data", data, "--out", out, "--iterations", 2,
            "--batch-size", 1, "--min-size", 128, "--max-size", 128, "--checkpoint-every", 1, "--log-every", 1,
            "--seed", 0, "--device", "cpu"]


def test_train_detector_checkpoint_on_a_full_disk_is_one_line(data, tmp_path, cli, monkeypatch):
    """The second checkpoint's write fails: one line, exit 2, the first checkpoint kept."""
    out = tmp_path / "detector"
    real = checkpoint.open if hasattr(checkpoint, "open") else open
    opened = []

    def second_fails(path, mode="r", buffering=-1, **kw):
        opened.append(Path(path).name)
        if len([n for n in opened if n.startswith(".checkpoint.pt.")]) >= 2:
            return _disk(50_000)(path, mode, buffering, **kw)
        return real(path, mode, buffering, **kw)

    monkeypatch.setattr(checkpoint, "open", second_fails, raising=False)
    res = cli("-q", *_train_detector_args(data, out))
    assert res.exit_code == 2 and res.exception is None, (res.stderr, res.exception)
    assert _one_line(res.stderr) == f"{ENOSPC_LINE}{out / 'checkpoint.pt'}"
    assert checkpoint.load_dict(out / "checkpoint.pt")["step"] == 1
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
