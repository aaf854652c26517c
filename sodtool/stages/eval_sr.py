"""`sodtool eval sr`: PSNR / SSIM of the generator against bicubic on standard SR test images.

Input: a folder with `HR/` and `LR/` holding same-named images (PNG, or anything PIL reads),
e.g. ../shared/data/sr/Set5; each LR image is the x`scale` reduction of its HR image.

Methods measured on every image (metrics in `sodtool.srmetrics`: RGB and BT.601 Y channel,
`border` px cropped from each side, data range 255):
- `bicubic`: PyTorch bicubic upscaling of the LR file (the baseline sodtool's generator sees,
  and what its bicubic skip adds to);
- `bicubic_matlab`: MATLAB imresize's bicubic kernel, with which published baselines were made
  (so the table can be compared with the literature);
- `generator`: the generator of a checkpoint, run on the whole LR image at once (it is fully
  convolutional) in float32, output clamped and rounded to 8 bits as a saved PNG would be.

Greyscale images (e.g. Set14/img_003) are converted to RGB (R = G = B) for the generator and
for the RGB metrics. For their Y-channel metrics the grey level itself is compared (the HR grey
value against the full-range luma (Y - 16) / 219 of the output, which is the grey value for a
grey output), as the MATLAB evaluation scripts of the SR literature do (they skip rgb2ycbcr
for single-channel images); BT.601 Y of a grey image would compress it to 16..235 and flatter
that image.

Sizes: an HR image must be `scale` x its LR image. HR sides up to `scale` - 1 px larger are
cropped at the right/bottom to `scale` x LR (the "modcrop" of SR datasets); any other
mismatch is an InputError naming the file.

Outputs in `out`: metrics.json (per-image and mean numbers, border and conventions stated),
metrics.md (Markdown tables), optionally images/<name>_sr.png, and manifest.json (last).
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import numpy as np
import torch

from sodtool.artefacts import Timer, atomic_path, check_output, staged_dir, write_json, write_manifest, write_text
from sodtool.configs.eval_sr import EvalSRConfig
from sodtool.console import print_table, track
from sodtool.device import device_name, resolve_device
from sodtool.errors import InputError
from sodtool.models.networks import generator_config, generator_file, generator_from_checkpoint
from sodtool.resample import bicubic_up
from sodtool.srmetrics import psnr, rgb_to_grey, ssim, to_uint8_range

IMAGE_SUFFIXES = {".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff", ".ppm", ".pgm"}
GREY_MODES = {"1", "L", "LA"}
COLOUR_MODES = {"RGB", "RGBA", "P", "CMYK", "YCbCr"}
METRIC_KEYS = ("psnr_rgb", "ssim_rgb", "psnr_y", "ssim_y")


def eval_sr(cfg: EvalSRConfig) -> dict:
    """Evaluate; returns the metrics dict written to metrics.json (see module docstring)."""
    timer = Timer()
    if cfg.scale < 1:
        raise InputError(f"--scale must be >= 1, got {cfg.scale}")
    if cfg.border < 0:
        raise InputError(f"--border must be >= 0, got {cfg.border}")
    out = check_output(cfg.out, "folder", overwrite=cfg.overwrite) if cfg.out is not None else None
    dev = resolve_device(cfg.device)
    pairs = find_pairs(Path(cfg.data))

    gen = None
    gen_path = None
    if cfg.generator is not None:
        gen_path = generator_file(cfg.generator)
        gen = generator_from_checkpoint(gen_path, dev)
        if gen.scale != cfg.scale:
            raise InputError(f"the generator in {gen_path} upscales x{gen.scale}, but --scale is {cfg.scale}")

    # Written in a folder swapped onto `out` once complete (nothing written without --out).
    with contextlib.ExitStack() as stack:
        work = stack.enter_context(staged_dir(out)) if out is not None else None
        methods = ["bicubic", "bicubic_matlab"] + (["generator"] if gen is not None else [])
        per_image = []
        for name, hr_path, lr_path in track(pairs, "eval sr"):
            hr, grey = read_rgb(hr_path)
            lr, _ = read_rgb(lr_path)
            hr, cropped = match_sizes(hr, lr, cfg.scale, hr_path, lr_path)
            min_side = 2 * cfg.border + 11
            if min(hr.shape[-2:]) < min_side:
                raise InputError(f"{hr_path} is {hr.shape[-1]}x{hr.shape[-2]} px: too small for SSIM with a border of {cfg.border} (needs {min_side} px)")
            outputs = {
                "bicubic": to_uint8_range(bicubic_up(lr, cfg.scale, kernel="torch")),
                "bicubic_matlab": to_uint8_range(bicubic_up(lr, cfg.scale, kernel="matlab")),
            }
            if gen is not None:
                with torch.no_grad():
                    sr = gen(lr.unsqueeze(0).to(dev)).squeeze(0).float().cpu()
                outputs["generator"] = to_uint8_range(sr)
            row = {"name": name, "hr_size": [int(hr.shape[-1]), int(hr.shape[-2])], "greyscale": grey, "hr_cropped": cropped}
            for m in methods:
                row[m] = measure(outputs[m], hr, cfg.border, grey)
            per_image.append(row)
            if cfg.save_images and work is not None and gen is not None:
                _save_png(outputs["generator"], work / "images" / f"{Path(name).stem}_sr.png")

        mean = {m: {k: _mean([r[m][k] for r in per_image]) for k in METRIC_KEYS} for m in methods}
        metrics = {
            "data": str(cfg.data),
            "generator": str(gen_path) if gen_path is not None else None,
            "generator_config": None,
            "scale": cfg.scale,
            "border": cfg.border,
            "num_images": len(per_image),
            "conventions": {
                "border": f"{cfg.border} px cropped from each side before measuring",
                "psnr": "10 log10(255^2 / MSE) on 8-bit-rounded outputs; mean of per-image values",
                "ssim": "Wang et al. 2004: Gaussian 11x11, sigma 1.5, K1 0.01, K2 0.03, L 255, valid filtering; RGB = mean of channels",
                "y_channel": "ITU-R BT.601 Y = 16 + 65.481 R + 128.553 G + 24.966 B (MATLAB rgb2ycbcr, not rounded)",
                "greyscale": "converted to RGB for the generator; Y metrics compare the grey level (HR) with (Y - 16) / 219 of the output",
                "bicubic": "PyTorch F.interpolate bicubic (a = -0.75) of the LR file",
                "bicubic_matlab": "MATLAB imresize bicubic (a = -0.5, symmetric edges) of the LR file",
            },
            "mean": mean,
            "images": per_image,
        }
        if gen is not None:
            metrics["generator_config"] = generator_config(gen)
        metrics = _json_safe(metrics)

        title = f"SR x{cfg.scale} on {Path(cfg.data).name} ({len(per_image)} images, border {cfg.border} px)"
        header = ["method", "PSNR RGB", "SSIM RGB", "PSNR Y", "SSIM Y"]
        rows = [[m] + [_fmt(mean[m][k], k) for k in METRIC_KEYS] for m in methods]
        print_table(title, header, rows)

        if work is not None:
            write_json(work / "metrics.json", metrics)
            write_text(work / "metrics.md", markdown(metrics, methods, title))
            write_manifest(
                work, "eval-sr", cfg, {"generator": gen_path, "data": cfg.data},
                {"mean": metrics["mean"], "border": cfg.border, "scale": cfg.scale, "num_images": len(per_image)},
                seed=None, device=device_name(dev), wall_time_s=timer.elapsed,
            )
    return metrics


def measure(sr: torch.Tensor, hr: torch.Tensor, border: int, grey: bool) -> dict:
    """PSNR/SSIM (RGB and Y) of one output [3, H, W] against its HR image [3, H, W], both [0, 1]."""
    res = {"psnr_rgb": psnr(sr, hr, border=border), "ssim_rgb": ssim(sr, hr, border=border)}
    if grey:
        a, b = rgb_to_grey(sr), hr[:1].double()
        res["psnr_y"], res["ssim_y"] = psnr(a, b, border=border), ssim(a, b, border=border)
    else:
        res["psnr_y"] = psnr(sr, hr, border=border, y_channel=True)
        res["ssim_y"] = ssim(sr, hr, border=border, y_channel=True)
    return res


def find_pairs(data: Path) -> list[tuple[str, Path, Path]]:
    """(name, HR path, LR path) for every image in data/HR, sorted by name; LR partners required."""
    hr_dir, lr_dir = data / "HR", data / "LR"
    if not hr_dir.is_dir() or not lr_dir.is_dir():
        raise InputError(f"{data} must hold HR/ and LR/ folders of same-named images (like ../shared/data/sr/Set5)")
    hr = {p.name: p for p in hr_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    lr = {p.name: p for p in lr_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    if not hr:
        raise InputError(f"{hr_dir} holds no images")
    missing = sorted(set(hr) - set(lr))
    if missing:
        raise InputError(f"{lr_dir} has no LR image for {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    extra = sorted(set(lr) - set(hr))
    if extra:
        raise InputError(f"{hr_dir} has no HR image for {extra[0]}" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    return [(n, hr[n], lr[n]) for n in sorted(hr)]


def read_rgb(path: Path) -> tuple[torch.Tensor, bool]:
    """Image file -> (float [3, H, W] in [0, 1], was it greyscale); unreadable -> InputError."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode not in GREY_MODES and mode not in COLOUR_MODES:
                raise InputError(f"{path}: image mode {mode} not supported (use 8-bit greyscale or RGB)")
            arr = np.array(im.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise InputError(f"{path} cannot be read as an image: {e}") from e
    return torch.from_numpy(arr).permute(2, 0, 1).float() / 255.0, mode in GREY_MODES


def match_sizes(hr: torch.Tensor, lr: torch.Tensor, scale: int, hr_path: Path, lr_path: Path) -> tuple[torch.Tensor, bool]:
    """HR cropped to scale x LR when it is up to scale - 1 px larger; other mismatches -> InputError."""
    h, w = lr.shape[-2:]
    hh, hw = hr.shape[-2:]
    if not (scale * h <= hh < scale * (h + 1) and scale * w <= hw < scale * (w + 1)):
        raise InputError(
            f"{hr_path} is {hw}x{hh} px but its LR image {lr_path} is {w}x{h} px: HR must be {scale} x LR "
            f"({scale * w}x{scale * h}, up to {scale - 1} px more)"
        )
    cropped = (hh, hw) != (scale * h, scale * w)
    return hr[:, : scale * h, : scale * w], cropped


def markdown(metrics: dict, methods: list[str], title: str) -> str:
    lines = [f"# {title}", ""]
    if metrics.get("generator"):
        lines += [f"Generator: `{metrics['generator']}` ({metrics['generator_config']})", ""]
    lines += [f"Border: {metrics['border']} px cropped from each side. Y: ITU-R BT.601 (MATLAB rgb2ycbcr).", ""]
    lines += ["| method | PSNR RGB (dB) | SSIM RGB | PSNR Y (dB) | SSIM Y |", "| --- | ---: | ---: | ---: | ---: |"]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(_fmt(metrics["mean"][m][k], k) for k in METRIC_KEYS) + " |")
    lines += ["", "Per image (Y channel, PSNR dB / SSIM):", ""]
    lines += ["| image | size | " + " | ".join(methods) + " |", "| --- | --- | " + " | ".join("---:" for _ in methods) + " |"]
    for r in metrics["images"]:
        note = " (grey)" if r["greyscale"] else ""
        cells = [f"{_fmt(r[m]['psnr_y'], 'psnr')} / {_fmt(r[m]['ssim_y'], 'ssim')}" for m in methods]
        lines.append(f"| {r['name']}{note} | {r['hr_size'][0]}x{r['hr_size'][1]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _mean(values: list[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


def _fmt(v, key: str) -> str:
    if v is None:
        return "inf" if key.startswith("psnr") else "-"
    return f"{v:.2f}" if key.startswith("psnr") else f"{v:.4f}"


def _json_safe(obj):
    """inf (identical images) and nan have no JSON form: written as null."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _save_png(img: torch.Tensor, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    arr = (img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")
