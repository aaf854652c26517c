"""The `sodtool` command line: thin Typer wrappers that parse options into each stage's config.

Heavy modules (torch, torchvision, pycocotools) are imported inside the commands so that
`sodtool --help` stays quick. Bad input (`InputError`) ends with one line on stderr and exit
code 2; `sodtool --debug ...` shows the traceback.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Optional

import functools

import typer

from sodtool import __version__
from sodtool.errors import InputError

_state = {"debug": False}


def handles_input_errors(fn):
    """Decorate every command: InputError -> one line on stderr and exit code 2.

    A decorator rather than a custom click group, because Typer's internals change between
    releases (0.29 vendors its own click) while `typer.Exit` stays.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except InputError as e:
            if _state["debug"]:
                traceback.print_exc()
            typer.echo(f"sodtool: error: {e}", err=True)
            raise typer.Exit(2) from None

    return wrapper


app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
data_app = typer.Typer(help="Make, import and describe COCO-format datasets.", no_args_is_help=True)
train_app = typer.Typer(help="Train the detector, the SR generator and the MTGAN.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(train_app, name="train")
# `sodtool eval --results FILE` is the group's callback (invoke_without_command); subcommands
# such as `sodtool eval sr` are added to eval_app by their own modules' commands below.
eval_app = typer.Typer(invoke_without_command=True)
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
    from sodtool.console import set_quiet

    _state["debug"] = debug
    set_quiet(quiet)


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
    images: Optional[Path] = typer.Option(None, "--images", help="Image folder (not needed to evaluate)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: <results folder>/eval_<results name>)."),
) -> None:
    """Evaluate detections with COCOeval (bbox): the 12 COCO numbers and per-class AP.

    Writes metrics.json, metrics.md and manifest.json into --out. Subcommands evaluate other things.

    Example: sodtool eval --results runs/quick/dets_minival.json --data data/synth-quick --split minival
    """
    if ctx.invoked_subcommand is not None:
        if results is not None:
            raise InputError(f"--results cannot be combined with the subcommand '{ctx.invoked_subcommand}'")
        return
    if results is None:
        typer.echo("sodtool: error: give --results FILE (a COCO results JSON) or a subcommand; "
                   "see 'sodtool eval --help'", err=True)
        raise typer.Exit(2)
    from sodtool.evaluate import EvalResultsConfig, evaluate_results

    evaluate_results(EvalResultsConfig(results=results, ann=ann, images=images, data=data, split=split, out=out))


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
) -> None:
    """PSNR / SSIM (RGB and Y channel) of the generator against bicubic on SR test images.

    Greyscale images are evaluated as RGB with equal channels (Y metrics on the grey level); an
    HR image up to scale-1 px larger than scale x LR is cropped to it.

    Example: sodtool eval sr --generator runs/quick/sr/generator.pt --data ../shared/data/sr/Set5 --out runs/quick/eval_sr_set5
    """
    from sodtool.eval_sr import EvalSRConfig, eval_sr

    eval_sr(EvalSRConfig(generator=generator, data=data, out=out, scale=scale, border=border, device=device, save_images=save_images))


@data_app.command("synth")
@handles_input_errors
def data_synth(
    out: Optional[Path] = typer.Option(None, "--out", help="Output dataset folder (default: data/synth-<preset>)."),
    preset: str = typer.Option("quick", "--preset", help="quick: 500 train + 100 minival images (the quickstart); bench: 4000 + 500 (measurements). 320x320 both."),
    train_images: Optional[int] = typer.Option(None, "--train-images", help="Number of train images (overrides the preset)."),
    minival_images: Optional[int] = typer.Option(None, "--minival-images", help="Number of minival images (overrides the preset)."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Side of the square images in px, >= 192 (overrides the preset)."),
    classes: int = typer.Option(10, "--classes", help="Number of classes K (1..12), each an internal pattern: stripes-h, stripes-v, stripes-d, ..."),
    seed: int = typer.Option(0, "--seed", help="Seed: the same seed gives byte-identical images and annotations."),
    workers: int = typer.Option(1, "--workers", help="Processes drawing images (the output does not depend on it)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty folder that is not a previous synth output."),
) -> None:
    """Generate the synthetic small-object benchmark as a COCO-format dataset.

    About 40% small (< 32²), 35% medium, 25% large objects; classes share colours and shapes and
    differ only in fine internal patterns, so a small object's class needs resolution. Cluttered
    backgrounds, unlabelled distractors, occlusion, blur, noise and JPEG artefacts. Writes
    images/{train,minival}/, annotations/instances_{train,minival}.json and manifest.json
    (built aside and renamed into place when complete).

    Example: sodtool data synth --preset quick --out data/synth-quick --seed 0
    """
    from sodtool.synth import SynthConfig, synthesize

    synthesize(SynthConfig(out=out, preset=preset, train_images=train_images, minival_images=minival_images,
                           image_size=image_size, classes=classes, seed=seed, workers=workers, overwrite=overwrite))


@data_app.command("stats")
@handles_input_errors
def data_stats(
    data: Optional[Path] = typer.Option(None, "--data", help="Dataset folder (sodtool or COCO 2017 layout)."),
    split: str = typer.Option("train", "--split", help="Split to describe."),
    ann: Optional[Path] = typer.Option(None, "--ann", help="Annotation file (overrides --data/--split)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Image folder (optional: counts missing image files)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: runs/stats/<dataset>_<split>)."),
) -> None:
    """Objects per class and per COCO size (small < 32², medium < 96², large), a box-size histogram.

    Writes stats_<split>.json, sizes_<split>.png and manifest.json into --out.

    Example: sodtool data stats --data data/synth-quick --split train
    """
    from sodtool.stats import StatsConfig, dataset_stats

    dataset_stats(StatsConfig(data=data, split=split, ann=ann, images=images, out=out))


@data_app.command("import-yolo")
@handles_input_errors
def data_import_yolo(
    src: Path = typer.Argument(..., help="YOLO dataset folder: images/, labels/ (one `class xc yc w h` .txt per image), classes.txt."),
    classes: Optional[Path] = typer.Option(None, "--classes", help="Classes file: `name` per line (ids 1..K) or `ID name` per line (ids kept). Default: SRC/classes.txt."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output dataset folder (default: data/<SRC folder name>)."),
    images: str = typer.Option("images", "--images", help="Image folder under SRC."),
    labels: str = typer.Option("labels", "--labels", help="Label folder under SRC."),
    val_fraction: float = typer.Option(0.2, "--val-fraction", help="Share of images put in minival (seeded shuffle)."),
    train_list: Optional[Path] = typer.Option(None, "--train-list", help="File listing the train images, one per line (overrides --val-fraction)."),
    minival_list: Optional[Path] = typer.Option(None, "--minival-list", help="File listing the minival images (with one list only, the other split is the rest)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the train/minival shuffle."),
    link: str = typer.Option("copy", "--link", help="How images reach the output: copy, hardlink or symlink."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output folder (only once the new one is complete)."),
    skip_orphan_labels: bool = typer.Option(False, "--skip-orphan-labels", help="Drop label files that have no image instead of failing."),
) -> None:
    """Import a YOLO-labelled dataset as COCO JSON: annotations/instances_{train,minival}.json + images/.

    Example: sodtool data import-yolo ../shared/data/kit-aerial --out data/kit-aerial --val-fraction 0.2 --seed 0
    """
    from sodtool.yolo import ImportYoloConfig, import_yolo

    import_yolo(ImportYoloConfig(src=src, out=out, classes=classes, images=images, labels=labels,
                                 val_fraction=val_fraction, train_list=train_list, minival_list=minival_list,
                                 seed=seed, link=link, overwrite=overwrite, skip_orphan_labels=skip_orphan_labels))


def _exit_on_nonfinite(fn, cfg) -> None:
    """Run a training stage; a NaN / inf loss ends with one line and exit code 3 (2 = bad input)."""
    from sodtool.train_sr import NonFiniteLossError

    try:
        fn(cfg)
    except NonFiniteLossError as e:
        if _state["debug"]:
            traceback.print_exc()
        typer.echo(f"sodtool: error: {e}", err=True)
        raise typer.Exit(NonFiniteLossError.exit_code) from None


@train_app.command("sr")
@handles_input_errors
def train_sr_cmd(
    hr: Path = typer.Option(..., "--hr", help="HR ROI store rois_<split>.h5 (from crop-rois)."),
    lr: Path = typer.Option(..., "--lr", help="Its LR twin rois_<split>_lr.h5 (from downsample)."),
    out: Path = typer.Option(..., "--out", help="Output folder, e.g. RUN/sr. Rerunning into it resumes from its checkpoint.pt."),
    preset: str = typer.Option("quick", "--preset", help="quick: light CPU widths (32/32), 300 iterations, batch 16; paper: Table 1 widths (64/256), 100k iterations, batch 64."),
    iterations: Optional[int] = typer.Option(None, "--iterations", help="Training iterations (overrides the preset)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Crops per iteration and process (overrides the preset)."),
    learning_rate: float = typer.Option(1e-4, "--learning-rate", help="Adam learning rate (betas 0.9, 0.999)."),
    channels: Optional[int] = typer.Option(None, "--channels", help="Generator trunk maps (paper 64)."),
    up_channels: Optional[int] = typer.Option(None, "--up-channels", help="Generator up-sampling maps (paper 256)."),
    num_blocks: Optional[int] = typer.Option(None, "--num-blocks", help="Generator residual blocks (paper 5)."),
    min_native_size: int = typer.Option(0, "--min-native-size", help="Train only on crops whose window in the source image is at least this many px wide (0 = all crops); smaller windows were upsampled into the store."),
    val_fraction: float = typer.Option(0.05, "--val-fraction", help="Share of the store's rows held out for PSNR/SSIM (same rows in train mtgan)."),
    val_max: int = typer.Option(256, "--val-max", help="At most this many held-out rows."),
    val_every: Optional[int] = typer.Option(None, "--val-every", help="Evaluate the held-out rows every N iterations (and at the end)."),
    log_every: Optional[int] = typer.Option(None, "--log-every", help="Write the mean loss to metrics.jsonl every N iterations."),
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every", help="Write checkpoint.pt every N iterations."),
    seed: int = typer.Option(0, "--seed", help="Seed of initialisation and data order: same seed, same weights on CPU."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N (CUDA: bf16 autocast, channels_last)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Loader worker processes (default: 0 on CPU, 4 on CUDA)."),
    stop_after: Optional[int] = typer.Option(None, "--stop-after", hidden=True, help="Testing: checkpoint and stop after this iteration."),
) -> None:
    """Pretrain the SR generator with pixel MSE on HR/LR crop pairs (paper Eq. 4).

    Writes generator.pt, checkpoint.pt, metrics.jsonl and manifest.json into --out; reports
    held-out PSNR/SSIM (RGB and Y) of the generator and of bicubic upsampling. Exit code 2 for
    bad input, 3 if the loss becomes NaN/inf (the last checkpoint is kept).

    Example: sodtool train sr --hr runs/quick/rois_train.h5 --lr runs/quick/rois_train_lr.h5 --out runs/quick/sr
    """
    from sodtool.train_sr import TrainSRConfig, train_sr

    _exit_on_nonfinite(train_sr, TrainSRConfig(
        hr=hr, lr=lr, out=out, preset=preset, iterations=iterations, batch_size=batch_size,
        learning_rate=learning_rate, channels=channels, up_channels=up_channels, num_blocks=num_blocks,
        min_native_size=min_native_size, val_fraction=val_fraction, val_max=val_max, val_every=val_every,
        log_every=log_every, checkpoint_every=checkpoint_every, seed=seed, device=device, num_workers=workers,
        stop_after=stop_after))


@train_app.command("mtgan")
@handles_input_errors
def train_mtgan_cmd(
    hr: Path = typer.Option(..., "--hr", help="HR ROI store rois_<split>.h5 (from crop-rois)."),
    lr: Path = typer.Option(..., "--lr", help="Its LR twin rois_<split>_lr.h5 (from downsample)."),
    sr: Path = typer.Option(..., "--sr", help="The `train sr` run folder whose generator.pt initialises G."),
    out: Path = typer.Option(..., "--out", help="Output folder, e.g. RUN/mtgan. Rerunning into it resumes from its checkpoint.pt."),
    preset: str = typer.Option("quick", "--preset", help="quick: ResNet-18 D, 200 iterations, batch 8, D lr /10 at 100; paper: ResNet-50 D, 80k iterations, batch 64, D lr /10 every 40k."),
    iterations: Optional[int] = typer.Option(None, "--iterations", help="Training iterations, one D and one G step each (overrides the preset)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Crops per iteration and process (overrides the preset)."),
    disc_arch: Optional[str] = typer.Option(None, "--disc-arch", help="Discriminator trunk: resnet18, resnet34, resnet50 (paper) or resnet101."),
    imagenet_weights: Optional[Path] = typer.Option(None, "--imagenet-weights", help="torchvision ImageNet state dict file for the D trunk (fetched by hand; nothing is downloaded)."),
    g_lr: float = typer.Option(1e-4, "--g-lr", help="Adam learning rate of G."),
    d_lr: float = typer.Option(0.01, "--d-lr", help="SGD learning rate of D."),
    d_momentum: float = typer.Option(0.9, "--d-momentum", help="SGD momentum of D."),
    d_weight_decay: float = typer.Option(1e-4, "--d-weight-decay", help="SGD weight decay of D."),
    d_lr_step: Optional[int] = typer.Option(None, "--d-lr-step", help="Divide D's learning rate by 10 every N iterations (paper 40k)."),
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
    stop_after: Optional[int] = typer.Option(None, "--stop-after", hidden=True, help="Testing: checkpoint and stop after this iteration."),
) -> None:
    """Train the multi-task GAN: G from `train sr`, D a ResNet with real/fake, class and box heads (Eq. 10/11).

    Alternates one D step (G fixed) and one G step (D fixed) per iteration. Writes model.pt,
    checkpoint.pt, metrics.jsonl, samples/*.png and manifest.json into --out; rerunning the same
    command resumes. Exit code 2 for bad input, 3 if a loss becomes NaN/inf (the last
    checkpoint is kept).

    Example: sodtool train mtgan --hr runs/quick/rois_train.h5 --lr runs/quick/rois_train_lr.h5 --sr runs/quick/sr --out runs/quick/mtgan
    """
    from sodtool.train_mtgan import TrainMTGANConfig, train_mtgan

    _exit_on_nonfinite(train_mtgan, TrainMTGANConfig(
        hr=hr, lr=lr, sr=sr, out=out, preset=preset, iterations=iterations, batch_size=batch_size,
        disc_arch=disc_arch, imagenet_weights=imagenet_weights, g_lr=g_lr, d_lr=d_lr, d_momentum=d_momentum,
        d_weight_decay=d_weight_decay, d_lr_step=d_lr_step, alpha=alpha, beta=beta, gamma=gamma,
        tv_weight=tv_weight, adversarial=adversarial, reg_branch=not no_reg_branch, adv=not no_adv,
        cls=not no_cls, reg=not no_reg, val_fraction=val_fraction, val_max=val_max, val_every=val_every,
        log_every=log_every, checkpoint_every=checkpoint_every, sample_every=sample_every, seed=seed,
        device=device, num_workers=workers, stop_after=stop_after))


def main(argv: Optional[list[str]] = None) -> None:
    """Console-script entry point."""
    app(args=argv, prog_name="sodtool")


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
