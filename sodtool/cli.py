"""The `sodtool` command line: thin Typer wrappers that parse options into each stage's config.

Each command's options are built from its stage's config dataclass (`config_options`): the
fields carry their defaults and help (`sodtool.options`), in modules that import no torch
(`sodtool.configs.*`), so `sodtool --help` builds the whole command tree without torch. What this
module adds is particular to the command line: modes chosen by which options are given, group
callbacks, error lines and exit codes. The stages (and torch) are imported inside the commands.

Bad input (`InputError`) ends with one line on stderr and exit code 2; so does a file-system
error (an output folder that cannot be written, a full disk: `OSError`), whose partial output
the stage's atomic writes have already removed. `sodtool --debug ...` shows the traceback.
Python warnings raised by the libraries during a command (torch's UserWarnings) are held back:
printed as `warning:` lines at the end of a command that succeeds, dropped from one that fails,
so an error is always one line.
"""

from __future__ import annotations

import functools
import sys
import traceback
import warnings
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperGroup

from sodtool import __version__
from sodtool.configs.crop_rois import CropRoisConfig
from sodtool.configs.detect import DetectConfig
from sodtool.configs.downsample import DownsampleConfig
from sodtool.configs.eval_mtgan import RescoreConfig
from sodtool.configs.eval_results import EvalResultsConfig
from sodtool.configs.eval_sr import EvalSRConfig
from sodtool.configs.generate_data import GenerateDataConfig
from sodtool.configs.import_yolo import ImportYoloConfig
from sodtool.configs.predict import PredictConfig
from sodtool.configs.slice_data import SliceDataConfig
from sodtool.configs.stats import StatsConfig
from sodtool.configs.synth import SynthConfig
from sodtool.configs.train_detector import TrainDetectorConfig
from sodtool.configs.train_detgan import TrainDetGANConfig
from sodtool.configs.train_fsr import TrainFSRConfig
from sodtool.configs.train_mtgan import TrainMTGANConfig
from sodtool.configs.train_sr import TrainSRConfig
from sodtool.errors import InputError

_state = {"debug": False}


def handles_input_errors(fn):
    """Decorate every command: InputError -> one line on stderr and exit code 2.

    A decorator rather than a custom click group, because Typer's internals change between
    releases (0.29 vendors its own click) while `typer.Exit` stays.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            completed = False
            try:
                ctx = kwargs.get("ctx")
                if ctx is None or ctx.invoked_subcommand is None:  # a group passing on to a subcommand needs no torch
                    _import_torch()
                result = fn(*args, **kwargs)
                completed = True
            except InputError as e:
                _fail(str(e))
            except OSError as e:
                _fail(_os_error_line(e))
            finally:  # under torchrun every exit path tears the process group down
                _finish_distributed(completed)
        for w in caught:  # the command succeeded: its warnings, one line each
            typer.echo(f"warning: {str(w.message).splitlines()[0] if str(w.message) else w.category.__name__}",
                       err=True)
        return result

    return wrapper


def _finish_distributed(completed: bool) -> None:
    """Tear down a torchrun process group, if the command made one.

    Nothing is imported here: a command that made a process group has imported sodtool.device
    (and torch) whole, while one stopped by Ctrl-C in the middle of `import torch` leaves a
    half-initialised torch behind, which a new import would trip over (a long traceback).
    """
    device = sys.modules.get("sodtool.device")
    finish = getattr(device, "finish_distributed", None)
    if finish is not None and "torch.distributed" in sys.modules:
        finish(completed)


def _import_torch() -> None:
    """Import torch with Ctrl-C held back until the import is over, then raised.

    Every command loads torch (through its stage module). A KeyboardInterrupt in the middle of
    torch's import can reach its C++ code, which then aborts the process ("terminate called after
    throwing an instance of 'pybind11::error_already_set'", exit -6), or be swallowed by it.
    """
    import threading

    if "torch" in sys.modules or threading.current_thread() is not threading.main_thread():
        return
    import signal

    held: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        import torch  # noqa: F401
    finally:
        signal.signal(signal.SIGINT, previous)
    if held:
        raise KeyboardInterrupt


def _interrupted() -> None:
    """Ctrl-C: one line and exit code 130 (128 + SIGINT), whatever the command was doing."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C would interrupt this exit
    if _state["debug"]:
        traceback.print_exc()
    sys.stderr.write("sodtool: interrupted\n")
    sys.stderr.flush()
    # CPython's `python -m` ends in SIGINT (exit status -2, not 130) once a KeyboardInterrupt has left
    # an embedded eval, which happens when Ctrl-C lands inside torch's import (C++ running Python
    # code), even though it was handled here; clear that flag (CPython only; best effort).
    try:
        import ctypes

        ctypes.c_int.in_dll(ctypes.pythonapi, "_Py_UnhandledKeyboardInterrupt").value = 0
    except (AttributeError, ValueError, OSError):
        pass
    sys.exit(130)


def _fail(line: str) -> None:
    if _state["debug"]:
        traceback.print_exc()
    typer.echo(f"sodtool: error: {line}", err=True)
    raise typer.Exit(2) from None


def _os_error_line(e: OSError) -> str:
    """An OSError as one line: what failed, on which path ("No space left on device: runs/x.h5")."""
    text = str(e).strip()
    what = e.strerror or (text.splitlines()[0] if text else type(e).__name__)
    paths = [str(p) for p in (e.filename, e.filename2) if p is not None]
    return f"{what}: {' -> '.join(paths)}" if paths else what


def config_options(*config_classes):
    """Give the decorated command one option per `option()` field of its config dataclasses.

    Defaults, types and help text are read from the fields (sodtool.options), so no default is
    written twice; the config modules import no torch, so neither does building the command tree
    (`sodtool --help`). The command function takes the built config as `cfg` (one class), or
    `configs`, a function that builds the class it is given from the options (several classes: a
    command whose mode decides which config it makes; a field name shared by two classes is one
    option), beside any parameters of its own: options particular to the command line.
    """
    import dataclasses
    import inspect
    import typing

    from sodtool import options as o

    fields = {}
    hints = {}
    for cls in config_classes:
        hints.update(typing.get_type_hints(cls))
        for f in dataclasses.fields(cls):
            if o.is_option(f):
                fields.setdefault(f.name, f)

    def values_for(cls, values: dict) -> dict:
        return {f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values and o.is_option(f)}

    def decorate(fn):
        own = inspect.signature(fn)
        own_hints = typing.get_type_hints(fn)
        params, annotations = [], {}
        for f in fields.values():
            meta = f.metadata
            kind = meta[o.CLI_TYPE] or hints[f.name]
            default = f.default if meta[o.CLI_DEFAULT] is o.SAME else meta[o.CLI_DEFAULT]
            if default is dataclasses.MISSING:
                default = ...
            elif isinstance(default, tuple):  # as the command line spells it
                default = o.csv_text(default) if kind in (str, Optional[str]) else (list(default) or None)
            if meta[o.ARGUMENT]:
                info = typer.Argument(default, help=meta[o.HELP], hidden=meta[o.HIDDEN])
            else:
                flags = meta[o.FLAG] or "--" + f.name.replace("_", "-")
                flags = (flags,) if isinstance(flags, str) else flags
                if kind in (bool, Optional[bool]) and len(flags) == 1 and "/" not in flags[0] and default is not False:
                    flags = (f"{flags[0]}/--no-{flags[0][2:]}",)
                info = typer.Option(default, *flags, help=meta[o.HELP], hidden=meta[o.HIDDEN])
            params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=kind))
            annotations[f.name] = kind
        for p in own.parameters.values():
            if p.name not in ("cfg", "configs"):
                params.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=own_hints[p.name]))
                annotations[p.name] = own_hints[p.name]

        def command(**kwargs):
            values = {name: kwargs.pop(name) for name in fields}
            for f in fields.values():
                if f.metadata[o.PARSE] is not None:
                    values[f.name] = f.metadata[o.PARSE](values[f.name], o.option_name(f))
                elif isinstance(values[f.name], list):
                    values[f.name] = tuple(values[f.name])
            if len(config_classes) == 1:
                return fn(cfg=config_classes[0](**values), **kwargs)
            return fn(configs=lambda cls: cls(**values_for(cls, values)), **kwargs)

        functools.update_wrapper(command, fn)
        del command.__wrapped__  # Typer reads the signature below, not fn's
        command.__signature__ = inspect.Signature(params)
        command.__annotations__ = annotations
        command.config_classes = config_classes  # for tests/test_cli.py's field <-> option check
        return command

    return decorate


class OrderedGroup(TyperGroup):
    """A command group whose --help lists its subcommands in the order of `order`, then any
    others in the order they were added (click sorts them by name; Typer 0.29 keeps the order
    of creation, but lists a group's plain commands before its sub-groups).

    Only `list_commands`, a plain click hook, is overridden; see handles_input_errors for why
    nothing more of the group is customised.
    """

    order: tuple[str, ...] = ()

    def list_commands(self, ctx) -> list[str]:
        rank = {name: i for i, name in enumerate(self.order)}
        return sorted(self.commands, key=lambda name: rank.get(name, len(rank)))  # stable: added order


class PipelineGroup(OrderedGroup):
    """`sodtool --help` in pipeline order: make the data, train the detector, detect, crop its
    ROIs, downsample them, train SR and the MTGAN on them (under `train`), evaluate."""

    order = ("data", "train", "detect", "crop-rois", "downsample", "eval", "predict", "verify", "info")


class TrainGroup(OrderedGroup):
    """`sodtool train --help`: the trainings in the order the pipeline runs them (fsr needs only the detector)."""

    order = ("detector", "fsr", "sr", "mtgan", "detgan")


app = typer.Typer(
    cls=PipelineGroup,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
data_app = typer.Typer(cls=OrderedGroup, help="Make, import and describe COCO-format datasets.", no_args_is_help=True)
train_app = typer.Typer(cls=TrainGroup, no_args_is_help=True,
                        help="Train the detector (before detect) and its feature-SR heads (fsr), then the SR generator and the MTGAN (after downsample); detgan: DetectorGAN, generated training images for a small dataset.")
app.add_typer(data_app, name="data")
app.add_typer(train_app, name="train")
# `sodtool eval --results FILE` is the group's callback (invoke_without_command); subcommands
# such as `sodtool eval sr` are added to eval_app by their own modules' commands below.
eval_app = typer.Typer(cls=OrderedGroup, invoke_without_command=True)
app.add_typer(eval_app, name="eval")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"sodtool {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback on errors."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or tables (for CI logs)."),
) -> None:
    """Small object detection with a multi-task super-resolution GAN (SOD-MTGAN).

    Each stage is a command that reads named artefacts and writes new ones (see README.md).

    Example: sodtool data synth --preset quick --out data/synth-quick
    """
    from sodtool.allocator import keep_freed_memory
    from sodtool.console import set_quiet

    _state["debug"] = debug
    set_quiet(quiet)
    keep_freed_memory()  # before any stage allocates: large batches then reuse freed memory


@app.command()
@handles_input_errors
def info() -> None:
    """Versions of sodtool, torch, torchvision, pycocotools and the device that `--device auto` picks.

    Example: sodtool info
    """
    import torch

    from sodtool.artefacts import versions
    from sodtool.device import device_name, resolve_device

    v = versions()
    for k in ("sodtool", "python", "torch", "torchvision", "pycocotools", "numpy"):
        typer.echo(f"{k:12s} {v[k]}")
    dev = resolve_device("auto")
    typer.echo(f"{'device':12s} {device_name(dev)}")
    typer.echo(f"{'cuda':12s} {torch.version.cuda if torch.cuda.is_available() else 'not available'}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            typer.echo(f"{'gpu ' + str(i):12s} {torch.cuda.get_device_name(i)}")


@eval_app.callback()
@handles_input_errors
@config_options(EvalResultsConfig, RescoreConfig)
def eval_results(ctx: typer.Context, configs) -> None:
    """Evaluate detections with COCOeval (bbox), or rescore the baseline's ROIs with an MTGAN and compare.

    Two modes (exactly one):

    --results FILE: evaluate a COCO results file; writes metrics.json, metrics.md, manifest.json.

    --mtgan RUN/mtgan with --detector or --rois: rescore the baseline's top-100 ROIs per image (G, D, NMS).
    Outputs baseline.json, mtgan.json, bicubic.json (control: D on bicubic crops), NAME.json per --ablation,
    pretrained_g.json with --pretrained-g (control: D on the pretrained generator's crops),
    NAME.json per --compare (another detector's detections, selected as the baseline's),
    metrics.json, table.md (AP, AP50, AP75, AP_S, AP_M, AP_L in %), figures/ and manifest.json.
    --compare without --mtgan: the baseline and the other detectors only.

    Subcommands evaluate other things.

    Example: sodtool eval --results runs/quick/dets_minival.json --data data/synth-quick --split minival

    Example: sodtool eval --split minival --data data/synth-quick --detector runs/quick/detector/model.pt --mtgan runs/quick/mtgan --out runs/quick/eval_minival

    Example: sodtool eval --split minival --data data/synth-quick --rois runs/quick/rois_minival.h5 --mtgan runs/quick/mtgan --ablation no_adv=runs/quick/mtgan_no_adv

    Example: sodtool eval --split minival --data data/synth-quick --rois runs/quick/rois_minival.h5 --mtgan runs/quick/mtgan --pretrained-g runs/quick/sr

    Example: sodtool eval --split minival --data data/synth-quick --detector runs/quick/detector/model.pt --compare fsr=runs/quick/fsr/model.pt --compare small_head=runs/quick/fsr_small_head/model.pt --out runs/quick/eval_fsr_minival
    """
    rescore = configs(RescoreConfig)
    results = configs(EvalResultsConfig).results  # None: not given (the field is required of the stage only)
    rescoring = [n for n, v in (("--mtgan", rescore.mtgan), ("--detector", rescore.detector), ("--rois", rescore.rois),
                                ("--ablation", rescore.ablations), ("--compare", rescore.compare),
                                ("--pretrained-g", rescore.pretrained_g)) if v]
    if ctx.invoked_subcommand is not None:
        if results is not None or rescoring:
            given = "--results" if results is not None else rescoring[0]
            raise InputError(f"{given} cannot be combined with the subcommand '{ctx.invoked_subcommand}'")
        return
    if results is not None and rescoring:
        raise InputError(f"--results (evaluate a results file) and {', '.join(rescoring)} (MTGAN rescoring) are "
                         "two modes: give one of them")
    if rescoring:
        if rescore.mtgan is None and not rescore.compare:
            raise InputError(f"{', '.join(rescoring)} need --mtgan (the MTGAN run folder or model.pt) for rescoring, "
                             "or --compare NAME=PATH (another detector) to put beside the baseline")
        from sodtool.stages.eval_mtgan import rescore_eval

        rescore_eval(rescore)
        return
    if results is None:
        typer.echo("sodtool: error: give --results FILE (a COCO results JSON), or --mtgan RUN/mtgan with "
                   "--detector or --rois (MTGAN rescoring), or a subcommand; see 'sodtool eval --help'", err=True)
        raise typer.Exit(2)
    from sodtool.stages.eval_results import evaluate_results

    evaluate_results(configs(EvalResultsConfig))


@eval_app.command("sr")
@handles_input_errors
@config_options(EvalSRConfig)
def eval_sr_cmd(cfg: EvalSRConfig) -> None:
    """PSNR / SSIM (RGB and Y channel) of the generator against bicubic on SR test images.

    Greyscale images are evaluated as RGB with equal channels (Y metrics on the grey level); an
    HR image up to scale-1 px larger than scale x LR is cropped to it.

    Example: sodtool eval sr --generator runs/quick/sr/generator.pt --data ../shared/data/sr/Set5 --out runs/quick/eval_sr_set5
    """
    from sodtool.stages.eval_sr import eval_sr

    eval_sr(cfg)


@data_app.command("synth")
@handles_input_errors
@config_options(SynthConfig)
def data_synth(cfg: SynthConfig) -> None:
    """Generate the synthetic small-object benchmark as a COCO-format dataset.

    About 40% small (< 32²), 35% medium, 25% large objects.

    Classes share colours and shapes and differ only in fine internal patterns, so a small object's class needs resolution.

    Cluttered backgrounds, unlabelled distractors, occlusion, blur, noise and JPEG artefacts.

    Splits: train (training), val (every choice made by looking at results), minival (reported figures only).

    Writes images/{train,val,minival}/, annotations/instances_{train,val,minival}.json and manifest.json (built aside, renamed into place when complete).

    Example: sodtool data synth --preset quick --out data/synth-quick --seed 0
    """
    from sodtool.stages.synth import synthesize

    synthesize(cfg)


@data_app.command("stats")
@handles_input_errors
@config_options(StatsConfig)
def data_stats(cfg: StatsConfig) -> None:
    """Objects per class and per COCO size (small < 32², medium < 96², large), a box-size histogram.

    Writes stats_<split>.json, sizes_<split>.png and manifest.json into --out.

    Example: sodtool data stats --data data/synth-quick --split train
    """
    from sodtool.stages.stats import dataset_stats

    dataset_stats(cfg)


@data_app.command("import-yolo")
@handles_input_errors
@config_options(ImportYoloConfig)
def data_import_yolo(cfg: ImportYoloConfig) -> None:
    """Import a YOLO-labelled dataset as COCO JSON: annotations/instances_{train,minival}.json + images/.

    Splits: train (training), val (every choice made by looking at results; written only with --holdout-fraction or --val-list, as annotations/instances_val.json + images/val/), minival (reported figures only; its share is --val-fraction).

    Example: sodtool data import-yolo ../shared/data/kit-aerial --out data/kit-aerial --val-fraction 0.2 --seed 0
    """
    from sodtool.stages.import_yolo import import_yolo

    import_yolo(cfg)


@data_app.command("slice")
@handles_input_errors
@config_options(SliceDataConfig)
def data_slice(cfg: SliceDataConfig) -> None:
    """Cut a dataset into overlapping square tiles with their boxes (SAHI's `sahi coco slice`), to train on tiles.

    Boxes are clipped to each tile and kept where --min-visibility of their area is inside. Each tile records its source image and offset in the COCO JSON ("tile"); tiles are PNG, pixel for pixel the source's.

    Writes images/<split>/, annotations/instances_<split>.json and manifest.json (built aside, renamed into place when complete).

    Example: sodtool data slice --data data/kit-aerial --split train --size 256 --overlap 0.2 --out data/kit-aerial-tiles256
    """
    from sodtool.stages.slice_data import slice_dataset

    slice_dataset(cfg)


@data_app.command("generate")
@handles_input_errors
@config_options(GenerateDataConfig)
def data_generate(cfg: GenerateDataConfig) -> None:
    """Training images with extra objects inserted (DetectorGAN's generated data; copy-paste is the baseline).

    Each place is beside a real object, along its long axis (queues, parking rows), clear of every box, on ground that looks like the ground under the image's objects (sodtool/insertion.py). Image and annotation entries are marked "generated" / "inserted" with their sources.

    Writes images/train/, annotations/instances_train.json and manifest.json (built aside, renamed into place when complete).

    Example: sodtool data generate --data data/kit-aerial --method copy-paste --count 200 --per-image 8 --out data/kit-aerial-cp
    """
    from sodtool.stages.generate_data import generate_data

    generate_data(cfg)


def _exit_on_nonfinite(fn, cfg) -> None:
    """Run a training stage; a NaN / inf loss ends with one line and exit code 3 (2 = bad input)."""
    from sodtool.errors import NonFiniteLossError

    try:
        fn(cfg)
    except NonFiniteLossError as e:
        if _state["debug"]:
            traceback.print_exc()
        typer.echo(f"sodtool: error: {e}", err=True)
        raise typer.Exit(NonFiniteLossError.exit_code) from None


@train_app.command("detector")
@handles_input_errors
@config_options(TrainDetectorConfig)
def train_detector_cmd(cfg: TrainDetectorConfig) -> None:
    """Train the baseline detector (torchvision Faster R-CNN) and evaluate it on minival.

    SGD with momentum, linear warm-up and step decay; random horizontal flips; trained from scratch unless --weights or --backbone-weights is given (nothing is downloaded).

    Writes config.json, metrics.jsonl (every loss term, lr), checkpoint.pt (every --checkpoint-every iterations and at the end), then model.pt (the checkpoint crop-rois, detect and eval take) and manifest.json (with the COCO AP of --val-split). Rerunning the same command resumes from checkpoint.pt.

    Exit code 2 for bad input, 3 if the loss becomes NaN/inf (the last checkpoint is kept). One device (no DDP for the detector).

    Example: sodtool train detector --detector frcnn --data data/synth-quick --out runs/quick/detector --preset quick

    Example: sodtool train detector --data data/coco --preset coco --backbone-weights resnet50-0676ba61.pth --out runs/coco/detector

    Example: sodtool train detector --data data/kit-aerial --extra-data runs/gan/generated --extra-ratio 0.3 --weights runs/bench/detector/model.pt --reinit-heads --out runs/kit/detector
    """
    from sodtool.stages.train_detector import train_detector

    _exit_on_nonfinite(train_detector, cfg)


@train_app.command("sr")
@handles_input_errors
@config_options(TrainSRConfig)
def train_sr_cmd(cfg: TrainSRConfig) -> None:
    """Pretrain the SR generator with pixel MSE on HR/LR crop pairs (paper Eq. 4).

    Writes generator.pt, checkpoint.pt, metrics.jsonl and manifest.json into --out; reports
    held-out PSNR/SSIM (RGB and Y) of the generator and of bicubic upsampling. Exit code 2 for
    bad input, 3 if the loss becomes NaN/inf (the last checkpoint is kept).

    Example: sodtool train sr --hr runs/quick/rois_train.h5 --lr runs/quick/rois_train_lr.h5 --out runs/quick/sr

    Example: sodtool train sr --hr runs/a/rois_train.h5 --lr runs/a/rois_train_lr.h5 --hr runs/b/rois_train.h5 --lr runs/b/rois_train_lr.h5 --out runs/ab/sr
    """
    from sodtool.stages.train_sr import train_sr

    _exit_on_nonfinite(train_sr, cfg)


@train_app.command("mtgan")
@handles_input_errors
@config_options(TrainMTGANConfig)
def train_mtgan_cmd(cfg: TrainMTGANConfig) -> None:
    """Train the multi-task GAN: G from `train sr`, D a ResNet with real/fake, class and box heads (Eq. 10/11).

    Alternates one D step (G fixed) and one G step (D fixed) per iteration. Writes model.pt,
    checkpoint.pt, metrics.jsonl, samples/*.png and manifest.json into --out; rerunning the same
    command resumes. Exit code 2 for bad input, 3 if a loss becomes NaN/inf (the last
    checkpoint is kept).

    Example: sodtool train mtgan --hr runs/quick/rois_train.h5 --lr runs/quick/rois_train_lr.h5 --sr runs/quick/sr --out runs/quick/mtgan
    """
    from sodtool.stages.train_mtgan import train_mtgan

    _exit_on_nonfinite(train_mtgan, cfg)


@train_app.command("fsr")
@handles_input_errors
@config_options(TrainFSRConfig)
def train_fsr_cmd(cfg: TrainFSRConfig) -> None:
    """Feature-level super-resolution of small proposals (Noh et al., ICCV 2019) on a trained Faster R-CNN, or one of its controls.

    The trunk and RPN stay frozen; an SR target extractor (the trunk run atrous, same weights) supervises a feature generator for proposals below --small-size² px, with a feature discriminator and a small head and predictor copied from the large ones; then both predictors are fine-tuned.

    Writes config.json, metrics.jsonl (every loss term), checkpoint.pt, then model.pt (detector family fsr: detect, eval --detector, crop-rois --detector fsr and predict take it) and manifest.json. Rerunning the same command resumes. Exit code 2 for bad input, 3 if a loss becomes NaN/inf (the last checkpoint is kept). One device.

    Example: sodtool train fsr --detector runs/quick/detector/model.pt --data data/synth-quick --out runs/quick/fsr

    Example: sodtool train fsr --detector runs/quick/detector/model.pt --data data/synth-quick --control small-head --out runs/quick/fsr-small-head
    """
    from sodtool.stages.train_fsr import train_fsr

    _exit_on_nonfinite(train_fsr, cfg)


# `sodtool crop-rois ...` is the group's callback (invoke_without_command), so that
# `sodtool crop-rois merge OUT SHARDS...` can sit beside it.
@train_app.command("detgan")
@handles_input_errors
@config_options(TrainDetGANConfig)
def train_detgan_cmd(cfg: TrainDetGANConfig) -> None:
    """Train DetectorGAN (Liu et al., ICCV 2019): a generator that inserts objects at given boxes, trained against global and local PatchGAN discriminators and through one unrolled step of the detector.

    Writes model.pt (for `data generate --method detgan`), checkpoint.pt, metrics.jsonl,
    samples/ and manifest.json into --out. Exit code 2 for bad input, 3 if a loss becomes NaN/inf.

    Example: sodtool train detgan --detector runs/kit/detector/model.pt --data data/kit-aerial-crossroads-to-street --out runs/kit/detgan
    """
    from sodtool.stages.train_detgan import train_detgan

    _exit_on_nonfinite(train_detgan, cfg)


crop_rois_app = typer.Typer(cls=OrderedGroup, invoke_without_command=True)
app.add_typer(crop_rois_app, name="crop-rois")


@crop_rois_app.callback()
@handles_input_errors
@config_options(CropRoisConfig)
def crop_rois_cmd(ctx: typer.Context, cfg: CropRoisConfig) -> None:
    """Crop the ROIs of a split into an HDF5 store: HR crops, labels, box targets, provenance.

    ROIs come from a detector checkpoint (--detector-weights) or its detections (--detections),
    or, with --gt-only (train mode), from the ground truth alone.
    Writes --out atomically and <out>.manifest.json beside it. Subcommand `merge` joins shards.

    Example: sodtool crop-rois --detector frcnn --detector-weights runs/quick/detector/model.pt --data data/synth-quick --split train --mode train --out runs/quick/rois_train.h5

    Example: sodtool crop-rois --gt-only --data data/coco128 --split train --out runs/sr-real/coco128/rois_train.h5
    """
    if ctx.invoked_subcommand is not None:
        return
    if cfg.out is None:
        raise InputError("give --out (the store to write, e.g. runs/quick/rois_train.h5); see 'sodtool crop-rois --help'")
    from sodtool.stages.crop_rois import crop_rois

    crop_rois(cfg)


@crop_rois_app.command("merge")
@handles_input_errors
def crop_rois_merge_cmd(
    out: Path = typer.Argument(..., help="The merged store to write, e.g. runs/quick/rois_train.h5."),
    shards: list[Path] = typer.Argument(..., help="Every shard of one run: rois_train.shard-0-of-n.h5 ... shard-(n-1)-of-n.h5."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing store (only once the new one is complete)."),
) -> None:
    """Join the shards of one `crop-rois --shard i/n` run into one store, in image order.

    The result equals the store an unsharded run writes. Refuses shards of different runs.

    Example: sodtool crop-rois merge runs/quick/rois_train.h5 runs/quick/rois_train.shard-0-of-2.h5 runs/quick/rois_train.shard-1-of-2.h5
    """
    from sodtool.stages.crop_rois import merge_shards

    merge_shards(out, shards, overwrite=overwrite)


@app.command("downsample")
@handles_input_errors
@config_options(DownsampleConfig)
def downsample_cmd(cfg: DownsampleConfig) -> None:
    """Write the 4x bicubic (antialiased) low-resolution twin of every crop, same row order.

    The HR store is only read, and verified first: its content digest is recomputed from every
    byte and compared with the one recorded when it was written (a damaged store is refused).
    Writes the LR store atomically and <out>.manifest.json beside it.

    Example: sodtool downsample runs/quick/rois_train.h5
    """
    from sodtool.stages.downsample import downsample

    downsample(cfg)


@app.command("predict")
@handles_input_errors
@config_options(PredictConfig)
def predict_cmd(cfg: PredictConfig) -> None:
    """Detect objects in your own images (optionally sliced, optionally rescored by the MTGAN).

    Writes OUT/predictions.json (a COCO object: images, categories, annotations with scores:
    pycocotools loads it as a dataset, and its annotations serve as results), one drawn image
    per input in OUT/drawn/, and OUT/manifest.json. An unreadable input is named and skipped;
    the command then ends with exit code 2 once every other image is written.

    Example: sodtool predict ../shared/data/kit-aerial/images --detector runs/kit/detector/model.pt --mtgan runs/kit/mtgan --slice 512 --out runs/kit/predict
    """
    from sodtool.stages.predict import predict_images

    predict_images(cfg)


@app.command("verify")
@handles_input_errors
def verify_cmd(
    stores: list[Path] = typer.Argument(..., help="ROI stores (HR rois_<split>.h5 or LR twins) to check."),
) -> None:
    """Check ROI stores against the content digest recorded when each was written.

    Reads every dataset of each store, recomputes its content_sha256 and compares. Prints one line
    per good store; the first damaged or unreadable one ends with one line on stderr and exit 2.
    `downsample` does the same check on its HR store before it writes anything.

    Example: sodtool verify runs/quick/rois_train.h5 runs/quick/rois_train_lr.h5
    """
    import time

    from sodtool.store import verify_store

    for path in stores:
        t0 = time.perf_counter()
        res = verify_store(path, expect_schema=None)
        dt = time.perf_counter() - t0
        typer.echo(f"{path}: ok, {res['rows']} rows, {res['bytes'] / 1e9:.3f} GB read in {dt:.2f} s "
                   f"(content_sha256 {res['content_sha256'][:16]}...)")


@app.command("detect")
@handles_input_errors
@config_options(DetectConfig)
def detect_cmd(cfg: DetectConfig) -> None:
    """Run a detector over a split and write COCO results JSON (dataset category ids, bbox x, y, w, h).

    Writes --out atomically, then its manifest <name>.manifest.json beside it (with COCO AP unless --no-eval).

    A torchvision COCO checkpoint (91 outputs indexed by COCO category id) works on a dataset with COCO's categories and names; its outputs for categories the dataset lacks are dropped.

    Example: sodtool detect --detector runs/quick/detector/model.pt --data data/synth-quick --split minival --out runs/quick/detections_minival.json

    Example: sodtool detect --detector frcnn --weights fasterrcnn_resnet50_fpn_coco-258fb6c6.pth --data data/coco --split minival --out runs/coco/detections_minival.json
    """
    from sodtool.stages.detect import detect

    detect(cfg)


def main(argv: Optional[list[str]] = None) -> None:
    """Console-script entry point. Ctrl-C is one line and exit code 130 at any moment: Typer
    turns a KeyboardInterrupt inside a command into a silent exit 130; one outside it (option
    parsing, the root callback) reaches here. `python -m sodtool` covers the imports before
    this (sodtool/__main__.py)."""
    try:
        if argv is None and sys.unraisablehook is sys.__unraisablehook__:  # the console script's process
            from sodtool.__main__ import catch_lost_interrupts

            catch_lost_interrupts()
        app(args=argv, prog_name="sodtool")
    except KeyboardInterrupt:
        _interrupted()
    except SystemExit as e:
        if e.code == 130:
            _interrupted()
        raise
    finally:
        if argv is None:  # the process's own command line: it is ending (a test's call goes on)
            import signal

            # Python restores the default SIGINT action while it finalises (torch's teardown
            # takes a moment): a Ctrl-C then would kill the process after its line was said.
            signal.signal(signal.SIGINT, signal.SIG_IGN)


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
