#!/usr/bin/env bash
# Generated training images for small real data (issue 34): DetectorGAN (Liu et al. 2019) on
# kit-aerial split by sequence, beside the baselines that say what caused a gain, each the same
# Faster R-CNN recipe and iteration budget as pipelines/kit-aerial.sh:
#
#   real             real images only, today's augmentations (flips, quarter turns, scale jitter);
#   copy_paste       real + copy-paste images (training objects pasted at sampled boxes, blended);
#   detgan_no_unroll real + DetectorGAN images, trained without Eq. 3's unrolled step;
#   detgan           real + DetectorGAN images;
#   bench_init       real only, its trunk from a detector trained on the synthetic bench.
#
# Then SOD-MTGAN over the detgan detector's ROIs. Every setting is fixed in advance (kit-aerial
# has no leak-free val split inside a sequence): GENERATED images = 5 x the training images, up to
# 8 objects inserted per image, extra-data ratio 0.5, the insertion rule of sodtool/insertion.py.
#
#   bash pipelines/kit-aerial-gan.sh [DIRECTION] [SEED] [RUN]
#   ROWS=core bash pipelines/kit-aerial-gan.sh crossroads-to-street 1   # real, copy_paste, detgan only
#   ROWS="core detgan_no_unroll" bash pipelines/kit-aerial-gan.sh crossroads-to-street 1
#
# ROWS: a space-separated list of rows (real, copy_paste, detgan, detgan_no_unroll, bench_init, and
# mtgan for the SOD-MTGAN second stage); `core` stands for the first three, `all` (default) for every
# row. The real-only row always trains: it is the detector in DetectorGAN's loop.
#
# DIRECTION: crossroads-to-street (default) or street-to-crossroads; RUN defaults to
# runs/kit-aerial-gan-DIRECTION/sSEED. bench_init takes BENCH_DETECTOR (default
# runs/bench/detector/model.pt), trained here with the bench preset when it is missing.
# Rerunning resumes the training stages from their checkpoints and rewrites the other outputs.
set -euo pipefail

DIRECTION=${1:-crossroads-to-street}
SEED=${2:-0}
RUN=${3:-runs/kit-aerial-gan-$DIRECTION/s$SEED}
ROWS=" ${ROWS:-all} "
ROWS=${ROWS/ all / core detgan_no_unroll bench_init mtgan }
ROWS=${ROWS/ core / real copy_paste detgan }
has_row() { [[ "$ROWS" == *" $1 "* ]]; }
SRC=${SODTOOL_SHARED_DATA:-../shared/data}/kit-aerial
DATA=data/kit-aerial-$DIRECTION
BENCH_DETECTOR=${BENCH_DETECTOR:-runs/bench/detector/model.pt}
PER_IMAGE=8
HR=64

. "$(dirname "$0")/kit_lists.sh"
kit_lists "$SRC" "$RUN/lists"
case "$DIRECTION" in
  crossroads-to-street) TRAIN=crossroads; MINIVAL=street ;;
  street-to-crossroads) TRAIN=street; MINIVAL=crossroads ;;
  *) echo "kit-aerial-gan.sh: DIRECTION must be crossroads-to-street or street-to-crossroads" >&2; exit 2 ;;
esac
if [ ! -f "$DATA/manifest.json" ]; then
  sodtool data import-yolo "$SRC" --out "$DATA" --train-list "$RUN/lists/$TRAIN.txt" \
    --minival-list "$RUN/lists/$MINIVAL.txt"
fi
COUNT=$(( 5 * $(wc -l < "$RUN/lists/$TRAIN.txt") ))

# pipelines/kit-aerial.sh's recipe, for every row.
RECIPE=(--detector frcnn --preset quick --data "$DATA" --min-size 544 --max-size 1792 --batch-size 2 --iterations 300
        --milestones 240 --anchor-sizes 8,16,32,64 --hflip --vflip --rot90 --train-sizes 480,512,544,576,608
        --lr 0.01 --seed "$SEED")

sodtool train detector "${RECIPE[@]}" --out "$RUN/real"

COMPARE=()
if has_row copy_paste; then
  sodtool data generate --method copy-paste --data "$DATA" --count "$COUNT" --per-image "$PER_IMAGE" --seed "$SEED" \
    --out "$RUN/gen_copy_paste" --overwrite
  sodtool train detector "${RECIPE[@]}" --extra-data "$RUN/gen_copy_paste" --extra-ratio 0.5 --out "$RUN/copy_paste"
  COMPARE+=(--compare "copy_paste=$RUN/copy_paste/model.pt")
fi

# DetectorGAN: the real-only detector above is the pretrained detector in the loop.
for v in detgan detgan_no_unroll; do
  has_row "$v" || continue
  flag=--unroll; [ "$v" = detgan_no_unroll ] && flag=--no-unroll
  sodtool train detgan --detector "$RUN/real/model.pt" --data "$DATA" --out "$RUN/gan_$v" $flag --seed "$SEED"
  sodtool data generate --method detgan --detgan "$RUN/gan_$v" --data "$DATA" --count "$COUNT" \
    --per-image "$PER_IMAGE" --seed "$SEED" --out "$RUN/gen_$v" --overwrite
  sodtool train detector "${RECIPE[@]}" --extra-data "$RUN/gen_$v" --extra-ratio 0.5 --out "$RUN/$v"
  COMPARE+=(--compare "$v=$RUN/$v/model.pt")
done

if has_row bench_init; then
  if [ ! -f "$BENCH_DETECTOR" ]; then
    [ -f data/synth-bench/manifest.json ] || sodtool data synth --preset bench --seed 0 --workers 2 --out data/synth-bench
    sodtool train detector --preset bench --data data/synth-bench --out "$(dirname "$BENCH_DETECTOR")" --seed 0
  fi
  sodtool train detector "${RECIPE[@]}" --weights "$BENCH_DETECTOR" --reinit-heads --out "$RUN/bench_init"
  COMPARE+=(--compare "bench_init=$RUN/bench_init/model.pt")
fi
sodtool eval --split minival --data "$DATA" --detector "$RUN/real/model.pt" "${COMPARE[@]}" \
  --out "$RUN/eval_minival" --overwrite
cat "$RUN/eval_minival/table.md"

if has_row mtgan; then
  # SOD-MTGAN over the DetectorGAN detector's ROIs (kit-aerial.sh's second stage).
  sodtool crop-rois --detector frcnn --detector-weights "$RUN/detgan/model.pt" --data "$DATA" --split train \
    --mode train --hr-size "$HR" --out "$RUN/rois_train.h5" --overwrite
  sodtool downsample "$RUN/rois_train.h5" --out "$RUN/rois_train_lr.h5" --overwrite
  sodtool train sr --preset quick --hr "$RUN/rois_train.h5" --lr "$RUN/rois_train_lr.h5" --out "$RUN/sr" --seed "$SEED"
  sodtool train mtgan --preset quick --hr "$RUN/rois_train.h5" --lr "$RUN/rois_train_lr.h5" --sr "$RUN/sr" \
    --disc-init "$RUN/detgan/model.pt" --out "$RUN/mtgan" --seed "$SEED"
  sodtool crop-rois --detector frcnn --detector-weights "$RUN/detgan/model.pt" --data "$DATA" --split minival \
    --mode test --hr-size "$HR" --out "$RUN/rois_minival.h5" --overwrite
  sodtool downsample "$RUN/rois_minival.h5" --out "$RUN/rois_minival_lr.h5" --overwrite
  sodtool eval --split minival --data "$DATA" --rois "$RUN/rois_minival.h5" --mtgan "$RUN/mtgan" \
    --small-area 1024 --out "$RUN/eval_mtgan_minival" --overwrite
  cat "$RUN/eval_mtgan_minival/table.md"
fi
