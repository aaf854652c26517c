"""The command line as a whole: version, help, info, error reporting, and an example in every --help."""

from __future__ import annotations

import os
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
