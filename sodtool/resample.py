"""Image resampling shared by the stages: the 4x bicubic pair that defines LR and its inverse.

- `bicubic_down`: how every LR crop is made (HR uint8 -> LR uint8, antialiased bicubic), by
  `sodtool downsample` for the stores and by `eval` for crops it cuts itself.
- `bicubic_up`: the bicubic upsampling of LR crops (PyTorch's kernel, a = -0.75, edges
  replicated), used by the generator's bicubic skip, the bicubic control, and the PSNR/SSIM
  baselines; `kernel="matlab"` gives MATLAB imresize's (a = -0.5, mirrored edges), with which
  published SR baselines were computed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SCALE = 4  # the paper's super-resolution factor: LR side = HR side / 4

# Rows per interpolate call: small batches stay in cache (16 rows ran 2-3x faster per row than 256).
DOWN_STEP = 16


def bicubic_down(hr: torch.Tensor, scale: int = SCALE) -> torch.Tensor:
    """uint8 [B, 3, S, S] -> uint8 [B, 3, S/scale, S/scale]: antialiased bicubic, rounded, clamped."""
    s = hr.shape[-1] // scale
    out = torch.empty((hr.shape[0], hr.shape[1], s, s), dtype=torch.uint8)
    for i in range(0, hr.shape[0], DOWN_STEP):
        lr = F.interpolate(hr[i:i + DOWN_STEP].float(), size=(s, s), mode="bicubic", antialias=True,
                           align_corners=False)
        out[i:i + DOWN_STEP] = lr.round_().clamp_(0, 255)
    return out


def bicubic_up(x: torch.Tensor, scale: int = SCALE, *, kernel: str = "torch") -> torch.Tensor:
    """Bicubic upsampling of float images [B, C, h, w] (or [C, h, w]) by an integer `scale`, unclamped.

    kernel="torch": F.interpolate (a = -0.75, edge pixels replicated). kernel="matlab": MATLAB
    imresize's bicubic (Keys cubic a = -0.5, mirrored edges), computed in float64.
    """
    squeeze = x.dim() == 3
    x = x.unsqueeze(0) if squeeze else x
    if kernel == "torch":
        out = F.interpolate(x.float(), scale_factor=scale, mode="bicubic", align_corners=False)
    elif kernel == "matlab":
        h, w = x.shape[-2:]
        wh = _matlab_cubic_matrix(h, scale).to(x.device)
        ww = _matlab_cubic_matrix(w, scale).to(x.device)
        out = (wh @ x.double() @ ww.T).to(torch.float32)
    else:
        raise ValueError(f"unknown bicubic kernel '{kernel}' (torch or matlab)")
    return out.squeeze(0) if squeeze else out


def _keys_cubic(x: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    ax = x.abs()
    ax2, ax3 = ax**2, ax**3
    near = (a + 2) * ax3 - (a + 3) * ax2 + 1
    far = a * ax3 - 5 * a * ax2 + 8 * a * ax - 4 * a
    return torch.where(ax <= 1, near, torch.where(ax < 2, far, torch.zeros_like(ax)))


def _matlab_cubic_matrix(n_in: int, scale: int) -> torch.Tensor:
    """[n_in * scale, n_in] interpolation matrix of MATLAB imresize(..., 'bicubic') upscaling."""
    n_out = n_in * scale
    u = torch.arange(1, n_out + 1, dtype=torch.float64) / scale + 0.5 * (1 - 1 / scale)  # 1-based input coords
    left = torch.floor(u - 2)
    taps = left.unsqueeze(1) + torch.arange(0, 5, dtype=torch.float64).unsqueeze(0)  # kernel width 4 (+1)
    weights = _keys_cubic(u.unsqueeze(1) - taps)
    weights = weights / weights.sum(dim=1, keepdim=True)
    idx = taps.long() - 1  # 0-based, then mirror (MATLAB's symmetric padding)
    period = 2 * n_in
    idx = torch.remainder(idx, period)
    idx = torch.where(idx >= n_in, period - 1 - idx, idx)
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    m.scatter_add_(1, idx, weights)
    return m
