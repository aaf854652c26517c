# Sourced by the kit-aerial pipelines: `kit_lists SRC DIR` writes DIR/crossroads.txt (MOS74-MOS93,
# 684 x 547, a crossroads) and DIR/street.txt (MOS155-MOS179, 1764 x 430, a straight street), the
# two sequences of ../shared/data/kit-aerial, so that train and minival are split by sequence.
kit_lists() {
  mkdir -p "$2"
  ls "$1/images" | grep -E '^MOS(7[4-9]|8[0-9]|9[0-3])\.' > "$2/crossroads.txt"
  ls "$1/images" | grep -E '^MOS(15[5-9]|16[0-9]|17[0-9])\.' > "$2/street.txt"
}
