"""Super-resolution quality metrics: PSNR and SSIM in RGB and on the Y channel.

Conventions (those of the SR literature's MATLAB evaluation scripts and BasicSR):
- Images are float tensors in [0, 1], [3, H, W] (or [1, H, W] for a single channel). The bicubic
  baselines are `sodtool.resample.bicubic_up`.
  Metrics are computed on the 0..255 scale (data range 255) in float64. Quantise network
  outputs to 8 bits first (`to_uint8_range`) to measure what a saved PNG would hold.
- Y channel: ITU-R BT.601 luma as MATLAB's rgb2ycbcr,
      Y = 16 + 65.481 R + 128.553 G + 24.966 B   (R, G, B in [0, 1]; Y in [16, 235]),
  i.e. rgb2ycbcr's [0, 1] output times 255. Y is not rounded to integers.
- `border` pixels are cropped from every side before measuring (the scale factor, by convention).
- PSNR = 10 log10(255^2 / MSE), MSE over all pixels (and all 3 channels for RGB); inf when equal.
- SSIM (Wang et al. 2004): 11x11 Gaussian window, sigma 1.5, K1 = 0.01, K2 = 0.03, L = 255,
  population (not sample) statistics, 'valid' filtering (no padding), mean of the SSIM map;
  for RGB the mean of the three per-channel SSIMs (skimage's channel_axis, BasicSR).
"""

from __future__ import annotations

import math

import torch

BT601 = (65.481, 128.553, 24.966)
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
DATA_RANGE = 255.0


def to_uint8_range(img: torch.Tensor) -> torch.Tensor:
    """Clamp to [0, 1] and round to the 256 levels of an 8-bit image (still float in [0, 1])."""
    return torch.round(img.clamp(0.0, 1.0) * 255.0) / 255.0


def rgb_to_y(img: torch.Tensor) -> torch.Tensor:
    """[..., 3, H, W] RGB in [0, 1] -> [..., 1, H, W] BT.601 luma on the 16..235 scale (float64)."""
    if img.shape[-3] != 3:
        raise ValueError(f"rgb_to_y expects 3 channels, got shape {tuple(img.shape)}")
    x = img.double()
    y = 16.0 + BT601[0] * x[..., 0, :, :] + BT601[1] * x[..., 1, :, :] + BT601[2] * x[..., 2, :, :]
    return y.unsqueeze(-3)


def rgb_to_grey(img: torch.Tensor) -> torch.Tensor:
    """[..., 3, H, W] in [0, 1] -> [..., 1, H, W] full-range BT.601 luma in [0, 1] (float64):
    (Y - 16) / 219, which is exactly g for a grey pixel R = G = B = g."""
    return (rgb_to_y(img) - 16.0) / 219.0


def _prepare(a: torch.Tensor, b: torch.Tensor, border: int, y_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if a.shape != b.shape or a.dim() != 3 or a.shape[0] not in (1, 3) or (y_channel and a.shape[0] != 3):
        raise ValueError(
            f"expected two [3, H, W] (or [1, H, W] without y_channel) images of equal shape, "
            f"got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if y_channel:
        a, b = rgb_to_y(a), rgb_to_y(b)
    else:
        a, b = a.double() * DATA_RANGE, b.double() * DATA_RANGE
    if border > 0:
        if a.shape[-1] <= 2 * border or a.shape[-2] <= 2 * border:
            raise ValueError(f"image {tuple(a.shape[-2:])} too small for a border of {border}")
        a = a[..., border:-border, border:-border]
        b = b[..., border:-border, border:-border]
    return a, b


def psnr(a: torch.Tensor, b: torch.Tensor, *, border: int = 0, y_channel: bool = False) -> float:
    """PSNR in dB between [C, H, W] images in [0, 1] (data range 255); inf for identical images."""
    a, b = _prepare(a, b, border, y_channel)
    mse = torch.mean((a - b) ** 2).item()
    return math.inf if mse == 0 else 10.0 * math.log10(DATA_RANGE**2 / mse)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Normalised 2-D Gaussian [size, size] (float64), MATLAB fspecial('gaussian', size, sigma)."""
    g = gaussian_taps(size, sigma)
    return torch.outer(g, g)


def ssim(a: torch.Tensor, b: torch.Tensor, *, border: int = 0, y_channel: bool = False) -> float:
    """Mean SSIM between [C, H, W] images in [0, 1] (mean over channels); 1.0 when equal."""
    a, b = _prepare(a, b, border, y_channel)
    return ssim_map(a, b).mean(dim=(-2, -1)).mean().item()


def gaussian_taps(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """The normalised 1-D Gaussian [size] (float64) whose outer product is `gaussian_window`."""
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    return g / g.sum()


def _filter_valid(x: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """Separable 'valid' filtering of [..., H, W] by shift-and-add: exact in float64 and several
    times faster on CPU than a float64 conv2d (which has no optimised kernel)."""
    k = taps.numel()
    n = x.shape[-2] - k + 1
    y = sum(taps[i] * x[..., i : i + n, :] for i in range(k))
    m = x.shape[-1] - k + 1
    return sum(taps[i] * y[..., :, i : i + m] for i in range(k))


def ssim_map(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SSIM map [C, H-10, W-10] of [C, H, W] images already on the 0..255 scale ('valid' filter)."""
    if a.shape[-1] < SSIM_WINDOW or a.shape[-2] < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} px, got {tuple(a.shape[-2:])}")
    a, b = a.double(), b.double()
    taps = gaussian_taps().to(a.device)
    mu_a, mu_b, e_aa, e_bb, e_ab = _filter_valid(torch.stack([a, b, a * a, b * b, a * b]), taps)
    c1 = (SSIM_K1 * DATA_RANGE) ** 2
    c2 = (SSIM_K2 * DATA_RANGE) ** 2
    var_a = e_aa - mu_a**2
    var_b = e_bb - mu_b**2
    cov = e_ab - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return num / den
