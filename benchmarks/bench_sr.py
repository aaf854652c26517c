"""MSE pretraining of the generator with and without the bicubic skip (`residual_bicubic`).

Measures how fast pixel-MSE pretraining (as `sodtool train sr`: Adam 1e-4, batch 16) beats
bicubic upsampling, for the generator's default (`residual_bicubic=True`) and for the paper's
plain Table 1 network. Data: random HR crops (128 px, `--hr-size`) of real photographs (../shared/data/coco128),
LR = 4x antialiased bicubic as `sodtool downsample` makes it; the last `--val-images` images are
held out. Prints one JSON object: per configuration, held-out PSNR/SSIM (Y, border 4) of the
generator and of bicubic at every `--eval-every` steps, and training crops/s.

    python benchmarks/bench_sr.py --iterations 300 --device cpu
    python benchmarks/bench_sr.py --iterations 2000 --channels 64 --up-channels 256 --device cuda

CPU timings on a shared machine are noisy; the PSNR figures are deterministic for a seed on CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sodtool.device import device_name, resolve_device, seed_everything
from sodtool.models.networks import Generator, count_parameters
from sodtool.resample import bicubic_up
from sodtool.srmetrics import psnr, ssim, to_uint8_range


def load_crops(folder: Path, n_crops: int, hr: int, seed: int, first: int, last: int) -> torch.Tensor:
    """uint8 [n, 3, hr, hr] random crops of images[first:last] (sorted file names)."""
    from PIL import Image

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in {".jpg", ".png"})[first:last]
    rng = np.random.default_rng(seed)
    imgs = []
    for f in files:
        a = np.asarray(Image.open(f).convert("RGB"))
        if min(a.shape[:2]) >= hr:
            imgs.append(a)
    out = np.empty((n_crops, 3, hr, hr), np.uint8)
    for i in range(n_crops):
        a = imgs[rng.integers(len(imgs))]
        y, x = rng.integers(a.shape[0] - hr + 1), rng.integers(a.shape[1] - hr + 1)
        out[i] = a[y:y + hr, x:x + hr].transpose(2, 0, 1)
    return torch.from_numpy(out)


def downsample(hr: torch.Tensor, scale: int = 4) -> torch.Tensor:
    """As sodtool downsample: antialiased bicubic, rounded, clamped, uint8."""
    s = hr.shape[-1] // scale
    lr = F.interpolate(hr.float(), size=(s, s), mode="bicubic", antialias=True, align_corners=False)
    return lr.round().clamp(0, 255).to(torch.uint8)


def evaluate(g: torch.nn.Module, lr: torch.Tensor, hr: torch.Tensor, dev) -> dict:
    g.eval()
    res = {"psnr_y": [], "ssim_y": [], "bicubic_psnr_y": [], "bicubic_ssim_y": []}
    with torch.no_grad():
        for i in range(0, len(lr), 32):
            x = lr[i:i + 32].float().div(255).to(dev)
            sr = to_uint8_range(g(x).float().cpu())
            bic = to_uint8_range(bicubic_up(x.cpu(), 4))
            for j in range(len(x)):
                y = hr[i + j].float() / 255
                res["psnr_y"].append(psnr(sr[j], y, border=4, y_channel=True))
                res["ssim_y"].append(ssim(sr[j], y, border=4, y_channel=True))
                res["bicubic_psnr_y"].append(psnr(bic[j], y, border=4, y_channel=True))
                res["bicubic_ssim_y"].append(ssim(bic[j], y, border=4, y_channel=True))
    g.train()
    return {k: round(float(np.mean(v)), 4) for k, v in res.items()}


def run(residual: bool, args, data, dev) -> dict:
    train_lr, train_hr, val_lr, val_hr = data
    seed_everything(args.seed)
    g = Generator(args.channels, args.up_channels, args.blocks, residual_bicubic=residual).to(dev)
    opt = torch.optim.Adam(g.parameters(), lr=args.lr, betas=(0.9, 0.999))
    rng = torch.Generator().manual_seed(args.seed)
    curve = [{"step": 0, **evaluate(g, val_lr, val_hr, dev)}]
    t_train = 0.0
    for step in range(1, args.iterations + 1):
        idx = torch.randint(len(train_lr), (args.batch_size,), generator=rng)
        x = train_lr[idx].float().div(255).to(dev)
        y = train_hr[idx].float().div(255).to(dev)
        t0 = time.perf_counter()
        loss = F.mse_loss(g(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t_train += time.perf_counter() - t0
        if step % args.eval_every == 0 or step == args.iterations:
            curve.append({"step": step, "train_mse": round(loss.item(), 6), **evaluate(g, val_lr, val_hr, dev)})
            print(json.dumps({"residual_bicubic": residual, **curve[-1]}), file=sys.stderr)
    if args.save is not None:
        from sodtool.checkpoint import save as save_checkpoint
        from sodtool.models.networks import generator_checkpoint

        save_checkpoint(generator_checkpoint(g), args.save / ("residual" if residual else "plain") / "generator.pt")
    return {
        "residual_bicubic": residual,
        "parameters": count_parameters(g),
        "train_crops_per_s": round(args.iterations * args.batch_size / t_train, 2),
        "curve": curve,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=Path, default=REPO.parent / "shared" / "data" / "coco128" / "images" / "train2017")
    ap.add_argument("--train-crops", type=int, default=2048)
    ap.add_argument("--val-crops", type=int, default=128)
    ap.add_argument("--val-images", type=int, default=28)
    ap.add_argument("--hr-size", type=int, default=128, help="HR crop side (LR = /4)")
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--channels", type=int, default=32)
    ap.add_argument("--up-channels", type=int, default=32)
    ap.add_argument("--blocks", type=int, default=5)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--configs", default="residual,plain", help="comma list of residual, plain")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save", type=Path, default=None, help="write SAVE/{residual,plain}/generator.pt (for sodtool eval sr)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    n = len([p for p in args.images.iterdir() if p.suffix.lower() in {".jpg", ".png"}])
    train_hr = load_crops(args.images, args.train_crops, args.hr_size, args.seed, 0, n - args.val_images)
    val_hr = load_crops(args.images, args.val_crops, args.hr_size, args.seed + 1, n - args.val_images, n)
    data = (downsample(train_hr), train_hr, downsample(val_hr), val_hr)
    results = []
    for c in args.configs.split(","):
        results.append(run(c.strip() == "residual", args, data, dev))
    print(json.dumps({
        "benchmark": "generator MSE pretraining, residual_bicubic on/off",
        "device": device_name(dev),
        "data": f"{args.train_crops} train / {args.val_crops} held-out {args.hr_size}px crops of {args.images} "
                f"(last {args.val_images} images held out), LR = antialiased bicubic /4",
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "metric": "mean PSNR/SSIM on the Y channel (BT.601), border 4, held-out crops",
        "results": results,
    }, indent=1))


if __name__ == "__main__":
    main()
