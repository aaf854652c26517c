"""Shared test fixtures.

Real data lives in ../shared/data beside the checkout (SODTOOL_SHARED_DATA points elsewhere).
Without it the tests that need it skip, except under CI (env CI set), where they fail.

Under pytest-xdist (`-n auto`, README's test command) each worker gets an equal share of the
cores as torch threads, and so do the processes the tests start (OMP_NUM_THREADS): workers
with every core each would oversubscribe the CPU, which slows torch down many times over.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SODTOOL_SHARED_DATA", REPO.parent / "shared" / "data"))

if os.environ.get("PYTEST_XDIST_WORKER"):
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    torch.set_num_threads(_threads)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(_threads)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of real test data (coco128, kit-aerial, sr, cocoeval)."""
    if not SHARED_DATA.is_dir():
        msg = f"shared test data not found at {SHARED_DATA} (set SODTOOL_SHARED_DATA)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return SHARED_DATA


class CliResult:
    def __init__(self, exit_code: int, stdout: str, stderr: str, exception: BaseException | None):
        self.exit_code, self.stdout, self.stderr, self.exception = exit_code, stdout, stderr, exception


@pytest.fixture
def cli():
    """Run `sodtool ARGS...` in-process: cli("data", "stats", ...) -> CliResult(exit_code, stdout, stderr)."""
    from sodtool.cli import app

    def run(*args: str) -> CliResult:
        runner = CliRunner()
        res = runner.invoke(app, [str(a) for a in args])
        exc = res.exception if not isinstance(res.exception, SystemExit) else None
        return CliResult(res.exit_code, res.stdout, res.stderr, exc)

    return run
