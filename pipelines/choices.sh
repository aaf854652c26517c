#!/usr/bin/env bash
# The defaults chosen by looking at results, checked on val and reported on minival (quick preset,
# HR 64 / LR 16), for one seed of the detector, train sr and train mtgan:
#
# - the D-only warm-up of `train mtgan --preset quick` (650 iterations) against the earlier 150;
# - the HR-read path of eval (D reads the HR crop of a ROI whose window is wider than the LR crop)
#   against --sr-only (every ROI through G);
# - the 32² size gate (--small-area 1024) against rescoring every ROI;
# - the SR gate (--sr-gate) rows, read beside them.
#
#   bash pipelines/choices.sh [SEED] [RUN] [DATA]   # defaults: 0 runs/choices/s<SEED> data/synth-quick
#   python benchmarks/choices_table.py runs/choices/s0 runs/choices/s1 runs/choices/s2
#
# The choice is read on val; minival is printed beside it only to report. Two seeds side by side
# with OMP_NUM_THREADS=1 take about as long as one (run times: docs/design_notes.md).
# Rerunning resumes the training stages from their checkpoints and rewrites the other outputs.
set -euo pipefail

SEED=${1:-0}
RUN=${2:-runs/choices/s$SEED}
DATA=${3:-data/synth-quick}
HR=64

if [ ! -f "$DATA/annotations/instances_val.json" ]; then
  sodtool data synth --preset quick --seed 0 --workers 2 --out "$DATA"
fi

sodtool train detector --detector frcnn --preset quick --data "$DATA" --out "$RUN/detector" --seed "$SEED"
sodtool crop-rois --detector frcnn --detector-weights "$RUN/detector/model.pt" --data "$DATA" --split train \
  --mode train --hr-size "$HR" --out "$RUN/rois_train.h5" --overwrite
sodtool downsample "$RUN/rois_train.h5" --out "$RUN/rois_train_lr.h5" --overwrite
sodtool train sr --preset quick --hr "$RUN/rois_train.h5" --lr "$RUN/rois_train_lr.h5" --out "$RUN/sr" --seed "$SEED"
sodtool train mtgan --preset quick --hr "$RUN/rois_train.h5" --lr "$RUN/rois_train_lr.h5" --sr "$RUN/sr" \
  --disc-init "$RUN/detector/model.pt" --out "$RUN/mtgan" --seed "$SEED"
sodtool train mtgan --preset quick --hr "$RUN/rois_train.h5" --lr "$RUN/rois_train_lr.h5" --sr "$RUN/sr" \
  --disc-init "$RUN/detector/model.pt" --out "$RUN/mtgan_w150" --seed "$SEED" --d-warmup 150

for split in val minival; do
  sodtool crop-rois --detector frcnn --detector-weights "$RUN/detector/model.pt" --data "$DATA" --split "$split" \
    --mode test --hr-size "$HR" --out "$RUN/rois_$split.h5" --overwrite
  sodtool downsample "$RUN/rois_$split.h5" --out "$RUN/rois_${split}_lr.h5" --overwrite
  sodtool eval --split "$split" --data "$DATA" --rois "$RUN/rois_$split.h5" --mtgan "$RUN/mtgan" \
    --ablation "w150=$RUN/mtgan_w150" --small-area 1024 --sr-gate --no-figures --out "$RUN/eval_$split" --overwrite
  sodtool eval --split "$split" --data "$DATA" --rois "$RUN/rois_$split.h5" --mtgan "$RUN/mtgan" \
    --sr-only --no-figures --out "$RUN/eval_${split}_sronly" --overwrite
done
