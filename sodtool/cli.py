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
from sodtool.configs.crop_rois import CropRoisConfig
from sodtool.configs.detect import DetectConfig
from sodtool.configs.downsample import DownsampleConfig
from sodtool.configs.generate_data import GenerateDataConfig
from sodtool.configs.import_yolo import ImportYoloConfig
from sodtool.configs.slice_data import SliceDataConfig
from sodtool.configs.stats import StatsConfig
from sodtool.configs.synth import SynthConfig
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
def eval_results(
    ctx: typer.Context,
    results: Optional[Path] = typer.Option(None, "--results", help="COCO results JSON: a list of {image_id, category_id, bbox (x, y, w, h), score}."),
    data: Optional[Path] = typer.Option(None, "--data", help="Dataset folder (sodtool or COCO 2017 layout)."),
    split: str = typer.Option("minival", "--split", help="Split whose ground truth to evaluate against."),
    ann: Optional[Path] = typer.Option(None, "--ann", help="Ground-truth annotation file (overrides --data/--split)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Image folder (not needed to evaluate --results; --detector runs on it)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: <results folder>/eval_<results name>; with --mtgan: RUN/eval_<split> beside RUN/mtgan)."),
    mtgan: Optional[Path] = typer.Option(None, "--mtgan", help="Rescoring mode: the MTGAN run folder (RUN/mtgan) or its model.pt."),
    detector: Optional[Path] = typer.Option(None, "--detector", help="Rescoring: the baseline detector (RUN/detector/model.pt), run on the split to get its top-100 ROIs."),
    rois: Optional[Path] = typer.Option(None, "--rois", help="Rescoring, instead of --detector: a test-mode ROI store (RUN/rois_<split>.h5; its _lr.h5 twin is used when present)."),
    score: str = typer.Option("fused", "--score", help="The MTGAN row the detections figure draws beside the baseline's, over every ROI: fused (mtgan_fused: geometric mean of D's class probability and the baseline's score) or disc (mtgan: D's class probability, the paper's). Each column shows an image's top k detections, k = its ground-truth count. The table and results files hold both, from one pass."),
    ablation: Optional[list[str]] = typer.Option(None, "--ablation", help="NAME=PATH of another MTGAN (e.g. trained with --no-adv) to evaluate the same way; repeatable."),
    compare: Optional[list[str]] = typer.Option(None, "--compare", help="NAME=PATH of another detector's model.pt (a `train fsr` model or control, another `train detector` run) whose own detections, taken and selected as the baseline's, make a row beside it; repeatable; without --mtgan the table holds only these rows and the baseline's (--out required)."),
    pretrained_g: Optional[Path] = typer.Option(None, "--pretrained-g", help="Rescoring: the `train sr` run (RUN/sr or its generator.pt) the MTGAN started from; adds the pretrained-G control rows (the MTGAN's D fed that generator's output), which separate what the adversarial stage did to G."),
    batch_size: int = typer.Option(256, "--batch-size", help="Rescoring: ROIs per forward pass (the ROIs of several images)."),
    device: str = typer.Option("auto", "--device", help="Rescoring: auto, cpu, cuda or cuda:N (bf16 autocast on CUDA)."),
    nms_iou: float = typer.Option(0.5, "--nms-iou", help="Rescoring: IoU of the per-class NMS."),
    min_score: Optional[float] = typer.Option(None, "--min-score", help="Rescoring: lowest score kept in every row, the baseline's included (default: the score threshold the ROIs were taken at, 0.05 in test mode; never below it)."),
    max_per_image: int = typer.Option(100, "--max-per-image", help="Rescoring: detections kept per image."),
    sr_only: bool = typer.Option(False, "--sr-only", help="Rescoring: send every ROI through G (or bicubic) from its LR crop. By default D reads the HR crop of a ROI whose crop window in the image is wider than the LR crop, whose shrinking would lose detail the image has (the paper's G upsamples ROIs as the image holds them)."),
    small_area: Optional[float] = typer.Option(None, "--small-area", help="Rescoring: also write size-gated rows (NAME_small.json), in which only ROIs of area below this many px² are rescored and larger ones keep the baseline's detection, as Noh et al. (2019) route only small proposals through super-resolution (1024 = 32², COCO's small; the pipelines pass it). Default: no gated rows, every ROI rescored as the paper."),
    sr_gate: bool = typer.Option(False, "--sr-gate", help="Rescoring: also write SR-gated rows (NAME_srgate.json), in which only the ROIs that go through G are rescored (crop window no wider than the LR crop) and those D reads from their HR crop keep the baseline's detection: the rows show what super-resolution does and nothing else. Not with --sr-only."),
    figures: bool = typer.Option(True, "--figures/--no-figures", help="Rescoring: write figures/ (SR triplets, detections, loss curves)."),
    seed: int = typer.Option(0, "--seed", help="Seed (rescoring is deterministic; recorded in the manifest)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a finished --out folder (only once the new one is complete)."),
    slice_size: Optional[int] = typer.Option(None, "--slice", help="Sliced inference of the detector: overlapping tiles of this many px, merged by greedy non-maximum merging (as `sodtool predict --slice`). Tiles are resized by the scale the detector was trained at (recorded in its model.pt); a detector trained on tiles (`data slice`) slices at its tile size by default; 0: whole images."),
    overlap: float = typer.Option(0.2, "--overlap", help="With --slice: overlap of neighbouring tiles, as a fraction of the tile side."),
    slice_full: bool = typer.Option(False, "--slice-full", help="With --slice: also run the detector on the whole image and merge it in."),
    context: Optional[float] = typer.Option(None, "--context", help="Rescoring with --detector: crop window side = context x max(ROI w, h), as crop-rois --context (default: the context of the store the MTGAN was trained on, read through its run manifest; --rois stores carry their own)."),
    allow_trained_images: bool = typer.Option(False, "--allow-trained-images", help="Rescoring, for debugging: evaluate even though a model (--mtgan, an --ablation, --pretrained-g, the detector) was trained on images of the split (same image file digests, whatever their names); refused otherwise. metrics.json and table.md then say how many."),
) -> None:
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
    rescoring = [n for n, v in (("--mtgan", mtgan), ("--detector", detector), ("--rois", rois), ("--ablation", ablation),
                                ("--compare", compare), ("--pretrained-g", pretrained_g)) if v]
    if ctx.invoked_subcommand is not None:
        if results is not None or rescoring:
            given = "--results" if results is not None else rescoring[0]
            raise InputError(f"{given} cannot be combined with the subcommand '{ctx.invoked_subcommand}'")
        return
    if results is not None and rescoring:
        raise InputError(f"--results (evaluate a results file) and {', '.join(rescoring)} (MTGAN rescoring) are "
                         "two modes: give one of them")
    if rescoring:
        if mtgan is None and not compare:
            raise InputError(f"{', '.join(rescoring)} need --mtgan (the MTGAN run folder or model.pt) for rescoring, "
                             "or --compare NAME=PATH (another detector) to put beside the baseline")
        from sodtool.stages.eval_mtgan import RescoreConfig, rescore_eval

        rescore_eval(RescoreConfig(mtgan=mtgan, data=data, split=split, ann=ann, images=images, detector=detector,
                                   rois=rois, ablations=tuple(ablation or ()), compare=tuple(compare or ()),
                                   pretrained_g=pretrained_g, out=out,
                                   score=score,
                                   nms_iou=nms_iou, max_per_image=max_per_image, min_score=min_score,
                                   small_area=small_area,
                                   sr_gate=sr_gate, sr_only=sr_only, batch_size=batch_size, device=device, seed=seed,
                                   figures=figures, overwrite=overwrite,
                                   slice=slice_size, overlap=overlap, slice_full=slice_full, context=context,
                                   allow_trained_images=allow_trained_images))
        return
    if results is None:
        typer.echo("sodtool: error: give --results FILE (a COCO results JSON), or --mtgan RUN/mtgan with "
                   "--detector or --rois (MTGAN rescoring), or a subcommand; see 'sodtool eval --help'", err=True)
        raise typer.Exit(2)
    from sodtool.stages.eval_results import EvalResultsConfig, evaluate_results

    evaluate_results(EvalResultsConfig(results=results, ann=ann, images=images, data=data, split=split, out=out,
                                       overwrite=overwrite))


@eval_app.command("sr")
@handles_input_errors
def eval_sr_cmd(
    data: Path = typer.Option(..., "--data", help="Folder with HR/ and LR/ of same-named images (e.g. ../shared/data/sr/Set5)."),
    generator: Optional[Path] = typer.Option(None, "--generator", help="Generator checkpoint: RUN/sr/generator.pt or RUN/mtgan/model.pt (a run folder works too). Without it: bicubic only."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder for metrics.json, metrics.md, manifest.json (default: write nothing)."),
    scale: int = typer.Option(4, "--scale", help="Upscaling factor between LR and HR (the generator's is 4)."),
    border: int = typer.Option(4, "--border", help="Pixels cropped from each side before measuring (convention: the scale)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    save_images: bool = typer.Option(False, "--save-images", help="Also write the generator's outputs as OUT/images/<name>_sr.png."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a finished --out folder (only once the new one is complete)."),
) -> None:
    """PSNR / SSIM (RGB and Y channel) of the generator against bicubic on SR test images.

    Greyscale images are evaluated as RGB with equal channels (Y metrics on the grey level); an
    HR image up to scale-1 px larger than scale x LR is cropped to it.

    Example: sodtool eval sr --generator runs/quick/sr/generator.pt --data ../shared/data/sr/Set5 --out runs/quick/eval_sr_set5
    """
    from sodtool.stages.eval_sr import EvalSRConfig, eval_sr

    eval_sr(EvalSRConfig(generator=generator, data=data, out=out, scale=scale, border=border, device=device,
                         save_images=save_images, overwrite=overwrite))


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


def _csv_ints(value: Optional[str], option: str) -> Optional[tuple[int, ...]]:
    """'16,32,64' -> (16, 32, 64); None stays None."""
    if value is None or value.strip() == "":
        return None
    try:
        return tuple(int(v) for v in value.split(","))
    except ValueError:
        raise InputError(f"{option} takes comma-separated integers, got '{value}'") from None


@train_app.command("detector")
@handles_input_errors
def train_detector_cmd(
    detector: str = typer.Option("frcnn", "--detector", help="Detector family: frcnn (torchvision Faster R-CNN), ssd or mdssd (one-stage; MDSSD adds the seed paper's three Fusion Blocks to the same SSD). ssd/mdssd presets: quick and bench (MobileNetV3 trunk, 320 px, the frcnn presets' schedule), paper (VGG16, 300 px, SSD's COCO schedule: the MDSSD paper gives none; deconvolution output resized to the shallow map, L2 scale 20 and default boxes from 0.04 of the side are sodtool's choices)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Dataset folder (sodtool or COCO 2017 layout)."),
    out: Path = typer.Option(Path("runs/detector"), "--out", help="Output folder, e.g. RUN/detector. Rerunning into it resumes from its checkpoint.pt."),
    preset: str = typer.Option("quick", "--preset", help="quick: MobileNetV3-FPN from scratch, 320 px, batch 4, 800 iterations (minutes on a 2-core CPU); bench: the same network, 2400 iterations (about 16 minutes on 2 cores); coco: the paper's ResNet-50-C4, 800/1333 px, batch 16, lr 0.02, 90k iterations, lr /10 at 60k and 80k (GPU, with --backbone-weights). With --detector ssd/mdssd: quick, bench (MobileNetV3 at 320 px, same schedules) and paper (VGG16 at 300 px, SSD's COCO schedule)."),
    arch: Optional[str] = typer.Option(None, "--arch", help="frcnn: resnet50_fpn, resnet101_fpn, resnet50_c4, resnet18_fpn or mobilenet_v3_fpn; ssd/mdssd: vgg16 or mobilenet_v3 (default: the preset's, or the --weights file's)."),
    train_split: str = typer.Option("train", "--train-split", help="Split to train on."),
    train_ann: Optional[Path] = typer.Option(None, "--train-ann", help="Training annotation file (overrides --data/--train-split)."),
    train_images: Optional[Path] = typer.Option(None, "--train-images", help="Training image folder (overrides --data/--train-split)."),
    val_split: str = typer.Option("minival", "--val-split", help="Split evaluated at the end."),
    val_ann: Optional[Path] = typer.Option(None, "--val-ann", help="Evaluation annotation file (overrides --data/--val-split)."),
    val_images: Optional[Path] = typer.Option(None, "--val-images", help="Evaluation image folder (overrides --data/--val-split)."),
    iterations: Optional[int] = typer.Option(None, "--iterations", help="Training iterations (overrides the preset; the lr steps move with it)."),
    epochs: Optional[float] = typer.Option(None, "--epochs", help="Or: passes over the training images (iterations = epochs x images / batch)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images per iteration."),
    lr: Optional[float] = typer.Option(None, "--lr", help="SGD base learning rate."),
    momentum: float = typer.Option(0.9, "--momentum", help="SGD momentum."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="SGD weight decay (preset: 1e-4)."),
    warmup_iters: Optional[int] = typer.Option(None, "--warmup-iters", help="Iterations of linear lr warm-up."),
    warmup_factor: Optional[float] = typer.Option(None, "--warmup-factor", help="lr multiplier at iteration 0 of the warm-up (0.001; coco: 1/3 as Detectron)."),
    milestones: Optional[str] = typer.Option(None, "--milestones", help="Iterations at which lr is multiplied by --gamma, comma-separated, e.g. 60000,80000."),
    gamma: float = typer.Option(0.1, "--gamma", help="lr decay factor at each milestone."),
    clip_grad_norm: Optional[float] = typer.Option(None, "--clip-grad-norm", help="Clip the gradient's global L2 norm at this before each step; metrics.jsonl then logs the largest norm of each window (grad_norm_max). Preset: 10 for --detector ssd/mdssd --preset bench, off otherwise; 0: off."),
    min_size: Optional[int] = typer.Option(None, "--min-size", help="Short image side the model resizes to (quick/bench 320, coco 800)."),
    max_size: Optional[int] = typer.Option(None, "--max-size", help="Longest image side allowed after resizing (coco 1333)."),
    size: Optional[int] = typer.Option(None, "--size", help="--detector ssd/mdssd: the square input size (quick/bench 320 with the MobileNetV3 trunk; VGG16: 300 or 512)."),
    train_sizes: Optional[str] = typer.Option(None, "--train-sizes", help="Multi-scale training: short sides drawn per image, comma-separated (e.g. 256,288,320,352)."),
    hflip: Optional[bool] = typer.Option(None, "--hflip/--no-hflip", help="Random horizontal flips in training (preset: off for quick/bench, whose stripes-d/stripes-a classes are mirror images; on for coco)."),
    vflip: bool = typer.Option(False, "--vflip/--no-vflip", help="Random vertical flips in training (overhead imagery)."),
    rot90: bool = typer.Option(False, "--rot90/--no-rot90", help="Random quarter turns in training (overhead imagery)."),
    anchor_sizes: Optional[str] = typer.Option(None, "--anchor-sizes", help="Anchor size (px) per feature level, comma-separated, e.g. 16,32,64,128 (quick)."),
    fpn_channels: Optional[int] = typer.Option(None, "--fpn-channels", help="FPN width (torchvision 256; quick and bench 64)."),
    returned_layers: Optional[str] = typer.Option(None, "--returned-layers", help="Trunk stages feeding the FPN, comma-separated (ResNet: 1..4 = strides 4..32, torchvision 1,2,3,4; MobileNetV3: 0..5, 2,3,4 = strides 8..32, torchvision 4,5; quick 2,3,4)."),
    roi_batch_size: Optional[int] = typer.Option(None, "--roi-batch-size", help="RoIs sampled per image for the box head (torchvision 512; quick 64, up to half of them positive)."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Start from a whole detector: sodtool's model.pt or a torchvision detection state dict (e.g. fasterrcnn_resnet50_fpn_coco-258fb6c6.pth, fetched by hand)."),
    reinit_heads: bool = typer.Option(False, "--reinit-heads", help="With --weights: load only its trunk (backbone body and FPN; SSD/MDSSD: backbone) and start the RPN and box heads afresh, so a detector of another class count can start the training; build options given here (--anchor-sizes, --fpn-channels...) shape the new model."),
    extra_data: Optional[list[Path]] = typer.Option(None, "--extra-data", help="A generated dataset (sodtool layout, its train split) mixed into training; repeatable (one pool). Same categories as --data."),
    extra_ratio: Optional[float] = typer.Option(None, "--extra-ratio", help="Expected share of --extra-data images among those seen, in (0, 1) (default 0.5); each batch slot draws it. --iterations stays the budget."),
    backbone_weights: Optional[Path] = typer.Option(None, "--backbone-weights", help="torchvision ImageNet classification state dict of the trunk (e.g. resnet50-0676ba61.pth); BatchNorm is then frozen."),
    seed: int = typer.Option(0, "--seed", help="Seed of initialisation, data order and flips: same seed, same weights on CPU."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Loader worker processes (default: 0 on CPU, 4 on CUDA)."),
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every", help="Write checkpoint.pt every N iterations (and at the end)."),
    log_every: int = typer.Option(20, "--log-every", help="Write the mean of every loss term to metrics.jsonl every N iterations."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from OUT/checkpoint.pt when it exists (the default), or start over: a previous run in OUT stays whole until the new one is complete."),
    evaluate: bool = typer.Option(True, "--eval/--no-eval", help="COCO evaluation of the --val-split at the end."),
    eval_score_thresh: float = typer.Option(0.001, "--eval-score-thresh", help="Lowest score kept for the evaluation (100 detections per image)."),
    amp: bool = typer.Option(False, "--amp/--no-amp", help="bf16 autocast on CUDA (fp32 by default)."),
    tensorboard: bool = typer.Option(False, "--tensorboard", help="Also write TensorBoard events to OUT/tensorboard (losses, lr, held-out metrics); needs pip install 'sodtool[tensorboard]'. metrics.jsonl stays the record."),
    skip_invalid: bool = typer.Option(False, "--skip-invalid", help="Drop annotations with zero-size or out-of-image boxes instead of failing."),
) -> None:
    """Train the baseline detector (torchvision Faster R-CNN) and evaluate it on minival.

    SGD with momentum, linear warm-up and step decay; random horizontal flips; trained from scratch unless --weights or --backbone-weights is given (nothing is downloaded).

    Writes config.json, metrics.jsonl (every loss term, lr), checkpoint.pt (every --checkpoint-every iterations and at the end), then model.pt (the checkpoint crop-rois, detect and eval take) and manifest.json (with the COCO AP of --val-split). Rerunning the same command resumes from checkpoint.pt.

    Exit code 2 for bad input, 3 if the loss becomes NaN/inf (the last checkpoint is kept). One device (no DDP for the detector).

    Example: sodtool train detector --detector frcnn --data data/synth-quick --out runs/quick/detector --preset quick

    Example: sodtool train detector --data data/coco --preset coco --backbone-weights resnet50-0676ba61.pth --out runs/coco/detector

    Example: sodtool train detector --data data/kit-aerial --extra-data runs/gan/generated --extra-ratio 0.3 --weights runs/bench/detector/model.pt --reinit-heads --out runs/kit/detector
    """
    from sodtool.stages.train_detector import TrainDetectorConfig, train_detector

    _exit_on_nonfinite(train_detector, TrainDetectorConfig(
        data=data, out=out, detector=detector, preset=preset, train_split=train_split, train_ann=train_ann,
        train_images=train_images, val_split=val_split, val_ann=val_ann, val_images=val_images, arch=arch,
        iterations=iterations, epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum,
        weight_decay=weight_decay, warmup_iters=warmup_iters, warmup_factor=warmup_factor,
        milestones=_csv_ints(milestones, "--milestones"), gamma=gamma, clip_grad_norm=clip_grad_norm, min_size=min_size, max_size=max_size, size=size,
        train_sizes=_csv_ints(train_sizes, "--train-sizes") or (), hflip=hflip, vflip=vflip, rot90=rot90,
        anchor_sizes=_csv_ints(anchor_sizes, "--anchor-sizes"), fpn_channels=fpn_channels,
        returned_layers=_csv_ints(returned_layers, "--returned-layers"),
        roi_batch_size=roi_batch_size, weights=weights, reinit_heads=reinit_heads, backbone_weights=backbone_weights,
        extra_data=tuple(extra_data or ()), extra_ratio=extra_ratio, seed=seed,
        device=device, workers=workers, checkpoint_every=checkpoint_every, log_every=log_every, resume=resume,
        eval=evaluate, eval_score_thresh=eval_score_thresh, amp=amp, skip_invalid=skip_invalid,
        tensorboard=tensorboard))


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
def train_mtgan_cmd(
    hr: Path = typer.Option(..., "--hr", help="HR ROI store rois_<split>.h5 (from crop-rois)."),
    lr: Path = typer.Option(..., "--lr", help="Its LR twin rois_<split>_lr.h5 (from downsample)."),
    sr: Path = typer.Option(..., "--sr", help="The `train sr` run folder whose generator.pt initialises G."),
    out: Path = typer.Option(..., "--out", help="Output folder, e.g. RUN/mtgan. Rerunning into it resumes from its checkpoint.pt."),
    preset: str = typer.Option("quick", "--preset", help="quick: ResNet-18 D from scratch (or the detector's trunk with --disc-init), batch 32, D trained with Adam at 1e-3, 650 D-only warm-up + 100 adversarial iterations, D lr /10 at 600; bench: the same, 1500 + 500 iterations, /10 at 1750; paper: ResNet-50 D, 80k iterations, batch 64, D SGD 0.01 /10 every 40k, no warm-up."),
    iterations: Optional[int] = typer.Option(None, "--iterations", help="Training iterations, one D and one G step each (overrides the preset)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Crops per iteration and process (overrides the preset)."),
    disc_arch: Optional[str] = typer.Option(None, "--disc-arch", help="Discriminator trunk: resnet18, resnet34, resnet50 (paper) or resnet101."),
    imagenet_weights: Optional[Path] = typer.Option(None, "--imagenet-weights", help="torchvision ImageNet state dict file for the D trunk (fetched by hand; nothing is downloaded)."),
    disc_init: Optional[Path] = typer.Option(None, "--disc-init", help="A detector model.pt (e.g. RUN/detector/model.pt) whose trunk initialises D; D's architecture then follows the detector's trunk (MobileNetV3 or ResNet), the heads stay the paper's."),
    g_lr: float = typer.Option(1e-4, "--g-lr", help="Adam learning rate of G."),
    d_optimizer: Optional[str] = typer.Option(None, "--d-optimizer", help="D's optimiser: sgd (paper, with --d-momentum) or adam (AdamW; the from-scratch CPU presets)."),
    d_lr: Optional[float] = typer.Option(None, "--d-lr", help="Learning rate of D (paper: SGD 0.01 for an ImageNet-initialised D; the from-scratch presets: Adam 1e-3)."),
    d_momentum: float = typer.Option(0.9, "--d-momentum", help="SGD momentum of D (sgd only)."),
    d_weight_decay: float = typer.Option(1e-4, "--d-weight-decay", help="Weight decay of D (decoupled, AdamW's, with adam)."),
    d_lr_step: Optional[int] = typer.Option(None, "--d-lr-step", help="Divide D's learning rate by 10 every N iterations (paper 40k)."),
    d_warmup: Optional[int] = typer.Option(None, "--d-warmup", help="First N iterations train D only, G fixed (BasicSR's net_d_init_iters; paper 0)."),
    alpha: float = typer.Option(1e-3, "--alpha", help="Weight of the adversarial loss (Eq. 10/11)."),
    beta: float = typer.Option(1e-2, "--beta", help="Weight of the classification loss."),
    gamma: float = typer.Option(1e-2, "--gamma", help="Weight of the box regression loss."),
    tv_weight: float = typer.Option(0.0, "--tv-weight", help="Weight of a total-variation loss on G's output (Gu et al.; 0 = off)."),
    adversarial: str = typer.Option("paper", "--adversarial", help="G's adversarial term: paper = log(1 - D(G(x))), nonsaturating = -log D(G(x))."),
    no_reg_branch: bool = typer.Option(False, "--no-reg-branch", help="Ablation: D without the box regression branch."),
    no_adv: bool = typer.Option(False, "--no-adv", help="Ablation: no adversarial loss."),
    no_cls: bool = typer.Option(False, "--no-cls", help="Ablation: no classification loss in G's objective."),
    no_reg: bool = typer.Option(False, "--no-reg", help="Ablation: no regression loss in G's objective."),
    val_fraction: float = typer.Option(0.05, "--val-fraction", help="Share of rows held out (the same rows as train sr with the same value)."),
    val_max: int = typer.Option(256, "--val-max", help="At most this many held-out rows."),
    val_every: Optional[int] = typer.Option(None, "--val-every", help="Evaluate the held-out rows every N iterations (and at the end)."),
    log_every: Optional[int] = typer.Option(None, "--log-every", help="Write mean loss terms to metrics.jsonl every N iterations."),
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every", help="Write checkpoint.pt every N iterations."),
    sample_every: Optional[int] = typer.Option(None, "--sample-every", help="Save a sample grid PNG (LR, bicubic, SR, HR) every N iterations."),
    seed: int = typer.Option(0, "--seed", help="Seed of D's initialisation and the data order: same seed, same weights on CPU."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N (CUDA: bf16 autocast, channels_last; several GPUs: torchrun)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Loader worker processes (default: 0 on CPU, 4 on CUDA)."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from OUT/checkpoint.pt when it exists (the default), or start over: a previous run in OUT stays whole until the new one is complete."),
    tensorboard: bool = typer.Option(False, "--tensorboard", help="Also write TensorBoard events to OUT/tensorboard (losses, lr, held-out metrics, sample crops); needs pip install 'sodtool[tensorboard]'. metrics.jsonl stays the record."),
    stop_after: Optional[int] = typer.Option(None, "--stop-after", hidden=True, help="Testing: checkpoint and stop after this iteration."),
) -> None:
    """Train the multi-task GAN: G from `train sr`, D a ResNet with real/fake, class and box heads (Eq. 10/11).

    Alternates one D step (G fixed) and one G step (D fixed) per iteration. Writes model.pt,
    checkpoint.pt, metrics.jsonl, samples/*.png and manifest.json into --out; rerunning the same
    command resumes. Exit code 2 for bad input, 3 if a loss becomes NaN/inf (the last
    checkpoint is kept).

    Example: sodtool train mtgan --hr runs/quick/rois_train.h5 --lr runs/quick/rois_train_lr.h5 --sr runs/quick/sr --out runs/quick/mtgan
    """
    from sodtool.stages.train_mtgan import TrainMTGANConfig, train_mtgan

    _exit_on_nonfinite(train_mtgan, TrainMTGANConfig(
        hr=hr, lr=lr, sr=sr, out=out, preset=preset, iterations=iterations, batch_size=batch_size,
        disc_arch=disc_arch, imagenet_weights=imagenet_weights, disc_init=disc_init, g_lr=g_lr, d_optimizer=d_optimizer, d_lr=d_lr, d_momentum=d_momentum,
        d_weight_decay=d_weight_decay, d_lr_step=d_lr_step, d_warmup=d_warmup, alpha=alpha, beta=beta, gamma=gamma,
        tv_weight=tv_weight, adversarial=adversarial, reg_branch=not no_reg_branch, adv=not no_adv,
        cls=not no_cls, reg=not no_reg, val_fraction=val_fraction, val_max=val_max, val_every=val_every,
        log_every=log_every, checkpoint_every=checkpoint_every, sample_every=sample_every, seed=seed,
        device=device, num_workers=workers, stop_after=stop_after, resume=resume, tensorboard=tensorboard))


@train_app.command("fsr")
@handles_input_errors
def train_fsr_cmd(
    detector: Path = typer.Option(..., "--detector", help="The base Faster R-CNN: RUN/detector/model.pt from `train detector` (its trunk and RPN stay frozen)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Dataset folder (sodtool or COCO 2017 layout)."),
    out: Path = typer.Option(Path("runs/fsr"), "--out", help="Output folder, e.g. RUN/fsr. Rerunning into it resumes from its checkpoint.pt."),
    control: str = typer.Option("none", "--control", help="none: Noh et al. (generator supervised by the atrous SR target extractor); small-head: the small head and predictor on the small proposals' own features, no generator; unmatched-target: targets from the plain backbone on the full-size image (the paper's naive supervision)."),
    preset: str = typer.Option("quick", "--preset", help="quick: 150 GAN + 50 fine-tuning steps of batch 4, small proposals below 32² px (2-core CPU, for the quickstart's MobileNetV3-FPN detector); bench: the same, 3x longer; coco: 40k + 10k steps of batch 8, below 96² px (the paper's COCO threshold; GPU)."),
    train_split: str = typer.Option("train", "--train-split", help="Split to train on."),
    train_ann: Optional[Path] = typer.Option(None, "--train-ann", help="Training annotation file (overrides --data/--train-split)."),
    train_images: Optional[Path] = typer.Option(None, "--train-images", help="Training image folder (overrides --data/--train-split)."),
    val_split: str = typer.Option("minival", "--val-split", help="Split evaluated at the end."),
    val_ann: Optional[Path] = typer.Option(None, "--val-ann", help="Evaluation annotation file (overrides --data/--val-split)."),
    val_images: Optional[Path] = typer.Option(None, "--val-images", help="Evaluation image folder (overrides --data/--val-split)."),
    iterations: Optional[int] = typer.Option(None, "--iterations", help="All steps: the GAN's, then the last --finetune-iterations (overrides the preset)."),
    finetune_iterations: Optional[int] = typer.Option(None, "--finetune-iterations", help="Final steps fine-tuning the small and large heads and predictors, all else frozen (default: the preset's share of --iterations)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images per step."),
    lr: Optional[float] = typer.Option(None, "--lr", help="SGD learning rate of the small and large heads and predictors (preset 0.002)."),
    momentum: float = typer.Option(0.9, "--momentum", help="SGD momentum of the heads."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="SGD weight decay of the heads (preset 1e-4)."),
    g_lr: Optional[float] = typer.Option(None, "--g-lr", help="Adam learning rate of the feature generator (betas 0.5, 0.999)."),
    d_lr: Optional[float] = typer.Option(None, "--d-lr", help="Adam learning rate of the feature discriminator (betas 0.5, 0.999)."),
    content_weight: float = typer.Option(1.0, "--content-weight", help="Weight of the content loss (Eq. 4, divided by the targets' mean square)."),
    adv_weight: float = typer.Option(0.01, "--adv-weight", help="Weight of the generator's adversarial loss (Eq. 5)."),
    det_weight: float = typer.Option(1.0, "--det-weight", help="Weight of the small predictor's classification and box losses in the generator's objective."),
    small_size: Optional[int] = typer.Option(None, "--small-size", help="Proposals of area below S² model-input px go through the generator and the small predictor (quick/bench 32, coco 96)."),
    pair_min_size: Optional[int] = typer.Option(None, "--pair-min-size", help="Training pairs: RoIs whose full-size side is in [this, 2 x --small-size) px (default: --small-size / 2)."),
    pool: str = typer.Option("avg", "--pool", help="The extractor's pooling where the trunk strides: avg (chosen on val) or max (the paper's Fig. 4c)."),
    gen_blocks: Optional[int] = typer.Option(None, "--gen-blocks", help="Residual blocks of the feature generator (quick 2, coco 4)."),
    gen_width: Optional[int] = typer.Option(None, "--gen-width", help="Inner width of the generator's blocks (default: base + sub-layer channels, at most 512)."),
    disc_hidden: Optional[int] = typer.Option(None, "--disc-hidden", help="Width of the discriminator's two hidden layers (quick 256, coco 1024)."),
    hflip: Optional[bool] = typer.Option(None, "--hflip/--no-hflip", help="Random horizontal flips (preset: off for quick/bench, on for coco)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the generator's and discriminator's initialisation, RoI sampling and data order: same seed, same weights on CPU."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Loader worker processes (default: 0 on CPU, 4 on CUDA)."),
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every", help="Write checkpoint.pt every N steps (and at the end)."),
    log_every: int = typer.Option(10, "--log-every", help="Write the mean of every loss term to metrics.jsonl every N steps."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from OUT/checkpoint.pt when it exists (the default), or start over: a previous run in OUT stays whole until the new one is complete."),
    evaluate: bool = typer.Option(True, "--eval/--no-eval", help="COCO evaluation of the --val-split at the end."),
    eval_score_thresh: float = typer.Option(0.001, "--eval-score-thresh", help="Lowest score kept for the evaluation (100 detections per image)."),
    eval_batch_size: int = typer.Option(4, "--eval-batch-size", help="Images per detector call in the evaluation."),
    amp: bool = typer.Option(False, "--amp/--no-amp", help="bf16 autocast on CUDA (fp32 by default)."),
    skip_invalid: bool = typer.Option(False, "--skip-invalid", help="Drop annotations with zero-size or out-of-image boxes instead of failing."),
    tensorboard: bool = typer.Option(False, "--tensorboard", help="Also write TensorBoard events to OUT/tensorboard (losses, lr, held-out metrics); needs pip install 'sodtool[tensorboard]'. metrics.jsonl stays the record."),
    stop_after: Optional[int] = typer.Option(None, "--stop-after", hidden=True, help="Testing: checkpoint and stop after this step."),
) -> None:
    """Feature-level super-resolution of small proposals (Noh et al., ICCV 2019) on a trained Faster R-CNN, or one of its controls.

    The trunk and RPN stay frozen; an SR target extractor (the trunk run atrous, same weights) supervises a feature generator for proposals below --small-size² px, with a feature discriminator and a small head and predictor copied from the large ones; then both predictors are fine-tuned.

    Writes config.json, metrics.jsonl (every loss term), checkpoint.pt, then model.pt (detector family fsr: detect, eval --detector, crop-rois --detector fsr and predict take it) and manifest.json. Rerunning the same command resumes. Exit code 2 for bad input, 3 if a loss becomes NaN/inf (the last checkpoint is kept). One device.

    Example: sodtool train fsr --detector runs/quick/detector/model.pt --data data/synth-quick --out runs/quick/fsr

    Example: sodtool train fsr --detector runs/quick/detector/model.pt --data data/synth-quick --control small-head --out runs/quick/fsr-small-head
    """
    from sodtool.stages.train_fsr import TrainFSRConfig, train_fsr

    _exit_on_nonfinite(train_fsr, TrainFSRConfig(
        detector=detector, data=data, out=out, control=control, preset=preset, train_split=train_split,
        train_ann=train_ann, train_images=train_images, val_split=val_split, val_ann=val_ann, val_images=val_images,
        iterations=iterations, finetune_iterations=finetune_iterations, batch_size=batch_size, lr=lr,
        momentum=momentum, weight_decay=weight_decay, g_lr=g_lr, d_lr=d_lr, content_weight=content_weight,
        adv_weight=adv_weight, det_weight=det_weight, small_size=small_size, pair_min_size=pair_min_size, pool=pool,
        gen_blocks=gen_blocks, gen_width=gen_width, disc_hidden=disc_hidden, hflip=hflip, seed=seed, device=device,
        workers=workers, checkpoint_every=checkpoint_every, log_every=log_every, resume=resume, eval=evaluate,
        eval_score_thresh=eval_score_thresh, eval_batch_size=eval_batch_size, amp=amp, skip_invalid=skip_invalid,
        stop_after=stop_after, tensorboard=tensorboard))


# `sodtool crop-rois ...` is the group's callback (invoke_without_command), so that
# `sodtool crop-rois merge OUT SHARDS...` can sit beside it.
@train_app.command("detgan")
@handles_input_errors
def train_detgan_cmd(
    detector: Path = typer.Option(..., "--detector", help="The detector in the loop: a `train detector` Faster R-CNN run (or its model.pt) trained on the same split; its trunk and RPN stay frozen, its RoI heads train and are unrolled."),
    data: Optional[Path] = typer.Option(None, "--data", help="Dataset root (COCO layout)."),
    out: Path = typer.Option(Path("runs/detgan"), "--out", help="Output folder, e.g. RUN/detgan. Rerunning into it resumes from its checkpoint.pt."),
    split: str = typer.Option("train", "--split", help="The split whose objects are learnt."),
    patch: int = typer.Option(128, "--patch", help="Patch side in px (a multiple of 4) around each object."),
    iterations: int = typer.Option(1500, "--iterations", help="Training iterations, both phases."),
    pretrain_iterations: int = typer.Option(500, "--pretrain-iterations", help="Phase 1: G and the discriminators alone, before the detector joins."),
    batch_size: int = typer.Option(4, "--batch-size", help="Objects (patches) per iteration."),
    channels: int = typer.Option(32, "--channels", help="G's base width (CycleGAN 64)."),
    blocks: int = typer.Option(4, "--blocks", help="G's residual blocks (the paper's 9)."),
    d_channels: int = typer.Option(32, "--d-channels", help="The PatchGAN discriminators' base width."),
    local_size: int = typer.Option(32, "--local-size", help="px the object crop is resampled to for the local discriminator."),
    lr: float = typer.Option(2e-4, "--lr", help="Adam learning rate of G and the discriminators (beta1 0.5)."),
    det_lr: float = typer.Option(0.005, "--det-lr", help="The in-loop detector's SGD step (the one Eq. 3 unrolls)."),
    adv_weight: float = typer.Option(1.0, "--adv-weight", help="Weight of the global adversarial loss."),
    local_weight: float = typer.Option(1.0, "--local-weight", help="Weight of the local (object crop) adversarial loss."),
    l1_weight: float = typer.Option(10.0, "--l1-weight", help="Weight of BboxLoss, the L1 between synthetic and real object crops."),
    syn_weight: float = typer.Option(0.1, "--syn-weight", help="Weight of the detection loss on synthetic patches, which G maximises (the paper's sign)."),
    unroll_weight: float = typer.Option(1.0, "--unroll-weight", help="Weight of the detection loss on real patches after the unrolled detector step (Eq. 3)."),
    unroll: bool = typer.Option(True, "--unroll/--no-unroll", help="Eq. 3's unrolled step; --no-unroll is the paper's 'DetectorGAN - unrolling'."),
    pool_size: int = typer.Option(50, "--pool-size", help="History of synthetic patches the discriminators see."),
    margin: int = typer.Option(2, "--margin", help="px the noised box is grown by."),
    min_visibility: float = typer.Option(0.5, "--min-visibility", help="A box cut by the patch border stays a target from this share of its area inside."),
    log_every: int = typer.Option(10, "--log-every", help="Write the mean losses to metrics.jsonl every N iterations."),
    checkpoint_every: int = typer.Option(100, "--checkpoint-every", help="Write checkpoint.pt every N iterations."),
    sample_every: int = typer.Option(250, "--sample-every", help="Write samples/iter_N.png every N iterations."),
    seed: int = typer.Option(0, "--seed", help="Seed of initialisation, patches and noise: same seed, same weights on CPU."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from OUT/checkpoint.pt when it exists (the default), or start over."),
    tensorboard: bool = typer.Option(False, "--tensorboard", help="Also write TensorBoard events to OUT/tensorboard (losses, lr, held-out metrics, sample patches); needs pip install 'sodtool[tensorboard]'. metrics.jsonl stays the record."),
    stop_after: Optional[int] = typer.Option(None, "--stop-after", hidden=True, help="Testing: checkpoint and stop after this iteration."),
) -> None:
    """Train DetectorGAN (Liu et al., ICCV 2019): a generator that inserts objects at given boxes, trained against global and local PatchGAN discriminators and through one unrolled step of the detector.

    Writes model.pt (for `data generate --method detgan`), checkpoint.pt, metrics.jsonl,
    samples/ and manifest.json into --out. Exit code 2 for bad input, 3 if a loss becomes NaN/inf.

    Example: sodtool train detgan --detector runs/kit/detector/model.pt --data data/kit-aerial-crossroads-to-street --out runs/kit/detgan
    """
    from sodtool.stages.train_detgan import TrainDetGANConfig, train_detgan

    _exit_on_nonfinite(train_detgan, TrainDetGANConfig(
        detector=detector, data=data, out=out, split=split, patch=patch, iterations=iterations,
        pretrain_iterations=pretrain_iterations, batch_size=batch_size, channels=channels, blocks=blocks,
        d_channels=d_channels, local_size=local_size, lr=lr, det_lr=det_lr, adv_weight=adv_weight,
        local_weight=local_weight, l1_weight=l1_weight, syn_weight=syn_weight, unroll_weight=unroll_weight,
        unroll=unroll, pool_size=pool_size, margin=margin, min_visibility=min_visibility, log_every=log_every,
        checkpoint_every=checkpoint_every, sample_every=sample_every, seed=seed, device=device, resume=resume,
        stop_after=stop_after, tensorboard=tensorboard))


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
def predict_cmd(
    inputs: list[str] = typer.Argument(..., help="Image files, folders (searched recursively) or globs (quoted), any size."),
    detector: Path = typer.Option(..., "--detector", help="The detector: RUN/detector/model.pt (any family) or a torchvision detection state dict."),
    out: Path = typer.Option(..., "--out", help="Output folder: predictions.json (COCO), drawn/, parts/, manifest.json. Rerunning skips finished images."),
    mtgan: Optional[Path] = typer.Option(None, "--mtgan", help="Rescore the detector's ROIs with this MTGAN (RUN/mtgan or its model.pt), as eval does."),
    score: str = typer.Option("fused", "--score", help="With --mtgan: disc (the paper: D's class probability) or fused (geometric mean with the detector's score)."),
    sr_only: bool = typer.Option(False, "--sr-only", help="With --mtgan: every rescored ROI through G from its LR crop (by default D reads the HR crop of ROIs whose window is wider than the LR crop, as eval)."),
    small_area: float = typer.Option(1024.0, "--small-area", help="With --mtgan: rescore only ROIs of area below this many px² (1024 = 32², COCO's small); larger ones keep the detector's detection, as eval's 'ROIs < 32² only' rows. 0: every ROI, as the paper."),
    slice_size: Optional[int] = typer.Option(None, "--slice", help="Sliced inference: tiles of this many px (square), merged across tiles by greedy non-maximum merging (SAHI's GREEDYNMM: a box cut by a tile border comes out once, whole). Tiles are resized by the scale the detector was trained at (recorded in its model.pt); a detector trained on tiles (`data slice`) slices at its tile size by default; 0: whole images."),
    overlap: float = typer.Option(0.2, "--overlap", help="Overlap of neighbouring tiles, as a fraction of the tile side."),
    slice_full: bool = typer.Option(False, "--slice-full", help="With --slice: also run the detector on the whole image and merge it in."),
    context: Optional[float] = typer.Option(None, "--context", help="With --mtgan: crop window side = context x max(ROI w, h), as crop-rois --context (default: the context of the store the MTGAN was trained on, read through its run manifest)."),
    score_thresh: float = typer.Option(0.05, "--score-thresh", help="Lowest detector score kept as a ROI (the paper's protocol: 0.05)."),
    max_rois: int = typer.Option(100, "--max-rois", help="ROIs per image (the paper's protocol: 100)."),
    max_per_image: int = typer.Option(100, "--max-per-image", help="Detections kept per image."),
    merge_ios: float = typer.Option(0.5, "--merge-ios", help="Tile merging: intersection over the smaller box at which two boxes of a class merge."),
    nms_iou: float = typer.Option(0.5, "--nms-iou", help="With --mtgan: IoU of the per-class NMS after rescoring."),
    min_score: float = typer.Option(1e-3, "--min-score", help="With --mtgan: lowest rescored score kept."),
    draw_threshold: float = typer.Option(0.5, "--draw-threshold", help="Smallest score drawn on the images in OUT/drawn/."),
    batch_size: int = typer.Option(8, "--batch-size", help="Images per group and tiles per detector call (tiles of several images go together)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Redo every image (by default a rerun skips those already in OUT)."),
) -> None:
    """Detect objects in your own images (optionally sliced, optionally rescored by the MTGAN).

    Writes OUT/predictions.json (a COCO object: images, categories, annotations with scores:
    pycocotools loads it as a dataset, and its annotations serve as results), one drawn image
    per input in OUT/drawn/, and OUT/manifest.json. An unreadable input is named and skipped;
    the command then ends with exit code 2 once every other image is written.

    Example: sodtool predict ../shared/data/kit-aerial/images --detector runs/kit/detector/model.pt --mtgan runs/kit/mtgan --slice 512 --out runs/kit/predict
    """
    from sodtool.stages.predict import PredictConfig, predict_images

    predict_images(PredictConfig(inputs=tuple(inputs), detector=detector, out=out, mtgan=mtgan, score=score,
                                 small_area=small_area, sr_only=sr_only,
                                 slice=slice_size, overlap=overlap, slice_full=slice_full, context=context,
                                 score_thresh=score_thresh, max_rois=max_rois, max_per_image=max_per_image,
                                 merge_ios=merge_ios, nms_iou=nms_iou, min_score=min_score,
                                 draw_threshold=draw_threshold, batch_size=batch_size, device=device,
                                 overwrite=overwrite))


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
