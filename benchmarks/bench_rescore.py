"""Throughput of the rescoring pass, D(G(x)) per ROI, in the two memory layouts (a benchmark, not a test).

    python benchmarks/bench_rescore.py --mtgan RUN/mtgan [--rois 512] [--batch 256] [--repeats 3] [--device cpu]
    python benchmarks/bench_rescore.py --mtgan RUN/mtgan --default-malloc   # glibc's own malloc options

Sends `--rois` random LR crops (the model's LR size) through `rescoring.MtganScorer`, `--batch`
at a time, once as contiguous NCHW tensors and once in channels_last (what `score_rois` does),
alternating the two `--repeats` times so that a busy machine slows both alike. Prints one JSON
object: ROIs/s of each layout (best repeat), their ratio, the largest difference of a class
probability between the two, and the process's user and kernel CPU seconds and page faults over
the timed passes. Like the CLI, it first makes malloc keep large freed blocks
(`sodtool.allocator`); `--default-malloc` leaves glibc's options, to measure what that saves.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from sodtool.allocator import keep_freed_memory
from sodtool.device import resolve_device
from sodtool.models.mtgan import load_mtgan
from sodtool.rescoring import MtganScorer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mtgan", required=True, help="an MTGAN run folder or its model.pt")
    ap.add_argument("--rois", type=int, default=512)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--default-malloc", action="store_true", help="leave glibc's malloc options as they are")
    args = ap.parse_args()
    kept = False if args.default_malloc else keep_freed_memory()

    device = resolve_device(args.device)
    model = load_mtgan(args.mtgan, device)
    scorer = MtganScorer("mtgan", model.generator, model.discriminator)
    lr = model.lr_size or 32
    x = torch.rand(args.rois, 3, lr, lr, generator=torch.Generator().manual_seed(args.seed)).to(device)
    layouts = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}

    def run(fmt) -> tuple[float, torch.Tensor]:
        probs = []
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            for s in range(0, args.rois, args.batch):
                probs.append(scorer(x[s:s + args.batch].contiguous(memory_format=fmt)).probs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, torch.cat(probs)

    for fmt in layouts.values():  # warm-up: oneDNN builds its kernels on first use
        run(fmt)
    best = {name: float("inf") for name in layouts}
    probs = {}
    before = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(args.repeats):
        for name, fmt in layouts.items():
            t, probs[name] = run(fmt)
            best[name] = min(best[name], t)
    after = resource.getrusage(resource.RUSAGE_SELF)
    rate = {name: args.rois / t for name, t in best.items()}
    print(json.dumps({
        "device": str(device), "threads": torch.get_num_threads(), "lr_size": lr, "hr_size": model.hr_size,
        "rois": args.rois, "batch": args.batch,
        "rois_per_s": {k: round(v, 1) for k, v in rate.items()},
        "channels_last_speedup": round(rate["channels_last"] / rate["nchw"], 2),
        "max_prob_diff": float((probs["nchw"] - probs["channels_last"]).abs().max()),
        "malloc_keeps_freed_blocks": kept,
        "user_s": round(after.ru_utime - before.ru_utime, 1), "kernel_s": round(after.ru_stime - before.ru_stime, 1),
        "page_faults": after.ru_minflt - before.ru_minflt,
    }))


if __name__ == "__main__":
    main()
