"""Throughput of `sodtool predict` with sliced inference on a large image (a benchmark, not a test).

    python benchmarks/bench_predict.py --detector RUN/detector/model.pt [--mtgan RUN/mtgan] \
        [--size 4000x3000] [--tile 512] [--overlap 0.2] [--images 2] [--out runs/bench_predict]

Writes `--images` copies of a size-W x H picture made of tiled synthetic-benchmark scenes
(`sodtool data synth` images, so the detector finds objects) into OUT/inputs, then runs the
`predict` stage on them whole (`--slice 0`: the detector's own input size), sliced, and sliced
with MTGAN rescoring, one after the other in this process, and prints images/s, tiles/s and
detections per image for each. Each run starts from an empty output folder.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image

from sodtool.console import set_quiet
from sodtool.stages.predict import PredictConfig, predict_images
from sodtool.stages.synth import image_rng, make_image


def big_picture(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A width x height RGB picture tiled from 320 px synthetic scenes (objects of 8-190 px)."""
    out = np.zeros((height, width, 3), np.uint8)
    k = 0
    for y in range(0, height, 320):
        for x in range(0, width, 320):
            scene = make_image(image_rng(seed, "minival", k), 320, 10)[0]
            h, w = min(320, height - y), min(320, width - x)
            out[y:y + h, x:x + w] = scene[:h, :w]
            k += 1
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--detector", required=True)
    ap.add_argument("--mtgan")
    ap.add_argument("--size", default="4000x3000")
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--overlap", type=float, default=0.2)
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--out", default="runs/bench_predict")
    args = ap.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    out = Path(args.out)
    inputs = out / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    pic = big_picture(width, height)
    for i in range(args.images):
        Image.fromarray(np.roll(pic, 97 * i, axis=1)).save(inputs / f"big_{i}.png")
    set_quiet(True)
    rows = []
    for name, mtgan, tile in (("whole image", None, 0), ("sliced", None, args.tile),
                              ("sliced + MTGAN", args.mtgan, args.tile)):
        if "MTGAN" in name and mtgan is None:
            continue
        run = out / name.replace(" + ", "_").replace(" ", "_")
        shutil.rmtree(run, ignore_errors=True)
        t = time.perf_counter()
        m = predict_images(PredictConfig(inputs=(str(inputs),), detector=Path(args.detector), out=run,
                                         mtgan=Path(mtgan) if mtgan else None, slice=tile,
                                         overlap=args.overlap, device="cpu"))
        dt = time.perf_counter() - t
        rows.append({"run": name, "images": m["images"], "tiles": m["tiles"], "seconds": round(dt, 2),
                     "images_per_s": round(m["images"] / dt, 4), "tiles_per_s": round(m["tiles"] / dt, 2),
                     "detections_per_image": round(m["detections"] / max(1, m["images"]), 1)})
    print(f"{width}x{height} px, {args.tile} px tiles, overlap {args.overlap}")
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
