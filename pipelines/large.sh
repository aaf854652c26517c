#!/usr/bin/env bash
# Large images end to end (SAHI's loop): whole-image training against tile training, each read
# whole and sliced, on images much larger than the detector's input, one seed:
#
#   synth  `data synth --preset large`: 2048 px images holding the bench's objects at their pixel
#          sizes; the detector's whole-image input is the bench's 320 px (objects 6.4x smaller);
#          tiles of 320 px (the input size: tiles run at their native scale);
#   kit    kit-aerial split by sequence (crossroads -> street), read whole at 320 px (the street's
#          1764 x 430 images shrunk 0.74x, the crossroads' 0.59x), tiles of 256 px at native scale.
#
#   bash pipelines/large.sh [synth|kit] [SEED] [RUN]   # RUN defaults to runs/large-<which>/s<SEED>
#   python benchmarks/large_table.py runs/large-synth/s0 runs/large-synth/s1 runs/large-synth/s2
#
# Rows (benchmarks/large_table.py): whole-image training read whole; the same detections passed
# through the tile merge; read sliced; tile training read sliced; tile training read whole. The
# tile size and overlap (0.2) are fixed in advance. Rerunning resumes the trainings.
set -euo pipefail

WHICH=${1:-synth}
SEED=${2:-0}
RUN=${3:-runs/large-$WHICH/s$SEED}
SYNTH_OPTS=${SYNTH_OPTS:-}  # tests: e.g. "--train-images 4 --val-images 1 --minival-images 2 --image-size 640"
DET_OPTS=${DET_OPTS:-}      # tests: e.g. "--iterations 2"
mkdir -p "$RUN"

case "$WHICH" in
  synth)
    DATA=${DATA:-data/synth-large}
    TILE=320
    [ -f "$DATA/manifest.json" ] || sodtool data synth --preset large --seed 0 --workers 2 --out "$DATA" $SYNTH_OPTS
    WHOLE=(--preset bench)
    TILED=(--preset bench --min-size "$TILE" --max-size "$TILE")
    ;;
  kit)
    DATA=${DATA:-data/kit-aerial-crossroads-to-street}
    TILE=256
    SRC=${SODTOOL_SHARED_DATA:-../shared/data}/kit-aerial
    if [ ! -f "$DATA/manifest.json" ]; then
      . "$(dirname "$0")/kit_lists.sh"
      kit_lists "$SRC" "$RUN/lists"
      sodtool data import-yolo "$SRC" --out "$DATA" --train-list "$RUN/lists/crossroads.txt" \
        --minival-list "$RUN/lists/street.txt"
    fi
    # kit-aerial.sh's recipe, with the whole image read at the quick preset's 320 px.
    KIT=(--preset quick --batch-size 2 --iterations 300 --milestones 240 --anchor-sizes 8,16,32,64 --hflip --vflip
         --rot90 --lr 0.01)
    WHOLE=("${KIT[@]}" --min-size 320 --max-size 533)
    TILED=("${KIT[@]}" --min-size "$TILE" --max-size "$TILE")
    ;;
  *) echo "large.sh: the first argument must be synth or kit" >&2; exit 2 ;;
esac

TILES=$DATA-tiles$TILE
[ -f "$TILES/manifest.json" ] || sodtool data slice --data "$DATA" --split train --size "$TILE" --overlap 0.2 --out "$TILES"

sodtool train detector --detector frcnn "${WHOLE[@]}" --data "$DATA" --out "$RUN/whole" --seed "$SEED" --no-eval $DET_OPTS
sodtool train detector --detector frcnn "${TILED[@]}" --data "$TILES" --out "$RUN/tile" --seed "$SEED" --no-eval $DET_OPTS

# Each detector read whole (--slice 0: the tile-trained one too, which warns) and sliced.
sodtool eval --split minival --data "$DATA" --detector "$RUN/whole/model.pt" --compare "tile=$RUN/tile/model.pt" \
  --slice 0 --out "$RUN/eval_whole" --overwrite
sodtool eval --split minival --data "$DATA" --detector "$RUN/whole/model.pt" --compare "tile=$RUN/tile/model.pt" \
  --slice "$TILE" --overlap 0.2 --out "$RUN/eval_sliced" --overwrite
python "$(dirname "$0")/../benchmarks/large_table.py" "$RUN"
