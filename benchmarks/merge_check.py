"""Does the tile merge fuse neighbouring objects? Whole-image detections, and the ground truth
itself, passed through `slicing.merge_detections` alone (no tiles), evaluated before and after.

Sliced inference merges the detections of all tiles of an image with greedy non-maximum merging
over intersection-over-smaller (IoS). Here nothing is sliced, so every merge the function makes
fuses two boxes that one pass of the detector kept apart (or two ground-truth objects): what it
costs is what the merge costs on its own.

    sodtool detect --detector RUN/detector/model.pt --data D --split val --out RUN/det_val.json
    python benchmarks/merge_check.py RUN/det_val.json --data D --split val [--ios 0.5 --ios 0.8]

Prints one Markdown table: AP, AP50, AP_S and the number of boxes, for the ground truth and the
detections, as they are and after the merge at each IoS threshold.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sodtool.artefacts import read_json  # noqa: E402
from sodtool.coco import load_split, resolve_split, to_coco_results, xywh_to_xyxy  # noqa: E402
from sodtool.errors import InputError  # noqa: E402
from sodtool.evaluate import check_results, coco_evaluate  # noqa: E402
from sodtool.slicing import DEFAULT_MERGE_IOS, merge_detections  # noqa: E402


def merged(results: list[dict], ios: float, categories) -> list[dict]:
    """COCO results (bbox xywh image px) -> the same after merge_detections per image."""
    by_image: dict[int, list[dict]] = defaultdict(list)
    for r in results:
        by_image[r["image_id"]].append(r)
    out = []
    for iid, rs in by_image.items():
        m = merge_detections(np.array([xywh_to_xyxy(r["bbox"]) for r in rs]), [r["score"] for r in rs],
                             [categories.to_label(r["category_id"]) for r in rs], ios)
        out += to_coco_results(iid, m, categories)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path, help="COCO results JSON of whole-image detections (sodtool detect)")
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--split", default="val")
    ap.add_argument("--ios", type=float, action="append", help=f"merge threshold(s) (default {DEFAULT_MERGE_IOS})")
    args = ap.parse_args()
    try:
        split = load_split(resolve_split(args.data, args.split), check_files=False)
        dets = read_json(args.results, "results file")
        dets = check_results(split.coco, dets, args.results)
        gt = [{"image_id": a["image_id"], "category_id": a["category_id"], "score": 1.0, "bbox": list(a["bbox"])}
              for a in split.coco.dataset["annotations"]]
        rows = []
        for name, res in (("ground truth as predictions", gt), ("detections", dets)):
            rows.append((name, "as they are", res))
            for ios in args.ios or [DEFAULT_MERGE_IOS]:
                rows.append((name, f"merged, IoS {ios:g}", merged(res, ios, split.categories)))
        print(f"{args.split} of {args.data}, {len(split.image_ids)} images\n")
        print("| input | merge | boxes | AP | AP50 | AP_S |\n| --- | --- | ---: | ---: | ---: | ---: |")
        for name, how, res in rows:
            s = coco_evaluate(split.coco, res)
            print(f"| {name} | {how} | {len(res)} | {100 * s['AP']:.1f} | {100 * s['AP50']:.1f} | "
                  f"{100 * s['AP_small']:.1f} |")
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
