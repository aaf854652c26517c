"""The large-image table of `pipelines/large.sh`: five ways to train and read, over seeds.

Rows, from each run folder's `eval_whole/` (`--slice 0`) and `eval_sliced/` (`--slice TILE`):
1. whole-image training, whole-image inference (eval_whole's baseline row);
2. the same detections passed through the tile merge alone (`slicing.merge_detections`: what the
   merge costs where there are no tiles);
3. whole-image training, sliced inference (eval_sliced's baseline row);
4. tile training, sliced inference (eval_sliced's `tile` row);
5. tile training, whole-image inference (eval_whole's `tile` row).

AP, AP50, AP_S in %, and detection seconds per image, as mean ± sd over the runs (one per seed),
then the paired difference of row 4 and row 1 per seed.

    python benchmarks/large_table.py runs/large-synth/s0 runs/large-synth/s1 runs/large-synth/s2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from merge_check import merged  # noqa: E402

from sodtool.artefacts import read_json  # noqa: E402
from sodtool.coco import load_split, resolve_split  # noqa: E402
from sodtool.errors import InputError  # noqa: E402
from sodtool.evaluate import coco_evaluate  # noqa: E402
from sodtool.slicing import DEFAULT_MERGE_IOS  # noqa: E402

ROWS = ("Whole-image training, whole-image inference", "Whole-image training, whole-image inference, merged",
        "Whole-image training, sliced inference", "Tile training, sliced inference",
        "Tile training, whole-image inference")
COLUMNS = (("AP", "AP"), ("AP50", "AP50"), ("AP_small", "AP_S"))


def _eval(run: Path, name: str) -> tuple[dict, dict]:
    folder = run / name
    if not (folder / "metrics.json").is_file():
        raise InputError(f"{folder}: no eval output (run pipelines/large.sh first)")
    return read_json(folder / "metrics.json", "eval metrics"), read_json(folder / "manifest.json", "eval manifest")


def _row(metrics: dict, name: str) -> dict:
    for r in metrics["rows"]:
        if r["name"] == name:
            return r
    raise InputError(f"no row {name!r} in an eval of {metrics.get('split')}")


def run_rows(run: Path) -> list[dict]:
    """The five rows of one run: {"AP", "AP50", "AP_small" (fractions), "s_per_image"}."""
    whole, manifest = _eval(run, "eval_whole")
    sliced, _ = _eval(run, "eval_sliced")
    n = whole["images"]

    def cells(metrics: dict, name: str) -> dict:
        r = _row(metrics, name)
        s = metrics["timing"]["roi_source_s"] if name == "baseline" else r["detect_s"]
        return {k: r[k] for k, _ in COLUMNS} | {"s_per_image": s / n}

    split = load_split(resolve_split(manifest["config"]["data"], manifest["config"]["split"]), check_files=False)
    base = cells(whole, "baseline")
    t0 = time.perf_counter()
    merged_results = merged(read_json(run / "eval_whole" / "baseline.json", "results"), DEFAULT_MERGE_IOS,
                            split.categories)
    merge_s = (time.perf_counter() - t0) / n
    ev = coco_evaluate(split.coco, merged_results)
    return [base, {k: ev[k] for k, _ in COLUMNS} | {"s_per_image": base["s_per_image"] + merge_s},
            cells(sliced, "baseline"), cells(sliced, "tile"), cells(whole, "tile")]


def fmt(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    v = np.asarray(values, dtype=np.float64) * scale
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}" if len(v) > 1 else f"{v[0]:.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path, nargs="+", help="pipelines/large.sh run folders, one per seed")
    args = ap.parse_args()
    try:
        per_run = [run_rows(r) for r in args.runs]
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"{len(args.runs)} run(s): {', '.join(str(r) for r in args.runs)}\n")
    print("| training, inference | " + " | ".join(c for _, c in COLUMNS) + " | s / image |")
    print("| --- |" + " ---: |" * (len(COLUMNS) + 1))
    for i, title in enumerate(ROWS):
        cells = [fmt([rows[i][k] for rows in per_run]) for k, _ in COLUMNS]
        cells.append(fmt([rows[i]["s_per_image"] for rows in per_run], scale=1.0, digits=2))
        print(f"| {title} | " + " | ".join(cells) + " |")
    diffs = [fmt([rows[3][k] - rows[0][k] for rows in per_run]) for k, _ in COLUMNS]
    print("| Tile training, sliced − whole-image training, whole (paired) | " + " | ".join(diffs) + " | |")


if __name__ == "__main__":
    main()
