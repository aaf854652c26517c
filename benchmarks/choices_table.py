"""The defaults chosen by looking at results, on val and minival side by side (pipelines/choices.sh).

Each choice is a difference of two rows, default minus alternative, in AP points, as mean ± sd
over the seeds (sample sd). The verdict is read on val alone: a default whose val difference is
negative by more than 2 sd is contradicted (change it); one within 2 sd of zero is not supported
but not contradicted either; minival is printed beside it only to report.

    python benchmarks/choices_table.py runs/choices/s0 runs/choices/s1 runs/choices/s2
    python benchmarks/choices_table.py --set bench runs/choices-bench/s0 runs/choices-bench/s1 runs/choices-bench/s2

`--set bench` reads pipelines/choices_bench.sh's runs: the bench schedule of `train mtgan` against
the quick one (its `quick` ablation row), over one bench detector's ROIs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sodtool.artefacts import read_json  # noqa: E402
from sodtool.errors import InputError  # noqa: E402

SPLITS = ("val", "minival")
COLUMNS = (("AP", "AP"), ("AP_small", "AP_S"), ("AP_large", "AP_L"))
# (choice, default, alternative): each side is (eval folder suffix, row name).
CHOICES = (
    ("D-only warm-up 650 (not 150), D's score", ("", "mtgan"), ("", "w150")),
    ("D-only warm-up 650 (not 150), fused score", ("", "mtgan_fused"), ("", "w150_fused")),
    ("D reads HR crops of wide ROIs (not --sr-only), D's score", ("", "mtgan"), ("_sronly", "mtgan")),
    ("D reads HR crops of wide ROIs (not --sr-only), fused score", ("", "mtgan_fused"), ("_sronly", "mtgan_fused")),
    ("32² size gate (not every ROI), D's score", ("", "mtgan_small"), ("", "mtgan")),
    ("32² size gate (not every ROI), fused score", ("", "mtgan_fused_small"), ("", "mtgan_fused")),
)
BENCH_CHOICES = (
    ("bench schedule 2000 / 1500 D-only (not quick 750 / 650), D's score", ("", "mtgan"), ("", "quick")),
    ("bench schedule 2000 / 1500 D-only (not quick 750 / 650), fused score", ("", "mtgan_fused"), ("", "quick_fused")),
)
BENCH_VS_BASELINE = ("mtgan", "mtgan_fused", "quick", "quick_fused", "bicubic", "bicubic_fused")
VS_BASELINE = ("mtgan", "mtgan_fused", "bicubic", "bicubic_fused", "mtgan_small", "mtgan_fused_small",
               "mtgan_srgate", "bicubic_srgate")


def rows(run: Path, split: str, suffix: str) -> dict[str, dict]:
    path = run / f"eval_{split}{suffix}" / "metrics.json"
    if not path.is_file():
        raise InputError(f"{path}: not found (run pipelines/choices.sh or choices_bench.sh for this seed first)")
    m = read_json(path, "eval metrics.json")
    return {r["name"]: r for r in m["rows"]}


def cell(values: list[float]) -> str:
    v = np.asarray(values, dtype=np.float64)
    return f"{v.mean():+.1f} ± {v.std(ddof=1):.1f}" if len(v) > 1 else f"{v[0]:+.1f}"


def verdict(values: list[float]) -> str:
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return "one seed: no verdict"
    mean, sd = v.mean(), v.std(ddof=1)
    if mean < -2 * sd:
        return "contradicted: change the default"
    if mean > 2 * sd:
        return "supported"
    return "within 2 sd: not contradicted"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="pipelines/choices.sh (or choices_bench.sh) run folders, "
                    "one per seed")
    ap.add_argument("--set", choices=("quick", "bench"), default="quick",
                    help="quick: pipelines/choices.sh's four choices; bench: choices_bench.sh's schedule")
    args = ap.parse_args()
    choices, vs_baseline, suffixes = ((BENCH_CHOICES, BENCH_VS_BASELINE, ("",)) if args.set == "bench"
                                      else (CHOICES, VS_BASELINE, ("", "_sronly")))
    try:
        evals = {(run, split, suffix): rows(run, split, suffix)
                 for run in args.runs for split in SPLITS for suffix in suffixes}
    except (InputError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    n = len(args.runs)
    head = "| choice (default − alternative) | " + " | ".join(
        f"{t} {s}" for _, t in COLUMNS for s in SPLITS) + " | verdict on val (AP) |"
    print(f"Differences in AP points, mean ± sd over {n} seed{'s' if n > 1 else ''}; chosen on val, "
          "reported on minival.\n")
    print(head)
    print("|" + " --- |" * (2 + 2 * len(COLUMNS)))
    for title, (sa, ra), (sb, rb) in choices:
        cells, val_ap = [], []
        for key, _ in COLUMNS:
            for split in SPLITS:
                d = [100 * (evals[(r, split, sa)][ra][key] - evals[(r, split, sb)][rb][key]) for r in args.runs]
                cells.append(cell(d))
                if key == "AP" and split == "val":
                    val_ap = d
        print(f"| {title} | " + " | ".join(cells) + f" | {verdict(val_ap)} |")
    print("\nEach row minus the baseline row (AP points), the same seeds:\n")
    print("| row | " + " | ".join(f"{t} {s}" for _, t in COLUMNS for s in SPLITS) + " |")
    print("|" + " --- |" * (1 + 2 * len(COLUMNS)))
    for name in vs_baseline:
        if not all(name in evals[(r, s, "")] for r in args.runs for s in SPLITS):
            continue
        cells = [cell([100 * evals[(r, s, "")][name]["delta"][key] for r in args.runs])
                 for key, _ in COLUMNS for s in SPLITS]
        print(f"| {evals[(args.runs[0], 'val', '')][name]['title']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
