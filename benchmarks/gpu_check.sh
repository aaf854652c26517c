#!/usr/bin/env bash
# GPU readiness check, one call on a CUDA machine, under 8 minutes (the sections' limits below):
#
#   1. info         `sodtool info` and nvidia-smi: versions, the device `--device auto` picks.
#   2. cuda_smoke   the CUDA code paths the tests cannot reach on CPU: `--device auto` / torchrun's
#                   LOCAL_RANK device, bf16 autocast of `sodtool.device`, `train sr`'s sr_step and
#                   `train mtgan`'s train_step (D warm-up and full) on a channels_last Generator and
#                   ResNet-18 D: every conv / linear runs in bf16, losses and terms are finite
#                   float32, parameters stay float32 and move. (No test is marked for CUDA: the
#                   suite runs every stage with --device cpu.)
#   3. bench        benchmarks/bench_train.py on CUDA, bf16: crops/s, TFLOP/s and the fraction of
#                   the GPU's dense bf16 peak, for the paper widths (G 64/256, ResNet-50 D, batch
#                   64, 128 px) and the light ones.
#   4. torchrun     tiny data (synth 12 + 4 images at 192 px), `train detector` (bf16) 6 iterations,
#                   `crop-rois`, `downsample`, then `torchrun --nproc_per_node=1 -m sodtool train
#                   sr` and `... train mtgan` on CUDA, a few iterations each. (One process:
#                   WORLD_SIZE 1 runs without a process group; the 2-rank DDP check is gloo, below.)
#   5. tests        tests/test_distributed.py (2-rank gloo DDP of train sr / mtgan, torchrun CLI,
#                   bf16 autocast path on CPU) on this machine's torch.
#
# Usage, from the repository root with the environment active:
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]      # default OUT_DIR: runs/gpu_check (emptied first)
#
# Writes OUT_DIR/gpu_check.json (device, torch, each section's status and seconds, the figures
# below) and OUT_DIR/logs/<section>.log; prints each section under a "=== name" header and the
# JSON at the end. Every section runs, each under its own time limit (45 + 75 + 110 + 140 + 60 s,
# plus 5 s of grace each: at most 7.6 min in all); exit status 1 if any failed.
# SODTOOL_GPU_CHECK_DEVICE=cpu (default cuda) runs the same flow on CPU, light bench only: a dry
# run of the script itself on a machine without a GPU, not a check of anything GPU.
set -euo pipefail

OUT_DIR=${1:-runs/gpu_check}
DEV=${SODTOOL_GPU_CHECK_DEVICE:-cuda}
PY=${PYTHON:-python}
export OUT_DIR DEV PY
export PYTHONUNBUFFERED=1
if [ "$DEV" = cpu ]; then export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}; fi

rm -rf "$OUT_DIR"
mkdir -p "$OUT_DIR/logs"
STATUS="$OUT_DIR/sections.tsv"
: >"$STATUS"
T0=$(date +%s)

# run_section NAME LIMIT_S FUNCTION: run FUNCTION in a fresh `bash -euo pipefail` under `timeout`,
# tee its output to logs/NAME.log, record "NAME rc seconds" in sections.tsv; never stops the script.
run_section() {
  local name=$1 limit=$2 fn=$3 t rc
  echo
  echo "=== $name (limit ${limit}s)"
  t=$(date +%s.%N)
  set +e
  timeout --kill-after=5 "$limit" bash -euo pipefail -c "$fn" 2>&1 | tee "$OUT_DIR/logs/$name.log"
  rc=${PIPESTATUS[0]}
  set -e
  t=$(awk -v a="$t" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  printf '%s\t%s\t%s\n' "$name" "$rc" "$t" >>"$STATUS"
  if [ "$rc" = 0 ]; then echo "--- $name: ok (${t}s)"; else echo "--- $name: FAILED rc=$rc (${t}s)"; fi
}

sec_info() {
  "$PY" -m sodtool info
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv
  else
    echo "(no nvidia-smi)"
  fi
  "$PY" - <<'EOF'
import json, os, torch
info = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
        "cuda_runtime": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(device_name=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1),
                device_count=torch.cuda.device_count(), bf16_supported=torch.cuda.is_bf16_supported())
print(json.dumps(info, indent=1))
with open(os.path.join(os.environ["OUT_DIR"], "info.json"), "w") as f:
    json.dump(info, f)
if os.environ["DEV"] == "cuda" and not torch.cuda.is_available():
    raise SystemExit("CUDA is not available to torch on this machine")
EOF
}

sec_cuda_smoke() {
  "$PY" - <<'EOF'
import json, os, time, torch
from sodtool.device import autocast, device_name, resolve_device
from sodtool.engine import setup_device
from sodtool.losses import LossWeights
from sodtool.models.networks import Discriminator, Generator
from sodtool.stages.train_mtgan import train_step
from sodtool.stages.train_sr import sr_step

want = os.environ["DEV"]
res = {}
dev = resolve_device("auto")
assert dev.type == want, f"--device auto picked {dev}, expected {want}"
assert resolve_device(want).type == want
os.environ["LOCAL_RANK"] = "0"  # what torchrun --nproc_per_node=1 sets
dev2, ddp, rank, world = setup_device(want)
assert (dev2.type, ddp, rank, world) == (want, False, 0, 1), (dev2, ddp, rank, world)
if want == "cuda":
    assert dev2.index == 0 and resolve_device("auto").index == 0
    ctx = autocast(dev)
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16, ctx
res["device"] = device_name(dev2)
dev = dev2
torch.manual_seed(0)
cl = torch.channels_last if dev.type == "cuda" else torch.contiguous_format
b, k = 16, 5
g = Generator(32, 32, 5).to(dev, memory_format=cl).train()
d = Discriminator(k, "resnet18").to(dev, memory_format=cl).train()
x = torch.rand(b, 3, 16, 16, device=dev).contiguous(memory_format=cl)
y = torch.rand(b, 3, 64, 64, device=dev).contiguous(memory_format=cl)
u = torch.randint(0, k + 1, (b,), device=dev)
v = torch.randn(b, 4, device=dev) * 0.1
dtypes = []
layers = (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Linear)
for net in (g, d):
    for m in net.modules():
        if isinstance(m, layers):
            m.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
expect = {torch.bfloat16} if dev.type == "cuda" else {torch.float32}

def snap(m):
    return [p.detach().clone() for p in m.parameters()]

def moved(before, m):
    return any(not torch.equal(a, p) for a, p in zip(before, m.parameters()))

opt_g = torch.optim.Adam(g.parameters(), lr=1e-4)
before = snap(g)
t = time.perf_counter()
loss = sr_step(g, opt_g, x, y, dev)
assert set(dtypes) == expect, set(dtypes)
assert loss.dtype == torch.float32 and torch.isfinite(loss) and moved(before, g)
res["sr_step_loss"] = float(loss.detach())
d_params = [p for p in d.parameters() if p.requires_grad]
opt_d = torch.optim.SGD(d_params, lr=0.01, momentum=0.9, weight_decay=1e-4)
sched = torch.optim.lr_scheduler.StepLR(opt_d, 100)
w = LossWeights()
for g_step in (False, True, True):
    dtypes.clear()
    gb, db = snap(g), snap(d)
    loss_d, loss_g, terms = train_step(g, d, d_params, opt_g, opt_d, sched, x, y, u, v, w, dev, g_step=g_step)
    assert dtypes and set(dtypes) == expect, set(dtypes)
    assert loss_d.dtype == torch.float32 and torch.isfinite(loss_d) and moved(db, d)
    assert all(t_.dtype == torch.float32 and torch.isfinite(t_) for t_ in terms.values()), terms
    if g_step:
        assert loss_g.dtype == torch.float32 and torch.isfinite(loss_g) and moved(gb, g)
    else:
        assert loss_g is None and not moved(gb, g)
assert all(p.dtype == torch.float32 for p in list(g.parameters()) + list(d.parameters()))
assert all(p.requires_grad for p in d.parameters())
if dev.type == "cuda":
    torch.cuda.synchronize()
    res["max_memory_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 3)
res.update(ok=True, layer_dtypes=sorted(str(t_) for t_ in expect), train_step_terms={k_: float(v_) for k_, v_ in terms.items()},
           seconds=round(time.perf_counter() - t, 2))
print(json.dumps(res, indent=1))
with open(os.path.join(os.environ["OUT_DIR"], "cuda_smoke.json"), "w") as f:
    json.dump(res, f)
EOF
}

sec_bench() {
  if [ "$DEV" = cuda ]; then
    "$PY" benchmarks/bench_train.py --preset paper --device cuda --iterations 20 --warmup 5 \
      >"$OUT_DIR/bench_paper.json"
    cat "$OUT_DIR/bench_paper.json"
    "$PY" benchmarks/bench_train.py --preset light --device cuda --iterations 20 --warmup 5 \
      >"$OUT_DIR/bench_light.json"
    cat "$OUT_DIR/bench_light.json"
  else
    "$PY" benchmarks/bench_train.py --preset light --device cpu --batch-size 2 --hr-size 64 --iterations 1 \
      --warmup 0 >"$OUT_DIR/bench_light.json"
    cat "$OUT_DIR/bench_light.json"
  fi
}

sec_torchrun() {
  local run=$OUT_DIR/smoke data=$OUT_DIR/smoke/data sod=("$PY" -m sodtool --quiet)
  local trun=("$PY" -m torch.distributed.run --standalone --nnodes=1 --nproc_per_node=1 -m sodtool --quiet)
  local amp=()
  if [ "$DEV" = cuda ]; then amp=(--amp); fi
  "${sod[@]}" data synth --preset quick --train-images 12 --val-images 4 --minival-images 4 --image-size 192 --seed 0 --out "$data"
  "${sod[@]}" train detector --detector frcnn --preset quick --data "$data" --out "$run/detector" --iterations 6 \
    --batch-size 2 --min-size 192 --max-size 192 --checkpoint-every 3 --seed 0 --device "$DEV" ${amp[@]+"${amp[@]}"}
  "${sod[@]}" crop-rois --detector frcnn --detector-weights "$run/detector/model.pt" --data "$data" --split train \
    --mode train --hr-size 32 --rois-per-image 16 --device "$DEV" --out "$run/rois_train.h5"
  "${sod[@]}" downsample "$run/rois_train.h5"
  echo "torchrun --nproc_per_node=1 -m sodtool train sr --device $DEV"
  "${trun[@]}" train sr --preset quick --hr "$run/rois_train.h5" --lr "$run/rois_train_lr.h5" --out "$run/sr" \
    --iterations 8 --batch-size 8 --log-every 4 --val-every 4 --checkpoint-every 4 --seed 0 --device "$DEV"
  echo "torchrun --nproc_per_node=1 -m sodtool train mtgan --device $DEV"
  "${trun[@]}" train mtgan --preset quick --hr "$run/rois_train.h5" --lr "$run/rois_train_lr.h5" --sr "$run/sr" \
    --out "$run/mtgan" --iterations 6 --d-warmup 2 --batch-size 8 --log-every 2 --val-every 3 --sample-every 3 \
    --checkpoint-every 3 --seed 0 --device "$DEV"
  "$PY" - <<'EOF'
import json, os
run = os.path.join(os.environ["OUT_DIR"], "smoke")
res = {}
for stage, art in (("sr", "generator.pt"), ("mtgan", "model.pt")):
    folder = os.path.join(run, stage)
    m = json.load(open(os.path.join(folder, "manifest.json")))
    assert os.path.isfile(os.path.join(folder, art)), art
    dev = json.dumps(m.get("device", m.get("environment", "")))
    assert os.environ["DEV"] in dev, f"{stage} ran on {dev}"
    lines = [json.loads(x) for x in open(os.path.join(folder, "metrics.jsonl"))]
    rates = [x["crops_per_s"] for x in lines if "crops_per_s" in x]
    res[stage] = {"device": m.get("device"), "iterations": m["metrics"]["iterations"],
                  "crops_per_s_last": rates[-1] if rates else None,
                  "final": {k: v for k, v in m["metrics"].items() if k.startswith(("final_", "val_sr_psnr_rgb"))}}
print(json.dumps(res, indent=1))
json.dump(res, open(os.path.join(os.environ["OUT_DIR"], "torchrun_smoke.json"), "w"))
EOF
}

sec_tests() {
  OMP_NUM_THREADS=1 "$PY" -m pytest -q -p no:cacheprovider tests/test_distributed.py --durations=0
}

export -f sec_info sec_cuda_smoke sec_bench sec_torchrun sec_tests

run_section info 45 sec_info
run_section cuda_smoke 75 sec_cuda_smoke
run_section bench 110 sec_bench
run_section torchrun 140 sec_torchrun
run_section tests 60 sec_tests

echo
echo "=== summary ($OUT_DIR/gpu_check.json)"
TOTAL_S=$(( $(date +%s) - T0 )) "$PY" - <<'EOF'
import json, os
out = os.environ["OUT_DIR"]

def load(name):
    p = os.path.join(out, name)
    try:
        return json.load(open(p))
    except (OSError, ValueError):
        return None

sections = {}
for line in open(os.path.join(out, "sections.tsv")):
    name, rc, sec = line.rstrip("\n").split("\t")
    sections[name] = {"ok": rc == "0", "rc": int(rc), "seconds": float(sec)}
info = load("info.json") or {}
benches = {}
for preset in ("paper", "light"):
    b = load(f"bench_{preset}.json")
    if b:
        benches[preset] = {k: b.get(k) for k in ("device", "bf16_autocast", "channels_last", "config", "mtgan_crops_per_s",
                                                 "mtgan_achieved_tflops", "mtgan_fraction_of_peak", "sr_crops_per_s",
                                                 "sr_achieved_tflops", "sr_fraction_of_peak", "bf16_peak_tflops",
                                                 "max_memory_gib")}
tests = None
log = os.path.join(out, "logs", "tests.log")
if os.path.isfile(log):
    tail = [x for x in open(log).read().splitlines() if " passed" in x or " failed" in x or " error" in x]
    tests = tail[-1].strip("= ") if tail else None
summary = {"device_asked": os.environ["DEV"], "device_name": info.get("device_name"), "torch": info.get("torch"),
           "cuda_runtime": info.get("cuda_runtime"), "ok": bool(sections) and all(s["ok"] for s in sections.values()),
           "total_seconds": int(os.environ["TOTAL_S"]), "sections": sections, "info": info,
           "cuda_smoke": load("cuda_smoke.json"), "bench": benches, "torchrun_smoke": load("torchrun_smoke.json"),
           "tests": tests}
with open(os.path.join(out, "gpu_check.json"), "w") as f:
    json.dump(summary, f, indent=1)
print(json.dumps(summary, indent=1))
for name, s in sections.items():
    print(f"{name:<11} {'ok' if s['ok'] else 'FAILED rc=%d' % s['rc']:<12} {s['seconds']:>6.1f} s")
for preset, b in benches.items():
    print(f"bench {preset}: mtgan {b['mtgan_crops_per_s']} crops/s ({b['mtgan_fraction_of_peak']} of bf16 peak), "
          f"sr {b['sr_crops_per_s']} crops/s ({b['sr_fraction_of_peak']} of peak)")
print(f"total {summary['total_seconds']} s: {'all sections ok' if summary['ok'] else 'SOME SECTIONS FAILED'}")
raise SystemExit(0 if summary["ok"] else 1)
EOF
