"""Every float option of every command is checked for finiteness and range before any work.

The walk reads the command tree of `sodtool.cli.app` (so a new command or option is walked
without being listed here), gives each float option `nan`, `inf` and an out-of-range value,
and expects one line on stderr naming the option, exit code 2, and nothing written. The
other arguments name files that do not exist: a command must refuse a bad value before it
looks at its inputs, let alone loads a model or a dataset (which keeps the walk fast).
"""

from __future__ import annotations

from pathlib import Path

import pytest

# Arguments beside the required ones (which the walk fills with missing files itself), so that the
# float options are in use: eval's rescoring mode (--mtgan with a ROI source), crop-rois' --out (a
# group callback) and ROI source, a detector file for detect, a dataset for train detector.
MODE_ARGS: dict[tuple[str, ...], list[str]] = {
    ("eval",): ["--mtgan", "{T}/run/mtgan", "--detector", "{T}/run/detector/model.pt", "--data", "{T}/data"],
    ("crop-rois",): ["--out", "{T}/run/rois_train.h5", "--detector-weights", "{T}/run/detector/model.pt",
                     "--data", "{T}/data"],
    ("detect",): ["--detector", "{T}/run/detector/model.pt", "--data", "{T}/data"],
    ("train", "detector"): ["--data", "{T}/data"],
}

# Out-of-range values of options bounded above (fractions, IoUs, scores, momenta); every float
# option is also given -1, out of range for all of them (rates, weights, areas, sizes, counts).
ABOVE_RANGE: dict[str, str] = {
    "--overlap": "1.0",  # [0, 1): a tile overlapping its neighbour wholly never advances
    "--nms-iou": "1.5", "--min-score": "1.5", "--score-thresh": "1.5", "--eval-score-thresh": "1.5",
    "--draw-threshold": "1.5", "--merge-ios": "2",
    "--val-fraction": "1.0", "--holdout-fraction": "1.0",
    "--fg-iou": "1.5", "--bg-low": "1.5", "--fg-fraction": "1.5", "--jitter-iou": "1.5",
    "--momentum": "1.5", "--d-momentum": "1.5", "--warmup-factor": "1.5",
}



def _command(path: tuple[str, ...]):
    import typer.main

    from sodtool.cli import app

    cmd = typer.main.get_command(app)
    for word in path:
        cmd = cmd.commands[word]
    return cmd


def _float_options():
    """[(command path, option name)] of every option whose type is float or Optional[float],
    read from the command functions' signatures."""
    import inspect
    import typing

    import typer.main

    from sodtool.cli import app

    found = []

    def walk(cmd, path):
        subs = getattr(cmd, "commands", None)
        if subs is None or (path and getattr(cmd, "invoke_without_command", False)):
            fn = inspect.unwrap(cmd.callback)
            hints, params = typing.get_type_hints(fn), inspect.signature(fn).parameters
            for name, hint in hints.items():
                if name in params and hint in (float, typing.Optional[float]):
                    found.append((tuple(path), params[name].default.param_decls[0]))
        for name, sub in sorted((subs or {}).items()):
            walk(sub, path + [name])

    walk(typer.main.get_command(app), [])
    return found


def _required_args(path: tuple[str, ...]) -> list[str]:
    """Values for the command's required arguments and options: files that do not exist."""
    args: list[str] = []
    for p in _command(path).params:
        if not p.required:
            continue
        value = "{T}/missing_" + p.name
        args += [value] if p.param_type_name == "argument" else [p.opts[0], value]
    return args


def _cases():
    cases = []
    for path, opt in _float_options():
        for value in ("nan", "inf", "-1", ABOVE_RANGE.get(opt)):
            if value is None:
                continue
            cases.append(pytest.param(path, opt, value, id=f"{' '.join(path)} {opt} {value}"))
    return cases


def test_the_walk_sees_every_command_with_float_options():
    """The introspection finds the float options (a broken walk would pass vacuously)."""
    commands = {path for path, _ in _float_options()}
    assert {("eval",), ("crop-rois",), ("predict",), ("detect",), ("train", "detector"), ("train", "sr"),
            ("train", "mtgan"), ("data", "import-yolo")} <= commands
    assert len(_float_options()) >= 35
    assert set(ABOVE_RANGE) <= {opt for _, opt in _float_options()}


@pytest.mark.parametrize("path, option, value", _cases())
def test_float_option_is_checked(cli, tmp_path, monkeypatch, path, option, value):
    monkeypatch.chdir(tmp_path)  # default outputs (train detector's runs/detector) would land here
    argv = [*path, *[a.format(T=tmp_path) for a in MODE_ARGS.get(path, []) + _required_args(path)],
            option, value]
    res = cli(*argv)
    assert res.exit_code == 2, (argv, res.stdout, res.stderr, res.exception)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sodtool: error: "), res.stderr
    assert option in lines[0], lines[0]
    assert not any(Path(tmp_path).iterdir()), sorted(map(str, Path(tmp_path).rglob("*")))
