#!/usr/bin/env bash
# The bench schedule of `train mtgan` (2000 iterations: 1500 D-only, then 500 adversarial) against
# the quick one (750: 650 D-only, then 100 adversarial), at HR 128 / LR 32 over one bench detector's
# ROIs, chosen on val and reported on minival, for one seed of train sr and train mtgan:
#
#   bash pipelines/choices_bench.sh [SEED] [RUN] [DATA]   # defaults: 0 runs/choices-bench data/synth-bench
#   python benchmarks/choices_table.py --set bench runs/choices-bench/s0 runs/choices-bench/s1 runs/choices-bench/s2
#
# The detector (RUN/detector, bench preset, seed 0) and the ROI stores are made once and shared by
# the seeds; seed S writes RUN/sS (hours a seed on one CPU thread). Rerunning resumes the
# training stages from their checkpoints (a run stopped anywhere goes on where it stopped) and
# rewrites the other outputs.
set -euo pipefail

SEED=${1:-0}
RUN=${2:-runs/choices-bench}
DATA=${3:-data/synth-bench}
HR=128
S="$RUN/s$SEED"

if [ ! -f "$DATA/annotations/instances_val.json" ]; then
  sodtool data synth --preset bench --seed 0 --workers 2 --out "$DATA"
fi

sodtool train detector --detector frcnn --preset bench --data "$DATA" --out "$RUN/detector" --seed 0
# The stores depend on the detector alone: made once, by whichever seed comes first.
for split in train val minival; do
  if [ ! -f "$RUN/rois_${split}_lr.h5.manifest.json" ]; then
    mode=test; [ "$split" = train ] && mode=train
    sodtool crop-rois --detector frcnn --detector-weights "$RUN/detector/model.pt" --data "$DATA" --split "$split" \
      --mode "$mode" --hr-size "$HR" --out "$RUN/rois_$split.h5" --overwrite
    sodtool downsample "$RUN/rois_$split.h5" --out "$RUN/rois_${split}_lr.h5" --overwrite
  fi
done

sodtool train sr --preset quick --hr "$RUN/rois_train.h5" --lr "$RUN/rois_train_lr.h5" --out "$S/sr" --seed "$SEED"
for schedule in bench quick; do
  sodtool train mtgan --preset "$schedule" --hr "$RUN/rois_train.h5" --lr "$RUN/rois_train_lr.h5" --sr "$S/sr" \
    --disc-init "$RUN/detector/model.pt" --out "$S/mtgan_$schedule" --seed "$SEED"
done

for split in val minival; do
  sodtool eval --split "$split" --data "$DATA" --rois "$RUN/rois_$split.h5" --mtgan "$S/mtgan_bench" \
    --ablation "quick=$S/mtgan_quick" --no-figures --out "$S/eval_$split" --overwrite
done
