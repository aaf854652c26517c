"""Mean ± sd over several `sodtool eval` runs of one comparison, e.g. MTGAN seeds 0, 1 and 2.

Reads each folder's metrics.json (or the file itself) and prints one Markdown table: every row of
the first run (baseline, SOD-MTGAN, bicubic control, ablations, gated rows) with its AP columns as
mean ± sd over the runs (sample sd), then D's held-out accuracy per run. README's multi-seed
tables are this script's output.

    python benchmarks/seeds_table.py runs/bench/eval_minival runs/bench_s1/eval_minival runs/bench_s2/eval_minival
    python benchmarks/seeds_table.py runs/bench/eval_fsr_minival runs/bench/eval_fsr_minival_s1 \
        --diff fsr:baseline --diff fsr:small_head    # + paired differences of rows, per run
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sodtool.artefacts import read_json  # noqa: E402
from sodtool.errors import InputError  # noqa: E402
from sodtool.reports import seeds_markdown  # noqa: E402


def load(path: Path) -> dict:
    if not path.exists():
        raise InputError(f"{path}: not found (give eval output folders or their metrics.json)")
    return read_json(path / "metrics.json" if path.is_dir() else path, "eval metrics.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="eval output folders (or their metrics.json)")
    ap.add_argument("--diff", action="append", default=[], metavar="A:B",
                    help="row names A:B: add A - B per run as mean ± sd (paired); repeatable")
    args = ap.parse_args()
    try:
        diffs = []
        for d in args.diff:
            a, sep, b = d.partition(":")
            if not sep or not a or not b:
                raise InputError(f"--diff expects A:B (two row names, e.g. fsr:baseline), got '{d}'")
            diffs.append((a, b))
        print(seeds_markdown([load(p) for p in args.runs], diffs), end="")
    except (InputError, KeyError) as e:
        print(f"error: {e if isinstance(e, InputError) else f'not an eval metrics.json: no {e}'}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
