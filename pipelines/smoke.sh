#!/usr/bin/env bash
# Smoke test: the quickstart shrunk to about a minute (tiny data, a few iterations per stage).
# CI runs it after the tests, so that every change proves the stages still chain as a shell
# pipeline. The numbers it prints mean nothing; only that every stage ran.
#
#   bash pipelines/smoke.sh [RUN]          # default RUN: runs/smoke (deleted first)
set -euo pipefail

RUN=${1:-runs/smoke}
DATA=$RUN/data
HR=32
rm -rf "$RUN"

sodtool --quiet data synth --preset quick --train-images 12 --val-images 4 --minival-images 4 --image-size 192 --seed 0 --out "$DATA"
sodtool --quiet data stats --data "$DATA" --split train --out "$RUN/stats"

sodtool --quiet train detector --detector frcnn --preset quick --data "$DATA" --out "$RUN/detector" \
  --iterations 6 --batch-size 2 --min-size 192 --max-size 192 --checkpoint-every 3 --seed 0
sodtool --quiet detect --detector "$RUN/detector/model.pt" --data "$DATA" --split minival \
  --out "$RUN/detections_minival.json"
sodtool --quiet eval --results "$RUN/detections_minival.json" --data "$DATA" --split minival --out "$RUN/eval_detections"

sodtool --quiet crop-rois --detector frcnn --detector-weights "$RUN/detector/model.pt" --data "$DATA" \
  --split train --mode train --hr-size "$HR" --rois-per-image 16 --out "$RUN/rois_train.h5"
sodtool --quiet downsample "$RUN/rois_train.h5"

sodtool --quiet train sr --preset quick --hr "$RUN/rois_train.h5" --lr "$RUN/rois_train_lr.h5" --out "$RUN/sr" \
  --iterations 4 --batch-size 8 --seed 0
sodtool --quiet train mtgan --preset quick --hr "$RUN/rois_train.h5" --lr "$RUN/rois_train_lr.h5" --sr "$RUN/sr" \
  --disc-init "$RUN/detector/model.pt" --out "$RUN/mtgan" --iterations 4 --d-warmup 2 --batch-size 8 --seed 0

sodtool --quiet crop-rois --detector frcnn --detector-weights "$RUN/detector/model.pt" --data "$DATA" \
  --split minival --mode test --hr-size "$HR" --max-rois 20 --out "$RUN/rois_minival.h5"
sodtool --quiet downsample "$RUN/rois_minival.h5"

sodtool --quiet eval --split minival --data "$DATA" --rois "$RUN/rois_minival.h5" --mtgan "$RUN/mtgan" \
  --small-area 1024 --out "$RUN/eval_minival"
SR_SET=${SODTOOL_SHARED_DATA:-../shared/data}/sr/Set5
if [ -d "$SR_SET" ]; then
  sodtool --quiet eval sr --generator "$RUN/sr/generator.pt" --data "$SR_SET" --out "$RUN/eval_sr_set5"
fi

test -f "$RUN/eval_minival/manifest.json"
cat "$RUN/eval_minival/table.md"
echo "smoke: every stage ran"
