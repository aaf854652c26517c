"""The `sodtool` command line: thin Typer wrappers that parse options into each stage's config.

Heavy modules (torch, torchvision, pycocotools) are imported inside the commands so that
`sodtool --help` stays quick; that includes the stage modules holding the config dataclasses
(`sodtool.stages.*` import torch: 1.5-4 s each).

Option defaults therefore restate the config dataclasses' field defaults as literals: Typer
reads defaults from the function signatures when it builds the command tree, before any
command runs, so taking them from the dataclasses would import every stage (and torch) on
`sodtool --help`. The dataclasses stay the one source of truth through
tests/test_cli.py::test_option_defaults_match_config_fields, which fails on any option whose
default differs from its field's (and lists the intentional differences with their reasons).

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
from sodtool.configs.eval_mtgan import RescoreConfig
from sodtool.configs.eval_results import EvalResultsConfig
from sodtool.configs.eval_sr import EvalSRConfig
from sodtool.configs.predict import PredictConfig
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
                flag = meta[o.FLAG] or "--" + f.name.replace("_", "-")
                if kind in (bool, Optional[bool]) and "/" not in flag and default is not False:
                    flag = f"{flag}/--no-{flag[2:]}"
                info = typer.Option(default, flag, help=meta[o.HELP], hidden=meta[o.HIDDEN])
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
def data_synth(
    out: Optional[Path] = typer.Option(None, "--out", help="Output dataset folder (default: data/synth-<preset>)."),
    preset: str = typer.Option("quick", "--preset", help="quick: 500 train + 100 val + 100 minival images (the quickstart); bench: 4000 + 500 + 500 (measurements), 320x320 both; large: 400 + 50 + 50 images of 2048x2048 holding the bench's objects at their pixel sizes, about 50 each (sliced inference)."),
    train_images: Optional[int] = typer.Option(None, "--train-images", help="Number of train images (overrides the preset)."),
    val_images: Optional[int] = typer.Option(None, "--val-images", help="Number of val images, where settings are chosen (overrides the preset)."),
    minival_images: Optional[int] = typer.Option(None, "--minival-images", help="Number of minival images (overrides the preset)."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Side of the square images in px, >= 192 (overrides the preset)."),
    classes: int = typer.Option(10, "--classes", help="Number of classes K (1..12), each an internal pattern: stripes-h, stripes-v, stripes-d, ..."),
    seed: int = typer.Option(0, "--seed", help="Seed: the same seed gives byte-identical images and annotations."),
    workers: int = typer.Option(1, "--workers", help="Processes drawing images (the output does not depend on it)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty folder that is not a previous synth output."),
) -> None:
    """Generate the synthetic small-object benchmark as a COCO-format dataset.

    About 40% small (< 32²), 35% medium, 25% large objects.

    Classes share colours and shapes and differ only in fine internal patterns, so a small object's class needs resolution.

    Cluttered backgrounds, unlabelled distractors, occlusion, blur, noise and JPEG artefacts.

    Splits: train (training), val (every choice made by looking at results), minival (reported figures only).

    Writes images/{train,val,minival}/, annotations/instances_{train,val,minival}.json and manifest.json (built aside, renamed into place when complete).

    Example: sodtool data synth --preset quick --out data/synth-quick --seed 0
    """
    from sodtool.stages.synth import SynthConfig, synthesize

    synthesize(SynthConfig(out=out, preset=preset, train_images=train_images, val_images=val_images,
                           minival_images=minival_images,
                           image_size=image_size, classes=classes, seed=seed, workers=workers, overwrite=overwrite))


@data_app.command("stats")
@handles_input_errors
def data_stats(
    data: Optional[Path] = typer.Option(None, "--data", help="Dataset folder (sodtool or COCO 2017 layout)."),
    split: str = typer.Option("train", "--split", help="Split to describe."),
    ann: Optional[Path] = typer.Option(None, "--ann", help="Annotation file (overrides --data/--split)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Image folder (optional: counts missing image files)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: runs/stats/<dataset>_<split>)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a finished --out folder (only once the new one is complete)."),
) -> None:
    """Objects per class and per COCO size (small < 32², medium < 96², large), a box-size histogram.

    Writes stats_<split>.json, sizes_<split>.png and manifest.json into --out.

    Example: sodtool data stats --data data/synth-quick --split train
    """
    from sodtool.stages.stats import StatsConfig, dataset_stats

    dataset_stats(StatsConfig(data=data, split=split, ann=ann, images=images, out=out, overwrite=overwrite))


@data_app.command("import-yolo")
@handles_input_errors
def data_import_yolo(
    src: Path = typer.Argument(..., help="YOLO dataset folder: images/, labels/ (one `class xc yc w h` .txt per image), classes.txt."),
    classes: Optional[Path] = typer.Option(None, "--classes", help="Classes file: `name` per line (ids 1..K) or `ID name` per line (ids kept). Default: SRC/classes.txt."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output dataset folder (default: data/<SRC folder name>)."),
    images: str = typer.Option("images", "--images", help="Image folder under SRC."),
    labels: str = typer.Option("labels", "--labels", help="Label folder under SRC."),
    val_fraction: float = typer.Option(0.2, "--val-fraction", help="Share of images put in minival (seeded shuffle); not the val split, see --holdout-fraction."),
    train_list: Optional[Path] = typer.Option(None, "--train-list", help="File listing the train images, one per line (overrides --val-fraction)."),
    minival_list: Optional[Path] = typer.Option(None, "--minival-list", help="File listing the minival images (with one list only, the other split is the rest)."),
    holdout_fraction: float = typer.Option(0.0, "--holdout-fraction", help="Share of all images put in the val split (where settings are chosen), drawn from what would be train; minival stays what --val-fraction gives. 0: no val split."),
    val_list: Optional[Path] = typer.Option(None, "--val-list", help="File listing the val-split images (not minival). Alone: minival is drawn by --val-fraction from the other images. With --train-list/--minival-list: the unlisted rest goes to train, else minival."),
    seed: int = typer.Option(0, "--seed", help="Seed of the train/val/minival shuffle."),
    link: str = typer.Option("copy", "--link", help="How images reach the output: copy, hardlink or symlink."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output folder (only once the new one is complete)."),
    skip_orphan_labels: bool = typer.Option(False, "--skip-orphan-labels", help="Drop label files that have no image instead of failing."),
) -> None:
    """Import a YOLO-labelled dataset as COCO JSON: annotations/instances_{train,minival}.json + images/.

    Splits: train (training), val (every choice made by looking at results; written only with --holdout-fraction or --val-list, as annotations/instances_val.json + images/val/), minival (reported figures only; its share is --val-fraction).

    Example: sodtool data import-yolo ../shared/data/kit-aerial --out data/kit-aerial --val-fraction 0.2 --seed 0
    """
    from sodtool.stages.import_yolo import ImportYoloConfig, import_yolo

    import_yolo(ImportYoloConfig(src=src, out=out, classes=classes, images=images, labels=labels,
                                 val_fraction=val_fraction, train_list=train_list, minival_list=minival_list,
                                 holdout_fraction=holdout_fraction, val_list=val_list,
                                 seed=seed, link=link, overwrite=overwrite, skip_orphan_labels=skip_orphan_labels))


@data_app.command("slice")
@handles_input_errors
def data_slice(
    data: Optional[Path] = typer.Option(None, "--data", help="Source dataset folder (sodtool or COCO 2017 layout)."),
    out: Path = typer.Option(..., "--out", help="Output dataset folder (sodtool's layout)."),
    size: int = typer.Option(512, "--size", help="Tile side in px (the grid predict --slice uses)."),
    split: Optional[list[str]] = typer.Option(None, "--split", help="Split to slice; repeatable (default: train)."),
    overlap: float = typer.Option(0.2, "--overlap", help="Share of a tile shared with its neighbour, in [0, 1)."),
    min_visibility: float = typer.Option(0.5, "--min-visibility", help="A box is kept in a tile when at least this share of its area lies inside (clipped to the tile), in (0, 1]."),
    empty_ratio: float = typer.Option(0.1, "--empty-ratio", help="Tiles without objects kept per tile with objects (a seeded draw); 0 keeps none."),
    ann: Optional[Path] = typer.Option(None, "--ann", help="Annotation file (overrides --data; one --split)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Image folder (overrides --data; one --split)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the draw of empty tiles."),
    skip_invalid: bool = typer.Option(False, "--skip-invalid", help="Drop boxes of zero size or outside their image instead of failing."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a finished --out folder (only once the new one is complete)."),
) -> None:
    """Cut a dataset into overlapping square tiles with their boxes (SAHI's `sahi coco slice`), to train on tiles.

    Boxes are clipped to each tile and kept where --min-visibility of their area is inside. Each tile records its source image and offset in the COCO JSON ("tile"); tiles are PNG, pixel for pixel the source's.

    Writes images/<split>/, annotations/instances_<split>.json and manifest.json (built aside, renamed into place when complete).

    Example: sodtool data slice --data data/kit-aerial --split train --size 256 --overlap 0.2 --out data/kit-aerial-tiles256
    """
    from sodtool.stages.slice_data import SliceDataConfig, slice_dataset

    slice_dataset(SliceDataConfig(data=data, out=out, size=size, splits=tuple(split or ("train",)), overlap=overlap,
                                  min_visibility=min_visibility, empty_ratio=empty_ratio, ann=ann, images=images,
                                  seed=seed, skip_invalid=skip_invalid, overwrite=overwrite))


@data_app.command("generate")
@handles_input_errors
def data_generate(
    data: Optional[Path] = typer.Option(None, "--data", help="Source dataset folder (sodtool or COCO 2017 layout)."),
    out: Path = typer.Option(..., "--out", help="Output dataset folder (sodtool's layout, split train)."),
    split: str = typer.Option("train", "--split", help="Split whose images and objects are used."),
    method: str = typer.Option("copy-paste", "--method", help="How objects are inserted: copy-paste (the real object, feathered in) or detgan (a trained DetectorGAN generator, with --detgan)."),
    count: int = typer.Option(100, "--count", help="Images written (the split's images in a seeded order, cycled)."),
    per_image: int = typer.Option(4, "--per-image", help="Objects inserted at most per image (fewer where the insertion rule finds no place)."),
    detgan: Optional[Path] = typer.Option(None, "--detgan", help="With --method detgan: the DetectorGAN run folder (RUN/detgan)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the image order, the places and the objects drawn."),
    skip_invalid: bool = typer.Option(False, "--skip-invalid", help="Drop boxes of zero size or outside their image instead of failing."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a finished --out folder (only once the new one is complete)."),
) -> None:
    """Training images with extra objects inserted (DetectorGAN's generated data; copy-paste is the baseline).

    Each place is beside a real object, along its long axis (queues, parking rows), clear of every box, on ground that looks like the ground under the image's objects (sodtool/insertion.py). Image and annotation entries are marked "generated" / "inserted" with their sources.

    Writes images/train/, annotations/instances_train.json and manifest.json (built aside, renamed into place when complete).

    Example: sodtool data generate --data data/kit-aerial --method copy-paste --count 200 --per-image 8 --out data/kit-aerial-cp
    """
    from sodtool.stages.generate_data import GenerateDataConfig, generate_data

    generate_data(GenerateDataConfig(data=data, out=out, split=split, method=method, count=count, per_image=per_image,
                                     detgan=detgan, seed=seed, skip_invalid=skip_invalid, overwrite=overwrite))


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
def crop_rois_cmd(
    ctx: typer.Context,
    out: Optional[Path] = typer.Option(None, "--out", help="The HR ROI store to write, e.g. RUN/rois_train.h5 (with --shard: RUN/rois_train.shard-i-of-n.h5)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Dataset folder (sodtool or COCO 2017 layout)."),
    split: str = typer.Option("train", "--split", help="Split to crop."),
    ann: Optional[Path] = typer.Option(None, "--ann", help="Annotation file (overrides --data/--split)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Image folder (overrides --data/--split)."),
    mode: str = typer.Option("train", "--mode", help="train: Fast R-CNN sampling (1 positive in 4, jittered ground truth added); test: the baseline's top detections, scores kept."),
    detector: str = typer.Option("frcnn", "--detector", help="Detector family of --detector-weights: frcnn, ssd or mdssd."),
    detector_weights: Optional[Path] = typer.Option(None, "--detector-weights", help="Detector checkpoint RUN/detector/model.pt (run on --device)."),
    detections: Optional[Path] = typer.Option(None, "--detections", help="Or: its detections, a COCO results JSON (from `sodtool detect`)."),
    hr_size: int = typer.Option(128, "--hr-size", help="Side S of the HR crops in px (LR = S/4)."),
    context: float = typer.Option(1.5, "--context", help="Crop window side = context x max(ROI w, h), square, centred on the ROI."),
    score_thresh: Optional[float] = typer.Option(None, "--score-thresh", help="Lowest detector score used (default: 0.01 train, 0.05 test)."),
    max_rois: Optional[int] = typer.Option(None, "--max-rois", help="Top detections per image used (default: 300 train, 100 test)."),
    fg_iou: float = typer.Option(0.5, "--fg-iou", help="IoU with a ground truth from which a ROI is positive."),
    bg_low: float = typer.Option(0.1, "--bg-low", help="Train: ROIs with IoU in [bg-low, fg-iou) are background; below are unused."),
    fg_fraction: float = typer.Option(0.25, "--fg-fraction", help="Train: share of positives among an image's ROIs."),
    rois_per_image: int = typer.Option(64, "--rois-per-image", help="Train: ROIs per image (more for images with many objects)."),
    gt_jitters: int = typer.Option(2, "--gt-jitters", help="Train: jittered copies of each ground-truth box added as positives."),
    jitter_iou: float = typer.Option(0.7, "--jitter-iou", help="Train: least IoU of a jittered copy with its ground truth."),
    shard: Optional[str] = typer.Option(None, "--shard", help="i/n: crop every n-th image from the i-th (merge with `sodtool crop-rois merge`)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sampling (per image, so shards agree with an unsharded run)."),
    device: str = typer.Option("auto", "--device", help="Device of the detector and the cropping: auto, cpu, cuda[:N]."),
    batch_images: int = typer.Option(4, "--batch-images", help="Images per detector call."),
    compression: str = typer.Option("lzf", "--compression", help="HDF5 filter of the crops: lzf (fast), gzip (level 1, smaller, slower) or none."),
    skip_invalid: bool = typer.Option(False, "--skip-invalid", help="Drop annotations with zero-size or out-of-image boxes instead of failing."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing store (only once the new one is complete)."),
    gt_only: bool = typer.Option(False, "--gt-only", help="Train mode without a detector: ROIs are the jittered ground truth plus random background boxes (IoU < --fg-iou), e.g. SR training crops of real photos."),
    slice_size: Optional[int] = typer.Option(None, "--slice", help="Sliced inference of the detector: overlapping tiles of this many px, merged by greedy non-maximum merging (as `sodtool predict --slice`). Tiles are resized by the scale the detector was trained at (recorded in its model.pt); a detector trained on tiles (`data slice`) slices at its tile size by default; 0: whole images."),
    overlap: float = typer.Option(0.2, "--overlap", help="With --slice: overlap of neighbouring tiles, as a fraction of the tile side."),
    slice_full: bool = typer.Option(False, "--slice-full", help="With --slice: also run the detector on the whole image and merge it in."),
) -> None:
    """Crop the ROIs of a split into an HDF5 store: HR crops, labels, box targets, provenance.

    ROIs come from a detector checkpoint (--detector-weights) or its detections (--detections),
    or, with --gt-only (train mode), from the ground truth alone.
    Writes --out atomically and <out>.manifest.json beside it. Subcommand `merge` joins shards.

    Example: sodtool crop-rois --detector frcnn --detector-weights runs/quick/detector/model.pt --data data/synth-quick --split train --mode train --out runs/quick/rois_train.h5

    Example: sodtool crop-rois --gt-only --data data/coco128 --split train --out runs/sr-real/coco128/rois_train.h5
    """
    if ctx.invoked_subcommand is not None:
        return
    if out is None:
        raise InputError("give --out (the store to write, e.g. runs/quick/rois_train.h5); see 'sodtool crop-rois --help'")
    from sodtool.stages.crop_rois import CropRoisConfig, crop_rois

    crop_rois(CropRoisConfig(
        out=out, data=data, split=split, ann=ann, images=images, mode=mode, detector=detector,
        detector_weights=detector_weights, detections=detections, hr_size=hr_size, context=context,
        score_thresh=score_thresh, max_rois=max_rois, fg_iou=fg_iou, bg_low=bg_low, fg_fraction=fg_fraction,
        rois_per_image=rois_per_image, gt_jitters=gt_jitters, jitter_iou=jitter_iou, shard=shard, seed=seed,
        device=device, batch_images=batch_images, compression=compression, skip_invalid=skip_invalid,
        overwrite=overwrite, gt_only=gt_only, slice=slice_size, overlap=overlap, slice_full=slice_full))


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
def downsample_cmd(
    src: Path = typer.Argument(..., help="The HR ROI store, e.g. runs/quick/rois_train.h5."),
    out: Optional[Path] = typer.Option(None, "--out", help="The LR store (default: <src stem>_lr.h5 beside src)."),
    scale: int = typer.Option(4, "--scale", help="Downsampling factor (the HR size must be divisible by it)."),
    batch: int = typer.Option(256, "--batch", help="Rows read per step."),
    compression: str = typer.Option("none", "--compression", help="HDF5 filter of the LR crops: none (default: 32 px crops barely compress), lzf or gzip."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing LR store (only once the new one is complete)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Processes reading and downsampling (default: one per CPU core, at most 4; 0 = this process). The output does not depend on it."),
) -> None:
    """Write the 4x bicubic (antialiased) low-resolution twin of every crop, same row order.

    The HR store is only read, and verified first: its content digest is recomputed from every
    byte and compared with the one recorded when it was written (a damaged store is refused).
    Writes the LR store atomically and <out>.manifest.json beside it.

    Example: sodtool downsample runs/quick/rois_train.h5
    """
    from sodtool.stages.downsample import DownsampleConfig, downsample

    downsample(DownsampleConfig(src=src, out=out, scale=scale, batch=batch, overwrite=overwrite,
                                compression=compression, workers=workers))


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
def detect_cmd(
    detector: str = typer.Option("frcnn", "--detector", help="The detector: RUN/detector/model.pt (or its folder), a torchvision detection state dict (Faster R-CNN, ssd300_vgg16), or a family name (frcnn, ssd, mdssd) with --weights."),
    weights: Optional[Path] = typer.Option(None, "--weights", "--detector-weights", help="With --detector frcnn: the checkpoint file."),
    data: Optional[Path] = typer.Option(None, "--data", help="Dataset folder (sodtool or COCO 2017 layout)."),
    split: str = typer.Option("minival", "--split", help="Split to run on."),
    ann: Optional[Path] = typer.Option(None, "--ann", help="Annotation file (overrides --data/--split)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Image folder (overrides --data/--split)."),
    out: Optional[Path] = typer.Option(None, "--out", help="COCO results JSON to write (default: RUN/detections_<split>.json beside RUN/detector, else ./detections_<split>.json). Its manifest goes beside it: <name>.manifest.json."),
    score_thresh: float = typer.Option(0.001, "--score-thresh", help="Lowest score kept."),
    max_per_image: int = typer.Option(100, "--max-per-image", help="Detections kept per image (top scores; the paper's protocol: 100)."),
    batch_size: int = typer.Option(4, "--batch-size", help="Images per forward pass."),
    min_size: Optional[int] = typer.Option(None, "--min-size", help="Override the short side the model resizes to (default: the checkpoint's; torchvision files: 800)."),
    max_size: Optional[int] = typer.Option(None, "--max-size", help="Override the longest side allowed (default: the checkpoint's; torchvision files: 1333)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    evaluate: bool = typer.Option(True, "--eval/--no-eval", help="Also report COCO AP against the split's annotations (in the manifest)."),
    amp: bool = typer.Option(False, "--amp/--no-amp", help="bf16 autocast on CUDA."),
    seed: int = typer.Option(0, "--seed", help="Seed (detection is deterministic; recorded in the manifest)."),
    skip_invalid: bool = typer.Option(False, "--skip-invalid", help="Drop annotations with zero-size or out-of-image boxes instead of failing."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing results file (only once the new one is complete)."),
) -> None:
    """Run a detector over a split and write COCO results JSON (dataset category ids, bbox x, y, w, h).

    Writes --out atomically, then its manifest <name>.manifest.json beside it (with COCO AP unless --no-eval).

    A torchvision COCO checkpoint (91 outputs indexed by COCO category id) works on a dataset with COCO's categories and names; its outputs for categories the dataset lacks are dropped.

    Example: sodtool detect --detector runs/quick/detector/model.pt --data data/synth-quick --split minival --out runs/quick/detections_minival.json

    Example: sodtool detect --detector frcnn --weights fasterrcnn_resnet50_fpn_coco-258fb6c6.pth --data data/coco --split minival --out runs/coco/detections_minival.json
    """
    from sodtool.stages.detect import DetectConfig, detect

    detect(DetectConfig(detector=detector, weights=weights, data=data, split=split, ann=ann, images=images, out=out,
                        score_thresh=score_thresh, max_per_image=max_per_image, batch_size=batch_size,
                        min_size=min_size, max_size=max_size, device=device, evaluate=evaluate, amp=amp, seed=seed,
                        skip_invalid=skip_invalid, overwrite=overwrite))


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
