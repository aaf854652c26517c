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
    help="Small object detection with a multi-task super-resolution GAN (SOD-MTGAN).\n\n"
    "Each stage is a command that reads named artefacts and writes new ones; see README.md.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
data_app = typer.Typer(help="Make, import and describe COCO-format datasets.", no_args_is_help=True)
train_app = typer.Typer(help="Train the detector, the SR generator and the MTGAN.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(train_app, name="train")


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
    """sodtool: every stage of SOD-MTGAN as a command.

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


def main(argv: Optional[list[str]] = None) -> None:
    """Console-script entry point."""
    app(args=argv, prog_name="sodtool")


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
