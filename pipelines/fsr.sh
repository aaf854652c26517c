#!/usr/bin/env bash
# Feature-level super-resolution (Noh et al. 2019, `sodtool train fsr`) and its two controls on a
# finished Faster R-CNN run (one with RUN/detector/model.pt, e.g. after quickstart.sh or bench.sh),
# all from that detector with one preset and seed, then evaluated in one table beside it:
#
#   fsr             Noh et al.: small proposals' pooled features super-resolved by G, supervised by
#                   the atrous extractor's targets, classified by the small head and predictor;
#   small_head      the same small head and predictor on the small proposals' own features, no G:
#                   what a dedicated head for small objects gives without super-resolution;
#   unmatched       G supervised by the plain backbone on the full-size image (the paper's naive
#                   supervision, Table 4): what matching the receptive fields adds.
#
#   bash pipelines/fsr.sh [RUN] [DATA] [PRESET] [SEED] [SPLIT]
#   # defaults: runs/quick data/synth-quick quick 0 minival
#
# Seed 0 writes RUN/fsr, RUN/fsr_small_head, RUN/fsr_unmatched and RUN/eval_fsr_SPLIT; another
# seed adds _sSEED to each. SPLIT val is where settings are chosen, minival where they are
# reported. Rerunning resumes the training stages and rewrites the table.
set -euo pipefail

RUN=${1:-runs/quick}
DATA=${2:-data/synth-quick}
PRESET=${3:-quick}
SEED=${4:-0}
SPLIT=${5:-minival}
SUFFIX=""
[ "$SEED" = 0 ] || SUFFIX="_s$SEED"

for control in none small-head unmatched-target; do
  case $control in
    none) out="$RUN/fsr$SUFFIX" ;;
    small-head) out="$RUN/fsr_small_head$SUFFIX" ;;
    unmatched-target) out="$RUN/fsr_unmatched$SUFFIX" ;;
  esac
  sodtool train fsr --preset "$PRESET" --control "$control" --detector "$RUN/detector/model.pt" --data "$DATA" \
    --val-split val --out "$out" --seed "$SEED"
done

sodtool eval --split "$SPLIT" --data "$DATA" --detector "$RUN/detector/model.pt" \
  --compare "fsr=$RUN/fsr$SUFFIX/model.pt" \
  --compare "small_head=$RUN/fsr_small_head$SUFFIX/model.pt" \
  --compare "unmatched=$RUN/fsr_unmatched$SUFFIX/model.pt" \
  --out "$RUN/eval_fsr_$SPLIT$SUFFIX" --overwrite
cat "$RUN/eval_fsr_$SPLIT$SUFFIX/table.md"
