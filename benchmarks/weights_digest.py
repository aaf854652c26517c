"""The digest of a model's weights and the CPU it was trained on, one JSON line per file.

The digest is sha256 over the state dict (names sorted, each name, dtype, shape and raw bytes),
so it does not change with a file's paths, times or pickling, only with the numbers. A line per
model file, with this machine's CPU model, instruction-set flags that matter to the kernels
(avx2, avx512f, avx512_bf16, avx512_vnni, amx_tile), the torch version, and the pinning and
thread variables set (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, MKL_CBWR, OMP_NUM_THREADS; run it
in the environment the model was trained in): benchmarks/cpu_digests.md
collects them across machines (benchmarks/cpu_repro.sh makes them).

    python benchmarks/weights_digest.py runs/cpu/default/detector/model.pt runs/cpu/pinned/detector/model.pt
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sodtool import checkpoint  # noqa: E402

PIN_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR", "OMP_NUM_THREADS")
FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile")


def weights_digest(state: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def cpu_info() -> dict:
    model, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("unknown", "", platform.processor()):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"cpu": model, "flags": [f for f in FLAGS if f in flags], "cores": os.cpu_count()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", type=Path, help="model.pt files (a detector's, or any sodtool model)")
    ap.add_argument("--label", default="", help="a free label for the lines, e.g. default or pinned")
    args = ap.parse_args()
    info = cpu_info()
    for path in args.models:
        obj = checkpoint.load(path, "model file")
        state = obj["model"] if isinstance(obj, dict) and isinstance(obj.get("model"), dict) else obj
        manifest = path.parent / "manifest.json"
        meta = json.loads(manifest.read_text()) if manifest.is_file() else {}
        print(json.dumps({"label": args.label, "file": str(path), "weights_sha256": weights_digest(state),
                          **info, "torch": torch.__version__,
                          "pins": {k: os.environ[k] for k in PIN_VARIABLES if k in os.environ},
                          "metrics_AP": (meta.get("metrics") or {}).get("AP"),
                          "wall_time_s": meta.get("wall_time_s")}))


if __name__ == "__main__":
    main()
