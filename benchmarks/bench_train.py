"""Training throughput of `train mtgan` (one D step + one G step per iteration) and `train sr`.

Prints one JSON object on stdout: crops/s of full MTGAN iterations (G forward, D forward on HR
and SR, D backward + SGD step, D forward on SR + G backward + Adam step, exactly
`sodtool.stages.train_mtgan.train_step`), crops/s of `train sr` MSE steps, seconds per iteration, and
the FLOPs of one iteration counted with torch.utils.flop_counter.FlopCounterMode (convolutions
and matmuls, forward and backward); on CUDA also the achieved TFLOP/s and its fraction of the
GPU's dense bf16 peak.

Batches are random tensors already on the device: this measures the networks, not the HDF5
loader (benchmarks/bench_rois.py measures that). The networks run in channels_last, as the
training stages run them (`engine.use_channels_last`); `--nchw` measures the standard layout.

    python benchmarks/bench_train.py --preset light --device cpu          # CPU, quick widths
    python benchmarks/bench_train.py --device cpu --batch-size 32 --hr-size 64 \
        --disc-arch mobilenet_v3_large [--nchw]                           # the quickstart's shapes
    python benchmarks/bench_train.py --preset paper --device cuda         # G 64/256, ResNet-50, batch 64, bf16
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

PRESETS = {
    # The `quick` CLI presets: light generator, ResNet-18 discriminator.
    "light": dict(batch_size=8, hr_size=128, channels=32, up_channels=32, num_blocks=5, disc_arch="resnet18"),
    # The paper: Table 1 generator, ResNet-50 discriminator, batch 64, 128 px HR crops.
    "paper": dict(batch_size=64, hr_size=128, channels=64, up_channels=256, num_blocks=5, disc_arch="resnet50"),
}
# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0,
                    "A100": 312.0, "L40S": 362.0, "A10": 125.0, "RTX 4090": 165.0}


def peak_tflops(name: str) -> float | None:
    for key, v in BF16_PEAK_TFLOPS.items():  # longest names first in the dict where it matters
        if key in name:
            return v
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="light")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--hr-size", type=int)
    ap.add_argument("--channels", type=int)
    ap.add_argument("--up-channels", type=int)
    ap.add_argument("--num-blocks", type=int)
    ap.add_argument("--disc-arch")
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--iterations", type=int, default=5, help="timed iterations (after --warmup)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    ap.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, if not in the built-in table")
    ap.add_argument("--skip-sr", action="store_true", help="do not time the MSE (train sr) step")
    ap.add_argument("--nchw", action="store_true", help="keep the standard memory layout, not channels_last")
    args = ap.parse_args(argv)

    from sodtool.device import device_name, resolve_device
    from sodtool.engine import use_channels_last
    from sodtool.losses import LossWeights
    from sodtool.models.networks import Discriminator, Generator
    from sodtool.stages.train_mtgan import train_step
    from sodtool.stages.train_sr import sr_step

    cfg = dict(PRESETS[args.preset])
    for k in cfg:
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    b, s = cfg["batch_size"], cfg["hr_size"]
    g = Generator(cfg["channels"], cfg["up_channels"], cfg["num_blocks"]).to(device).train()
    d = Discriminator(args.num_classes, cfg["disc_arch"]).to(device).train()
    cl = not args.nchw and use_channels_last(device, g, d)
    fmt = torch.channels_last if cl else torch.contiguous_format
    d_params = [p for p in d.parameters() if p.requires_grad]
    opt_g = torch.optim.Adam(g.parameters(), lr=1e-4)
    opt_d = torch.optim.SGD(d_params, lr=0.01, momentum=0.9, weight_decay=1e-4)
    sched_d = torch.optim.lr_scheduler.StepLR(opt_d, step_size=40_000, gamma=0.1)
    w = LossWeights()
    x = torch.rand(b, 3, s // 4, s // 4, device=device).contiguous(memory_format=fmt)
    y = torch.rand(b, 3, s, s, device=device).contiguous(memory_format=fmt)
    u = torch.randint(0, args.num_classes + 1, (b,), device=device)
    v = torch.randn(b, 4, device=device) * 0.1

    def mtgan_iter() -> None:
        train_step(g, d, d_params, opt_g, opt_d, sched_d, x, y, u, v, w, device)

    def sr_iter() -> None:
        sr_step(g, opt_g, x, y, device)

    def flops_of(fn) -> int:
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            fn()
        return int(counter.get_total_flops())

    def timed(fn) -> float:
        for _ in range(args.warmup):
            fn()
        _sync(device)
        t = time.perf_counter()
        for _ in range(args.iterations):
            fn()
        _sync(device)
        return (time.perf_counter() - t) / args.iterations

    result = {"benchmark": "train", "device": device_name(device), "preset": args.preset, "config": cfg,
              "bf16_autocast": device.type == "cuda", "channels_last": cl, "torch_threads": torch.get_num_threads(),
              "iterations": args.iterations, "warmup": args.warmup, "torch": torch.__version__}
    flops = flops_of(mtgan_iter)  # also a warm-up iteration
    sec = timed(mtgan_iter)
    result.update({"mtgan_s_per_iter": round(sec, 4), "mtgan_crops_per_s": round(b / sec, 2),
                   "mtgan_gflop_per_iter": round(flops / 1e9, 2), "mtgan_achieved_tflops": round(flops / sec / 1e12, 4)})
    if not args.skip_sr:
        sr_flops = flops_of(sr_iter)
        sr_sec = timed(sr_iter)
        result.update({"sr_s_per_iter": round(sr_sec, 4), "sr_crops_per_s": round(b / sr_sec, 2),
                       "sr_gflop_per_iter": round(sr_flops / 1e9, 2),
                       "sr_achieved_tflops": round(sr_flops / sr_sec / 1e12, 4)})
    if device.type == "cuda":
        peak = args.peak_tflops or peak_tflops(torch.cuda.get_device_name(device))
        result["bf16_peak_tflops"] = peak
        result["mtgan_fraction_of_peak"] = round(flops / sec / 1e12 / peak, 4) if peak else None
        if "sr_achieved_tflops" in result and peak:
            result["sr_fraction_of_peak"] = round(result["sr_achieved_tflops"] / peak, 4)
        result["max_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    json.dump(result, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return result


if __name__ == "__main__":
    main()
