"""Console output: rich progress bars and summary tables, silenced by `--quiet`.

Everything goes to stderr so that stdout stays free for machine-readable output (JSON).
"""

from __future__ import annotations

from typing import Iterable, Iterator, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

T = TypeVar("T")

console = Console(stderr=True)
_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def is_quiet() -> bool:
    return _quiet


def log(msg: str) -> None:
    # soft_wrap: rich would otherwise break lines at the console's width, inside a path if need
    # be ("photos/br", "oken.jpg"), which a user can then neither copy nor grep.
    if not _quiet:
        console.print(msg, highlight=False, soft_wrap=True)


def warn(msg: str) -> None:
    """Warnings are shown even with --quiet: they say something about the result."""
    console.print(f"[yellow]warning:[/yellow] {msg}", highlight=False, soft_wrap=True)


def make_progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        disable=_quiet,
        transient=False,
    )


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a progress bar (none under --quiet)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with make_progress() as progress:
        task = progress.add_task(description, total=total, info="")
        for item in items:
            yield item
            progress.advance(task)


def summary_table(title: str, rows: dict | list[tuple], columns: tuple[str, str] = ("", "value")) -> None:
    """Print a two-column summary table at the end of a stage."""
    if _quiet:
        return
    table = Table(title=title, title_justify="left")
    table.add_column(columns[0])
    table.add_column(columns[1], justify="right")
    items = rows.items() if isinstance(rows, dict) else rows
    for k, v in items:
        table.add_row(str(k), _fmt(v))
    console.print(table)


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    if _quiet:
        return
    table = Table(title=title, title_justify="left")
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*[_fmt(v) for v in r])
    console.print(table)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.1f}"
    return str(v)
