#!/usr/bin/env bash
# Quickstart: every stage of SOD-MTGAN on the built-in synthetic benchmark (quick preset), from
# `data synth` to the comparison table; minutes on a 2-core CPU (docs/results.md); uses a GPU if present.
#
#   bash pipelines/quickstart.sh            # writes data/synth-quick and runs/quick
#   DETECTOR=mdssd bash pipelines/quickstart.sh   # the same over MDSSD's ROIs: runs/quick-mdssd
#
# Rerunning resumes the training stages from their checkpoints and rewrites the other outputs.
set -euo pipefail

DATA=data/synth-quick
DETECTOR=${DETECTOR:-frcnn}  # the baseline family: frcnn, or ssd / mdssd (DETECTOR=mdssd bash ...)
RUN=runs/quick
[ "$DETECTOR" = frcnn ] || RUN=runs/quick-$DETECTOR
HR=64   # HR crop side for the quick preset (LR = 16): a quarter of the cost of the paper's 128.

sodtool data synth --preset quick --seed 0 --workers 2 --out "$DATA"  # the images do not depend on --workers
sodtool data stats --data "$DATA" --split train --out "$RUN/stats" --overwrite

sodtool train detector --detector "$DETECTOR" --preset quick --data "$DATA" --out "$RUN/detector" --seed 0

# Feature-level super-resolution (Noh et al. 2019) from the same Faster R-CNN: the small proposals'
# pooled features super-resolved inside the detector; its row goes beside SOD-MTGAN's below.
# pipelines/fsr.sh adds its two controls (a small head without G; G with unmatched targets).
COMPARE=()
if [ "$DETECTOR" = frcnn ]; then
  sodtool train fsr --preset quick --detector "$RUN/detector/model.pt" --data "$DATA" --val-split val \
    --out "$RUN/fsr" --seed 0
  COMPARE=(--compare "fsr=$RUN/fsr/model.pt")
fi

sodtool crop-rois --detector "$DETECTOR" --detector-weights "$RUN/detector/model.pt" --data "$DATA" --split train \
  --mode train --hr-size "$HR" --out "$RUN/rois_train.h5" --overwrite
sodtool downsample "$RUN/rois_train.h5" --out "$RUN/rois_train_lr.h5" --overwrite

sodtool train sr --preset quick --hr "$RUN/rois_train.h5" --lr "$RUN/rois_train_lr.h5" --out "$RUN/sr" --seed 0
# D's trunk starts from the baseline detector's (--disc-init): no ImageNet weights can be downloaded,
# and a D trained from scratch on these few crops classifies no held-out object crop.
sodtool train mtgan --preset quick --hr "$RUN/rois_train.h5" --lr "$RUN/rois_train_lr.h5" --sr "$RUN/sr" \
  --disc-init "$RUN/detector/model.pt" --out "$RUN/mtgan" --seed 0

sodtool crop-rois --detector "$DETECTOR" --detector-weights "$RUN/detector/model.pt" --data "$DATA" --split minival \
  --mode test --hr-size "$HR" --out "$RUN/rois_minival.h5" --overwrite
sodtool downsample "$RUN/rois_minival.h5" --out "$RUN/rois_minival_lr.h5" --overwrite

# One pass of G and D per ROI gives every row: the paper's score (D's class probability), the
# fused score (D's and the baseline's), the bicubic control with both, and each again with only
# the ROIs below 32² px rescored (--small-area 1024; larger ones keep the baseline's detection, as
# Noh et al. 2019 route only small proposals through SR); under the table, how far D's held-out
# accuracy lets the rescored rows be trusted. Last, the feature-SR detector's own detections.
sodtool eval --split minival --data "$DATA" --rois "$RUN/rois_minival.h5" --mtgan "$RUN/mtgan" \
  --small-area 1024 ${COMPARE[@]+"${COMPARE[@]}"} --out "$RUN/eval_minival" --overwrite

cat "$RUN/eval_minival/table.md"
