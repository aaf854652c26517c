#!/usr/bin/env bash
# Does the quick preset's detector come out bit-identical on another x86 CPU? Trains it (seed 0,
# data/synth-quick) twice, with the default kernels and with the instruction sets pinned to AVX2,
# and prints one JSON line each: the weights' digest, the CPU, its flags and the pins
# (benchmarks/weights_digest.py). Paste the lines into benchmarks/cpu_digests.md and compare with
# the other machines' rows: same digest in the same column = the same numbers on both CPUs.
# THREADS (default 1) fixes torch's thread count, which changes the numbers too.
#
#   bash benchmarks/cpu_repro.sh [OUT]   # default runs/cpu
set -euo pipefail

OUT=${1:-runs/cpu}
DATA=data/synth-quick
export OMP_NUM_THREADS=${THREADS:-1}
if [ ! -f "$DATA/manifest.json" ]; then
  sodtool --quiet data synth --preset quick --seed 0 --workers 2 --out "$DATA"
fi
sodtool --quiet train detector --detector frcnn --preset quick --data "$DATA" --out "$OUT/default/detector" --seed 0
python benchmarks/weights_digest.py --label default "$OUT/default/detector/model.pt"
(
  export ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_CBWR=AVX2
  sodtool --quiet train detector --detector frcnn --preset quick --data "$DATA" --out "$OUT/pinned/detector" --seed 0
  python benchmarks/weights_digest.py --label pinned-avx2 "$OUT/pinned/detector/model.pt"
)
