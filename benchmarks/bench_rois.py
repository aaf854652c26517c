"""Speed of the ROI pipeline: crop step and shuffled HDF5 loader on ONE CPU thread, downsample with its workers.

    python benchmarks/bench_rois.py [--images 40] [--rows 4096] [--repeats 3]

Prints one JSON object (stdout):
- `crop`: crops/s of the crop step alone (sodtool.rois.crop_windows: uint8 image -> float,
  area pyramid, batched grid_sample, rounding), no detector, no image decoding, no HDF5 write;
  100 ROIs per image, the synthetic benchmark's own objects (40% small, 35% medium, 25% large),
  jittered, context 1.5, HR 128; beside it, torchvision roi_align on the same windows
  (sampling_ratio 2 and adaptive) for comparison. Floor: 1,000 crops/s.
- `store_write`: crops/s written into an HR store (LZF, 8-row chunks), content digest included.
- `downsample`: crops/s of the whole `downsample` stage (read + decompress HR, bicubic, write LR)
  in one process (`--workers 0`) and with its default worker processes (one per core, each on
  one thread), and of the bicubic step alone. Floor: 3,000 crops/s.
- `loader`: HR/LR pairs/s that make_loader delivers at batch 64, num_workers 0, shuffled (floor
  3,000/s) and sequential; and the same shuffled read for each compression (lzf, gzip 1, none)
  with the compression ratio, to show why LZF is the default.
- `machine`: CPU model, cores, torch threads, load average at start and end.

Every rate is given per wall-clock second (`*_per_s`) and per CPU second of this process
(`*_per_cpu_s`): on a shared machine the wall-clock figure moves with other people's load, the
CPU-second one much less. The best of `--repeats` runs is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sodtool import boxes as B, store as S
from sodtool.console import set_quiet
from sodtool.resample import bicubic_down
from sodtool.rois import crop_windows, jitter_boxes
from sodtool.stages.downsample import DownsampleConfig, default_workers, downsample
from sodtool.stages.synth import image_rng, make_image

HR = 128
ROIS_PER_IMAGE = 100


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def timed(fn, repeats: int) -> tuple[float, float, object]:
    """(best wall s, best cpu s, last result) over `repeats` calls."""
    best_w = best_c = float("inf")
    out = None
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        best_w = min(best_w, time.perf_counter() - w)
        best_c = min(best_c, time.process_time() - c)
    return best_w, best_c, out


def rates(n: int, wall: float, cpu: float, key: str) -> dict:
    return {f"{key}_per_s": round(n / wall, 1), f"{key}_per_cpu_s": round(n / cpu, 1) if cpu > 0 else None}


def workload(n_images: int, size: int = 320) -> list[tuple[np.ndarray, torch.Tensor]]:
    """Synthetic-benchmark images with 100 windows each: its objects, jittered, context 1.5."""
    out = []
    for i in range(n_images):
        rng = image_rng(0, "bench", i)
        img, objects, _ = make_image(rng, size, 10, (6, 10), (1, 3))
        gt = np.array([[o["bbox"][0], o["bbox"][1], o["bbox"][0] + o["bbox"][2], o["bbox"][1] + o["bbox"][3]]
                       for o in objects], np.float32)
        reps = -(-ROIS_PER_IMAGE // len(gt))
        rois = jitter_boxes(gt, reps, rng, size, size, min_iou=0.3)[:ROIS_PER_IMAGE]
        out.append((np.ascontiguousarray(img), B.square_windows(torch.from_numpy(rois), 1.5)))
    return out


def bench_crop(work, repeats: int) -> tuple[dict, np.ndarray]:
    from torchvision.ops import roi_align

    n = sum(len(w) for _, w in work)
    wall, cpu, crops = timed(lambda: [crop_windows(img, win, HR) for img, win in work], repeats)
    side = torch.cat([w[:, 2] - w[:, 0] for _, w in work])
    res = {"crops": n, **rates(n, wall, cpu, "crops"),
           "window_side_px": {"min": round(float(side.min()), 1), "median": round(float(side.median()), 1),
                              "max": round(float(side.max()), 1),
                              "share_upsampled": round(float((side <= HR).float().mean()), 3)}}
    for ratio in (2, 0):
        def run_ra(ratio=ratio):
            return [roi_align(torch.from_numpy(img).permute(2, 0, 1)[None].float(), [win], HR, 1.0, ratio, True)
                    .round_().clamp_(0, 255).to(torch.uint8) for img, win in work]

        w, c, _ = timed(run_ra, 1)
        res[f"roi_align_sampling_ratio_{ratio}"] = rates(n, w, c, "crops")
    hr = torch.cat(crops).numpy()
    return res, hr


def write_store(path: Path, hr: np.ndarray, compression: str) -> None:
    n = len(hr)
    rows = {"hr": hr, "label": np.zeros(n, np.int64), "target": np.zeros((n, 4), np.float32),
            "roi": np.zeros((n, 4), np.float32), "gt_box": np.zeros((n, 4), np.float32),
            "iou": np.zeros(n, np.float32), "image_id": np.arange(n, dtype=np.int64) // 64,
            "score": np.zeros(n, np.float32), "det_label": np.zeros(n, np.int64),
            "window": np.zeros((n, 4), np.float32), "source": np.zeros(n, np.uint8)}
    attrs = {"categories": [{"id": 1, "name": "object"}], "hr_size": HR, "context": 1.5, "mode": "train",
             "split": "bench", "detector": {"kind": "benchmark"}, "annotations": {}, "image_dir": ""}
    with S.StoreWriter(path, schema=S.SCHEMA, fields=S.hr_fields(HR), attrs=attrs, compression=compression) as w:
        for i in range(0, n, ROIS_PER_IMAGE):  # one image's worth per append, as crop-rois does
            w.append(**{k: v[i:i + ROIS_PER_IMAGE] for k, v in rows.items()})


def loader_epoch(hr_path: Path, lr_path: Path, shuffle: bool, epoch: int) -> int:
    loader = S.make_loader(hr_path, lr_path, batch_size=64, shuffle=shuffle, seed=0)
    loader.set_epoch(epoch)
    n = 0
    for b in loader:
        n += len(b["index"])
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=40, help="images of the crop workload (100 ROIs each)")
    ap.add_argument("--rows", type=int, default=4096, help="rows of the store for downsample and the loader")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    set_quiet(True)
    load_start = os.getloadavg()
    out: dict = {}

    work = workload(args.images)
    out["crop"], hr = bench_crop(work, args.repeats)
    reps = -(-args.rows // len(hr))
    hr = np.concatenate([hr] * reps)[: args.rows]

    with tempfile.TemporaryDirectory(prefix="bench_rois_") as tmp:
        tmp = Path(tmp)
        hr_path = tmp / "rois_bench.h5"
        wall, cpu, _ = timed(lambda: write_store(hr_path, hr, "lzf"), 1)
        out["store_write"] = {"rows": len(hr), **rates(len(hr), wall, cpu, "crops"), "compression": "lzf"}

        lr_path = tmp / "rois_bench_lr.h5"

        def run_down(workers: int):
            lr_path.unlink(missing_ok=True)
            return downsample(DownsampleConfig(src=hr_path, out=lr_path, workers=workers))

        stage = {}
        for key, workers in (("one_process", 0), ("workers", default_workers())):
            wall, cpu, _ = timed(lambda: run_down(workers), args.repeats)
            # The workers' CPU time is not this process's: only the wall-clock rate means something there.
            stage[key] = {"workers": workers, **(rates(len(hr), wall, cpu, "crops") if workers == 0
                                                 else {"crops_per_s": round(len(hr) / wall, 1)})}
        x = torch.from_numpy(hr[:1024])
        w2, c2, _ = timed(lambda: bicubic_down(x, 4), args.repeats)
        out["downsample"] = {"rows": len(hr), "stage": stage, "bicubic_only": rates(len(x), w2, c2, "crops")}

        loader = {}
        for shuffle in (True, False):
            wall, cpu, n = timed(lambda: loader_epoch(hr_path, lr_path, shuffle, 1), args.repeats)
            loader["shuffled" if shuffle else "sequential"] = rates(n, wall, cpu, "pairs")
        raw = hr.nbytes
        by_comp = {}
        for comp in ("lzf", "gzip", "none"):
            p = hr_path if comp == "lzf" else tmp / f"rois_{comp}.h5"
            if comp != "lzf":
                write_store(p, hr, comp)
                lp = tmp / f"rois_{comp}_lr.h5"
                downsample(DownsampleConfig(src=p, out=lp))
            else:
                lp = lr_path
            wall, cpu, n = timed(lambda: loader_epoch(p, lp, True, 2), args.repeats)
            by_comp[comp] = {"ratio": round(raw / p.stat().st_size, 3), **rates(n, wall, cpu, "shuffled_pairs")}
        loader["by_compression"] = by_comp
        out["loader"] = {"batch_size": 64, "num_workers": 0, "rows": len(hr), **loader}

    out["floors"] = {"crop_crops_per_s": 1000, "downsample_crops_per_s": 3000, "loader_pairs_per_s": 3000}
    out["machine"] = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                      "torch": torch.__version__, "python": platform.python_version(),
                      "loadavg_start": [round(v, 2) for v in load_start],
                      "loadavg_end": [round(v, 2) for v in os.getloadavg()]}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
