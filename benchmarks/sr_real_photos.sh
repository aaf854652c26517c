#!/usr/bin/env bash
# SR generator on real photos: `train sr` on ground-truth crops of coco128 + kit-aerial, then
# `eval sr` on Set5 and Set14 against PyTorch and MATLAB-kernel bicubic (PSNR/SSIM, Y and RGB,
# border 4). Floor: generator >= bicubic + 0.5 dB (Y, border 4) on both sets, against the
# stronger of the two bicubics; the script exits 1 when it is missed.
#
# Usage (from the repository root, venv active):  benchmarks/sr_real_photos.sh [OUT]
#   OUT         output folder (default runs/sr-real); rerunning skips the finished stages,
#               `train sr` resumes from its checkpoint.
#   THREADS     torch / OpenMP threads (default 1: on a 2-core CPU shared with another job, 2
#               threads were slower than 1, docs/design_notes.md)
#   ITERATIONS  generator iterations (default 800, batch 16)
#
# Data: ../shared/data/coco128 (COCO photos, 640 px; two label files there have no image) and
# ../shared/data/kit-aerial (aerial photos, ~35 px cars), both imported whole (no minival: the
# test sets are Set5/Set14). ROIs: `crop-rois --gt-only`, i.e. jittered ground-truth boxes plus
# random background boxes, at HR 128. Context: coco128 1.5 (the MTGAN default; its objects are
# large); kit-aerial 5, so that windows around its ~35 px cars are >= 128 px and hold real
# detail (one jittered copy per box, so both datasets give ~6k native crops). `train sr
# --min-native-size 128` trains only on crops whose window was >= 128 px in the photo (smaller
# ones were upsampled into the store: no detail to learn). One generator, light widths 32/32,
# 5 blocks, trained on both stores (repeated --hr/--lr).
#
# Prints both eval tables (stderr) and a JSON summary on stdout (also OUT/summary.json).
set -euo pipefail

OUT="${1:-runs/sr-real}"
THREADS="${THREADS:-1}"
ITERATIONS="${ITERATIONS:-800}"
export OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS"

t_start=$(date +%s)
mkdir -p "$OUT"

# 1. Import the YOLO datasets (all images in the train split).
if [ ! -f "$OUT/data/coco128/manifest.json" ]; then
    sodtool -q data import-yolo ../shared/data/coco128 --out "$OUT/data/coco128" --val-fraction 0 \
        --skip-orphan-labels --seed 0
fi
if [ ! -f "$OUT/data/kit-aerial/manifest.json" ]; then
    sodtool -q data import-yolo ../shared/data/kit-aerial --out "$OUT/data/kit-aerial" --val-fraction 0 --seed 0
fi

# 2. Ground-truth-only ROI crops at HR 128, and their x4 LR twins.
if [ ! -f "$OUT/coco128/rois_train.h5.manifest.json" ]; then
    sodtool -q crop-rois --gt-only --data "$OUT/data/coco128" --split train --hr-size 128 --context 1.5 \
        --gt-jitters 2 --seed 0 --device cpu --out "$OUT/coco128/rois_train.h5"
fi
if [ ! -f "$OUT/kit-aerial/rois_train.h5.manifest.json" ]; then
    sodtool -q crop-rois --gt-only --data "$OUT/data/kit-aerial" --split train --hr-size 128 --context 5 \
        --gt-jitters 1 --seed 0 --device cpu --out "$OUT/kit-aerial/rois_train.h5"
fi
if [ ! -f "$OUT/coco128/rois_train_lr.h5.manifest.json" ]; then
    sodtool -q downsample "$OUT/coco128/rois_train.h5" --out "$OUT/coco128/rois_train_lr.h5"
fi
if [ ! -f "$OUT/kit-aerial/rois_train_lr.h5.manifest.json" ]; then
    sodtool -q downsample "$OUT/kit-aerial/rois_train.h5" --out "$OUT/kit-aerial/rois_train_lr.h5"
fi
t_data=$(date +%s)

# 3. One generator on the crops of both datasets (MSE, Adam 1e-4).
sodtool train sr \
    --hr "$OUT/coco128/rois_train.h5" --lr "$OUT/coco128/rois_train_lr.h5" \
    --hr "$OUT/kit-aerial/rois_train.h5" --lr "$OUT/kit-aerial/rois_train_lr.h5" \
    --out "$OUT/sr" --channels 32 --up-channels 32 --num-blocks 5 --batch-size 16 \
    --iterations "$ITERATIONS" --learning-rate 1e-4 --min-native-size 128 \
    --val-max 128 --val-every "$ITERATIONS" --log-every 20 --checkpoint-every 100 --seed 0 --device cpu
t_train=$(date +%s)

# 4. Set5 and Set14 (tables on stderr, metrics.json/.md in OUT/eval_*).
sodtool eval sr --generator "$OUT/sr/generator.pt" --data ../shared/data/sr/Set5 --out "$OUT/eval_set5" --device cpu --overwrite
sodtool eval sr --generator "$OUT/sr/generator.pt" --data ../shared/data/sr/Set14 --out "$OUT/eval_set14" --device cpu --overwrite
t_end=$(date +%s)

cat "$OUT/eval_set5/metrics.md" "$OUT/eval_set14/metrics.md" >&2

python - "$OUT" "$THREADS" "$((t_data - t_start))" "$((t_train - t_data))" "$((t_end - t_train))" "$((t_end - t_start))" <<'EOF'
import json, platform, subprocess, sys
from pathlib import Path

out, threads = Path(sys.argv[1]), int(sys.argv[2])
walls = dict(zip(("data_s", "train_s", "eval_s", "total_s"), map(int, sys.argv[3:7])))
sr = json.loads((out / "sr" / "manifest.json").read_text())
cpu = next((l.split(":", 1)[1].strip() for l in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
            if l.startswith("Model name")), platform.processor())
summary = {"benchmark": "sr_real_photos", "out": str(out), "machine": {"cpu": cpu, "threads": threads},
           "train": {k: sr["metrics"].get(k) for k in ("iterations", "train_crops", "train_crops_per_store",
                                                         "val_crops", "train_time_s", "final_g_mse")}
           | {"generator": {k: sr["config"][k] for k in ("channels", "up_channels", "num_blocks", "batch_size",
                                                          "learning_rate", "min_native_size")}},
           "wall_time": walls, "sets": {}}
ok = True
for name in ("set5", "set14"):
    m = json.loads((out / f"eval_{name}" / "metrics.json").read_text())["mean"]
    best_bicubic = max(m["bicubic"]["psnr_y"], m["bicubic_matlab"]["psnr_y"])
    margin = m["generator"]["psnr_y"] - best_bicubic
    ok &= margin >= 0.5
    summary["sets"][name] = {**{meth: {k: round(v, 4) for k, v in m[meth].items()} for meth in m},
                             "margin_psnr_y_db": round(margin, 3),
                             "margin_psnr_y_vs_matlab_db": round(m["generator"]["psnr_y"] - m["bicubic_matlab"]["psnr_y"], 3)}
summary["floor_0_5_db_met"] = bool(ok)
text = json.dumps(summary, indent=2)
(out / "summary.json").write_text(text + "\n")
print(text)
sys.exit(0 if ok else 1)
EOF
