"""Issue 33's start-up, message and resume failures, each in its own test.

- Ctrl-C at any moment of start-up (while the CLI and torch import) is one line and exit 130.
- `eval --slice 128 --overlap nan|1.0|-0.5` is one line (it was a traceback); `eval --slice 16`
  names the tile size (it said "give --detector" while --detector was given); `--slice 0` means
  whole images.
- An MTGAN run moved as a whole folder still finds the store it was trained on (crop context)
  and its `train sr` run (loss curves); where the store truly is gone, the warning names an
  option that exists (`--context`, of eval and predict).
- A training killed between two log lines and resumed writes the uninterrupted run's
  metrics.jsonl, row for row (loss terms; timings and crops/s aside): train sr, train mtgan,
  train detector (MDSSD).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from test_rescore import save_mtgan, save_tiny_detector
from test_train import write_hr, write_lr

REPO = Path(__file__).resolve().parents[1]
HR = 32
TIMINGS = ("crops_per_s", "train_time_s")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread, as tests/test_train.py: quicker on a loaded machine, and the two runs compared alike."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _rows(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS}
            for line in path.read_text().splitlines()]


# --------------------------------------------------------------------------------------------
# Ctrl-C during start-up
# --------------------------------------------------------------------------------------------

# Modules whose import ends while `python -m sodtool` starts: the CLI's own (typer, before any
# command runs), then torch's, mid-way through torch's import inside the command (the 88-line
# traceback of the issue came from there: cli.py's `finally` imported torch again).
STARTUP_MARKS = ("typer.main", "torch._C", "torch.nn.modules.module", "torch.nn")


def _interrupt_after_import(mark: str, tmp_path: Path, delay: float = 0.0) -> tuple[int, list[str]]:
    """Start `python -X importtime -m sodtool train detector ...`, send SIGINT `delay` seconds
    after the import of `mark` has finished (importtime reports each import on stderr as it
    ends; a thread drains the pipe meanwhile), and return (exit code, stderr lines other than
    importtime's). Timed from a module of sodtool rather than from the process start, so that
    the signal never lands in the interpreter's own start-up (site), before any code of sodtool
    can run: there Python prints its own traceback, whatever the package does."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-X", "importtime", "-m", "sodtool", "train", "detector", "--data",
           str(tmp_path / "missing"), "--out", str(tmp_path / "det")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    seen = threading.Event()

    def drain():
        for line in proc.stderr:
            lines.append(line.rstrip("\n"))
            if line.startswith("import time:") and line.split("|")[-1].strip() == mark:
                seen.set()

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        assert seen.wait(timeout=120), f"{mark} was never imported"
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
        reader.join(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, [x for x in lines if not x.startswith("import time:")]


@pytest.mark.parametrize("mark", STARTUP_MARKS)
def test_ctrl_c_during_start_up_is_one_line_and_exit_130(tmp_path, mark):
    code, said = _interrupt_after_import(mark, tmp_path)
    assert (code, said) == (130, ["sodtool: interrupted"])
    assert not (tmp_path / "det").exists()


@pytest.mark.parametrize("delay", [0.05, 0.2, 0.5, 1.0])
def test_ctrl_c_at_fixed_delays_is_one_line_and_exit_130(tmp_path, delay):
    """Delays as the issue tried them, from the moment the package starts importing. The command
    ends by itself (exit 2, one line too) if the signal comes after it has failed on the missing data."""
    code, said = _interrupt_after_import("sodtool", tmp_path, delay)
    assert (code, said) in ((130, ["sodtool: interrupted"]),
                            (2, [f"sodtool: error: dataset folder not found: {tmp_path / 'missing'}"])), said


def test_ctrl_c_raised_inside_a_finaliser_is_not_lost():
    """A KeyboardInterrupt raised in a `__del__` is "Exception ignored" by Python, and the command
    went on (seen once in this file's start-up test: exit 2 after the Ctrl-C): it is delivered
    again, silently."""
    code = ("import time\n"
            "from sodtool.__main__ import catch_lost_interrupts\n"
            "catch_lost_interrupts()\n"
            "class A:\n"
            "    def __del__(self):\n"
            "        raise KeyboardInterrupt\n"
            "try:\n"
            "    A()\n"
            "    time.sleep(5)\n"
            "    print('lost')\n"
            "except KeyboardInterrupt:\n"
            "    print('delivered')\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert (res.stdout, res.stderr) == ("delivered\n", "")


def test_command_interrupted_inside_torch_import_does_not_import_it_again(monkeypatch):
    """The wrapper's teardown imports nothing: with torch.distributed in sys.modules but
    sodtool.device gone (an import cut short), a KeyboardInterrupt stays a KeyboardInterrupt."""
    from sodtool import cli

    monkeypatch.delitem(sys.modules, "sodtool.device", raising=False)
    monkeypatch.setitem(sys.modules, "torch.distributed", sys.modules.get("torch.distributed", object()))
    imported = []
    real_import = __import__

    def spy(name, *args, **kwargs):
        imported.append(name)
        return real_import(name, *args, **kwargs)

    @cli.handles_input_errors
    def command():
        monkeypatch.setattr("builtins.__import__", spy)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        command()
    monkeypatch.undo()
    assert "sodtool.device" not in imported


# --------------------------------------------------------------------------------------------
# eval --slice / --overlap
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A one-image dataset (3 classes), a tiny detector, a tiny MTGAN run with the manifest and
    train-mode store `train mtgan` would leave (context 2.0, not crop-rois' default 1.5), made
    with paths relative to the working directory, as users type them."""
    from sodtool.artefacts import write_manifest
    from sodtool.models.frcnn import build_detector
    from sodtool.stages.crop_rois import CropRoisConfig, crop_rois
    from sodtool.stages.synth import SynthConfig, synthesize
    from sodtool.stages.train_mtgan import TrainMTGANConfig

    root = tmp_path_factory.mktemp("messages")
    data = root / "data"
    synthesize(SynthConfig(out=data, train_images=1, val_images=1, minival_images=1, image_size=192, classes=3,
                           objects_per_image=(3, 4), distractors_per_image=(0, 1), seed=3))
    cats = [{"id": c["id"], "name": c["name"]}
            for c in json.loads((data / "annotations" / "instances_minival.json").read_text())["categories"]]
    det = save_tiny_detector(root / "detector.pt", cats, build_detector)
    work = root / "work"
    work.mkdir()
    cwd = os.getcwd()
    os.chdir(work)
    try:
        run = Path("runs/q")
        crop_rois(CropRoisConfig(out=run / "rois_train.h5", data=data, split="train", mode="train", gt_only=True,
                                 hr_size=HR, context=2.0, rois_per_image=8))
        (run / "sr").mkdir(parents=True)
        (run / "sr" / "metrics.jsonl").write_text(json.dumps({"step": 1, "g_mse": 0.1}) + "\n")
        (run / "mtgan").mkdir()
        save_mtgan(run / "mtgan" / "model.pt", cats, hr_size=HR)
        cfg = TrainMTGANConfig(hr=run / "rois_train.h5", lr=run / "rois_train_lr.h5", sr=run / "sr", out=run / "mtgan")
        write_manifest(run / "mtgan", "train-mtgan", cfg, {"hr": cfg.hr, "sr": cfg.sr}, {}, seed=0, device="cpu",
                       wall_time_s=0.0)
    finally:
        os.chdir(cwd)
    return {"root": root, "data": data, "det": det, "work": work, "run": work / "runs" / "q"}


@pytest.mark.parametrize("overlap", ["nan", "1.0", "-0.5"])
def test_eval_slice_overlap_out_of_range_is_one_line(cli, world, tmp_path, overlap):
    res = cli("eval", "--slice", "128", "--overlap", overlap, "--detector", world["det"], "--mtgan",
              world["run"] / "mtgan", "--data", world["data"], "--split", "minival", "--out", tmp_path / "ev",
              "--device", "cpu", "--no-figures")
    assert res.exit_code == 2, (res.stderr, res.exception)
    assert res.stderr.strip().splitlines() == [f"sodtool: error: --overlap must be in [0, 1), got {float(overlap)}"]
    assert not any(tmp_path.iterdir())


def test_eval_slice_16_says_the_tile_size_is_wrong(cli, world, tmp_path):
    res = cli("eval", "--slice", "16", "--detector", world["det"], "--mtgan", world["run"] / "mtgan", "--data",
              world["data"], "--split", "minival", "--out", tmp_path / "ev")
    assert res.exit_code == 2
    assert res.stderr.strip().splitlines() == [
        "sodtool: error: --slice must be a tile size of at least 32 px (0: whole images), got 16"]
    res = cli("eval", "--slice", "128", "--rois", tmp_path / "r.h5", "--mtgan", world["run"] / "mtgan")
    assert res.exit_code == 2 and "give --detector" in res.stderr  # with --rois it is --detector that is missing


# --------------------------------------------------------------------------------------------
# Moved runs
# --------------------------------------------------------------------------------------------


def _moved(world, tmp_path) -> Path:
    """A copy of the whole runs/ folder elsewhere, read from a third working directory."""
    dest = tmp_path / "moved" / "runs"
    shutil.copytree(world["work"] / "runs", dest)
    (tmp_path / "elsewhere").mkdir()
    return dest / "q"


def test_moved_mtgan_run_finds_its_store_and_sr_run(world, tmp_path, monkeypatch, capsys):
    from sodtool.models.mtgan import load_mtgan, training_context, training_logs

    run = _moved(world, tmp_path)
    monkeypatch.chdir(tmp_path / "elsewhere")
    model = load_mtgan(run / "mtgan", "cpu")
    assert training_context(model, 1.5) == 2.0
    assert "could not read" not in capsys.readouterr().err
    assert training_logs(model)["sr"] == run / "sr" / "metrics.jsonl"


def test_eval_on_a_moved_run_uses_its_training_context(cli, world, tmp_path, monkeypatch):
    run = _moved(world, tmp_path)
    monkeypatch.chdir(tmp_path / "elsewhere")
    res = cli("eval", "--detector", world["det"], "--mtgan", run / "mtgan", "--data", world["data"], "--split",
              "minival", "--out", tmp_path / "ev", "--device", "cpu", "--no-figures", "--allow-trained-images")
    assert res.exit_code == 0, (res.stderr, res.exception)
    assert "could not read the crop context" not in res.stderr
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["source"]["context"] == 2.0


def test_a_store_truly_gone_names_an_option_that_exists(cli, world, tmp_path, monkeypatch, capsys):
    from sodtool.models.mtgan import load_mtgan, training_context

    run = _moved(world, tmp_path)
    (run / "rois_train.h5").unlink()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert training_context(load_mtgan(run / "mtgan", "cpu"), 1.5) == 1.5
    said = capsys.readouterr().err
    assert "could not read the crop context" in said and "runs/q/rois_train.h5" in said and "--context" in said
    for command in (["eval"], ["predict"]):
        assert "--context" in cli(*command, "--help").stdout
    res = cli("eval", "--detector", world["det"], "--mtgan", run / "mtgan", "--data", world["data"], "--split",
              "minival", "--out", tmp_path / "ev", "--device", "cpu", "--no-figures", "--allow-trained-images",
              "--context", "2.0")
    assert res.exit_code == 0, (res.stderr, res.exception)
    assert "could not read the crop context" not in res.stderr
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["source"]["context"] == 2.0


def test_run_input_follows_the_run_folder(tmp_path, monkeypatch):
    """Relative, absolute and mixed recordings (the manifest's cwd resolves the mixed ones)."""
    from sodtool.artefacts import run_input

    (tmp_path / "new" / "runs" / "q" / "mtgan").mkdir(parents=True)
    store = tmp_path / "new" / "runs" / "q" / "rois.h5"
    store.write_bytes(b"x")
    run = tmp_path / "new" / "runs" / "q" / "mtgan"
    monkeypatch.chdir(tmp_path)
    old = "/gone/work"
    assert run_input(run, {"config": {"out": "runs/q/mtgan"}}, "runs/q/rois.h5") == store
    assert run_input(run, {"config": {"out": f"{old}/runs/q/mtgan"}}, f"{old}/runs/q/rois.h5") == store
    assert run_input(run, {"config": {"out": f"{old}/runs/q/mtgan"}, "cwd": old}, "runs/q/rois.h5") == store
    assert run_input(run, {"config": {"out": f"{old}/runs/q/mtgan"}}, "runs/q/rois.h5") is None  # no cwd recorded
    assert run_input(run, {"config": {"out": "runs/q/mtgan"}}, "runs/q/other.h5") is None
    assert run_input(run, {"config": {}}, str(store)) == store  # where it was recorded: found as is


# --------------------------------------------------------------------------------------------
# metrics.jsonl of a resumed training
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("stores")
    hr = write_hr(d / "rois_train.h5")
    return hr, write_lr(hr, d / "rois_train_lr.h5")


def test_train_sr_resumed_between_log_lines_logs_the_uninterrupted_rows(stores, tmp_path):
    """Checkpoint every 2, a log line every 3: killed at 4 (after the line of 3, before that of 6),
    the resumed run's line of step 6 is the mean of steps 4-6, as the uninterrupted run's."""
    from sodtool.stages.train_sr import TrainSRConfig, train_sr

    hr, lr = stores
    kw = dict(hr=hr, lr=lr, iterations=8, batch_size=4, channels=8, up_channels=8, num_blocks=1, val_every=5,
              log_every=3, checkpoint_every=2, device="cpu")
    train_sr(TrainSRConfig(out=tmp_path / "a", **kw))
    assert train_sr(TrainSRConfig(out=tmp_path / "b", stop_after=4, **kw)) == {"stopped_at": 4}
    train_sr(TrainSRConfig(out=tmp_path / "b", **kw))
    a, b = _rows(tmp_path / "a" / "metrics.jsonl"), _rows(tmp_path / "b" / "metrics.jsonl")
    assert [r["step"] for r in a if "g_mse" in r] == [3, 6, 8]
    assert a == b


def test_train_mtgan_resumed_between_log_lines_logs_the_uninterrupted_rows(stores, tmp_path):
    """Across the end of the D warm-up (G terms start at step 3): killed at 4, between the lines of 3 and 6."""
    from sodtool.stages.train_mtgan import TrainMTGANConfig, train_mtgan
    from sodtool.stages.train_sr import TrainSRConfig, train_sr

    hr, lr = stores
    sr = tmp_path / "sr"
    train_sr(TrainSRConfig(hr=hr, lr=lr, out=sr, iterations=2, batch_size=4, channels=8, up_channels=8,
                           num_blocks=1, device="cpu"))
    kw = dict(hr=hr, lr=lr, sr=sr, iterations=7, batch_size=4, disc_arch="resnet18", d_lr=0.01, d_lr_step=3,
              d_warmup=2, log_every=3, checkpoint_every=2, sample_every=100, val_every=100, device="cpu", seed=1)
    train_mtgan(TrainMTGANConfig(out=tmp_path / "a", **kw))
    assert train_mtgan(TrainMTGANConfig(out=tmp_path / "b", stop_after=4, **kw)) == {"stopped_at": 4}
    train_mtgan(TrainMTGANConfig(out=tmp_path / "b", **kw))
    a, b = _rows(tmp_path / "a" / "metrics.jsonl"), _rows(tmp_path / "b" / "metrics.jsonl")
    assert [r["step"] for r in a if "d_total" in r] == [3, 6, 7]
    assert a == b


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    from typer.testing import CliRunner

    from sodtool.cli import app

    d = tmp_path_factory.mktemp("ssd_data") / "data"
    r = CliRunner().invoke(app, ["--quiet", "data", "synth", "--preset", "quick", "--train-images", "6", "--val-images",
                                 "1", "--minival-images", "1", "--image-size", "192", "--seed", "0", "--out", str(d)])
    assert r.exit_code == 0, r.stderr
    return d


def test_train_detector_resumed_between_log_lines_logs_the_uninterrupted_rows(tiny_data, tmp_path):
    """MDSSD, as the issue ran it: checkpoint every 2, a log line every 3, killed at 4."""
    from sodtool.stages.train_detector import TrainDetectorConfig, train_detector

    kw = dict(data=tiny_data, detector="mdssd", size=128, iterations=5, batch_size=2, checkpoint_every=2,
              log_every=3, seed=0, eval=False, device="cpu")
    train_detector(TrainDetectorConfig(out=tmp_path / "a", **kw))
    assert train_detector(TrainDetectorConfig(out=tmp_path / "b", stop_after=4, **kw)) == {"stopped_at": 4}
    train_detector(TrainDetectorConfig(out=tmp_path / "b", **kw))
    a, b = _rows(tmp_path / "a" / "metrics.jsonl"), _rows(tmp_path / "b" / "metrics.jsonl")
    assert [r["step"] for r in a] == [3, 5]
    assert a == b
