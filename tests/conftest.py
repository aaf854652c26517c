"""Shared test fixtures.

Real data lives in ../shared/data beside the checkout (SODTOOL_SHARED_DATA points elsewhere).
Without it the tests that need it skip, except under CI (env CI set), where they fail.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SODTOOL_SHARED_DATA", REPO.parent / "shared" / "data"))


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
