#!/usr/bin/env bash
# The paper's Table 3 on a finished run (one that has rois_train.h5, rois_train_lr.h5, sr/,
# mtgan/ and rois_minival.h5, e.g. after quickstart.sh): train one MTGAN per ablation with the
# same preset, seed and inputs, then evaluate them all beside the full model.
#
#   bash pipelines/ablations.sh [RUN] [DATA] [PRESET] [SEED]   # defaults: runs/quick data/synth-quick quick 0
#
# PRESET and SEED are the `train mtgan` preset and seed RUN/mtgan was trained with, so that each
# ablation differs from the full model by its one flag alone: `quick` for a run of quickstart.sh
# (or of `MTGAN_SCHEDULE=quick bash pipelines/bench.sh`), `bench` for one of bench.sh's default
# (HR 128) or of `HR=64 SCHEDULE=bench bash pipelines/bench.sh`.
#
# Paper, Table 3 (COCO minival, ResNet-50 D; AP / AP50 / AP75 / AP_S / AP_M / AP_L):
#   w/o reg+ branch  36.7 57.5 39.8 19.0 40.9 49.9
#   w/o adv loss     37.0 57.6 40.0 19.4 41.0 51.0
#   w/o cls loss     36.8 57.6 39.9 19.2 41.1 50.3
#   w/o reg loss     36.7 57.6 39.7 19.1 41.1 50.2
#   SOD-MTGAN        37.2 57.7 40.2 19.9 41.2 51.2
set -euo pipefail

RUN=${1:-runs/quick}
DATA=${2:-data/synth-quick}
PRESET=${3:-quick}
SEED=${4:-0}

for ablation in no-reg-branch no-adv no-cls no-reg; do
  sodtool train mtgan --preset "$PRESET" --hr "$RUN/rois_train.h5" --lr "$RUN/rois_train_lr.h5" --sr "$RUN/sr" \
    --disc-init "$RUN/detector/model.pt" --out "$RUN/mtgan_${ablation//-/_}" --seed "$SEED" "--$ablation"
done

sodtool eval --split minival --data "$DATA" --rois "$RUN/rois_minival.h5" --mtgan "$RUN/mtgan" \
  --ablation "no_reg_branch=$RUN/mtgan_no_reg_branch" \
  --ablation "no_adv=$RUN/mtgan_no_adv" \
  --ablation "no_cls=$RUN/mtgan_no_cls" \
  --ablation "no_reg=$RUN/mtgan_no_reg" \
  --small-area 1024 --out "$RUN/eval_minival_ablations" --overwrite
cat "$RUN/eval_minival_ablations/table.md"

# The feature-SR method's two controls beside it (a Faster R-CNN run only): pipelines/fsr.sh.
if [ "$(python -c 'import json,sys; print(json.load(open(sys.argv[1]))["config"].get("detector", "frcnn"))' \
       "$RUN/detector/manifest.json")" = frcnn ]; then
  bash pipelines/fsr.sh "$RUN" "$DATA" "$PRESET" "$SEED" minival
fi
