#!/usr/bin/env bash
# The paper's configuration on COCO 2017 (GPU). COCO is not downloaded: pass its folder, laid out
# as annotations/instances_{train,val}2017.json + train2017/ + val2017/ (train -> train2017,
# minival -> val2017). Optional ImageNet weights (fetched by hand, torchvision format) for the
# detector trunk and the discriminator:
#
#   bash pipelines/coco2017.sh /data/coco runs/coco [resnet50-0676ba61.pth]
#
# Several GPUs: the training stages of sr/mtgan run under torchrun, e.g.
#   TORCHRUN="torchrun --nproc_per_node=8" bash pipelines/coco2017.sh /data/coco runs/coco
#
# Paper, Table 2 (COCO minival, AP / AP50 / AP75 / AP_S / AP_M / AP_L):
#   Faster R-CNN ResNet-50-C4 baseline  36.5 57.3 39.3 18.4 40.6 50.6
#   SOD-MTGAN (ResNet-50 D)             37.2 57.7 40.2 19.9 41.1 51.2
#   Mask R-CNN ResNet-101-FPN baseline  40.9 61.9 44.8 23.5 44.2 53.9
#   SOD-MTGAN (ResNet-101 D)            41.5 62.5 45.4 25.1 44.6 54.1
# The paper trains on trainval135k and reports minival (5k); COCO 2017 train/val are the same
# images under new names.
set -euo pipefail

COCO=${1:?give the COCO 2017 folder}
RUN=${2:-runs/coco}
IMAGENET=${3:-}
TORCHRUN=${TORCHRUN:-}
SODTOOL="python -m sodtool"
if [ -n "$TORCHRUN" ]; then SODTOOL_DDP="$TORCHRUN -m sodtool"; else SODTOOL_DDP=$SODTOOL; fi
BACKBONE_ARGS=()
DISC_ARGS=()
if [ -n "$IMAGENET" ]; then BACKBONE_ARGS=(--backbone-weights "$IMAGENET"); DISC_ARGS=(--imagenet-weights "$IMAGENET"); fi

$SODTOOL data stats --data "$COCO" --split minival --out "$RUN/stats" --overwrite

# Baseline: Faster R-CNN ResNet-50-C4, 800/1333, batch 16, lr 0.02, 90k iterations, steps 60k/80k.
$SODTOOL train detector --detector frcnn --preset coco --data "$COCO" --out "$RUN/detector" --device cuda \
  --amp "${BACKBONE_ARGS[@]}"

# ROIs of the baseline (HR 128, LR 32); shards can run on several machines and be merged.
$SODTOOL crop-rois --detector frcnn --detector-weights "$RUN/detector/model.pt" --data "$COCO" --split train \
  --mode train --out "$RUN/rois_train.h5" --device cuda --overwrite
$SODTOOL downsample "$RUN/rois_train.h5" --out "$RUN/rois_train_lr.h5" --overwrite

# Generator (Table 1 widths) pretrained with MSE, then the MTGAN with a ResNet-50 D: SGD 0.01,
# /10 every 40k, 80k iterations, alternating D and G steps, batch 64, bf16 autocast.
$SODTOOL_DDP train sr --preset paper --hr "$RUN/rois_train.h5" --lr "$RUN/rois_train_lr.h5" --out "$RUN/sr" --device cuda
$SODTOOL_DDP train mtgan --preset paper --hr "$RUN/rois_train.h5" --lr "$RUN/rois_train_lr.h5" --sr "$RUN/sr" \
  --out "$RUN/mtgan" --disc-arch resnet50 --device cuda "${DISC_ARGS[@]}"

# Test: the baseline's top 100 detections per minival image, rescored.
$SODTOOL crop-rois --detector frcnn --detector-weights "$RUN/detector/model.pt" --data "$COCO" --split minival \
  --mode test --out "$RUN/rois_minival.h5" --device cuda --overwrite
$SODTOOL downsample "$RUN/rois_minival.h5" --out "$RUN/rois_minival_lr.h5" --overwrite
$SODTOOL eval --split minival --data "$COCO" --rois "$RUN/rois_minival.h5" --mtgan "$RUN/mtgan" \
  --out "$RUN/eval_minival" --device cuda --overwrite
cat "$RUN/eval_minival/table.md"
