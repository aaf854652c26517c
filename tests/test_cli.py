"""The command line as a whole: version, help, info, error reporting, and an example in every --help."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from sodtool import __version__


def _commands():
    """Every runnable command path registered right now: leaf commands, and groups that do
    something themselves (invoke_without_command, e.g. `sodtool eval --results`)."""
    import typer.main

    from sodtool.cli import app

    root = typer.main.get_command(app)
    found = []

    def walk(cmd, path):
        subs = getattr(cmd, "commands", None)
        if subs is None or (path and getattr(cmd, "invoke_without_command", False)):
            found.append(tuple(path))
        for name, sub in sorted((subs or {}).items()):
            if not getattr(sub, "hidden", False):
                walk(sub, path + [name])

    walk(root, [])
    return found


def test_version(cli):
    res = cli("--version")
    assert res.exit_code == 0 and res.stdout.strip() == f"sodtool {__version__}"


def test_python_m_sodtool_version():
    res = subprocess.run([sys.executable, "-m", "sodtool", "--version"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "NO_COLOR": "1"})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"sodtool {__version__}"


def test_help_lists_groups(cli):
    res = cli("--help")
    assert res.exit_code == 0
    for word in ("data", "train", "info", "--version", "--debug", "--quiet"):
        assert word in res.stdout
    assert cli().exit_code in (0, 2)  # no arguments: help, not a crash


def test_root_help_has_an_example(cli):
    assert "Example" in cli("--help").stdout


def test_info(cli):
    res = cli("info")
    assert res.exit_code == 0, res.stderr
    for key in ("sodtool", "torch", "torchvision", "pycocotools", "device"):
        assert any(line.split()[0] == key for line in res.stdout.splitlines() if line.strip()), res.stdout
    assert __version__ in res.stdout


def test_known_commands_are_registered():
    cmds = _commands()
    assert ("info",) in cmds and ("data", "import-yolo") in cmds


@pytest.mark.parametrize("path", _commands(), ids=lambda p: " ".join(p))
def test_every_command_help_has_an_example(cli, path):
    res = cli(*path, "--help")
    assert res.exit_code == 0, res.stderr
    assert "Example" in res.stdout, f"`sodtool {' '.join(path)} --help` shows no example"
    assert "sodtool " + path[0] in res.stdout.replace("\n", " ")  # the example runs this command


def test_input_error_is_one_line_exit_2(cli, tmp_path):
    res = cli("data", "import-yolo", tmp_path / "no-such-folder", "--out", tmp_path / "o")
    assert res.exit_code == 2
    assert res.exception is None  # handled, not a crash
    lines = res.stderr.strip().splitlines()
    assert lines == [f"sodtool: error: YOLO dataset folder not found: {tmp_path / 'no-such-folder'}"]
    assert "Traceback" not in res.stderr and res.stdout == ""


def test_debug_shows_the_traceback(cli, tmp_path):
    res = cli("--debug", "data", "import-yolo", tmp_path / "no-such-folder")
    assert res.exit_code == 2
    assert "Traceback (most recent call last)" in res.stderr
    assert "InputError: YOLO dataset folder not found" in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("sodtool: error: YOLO dataset folder not found")
    # --debug does not stick to the next command
    res = cli("data", "import-yolo", tmp_path / "no-such-folder")
    assert "Traceback" not in res.stderr


def test_usage_error_exits_2(cli):
    res = cli("data", "import-yolo", "--no-such-option")
    assert res.exit_code == 2
    res = cli("no-such-command")
    assert res.exit_code == 2


def _command_tree():
    """{path: click command} of every runnable command (see _commands), hidden ones included."""
    import typer.main

    from sodtool.cli import app

    found = {}

    def walk(cmd, path):
        subs = getattr(cmd, "commands", None)
        if subs is None or (path and getattr(cmd, "invoke_without_command", False)):
            found[tuple(path)] = cmd
        for name, sub in (subs or {}).items():
            walk(sub, path + [name])

    walk(typer.main.get_command(app), [])
    return found


def _listed_commands(help_text: str) -> list[str]:
    """Command names of a --help's Commands section, top to bottom (rich panel or plain click)."""
    import re

    lines = help_text.splitlines()
    start = next(i for i, line in enumerate(lines) if "Commands" in line)
    names = []
    for line in lines[start + 1:]:
        m = re.match(r"^[│|]? {1,2}([a-z][a-z0-9-]*)(?: {2,}|\s*[│|]?$)", line)
        if m:
            names.append(m.group(1))
    return names


def test_help_lists_commands_in_pipeline_order(cli):
    res = cli("--help")
    assert res.exit_code == 0, res.stderr
    assert _listed_commands(res.stdout) == ["data", "train", "detect", "crop-rois", "downsample", "eval", "predict", "verify",
                                            "info"], res.stdout


def test_train_help_lists_trainings_in_pipeline_order(cli):
    res = cli("train", "--help")
    assert res.exit_code == 0, res.stderr
    assert _listed_commands(res.stdout) == ["detector", "fsr", "sr", "mtgan", "detgan"], res.stdout


_REUSE_PROBE = """
import ctypes, resource, sys
from sodtool.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
size = 64 << 20  # above glibc's largest mmap threshold (32 MiB)
def touch():
    p = libc.malloc(size)
    ctypes.memset(p, 1, size)
    libc.free(p)
touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
touch()
print(int(applied), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc options are glibc's")
def test_keep_freed_memory_makes_malloc_reuse_large_freed_blocks():
    # A 64 MiB block (a batch's activations are 10x that) freed and asked for again: glibc's
    # default unmaps it and faults in all 16,384 pages anew; after keep_freed_memory(), which the
    # CLI calls first thing, the heap keeps it and the second use faults (almost) no page.
    def faults(mode):
        res = subprocess.run([sys.executable, "-c", _REUSE_PROBE, mode], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        applied, n = map(int, res.stdout.split())
        return applied, n

    (default_applied, default_n), (applied, n) = faults("default"), faults("keep")
    assert default_applied == 0 and applied == 1
    # 16,384 faults by default on 4 KiB pages (fewer where transparent huge pages are "always").
    assert n < 100 and default_n > n


@pytest.mark.parametrize("kind", ["log", "warn"])
def test_a_long_path_in_a_message_is_not_broken_across_lines(monkeypatch, kind):
    # rich breaks lines at the console's width, inside a word if need be; a path named in a
    # message must stay whole, so that a user can copy it and a script can grep for it.
    import io

    from rich.console import Console

    from sodtool import console

    buf = io.StringIO()
    monkeypatch.setattr(console, "console", Console(file=buf, width=40, color_system=None))
    path = "/tmp/" + "a-rather-long-folder-name/" * 4 + "broken.jpg"
    getattr(console, kind)(f"skipped {path}: image file unreadable")
    assert path in buf.getvalue().splitlines()[0]


# --- options built from the configs (sodtool.options, cli.config_options) -------------------

# Commands whose options feed no config dataclass.
NO_CONFIG_COMMANDS = {
    ("info",): "no options",
    ("crop-rois", "merge"): "calls merge_shards(out, shards, overwrite=...) directly; no config dataclass",
    ("verify",): "calls store.verify_store(path) on each argument; no options",
}

# (config class, field): fields that are no command-line option, and why.
_PRESET_ONLY = "a Faster R-CNN build setting that only the preset (PRESETS) fills; no option has ever set it"
NOT_OPTIONS = {
    ("TrainSRConfig", "val_seed"): "fixed at 0 so that train sr and train mtgan hold out the same rows",
    ("TrainMTGANConfig", "val_seed"): "fixed at 0 so that train sr and train mtgan hold out the same rows",
    ("TrainMTGANConfig", "d_lr_gamma"): "D's step decay stays the paper's /10 (--d-lr-step's help says so); "
                                        "--d-lr-step sets only how often it applies",
    ("TrainMTGANConfig", "sample_count"): "crops per sample grid: a fixed layout of samples/*.png, no option",
    ("TrainDetectorConfig", "roi_positive_fraction"): _PRESET_ONLY,
    ("TrainDetectorConfig", "representation_size"): _PRESET_ONLY,
    ("TrainDetectorConfig", "rpn_pre_nms_train"): _PRESET_ONLY,
    ("TrainDetectorConfig", "rpn_post_nms_train"): _PRESET_ONLY,
    ("TrainDetectorConfig", "rpn_post_nms_test"): _PRESET_ONLY,
    ("TrainDetectorConfig", "eval_batch_size"): "train detector has no --eval-batch-size: its final evaluation "
                                                "runs at the field's default (train fsr has the option)",
    ("TrainDetectorConfig", "stop_after"): "test hook the tests set on the config; unlike the other trainings, "
                                           "train detector never had a hidden --stop-after",
    ("RescoreConfig", "roi_score_thresh"): "eval --detector takes its ROIs at the paper's protocol (crop-rois test "
                                           "mode's 0.05), as a --rois store holds them; tests set it",
    ("RescoreConfig", "rois_per_image"): "eval --detector takes the paper's 100 ROIs per image (crop-rois test mode), "
                                         "as a --rois store holds them; tests take fewer to run quicker",
    ("RescoreConfig", "detector_batch"): "images per detector call on eval --detector's path: never exposed on the "
                                         "command line; kept at crop-rois --batch-images' default",
    ("RescoreConfig", "fig_triplets"): "figure size, fixed on the command line (--no-figures drops the figures); "
                                       "tests draw fewer",
    ("RescoreConfig", "fig_images"): "figure size, fixed on the command line (--no-figures drops the figures); "
                                     "tests draw fewer",
    ("SynthConfig", "objects_per_image"): "never an option: the preset's range (None); tests and library callers "
                                          "set small ranges for tiny datasets",
    ("SynthConfig", "distractors_per_image"): "as objects_per_image",
    ("SynthConfig", "max_object_side"): "never an option: the large preset's cap on object sides (None: the "
                                        "preset's); tests set it through the library",
}


def _config_commands():
    """{path: (click command, its config classes)} of the commands built by cli.config_options."""
    return {path: (cmd, cmd.callback.config_classes) for path, cmd in _command_tree().items()
            if getattr(cmd.callback, "config_classes", None)}


def test_every_config_field_has_its_option_and_every_option_its_field():
    import dataclasses
    import inspect

    from sodtool import options as o

    found = _config_commands()
    tree = _command_tree()
    assert set(found) == set(tree) - set(NO_CONFIG_COMMANDS), (
        "build each command's options from its config (@config_options) or list it in NO_CONFIG_COMMANDS: "
        f"{sorted(set(tree) - set(NO_CONFIG_COMMANDS) - set(found))}")
    for path, (cmd, classes) in found.items():
        where = f"sodtool {' '.join(path)}"
        params = {p.name: p for p in cmd.params}
        own = set(inspect.signature(cmd.callback.__wrapped__ if hasattr(cmd.callback, "__wrapped__")
                                    else cmd.callback).parameters)
        fields = {}
        for cls in classes:
            for f in dataclasses.fields(cls):
                if o.is_option(f):
                    assert f.name in params, f"{where}: {cls.__name__}.{f.name} has no option"
                    if f.name in fields:  # a field of two configs is one option: they must agree
                        assert fields[f.name].default == f.default, f"{where}: {f.name} differs between configs"
                    fields[f.name] = f
                else:
                    assert (cls.__name__, f.name) in NOT_OPTIONS, (
                        f"{where}: {cls.__name__}.{f.name} is no option; declare it with option() or list it "
                        "in NOT_OPTIONS with the reason")
        for name, p in params.items():
            assert name in fields or name in own, f"{where}: option {p.opts} feeds no config field"
            if name not in fields:
                continue
            f = fields[name]
            cli_default = f.default if f.metadata[o.CLI_DEFAULT] is o.SAME else f.metadata[o.CLI_DEFAULT]
            if cli_default is dataclasses.MISSING:
                assert p.required, f"{where} {p.opts[0]}: the field is required, the option is not"
                continue
            assert not p.required, f"{where} {p.opts[0]}"
            got = p.default
            parse = f.metadata[o.PARSE]
            if parse is not None:
                got = parse(got, p.opts[0])
            elif isinstance(got, list):
                got = tuple(got)
            # What the config gets when the option is not given: the field's default, or for a field
            # the stage requires (e.g. crop-rois --out), the option's own (the stage names it).
            want = cli_default if f.default is dataclasses.MISSING else f.default
            assert got == want and isinstance(got, bool) == isinstance(want, bool), (
                f"{where} {p.opts[0]}: default {p.default!r} reads as {got!r}, the field's is {want!r}")
            assert f.metadata[o.HELP] == p.help, f"{where} {p.opts[0]}: help text not the field's"
    stale = set(NOT_OPTIONS) - {(cls.__name__, f.name) for _, classes in found.values() for cls in classes
                                for f in dataclasses.fields(cls)}
    assert not stale, f"NOT_OPTIONS entries that match no field: {sorted(stale)}"


def test_options_reach_the_config(cli, tmp_path, monkeypatch):
    """A command builds its config from the options: defaults from the fields, values as typed."""
    from pathlib import Path

    import sodtool.stages.train_sr as stage
    from sodtool.configs.train_sr import TrainSRConfig

    seen = []
    monkeypatch.setattr(stage, "train_sr", lambda cfg: seen.append(cfg))
    res = cli("train", "sr", "--hr", "a.h5", "--lr", "a_lr.h5", "--out", tmp_path / "sr")
    assert res.exit_code == 0, res.stderr
    assert seen == [TrainSRConfig(hr=Path("a.h5"), lr=Path("a_lr.h5"), out=tmp_path / "sr")]
    res = cli("train", "sr", "--hr", "a.h5", "--lr", "a_lr.h5", "--hr", "b.h5", "--lr", "b_lr.h5", "--out",
              tmp_path / "sr", "--workers", "2", "--no-long-skip", "--learning-rate", "0.5", "--tensorboard")
    assert res.exit_code == 0, res.stderr
    assert seen[1] == TrainSRConfig(hr=(Path("a.h5"), Path("b.h5")), lr=(Path("a_lr.h5"), Path("b_lr.h5")),
                                    out=tmp_path / "sr", num_workers=2, long_skip=False, learning_rate=0.5,
                                    tensorboard=True)

    # comma-separated integers, a repeated path and inverted flags become the fields they feed
    import sodtool.stages.train_detector as detector_stage
    import sodtool.stages.train_mtgan as mtgan_stage
    from sodtool.configs.train_detector import TrainDetectorConfig
    from sodtool.configs.train_mtgan import TrainMTGANConfig

    monkeypatch.setattr(detector_stage, "train_detector", lambda cfg: seen.append(cfg))
    monkeypatch.setattr(mtgan_stage, "train_mtgan", lambda cfg: seen.append(cfg))
    res = cli("train", "detector", "--out", tmp_path / "det")
    assert res.exit_code == 0, res.stderr
    assert seen[-1] == TrainDetectorConfig(out=tmp_path / "det")
    res = cli("train", "detector", "--out", tmp_path / "det", "--milestones", "600,800", "--train-sizes", "256,320",
              "--anchor-sizes", "16,32", "--returned-layers", "2,3", "--extra-data", "g1", "--extra-data", "g2",
              "--no-eval", "--vflip", "--workers", "1")
    assert res.exit_code == 0, res.stderr
    assert seen[-1] == TrainDetectorConfig(out=tmp_path / "det", milestones=(600, 800), train_sizes=(256, 320),
                                           anchor_sizes=(16, 32), returned_layers=(2, 3),
                                           extra_data=(Path("g1"), Path("g2")), eval=False, vflip=True, workers=1)
    res = cli("train", "detector", "--out", tmp_path / "det", "--milestones", "6e2")
    assert res.exit_code == 2 and "--milestones takes comma-separated integers, got '6e2'" in res.stderr

    args = ["train", "mtgan", "--hr", "a.h5", "--lr", "a_lr.h5", "--sr", tmp_path / "sr", "--out", tmp_path / "mt"]
    res = cli(*args)
    assert res.exit_code == 0, res.stderr
    assert seen[-1] == TrainMTGANConfig(hr=Path("a.h5"), lr=Path("a_lr.h5"), sr=tmp_path / "sr", out=tmp_path / "mt")
    res = cli(*args, "--no-adv", "--no-reg-branch", "--workers", "3")
    assert res.exit_code == 0, res.stderr
    assert seen[-1] == TrainMTGANConfig(hr=Path("a.h5"), lr=Path("a_lr.h5"), sr=tmp_path / "sr", out=tmp_path / "mt",
                                        adv=False, reg_branch=False, num_workers=3)


def test_eval_options_reach_their_configs(cli, tmp_path, monkeypatch):
    """`sodtool eval` builds one of two configs from one set of options: its mode decides which."""
    from pathlib import Path

    import sodtool.stages.eval_mtgan as rescoring
    import sodtool.stages.eval_results as results
    from sodtool.configs.eval_mtgan import RescoreConfig
    from sodtool.configs.eval_results import EvalResultsConfig

    seen = []
    monkeypatch.setattr(rescoring, "rescore_eval", lambda cfg: seen.append(cfg))
    monkeypatch.setattr(results, "evaluate_results", lambda cfg: seen.append(cfg))
    res = cli("eval", "--mtgan", "m", "--rois", "r.h5", "--ablation", "a=x", "--ablation", "b=y", "--slice", "512",
              "--no-figures", "--split", "val")
    assert res.exit_code == 0, res.stderr
    assert seen == [RescoreConfig(mtgan=Path("m"), rois=Path("r.h5"), ablations=("a=x", "b=y"), slice=512,
                                  figures=False, split="val")]
    res = cli("eval", "--results", "dets.json", "--data", "d", "--overwrite")
    assert res.exit_code == 0, res.stderr
    assert seen[1] == EvalResultsConfig(results=Path("dets.json"), data=Path("d"), overwrite=True)


# (command line, stage module, stage function, the config it must build): defaults from the
# fields, values as typed, the spellings that differ from the field (--split -> splits, --slice,
# --detector-weights, --eval/--no-eval) included.
_REACH = [
    (["data", "synth"], "synth", "synthesize", ("SynthConfig", {})),
    (["data", "synth", "--preset", "bench", "--train-images", "5", "--workers", "2", "--overwrite"], "synth",
     "synthesize", ("SynthConfig", dict(preset="bench", train_images=5, workers=2, overwrite=True))),
    (["data", "stats", "--data", "d", "--split", "val"], "stats", "dataset_stats",
     ("StatsConfig", dict(data="d", split="val"))),
    (["data", "import-yolo", "src", "--val-fraction", "0.3", "--skip-orphan-labels"], "import_yolo", "import_yolo",
     ("ImportYoloConfig", dict(src="src", val_fraction=0.3, skip_orphan_labels=True))),
    (["data", "slice", "--out", "o"], "slice_data", "slice_dataset", ("SliceDataConfig", dict(out="o"))),
    (["data", "slice", "--out", "o", "--split", "train", "--split", "val", "--size", "256"], "slice_data",
     "slice_dataset", ("SliceDataConfig", dict(out="o", splits=("train", "val"), size=256))),
    (["data", "generate", "--out", "o", "--method", "detgan", "--detgan", "r"], "generate_data", "generate_data",
     ("GenerateDataConfig", dict(out="o", method="detgan", detgan="r"))),
    (["downsample", "a.h5", "--workers", "0"], "downsample", "downsample",
     ("DownsampleConfig", dict(src="a.h5", workers=0))),
    (["detect"], "detect", "detect", ("DetectConfig", {})),
    (["detect", "--detector-weights", "w.pt", "--no-eval", "--amp"], "detect", "detect",
     ("DetectConfig", dict(weights="w.pt", evaluate=False, amp=True))),
    (["crop-rois", "--out", "o.h5", "--slice", "256", "--gt-only"], "crop_rois", "crop_rois",
     ("CropRoisConfig", dict(out="o.h5", slice=256, gt_only=True))),
]


@pytest.mark.parametrize("args, module, function, expected", _REACH, ids=lambda v: " ".join(v) if isinstance(v, list)
                         else None)
def test_options_reach_the_configs_of_the_data_and_roi_commands(cli, monkeypatch, args, module, function, expected):
    import dataclasses
    import importlib
    from pathlib import Path

    stage = importlib.import_module(f"sodtool.stages.{module}")
    cls_name, values = expected
    cls = getattr(stage, cls_name)
    paths = {f.name for f in dataclasses.fields(cls) if "Path" in str(f.type)}
    want = cls(**{k: Path(v) if k in paths else v for k, v in values.items()})
    seen = []
    monkeypatch.setattr(stage, function, lambda cfg: seen.append(cfg))
    res = cli(*args)
    assert res.exit_code == 0, res.stderr
    assert seen == [want]


def test_crop_rois_without_out_asks_for_it_and_merge_needs_none(cli, monkeypatch):
    import sodtool.stages.crop_rois as stage

    monkeypatch.setattr(stage, "crop_rois", lambda cfg: pytest.fail("crop_rois ran"))
    res = cli("crop-rois", "--gt-only")
    assert res.exit_code == 2
    assert res.stderr.strip().startswith("sodtool: error: give --out (the store to write")
    monkeypatch.setattr(stage, "merge_shards", lambda out, shards, overwrite: None)
    res = cli("crop-rois", "merge", "m.h5", "a.h5", "b.h5")
    assert res.exit_code == 0, res.stderr


def test_help_and_the_configs_import_no_torch():
    """`--help` of every command, and the config modules, load without torch (seconds saved)."""
    code = """
import pkgutil, sys, importlib
import sodtool.configs
for m in pkgutil.iter_modules(sodtool.configs.__path__):
    importlib.import_module("sodtool.configs." + m.name)
from typer.testing import CliRunner
import typer.main
from sodtool.cli import app
runner = CliRunner()
def walk(cmd, path):
    res = runner.invoke(app, path + ["--help"])
    assert res.exit_code == 0, (path, res.output)
    for name, sub in (getattr(cmd, "commands", None) or {}).items():
        walk(sub, path + [name])
walk(typer.main.get_command(app), [])
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "pycocotools", "h5py"))
print(" ".join(heavy[:5]))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "NO_COLOR": "1"})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "", f"imported by --help: {res.stdout.strip()}"
