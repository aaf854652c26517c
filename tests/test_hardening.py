"""Bad input across every command: one line on stderr, exit code 2, nothing already written lost.

A tiny pipeline (synthetic data, a detector of 2 iterations, ROI stores, SR, MTGAN, eval
outputs) is built once; each bad-input case then runs against it and the whole tree must be
byte-identical afterwards (so no temporary file is left either). Further tests cover what a
table cannot: --no-resume keeping the old run until the new one is complete, a full disk or a
permission error in the middle of writing, stale temporaries, a damaged store, --skip-invalid
counts, warnings held back on error, and metrics.jsonl after a kill equal to an uninterrupted run's.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

import h5py
import pytest

from sodtool.errors import InputError

HR = 32


def _run(cli, *args):
    res = cli(*[str(a) for a in args])
    assert res.exit_code == 0, (args, res.stderr, res.exception)
    return res


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    """ROOT/data (8 train, 3 minival images) and ROOT/run with every stage's output."""
    from typer.testing import CliRunner

    from sodtool.cli import app

    def cli(*args):
        r = CliRunner().invoke(app, ["--quiet", *[str(a) for a in args]])
        assert r.exit_code == 0, (args, r.stderr, r.exception)

    root = tmp_path_factory.mktemp("hardening")
    d, r = root / "data", root / "run"
    cli("data", "synth", "--preset", "quick", "--train-images", 8, "--val-images", 2, "--minival-images", 3, "--image-size", 192,
        "--seed", 0, "--out", d)
    cli("data", "stats", "--data", d, "--split", "train", "--out", r / "stats")
    cli("train", "detector", "--preset", "quick", "--data", d, "--out", r / "detector", "--iterations", 2,
        "--batch-size", 2, "--min-size", 192, "--max-size", 192, "--checkpoint-every", 1, "--log-every", 1,
        "--seed", 0)
    cli("detect", "--detector", r / "detector" / "model.pt", "--data", d, "--split", "minival",
        "--out", r / "detections_minival.json")
    cli("eval", "--results", r / "detections_minival.json", "--data", d, "--split", "minival",
        "--out", r / "eval_detections")
    for split, mode, extra in (("train", "train", ["--rois-per-image", 16]), ("minival", "test", ["--max-rois", 10])):
        cli("crop-rois", "--detector", "frcnn", "--detector-weights", r / "detector" / "model.pt", "--data", d,
            "--split", split, "--mode", mode, "--hr-size", HR, "--out", r / f"rois_{split}.h5", *extra)
        cli("downsample", r / f"rois_{split}.h5")
    cli("train", "sr", "--hr", r / "rois_train.h5", "--lr", r / "rois_train_lr.h5", "--out", r / "sr",
        "--iterations", 2, "--batch-size", 4, "--checkpoint-every", 1, "--log-every", 1, "--seed", 0)
    cli("train", "mtgan", "--hr", r / "rois_train.h5", "--lr", r / "rois_train_lr.h5", "--sr", r / "sr",
        "--disc-init", r / "detector" / "model.pt", "--out", r / "mtgan", "--iterations", 3, "--d-warmup", 1,
        "--batch-size", 4, "--checkpoint-every", 1, "--log-every", 1, "--seed", 0)
    cli("eval", "--split", "minival", "--data", d, "--rois", r / "rois_minival.h5", "--mtgan", r / "mtgan",
        "--out", r / "eval_minival", "--no-figures")
    return root


def _snapshot(root: Path) -> dict[str, str]:
    """Every file under root (hidden ones too) -> sha256 of its bytes."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _write_bad_inputs(tmp: Path, root: Path) -> None:
    """Malformed inputs for the table, in a folder of their own."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "not_a_checkpoint.pt").write_bytes(b"this is not a torch file")
    (tmp / "not_json.json").write_text("{ nope", encoding="utf-8")
    (tmp / "a_file").write_text("x", encoding="utf-8")
    # A copy of the HR train store with 64 bytes of its crops flipped.
    damaged = tmp / "damaged.h5"
    shutil.copy(root / "run" / "rois_train.h5", damaged)
    _flip_crop_bytes(damaged)
    # A dataset whose image width is a string.
    ds = tmp / "data_strwidth"
    shutil.copytree(root / "data", ds)
    ann = ds / "annotations" / "instances_minival.json"
    coco = json.loads(ann.read_text())
    coco["images"][0]["width"] = str(coco["images"][0]["width"])
    ann.write_text(json.dumps(coco))
    # A dataset with a box outside its image (refused without --skip-invalid).
    ds = tmp / "data_badbox"
    shutil.copytree(root / "data", ds)
    ann = ds / "annotations" / "instances_train.json"
    coco = json.loads(ann.read_text())
    coco["annotations"][0]["bbox"] = [180.0, 180.0, 50.0, 50.0]
    ann.write_text(json.dumps(coco))


def _flip_crop_bytes(path: Path, count: int = 64) -> None:
    """Invert `count` bytes in the middle of the first chunk of the 'hr' dataset, in place."""
    with h5py.File(path, "r") as f:
        offset = f["hr"].id.get_chunk_info(0).byte_offset if f["hr"].chunks else f["hr"].id.get_offset()
        size = f["hr"].id.get_chunk_info(0).size if f["hr"].chunks else 4096
    with open(path, "r+b") as fh:
        fh.seek(offset + size // 2)
        raw = bytearray(fh.read(count))
        fh.seek(offset + size // 2)
        fh.write(bytes(b ^ 0xFF for b in raw))


# (case id, argument list with {D} = dataset, {R} = run folder, {T} = bad-input folder, expected stderr part)
BAD_INPUTS = [
    # Output paths
    ("detect-out-exists", "detect --detector {R}/detector/model.pt --data {D} --split minival --out {R}/detections_minival.json", "already exists"),
    ("detect-out-folder", "detect --detector {R}/detector/model.pt --data {D} --split minival --out {R}", "is a folder"),
    ("detect-out-under-file", "detect --detector {R}/detector/model.pt --data {D} --split minival --out {T}/a_file/d.json", "is a file, not a folder"),
    ("stats-out-exists", "data stats --data {D} --split train --out {R}/stats", "already exists"),
    ("stats-out-file", "data stats --data {D} --split train --out {T}/a_file", "is a file"),
    ("eval-results-out-exists", "eval --results {R}/detections_minival.json --data {D} --split minival --out {R}/eval_detections", "already exists"),
    ("eval-mtgan-out-exists", "eval --split minival --data {D} --rois {R}/rois_minival.h5 --mtgan {R}/mtgan --out {R}/eval_minival", "already exists"),
    ("crop-out-exists", "crop-rois --detector frcnn --detector-weights {R}/detector/model.pt --data {D} --split minival --mode test --hr-size 32 --out {R}/rois_minival.h5", "already exists"),
    ("crop-out-folder", "crop-rois --detector frcnn --detector-weights {R}/detector/model.pt --data {D} --split minival --mode test --hr-size 32 --out {R}/sr", "is a folder"),
    ("downsample-out-exists", "downsample {R}/rois_train.h5", "already exists"),
    ("downsample-out-under-file", "downsample {R}/rois_train.h5 --out {T}/a_file/x.h5", "is a file, not a folder"),
    ("train-sr-out-file", "train sr --hr {R}/rois_train.h5 --lr {R}/rois_train_lr.h5 --out {T}/a_file --iterations 2", "is a file"),
    ("train-sr-out-under-file", "train sr --hr {R}/rois_train.h5 --lr {R}/rois_train_lr.h5 --out {T}/a_file/sr --iterations 2", "is a file, not a folder"),
    ("train-detector-out-file", "train detector --data {D} --out {T}/a_file --iterations 2", "is a file"),
    ("train-mtgan-out-file", "train mtgan --hr {R}/rois_train.h5 --lr {R}/rois_train_lr.h5 --sr {R}/sr --out {T}/a_file --iterations 3 --d-warmup 1", "is a file"),
    ("eval-sr-out-file", "eval sr --data {T} --out {T}/a_file", "is a file"),
    # Missing or malformed inputs
    ("detect-no-model", "detect --detector {T}/missing.pt --data {D} --split minival --out {T}/new.json", "not found"),
    ("detect-garbage-model", "detect --detector {T}/not_a_checkpoint.pt --data {D} --split minival --out {T}/new.json", "not_a_checkpoint.pt"),
    ("detect-no-split", "detect --detector {R}/detector/model.pt --data {D} --split nosuch --out {T}/new.json", "nosuch"),
    ("eval-results-not-json", "eval --results {T}/not_json.json --data {D} --split minival --out {T}/ev", "not valid JSON"),
    ("eval-two-modes", "eval --results {R}/detections_minival.json --mtgan {R}/mtgan --data {D} --out {T}/ev", "two modes"),
    ("eval-train-store", "eval --split minival --data {D} --rois {R}/rois_train.h5 --mtgan {R}/mtgan --out {T}/ev", "'train'-mode"),
    ("eval-other-split-store", "eval --split train --data {D} --rois {R}/rois_minival.h5 --mtgan {R}/mtgan --out {T}/ev", "another split"),
    ("eval-not-mtgan", "eval --split minival --data {D} --rois {R}/rois_minival.h5 --mtgan {R}/sr --out {T}/ev", "sr"),
    ("stats-no-ann", "data stats --ann {T}/missing.json --out {T}/st", "not found"),
    ("downsample-lr-store", "downsample {R}/rois_train_lr.h5 --out {T}/x.h5", "low-resolution twin"),
    ("downsample-damaged", "downsample {T}/damaged.h5 --out {T}/damaged_lr.h5", "corrupted"),
    ("verify-damaged", "verify {R}/rois_train.h5 {T}/damaged.h5", "corrupted"),
    ("verify-not-hdf5", "verify {T}/not_json.json", "not a readable HDF5"),
    ("train-sr-missing-hr", "train sr --hr {T}/missing.h5 --lr {R}/rois_train_lr.h5 --out {T}/sr", "not found"),
    ("train-sr-mismatched-lr", "train sr --hr {R}/rois_train.h5 --lr {R}/rois_minival_lr.h5 --out {T}/sr", "rois_minival_lr.h5"),
    ("train-sr-zero-iterations", "train sr --hr {R}/rois_train.h5 --lr {R}/rois_train_lr.h5 --out {T}/sr --iterations 0", "iterations"),
    ("train-sr-resume-other-config", "train sr --hr {R}/rois_train.h5 --lr {R}/rois_train_lr.h5 --out {R}/sr --iterations 2 --batch-size 4 --checkpoint-every 1 --log-every 1 --seed 0 --learning-rate 0.5", "another configuration"),
    ("train-mtgan-sr-not-sr", "train mtgan --hr {R}/rois_train.h5 --lr {R}/rois_train_lr.h5 --sr {R}/detector --out {T}/mt", "train-sr"),
    ("train-mtgan-warmup", "train mtgan --hr {R}/rois_train.h5 --lr {R}/rois_train_lr.h5 --sr {R}/sr --out {T}/mt --iterations 3 --d-warmup 3", "--d-warmup"),
    ("train-mtgan-garbage-init", "train mtgan --hr {R}/rois_train.h5 --lr {R}/rois_train_lr.h5 --sr {R}/sr --out {T}/mt --disc-init {T}/not_a_checkpoint.pt", "not_a_checkpoint.pt"),
    ("train-mtgan-resume-other-data", "train mtgan --hr {R}/rois_minival.h5 --lr {R}/rois_minival_lr.h5 --sr {R}/sr --disc-init {R}/detector/model.pt --out {R}/mtgan --iterations 3 --d-warmup 1 --batch-size 4 --checkpoint-every 1 --log-every 1 --seed 0", "another hr file"),
    ("train-detector-no-data", "train detector --data {T}/missing --out {T}/det", "missing"),
    ("train-detector-no-extra-data", "train detector --data {D} --out {T}/det --extra-data {T}/missing", "missing"),
    ("train-detector-extra-ratio-alone", "train detector --data {D} --out {T}/det --extra-ratio 0.3", "give --extra-data"),
    ("train-detector-extra-ratio-range", "train detector --data {D} --out {T}/det --extra-data {D} --extra-ratio 1", "--extra-ratio must be a share in (0, 1)"),
    ("train-detector-reinit-no-weights", "train detector --data {D} --out {T}/det --reinit-heads", "give --weights"),
    ("train-detector-resume-other-config", "train detector --preset quick --data {D} --out {R}/detector --iterations 2 --batch-size 2 --min-size 192 --max-size 192 --checkpoint-every 1 --log-every 1 --seed 0 --lr 0.5", "another configuration"),
    ("train-detgan-no-detector", "train detgan --detector {T}/missing.pt --data {D} --out {T}/gan", "missing.pt"),
    ("train-detgan-garbage-detector", "train detgan --detector {T}/not_a_checkpoint.pt --data {D} --out {T}/gan", "not_a_checkpoint.pt"),
    ("train-fsr-train-checkpoint", "train fsr --detector {R}/detector/checkpoint.pt --data {D} --out {T}/fsr", "is a training checkpoint"),
    ("detect-width-string", "detect --detector {R}/detector/model.pt --data {T}/data_strwidth --split minival --out {T}/new.json", "width '192', expected a number"),
    ("crop-bad-box", "crop-rois --detector frcnn --detector-weights {R}/detector/model.pt --data {T}/data_badbox --split train --mode train --hr-size 32 --out {T}/r.h5", "--skip-invalid"),
    ("import-yolo-missing", "data import-yolo {T}/missing --out {T}/yolo", "missing"),
    ("slice-no-split", "data slice --data {D} --split nosuch --out {T}/tiles", "nosuch"),
    ("slice-out-exists", "data slice --data {D} --split minival --size 64 --out {R}/stats", "already exists"),
    ("generate-no-split", "data generate --data {D} --split nosuch --out {T}/gen", "nosuch"),
    ("generate-out-exists", "data generate --data {D} --count 1 --out {R}/stats", "already exists"),
    ("synth-out-file", "data synth --preset quick --train-images 2 --val-images 1 --minival-images 1 --image-size 192 --out {T}/a_file", "a_file"),
    ("predict-no-detector", "predict {T}/not_json.json --detector {T}/missing.pt --out {T}/pr", "detector weights file not found"),
    ("merge-not-hdf5", "crop-rois merge {T}/merged.h5 {T}/not_json.json", "not a readable HDF5"),
]

# Commands that read no input file, so have no bad input to give.
NO_INPUT_COMMANDS = {"info"}


def _cli_commands():
    """{command path: click command} of every command the CLI runs, a group that runs without a
    subcommand (`eval --results`, `crop-rois`) included."""
    from typer.main import get_command

    from sodtool.cli import app

    out = {}

    def walk(cmd, path):
        subs = getattr(cmd, "commands", None)
        if subs is None or getattr(cmd, "invoke_without_command", False):
            out[path] = cmd
        for name, sub in (subs or {}).items():
            walk(sub, f"{path} {name}".strip())

    walk(get_command(app), "")
    out.pop("", None)
    return out


def test_bad_input_table_covers_every_command():
    """The table claims bad input across every command: each command that reads input has a row
    (a new command without one fails here), and every case id is distinct."""
    from typer.main import get_command

    from sodtool.cli import app

    commands = _cli_commands()
    covered = set()
    for _, argline, _ in BAD_INPUTS:
        cmd, path = get_command(app), []
        for word in argline.split():  # descend while the words name subcommands
            sub = getattr(cmd, "commands", {}).get(word)
            if sub is None:
                break
            cmd, path = sub, path + [word]
        assert " ".join(path) in commands, argline
        covered.add(" ".join(path))
    assert set(commands) - NO_INPUT_COMMANDS - covered == set()
    assert NO_INPUT_COMMANDS <= set(commands)
    assert len({c[0] for c in BAD_INPUTS}) == len(BAD_INPUTS)


@pytest.mark.parametrize("case, argline, expected", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2_and_nothing_lost(cli, pipeline, tmp_path, case, argline, expected):
    bad = tmp_path / "bad"
    _write_bad_inputs(bad, pipeline)
    before = _snapshot(pipeline)
    before_bad = _snapshot(bad)
    args = argline.format(D=pipeline / "data", R=pipeline / "run", T=bad).split()
    res = cli(*args)
    assert res.exit_code == 2, (res.stdout, res.stderr, res.exception)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sodtool: error: "), res.stderr
    assert expected in lines[0], lines[0]
    assert _snapshot(pipeline) == before
    assert _snapshot(bad) == before_bad  # nothing half-written beside the inputs either


def test_unwritable_output_folder_is_one_line(cli, pipeline, tmp_path, monkeypatch):
    """A folder without write permission (simulated: the tests may run as root, for whom
    permissions do not hold) is refused before any work, for a file and a folder output."""
    import sodtool.artefacts as A

    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(A.os, "access", lambda p, mode, *a, **k: False if Path(p) == locked else real(p, mode))
    r = pipeline / "run"
    for args in (["detect", "--detector", r / "detector" / "model.pt", "--data", pipeline / "data", "--split",
                  "minival", "--out", locked / "d.json"],
                 ["data", "stats", "--data", pipeline / "data", "--out", locked / "stats"],
                 ["train", "sr", "--hr", r / "rois_train.h5", "--lr", r / "rois_train_lr.h5", "--out", locked / "sr"]):
        res = cli(*args)
        assert res.exit_code == 2 and res.stderr.strip() == f"sodtool: error: cannot write {args[-1]}: no permission to write in {locked}", res.stderr
    assert list(locked.iterdir()) == []


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES])
def test_full_disk_while_writing_keeps_the_old_output(cli, pipeline, tmp_path, monkeypatch, code):
    """ENOSPC / EACCES in the middle of writing: one line, exit 2, the previous output intact,
    no temporary left (data stats --overwrite: a folder; detect --overwrite: a file)."""
    import sodtool.stages.stats as stats_stage
    from sodtool import artefacts

    stats = tmp_path / "stats"
    shutil.copytree(pipeline / "run" / "stats", stats)
    dets = tmp_path / "dets.json"
    shutil.copy(pipeline / "run" / "detections_minival.json", dets)
    shutil.copy(pipeline / "run" / "detections_minival.manifest.json", tmp_path / "dets.manifest.json")
    before = _snapshot(tmp_path)

    def fail(*a, **k):
        raise OSError(code, os.strerror(code), str(a[-1]) if a else None)

    monkeypatch.setattr(stats_stage, "draw_size_histogram", fail)
    res = cli("data", "stats", "--data", pipeline / "data", "--split", "train", "--out", stats, "--overwrite")
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert res.stderr.startswith(f"sodtool: error: {os.strerror(code)}")
    real_dump = json.dump
    monkeypatch.setattr(artefacts.json, "dump", lambda obj, f, **k: (real_dump(obj[:1], f), fail(f.name)))
    # (write_json into the temporary file dies half-way: the file it wrote must go too)
    # --quiet: without it the finished progress bar stands above the error line.
    res = cli("--quiet", "detect", "--detector", pipeline / "run" / "detector" / "model.pt", "--data",
              pipeline / "data", "--split", "minival", "--out", dets, "--overwrite")
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert _snapshot(tmp_path) == before


def test_overwrite_replaces_a_finished_output(cli, pipeline, tmp_path):
    stats = tmp_path / "stats"
    shutil.copytree(pipeline / "run" / "stats", stats)
    (stats / "extra.txt").write_text("old")
    _run(cli, "data", "stats", "--data", pipeline / "data", "--split", "minival", "--out", stats, "--overwrite")
    assert sorted(p.name for p in stats.iterdir()) == ["manifest.json", "sizes_minival.png", "stats_minival.json"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_stale_temporaries_are_removed_at_the_next_start(cli, pipeline, tmp_path):
    """A kill leaves `.NAME.PID.tmp` files; the next run writing the same output removes those of
    dead processes (and leaves other files alone)."""
    from sodtool.artefacts import remove_stale_temporaries

    dead = 2 ** 22 + 12345  # above Linux's default pid_max: no such process
    out = tmp_path / "dets.json"
    stale = [tmp_path / f".dets.json.{dead}.tmp", tmp_path / f".eval.{dead}.tmp"]
    stale[0].write_bytes(b"x" * 1000)
    stale[1].mkdir()
    (stale[1] / "metrics.json").write_text("{}")
    alive = tmp_path / f".dets.json.{os.getppid()}.tmp"  # a live process: left alone
    alive.write_text("busy")
    other = tmp_path / ".dets.json.notes"
    other.write_text("mine")
    _run(cli, "detect", "--detector", pipeline / "run" / "detector" / "model.pt", "--data", pipeline / "data",
         "--split", "minival", "--out", out)
    assert not stale[0].exists() and stale[1].exists() and alive.exists() and other.exists()
    assert remove_stale_temporaries(tmp_path / "eval") == 1 and not stale[1].exists()
    # Killed between the two renames of a folder swap: the old output is put back.
    old = tmp_path / f".eval.old.{dead}.tmp"
    old.mkdir()
    (old / "manifest.json").write_text("{}")
    remove_stale_temporaries(tmp_path / "eval")
    assert (tmp_path / "eval" / "manifest.json").is_file() and not old.exists()


def test_no_resume_keeps_the_old_run_until_the_new_one_is_complete(cli, pipeline, tmp_path, monkeypatch):
    from sodtool.stages import train_detector as td
    from sodtool.stages.train_sr import TrainSRConfig, train_sr

    r = pipeline / "run"
    det = tmp_path / "detector"
    shutil.copytree(r / "detector", det)
    before = _snapshot(det)
    args = ["train", "detector", "--preset", "quick", "--data", pipeline / "data", "--out", det, "--iterations", 3,
            "--batch-size", 2, "--min-size", 192, "--max-size", 192, "--checkpoint-every", 1, "--log-every", 1,
            "--seed", 1, "--no-resume", "--no-eval"]

    def killed(*a, **k):
        raise KeyboardInterrupt  # as if killed while the new model is written

    monkeypatch.setattr(td, "save_detector", killed)
    with pytest.raises(KeyboardInterrupt):
        td.train_detector(td.TrainDetectorConfig(data=pipeline / "data", out=det, preset="quick", iterations=3,
                                                 batch_size=2, min_size=192, max_size=192, checkpoint_every=1,
                                                 seed=1, resume=False, eval=False))
    assert _snapshot(det) == before  # the old run is whole; its new version was beside it
    monkeypatch.undo()
    _run(cli, *args)
    manifest = json.loads((det / "manifest.json").read_text())
    assert manifest["config"]["seed"] == 1 and manifest["metrics"]["iterations"] == 3
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    sr = tmp_path / "sr"
    shutil.copytree(r / "sr", sr)
    before = _snapshot(sr)
    kw = dict(hr=r / "rois_train.h5", lr=r / "rois_train_lr.h5", out=sr, iterations=3, batch_size=4,
              checkpoint_every=1, log_every=1, seed=2, resume=False)
    assert train_sr(TrainSRConfig(stop_after=2, **kw)) == {"stopped_at": 2}
    assert _snapshot(sr) == before
    train_sr(TrainSRConfig(**kw))
    assert json.loads((sr / "manifest.json").read_text())["config"]["seed"] == 2


def _rows(path: Path, drop=("crops_per_s", "train_time_s")) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in drop} for line in path.read_text().splitlines()]


def test_train_sr_log_after_a_kill_equals_the_uninterrupted_run(pipeline, tmp_path):
    """Killed after logging past its last checkpoint (simulated exactly: the checkpoint of step 4
    put back after the run went on to step 6), rerun, then rerun once finished: metrics.jsonl is
    the uninterrupted run's, row for row."""
    from sodtool.stages.train_sr import TrainSRConfig, train_sr

    r = pipeline / "run"
    kw = dict(hr=r / "rois_train.h5", lr=r / "rois_train_lr.h5", iterations=8, batch_size=4, checkpoint_every=2,
              log_every=1, val_every=3, seed=0, device="cpu")
    train_sr(TrainSRConfig(out=tmp_path / "a", **kw))
    b = tmp_path / "b"
    train_sr(TrainSRConfig(out=b, stop_after=4, **kw))
    shutil.copy(b / "checkpoint.pt", tmp_path / "ckpt4.pt")
    train_sr(TrainSRConfig(out=b, stop_after=6, **kw))
    shutil.copy(tmp_path / "ckpt4.pt", b / "checkpoint.pt")  # the kill came before the step-6 checkpoint
    assert len(_rows(b / "metrics.jsonl")) > len([x for x in _rows(tmp_path / "a" / "metrics.jsonl") if x["step"] <= 4])
    train_sr(TrainSRConfig(out=b, **kw))
    assert _rows(b / "metrics.jsonl") == _rows(tmp_path / "a" / "metrics.jsonl")
    train_sr(TrainSRConfig(out=b, **kw))  # a finished run rerun: no row added
    assert _rows(b / "metrics.jsonl") == _rows(tmp_path / "a" / "metrics.jsonl")


def test_downsample_records_the_digest_it_read_and_verify_reports(cli, pipeline, tmp_path):
    from sodtool import store as S

    r = pipeline / "run"
    res = _run(cli, "verify", r / "rois_train.h5", r / "rois_train_lr.h5")
    assert res.stdout.count(": ok, ") == 2
    info = S.store_info(r / "rois_train_lr.h5", S.LR_SCHEMA)
    assert info["source_content_sha256"] == S.store_info(r / "rois_train.h5")["content_sha256"]
    damaged = tmp_path / "rois_train.h5"
    shutil.copy(r / "rois_train.h5", damaged)
    _flip_crop_bytes(damaged)
    with pytest.raises(InputError, match="corrupted"):
        S.verify_store(damaged)


def test_skip_invalid_reports_what_it_dropped(cli, pipeline, tmp_path):
    bad = tmp_path / "bad"
    _write_bad_inputs(bad, pipeline)
    out = tmp_path / "r.h5"
    res = cli("crop-rois", "--detector", "frcnn", "--detector-weights", pipeline / "run" / "detector" / "model.pt",
              "--data", bad / "data_badbox", "--split", "train", "--mode", "train", "--hr-size", 32,
              "--rois-per-image", 4, "--out", out, "--skip-invalid")
    assert res.exit_code == 0, res.stderr
    said = " ".join(res.stderr.split())
    assert "--skip-invalid: dropped 1 boxes of" in said and "outside_image: 1 boxes in 1 images" in said
    manifest = json.loads((tmp_path / "r.h5.manifest.json").read_text())
    assert manifest["metrics"]["skipped_annotations"] == {"boxes": {"outside_image": 1},
                                                          "images": {"outside_image": 1}}


def test_warnings_are_held_back_on_error_and_shown_on_success(capsys):
    """A library warning then an error: the error line alone. A warning in a command that
    succeeds: one `warning:` line after it."""
    import typer

    from sodtool.cli import handles_input_errors

    @handles_input_errors
    def failing():
        warnings.warn("torch says something\nover two lines", UserWarning)
        raise InputError("bad input")

    @handles_input_errors
    def fine():
        warnings.warn("torch says something", UserWarning)
        return 7

    with pytest.raises(typer.Exit) as e:
        failing()
    assert e.value.exit_code == 2
    assert capsys.readouterr().err == "sodtool: error: bad input\n"
    assert fine() == 7
    assert capsys.readouterr().err == "warning: torch says something\n"

    @handles_input_errors
    def non_finite():  # as `train detector` ends on a NaN loss: its own line, exit 3
        warnings.warn("grad scaler says something", UserWarning)
        typer.echo("sodtool: error: loss is not finite at iteration 3", err=True)
        raise typer.Exit(3)

    with pytest.raises(typer.Exit) as e:
        non_finite()
    assert e.value.exit_code == 3
    assert capsys.readouterr().err == "sodtool: error: loss is not finite at iteration 3\n"


def test_os_error_line_names_the_path():
    from sodtool.cli import _os_error_line

    assert _os_error_line(OSError(errno.ENOSPC, "No space left on device", "runs/x.h5")) == \
        "No space left on device: runs/x.h5"
    assert _os_error_line(OSError("Unable to create file\nmore")) == "Unable to create file"


def test_width_given_as_a_string_is_named(tmp_path):
    from sodtool.coco import validate_coco_dict

    data = {"images": [{"id": 1, "width": "320", "height": 320, "file_name": "a.jpg"}], "annotations": [],
            "categories": [{"id": 1, "name": "a"}]}
    with pytest.raises(InputError, match=r"image 1 \(a.jpg\) has width '320', expected a number of pixels"):
        validate_coco_dict(data, "x.json")


def test_non_finite_detector_loss_is_one_line_exit_3(cli, pipeline, tmp_path):
    """A learning rate that blows the detector up: exit 3 and its one line, whatever torch warned."""
    res = cli("--quiet", "train", "detector", "--preset", "quick", "--data", pipeline / "data", "--out",
              tmp_path / "nan", "--iterations", 6, "--batch-size", 2, "--min-size", 192, "--max-size", 192,
              "--lr", "1e12", "--warmup-iters", 0, "--checkpoint-every", 1, "--no-eval")
    assert res.exit_code == 3, (res.stderr, res.exception)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sodtool: error: loss is not finite at iteration"), res.stderr
    assert not (tmp_path / "nan" / "model.pt").exists()
