"""The SOD-MTGAN training losses: Eq. 10 (generator step) and Eq. 11 (discriminator step).

Notation (DESIGN.md section 5): x the LR crop, y the HR crop, G(x) the SR crop, u the class
(0 = background, 1..K), v the box target. Every term is computed from logits in a numerically
stable form and in float32 (also under bf16 autocast).

Normalisations (N = batch size):
- MSE: mean over all N*3*H*W pixel values of images in [0, 1] (the per-pixel mean of SRGAN /
  BasicSR; Eq. 4's 1/N * sum ||.||^2 with the squared norm taken per pixel). With the sum over
  pixels instead, alpha/beta/gamma would be 3*128*128 times smaller in effect.
- adversarial, classification: mean over the N rows.
- box regression (Eq. 7): smooth L1 with beta = 1 (Eq. 8, as Fast R-CNN) between D's reg output
  and v * BOX_WEIGHTS (the store holds raw deltas; D predicts weighted deltas), summed over the
  4 coordinates and over the positive rows (u >= 1) only, divided by N (all rows, background
  included). A batch without positives gives 0.

Generator step (Eq. 10, D fixed):
    L_G = mse + alpha * adv_G + beta * CE(D_cls(G(x)), u) + gamma * reg(D_reg(G(x)), v) + tv * TV(G(x))
  adv_G, "paper":         mean log(1 - sigmoid(l)) = mean -softplus(l)   (Eq. 5; l = D_adv(G(x)))
  adv_G, "nonsaturating": mean -log sigmoid(l)    = mean softplus(-l)   (Goodfellow et al.)
Discriminator step (Eq. 11, G fixed; pass D(G(x).detach())):
    L_D = alpha * (BCE(D_adv(y), 1) + BCE(D_adv(G(x)), 0))
        + beta  * (CE(D_cls(y), u) + CE(D_cls(G(x)), u))
        + gamma * (reg(D_reg(y), v) + reg(D_reg(G(x)), v))

Switches (the ablations of paper Table 3):
- adv=False ("w/o adv loss") removes the adversarial terms from BOTH losses: G gets no
  adversarial gradient and the real/fake head is not trained (nothing would use it).
- cls=False / reg=False ("w/o cls loss" / "w/o reg loss") remove the classification /
  regression term from the GENERATOR loss only. Sec. 4.3 describes these ablations as adding
  each loss "in the loss function of the generator" to the MSE loss; the discriminator keeps
  its classification and regression terms because at test time its class scores and boxes
  replace the baseline's (DESIGN.md section 6): without them the ablated model could not
  detect at all, and Table 3 still reports APs for these rows.
- A discriminator built with reg_branch=False ("w/o reg+ branch", `DiscOut.reg is None`) has no
  regression terms at all, in either loss, whatever `reg` says.
- tv: Gu et al.'s total-variation weight (paper 001), 0 by default = no term.
The MSE term is always there.

Returned terms: a dict of detached float32 scalar tensors holding the UNWEIGHTED terms, e.g.
{"g_mse", "g_adv", "g_cls", "g_reg", "g_tv", "g_total"} and {"d_adv_real", "d_adv_fake",
"d_cls_real", "d_cls_fake", "d_reg_real", "d_reg_fake", "d_total"}; the *_total entries are the
weighted sums that are returned as the loss. A term that is switched off is OMITTED from the
dict (not reported as 0), so the keys present are exactly the terms in the total.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sodtool.boxes import BOX_WEIGHTS
from sodtool.errors import InputError

ADVERSARIAL_FORMS = ("paper", "nonsaturating")


@dataclass(frozen=True)
class LossWeights:
    """Weights and switches of Eq. 10/11. Paper values: alpha = 1e-3, beta = gamma = 1e-2."""

    alpha: float = 1e-3
    beta: float = 1e-2
    gamma: float = 1e-2
    tv: float = 0.0
    adv: bool = True
    cls: bool = True
    reg: bool = True
    adversarial: str = "paper"

    def __post_init__(self) -> None:
        if self.adversarial not in ADVERSARIAL_FORMS:
            raise InputError(f"unknown adversarial loss form '{self.adversarial}' (use paper or nonsaturating)")
        for name in ("alpha", "beta", "gamma", "tv"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v >= 0 and v == v and v != float("inf")):
                raise InputError(f"loss weight {name} must be a finite number >= 0, got {v}")


def box_loss(pred: torch.Tensor, label: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Eq. 7 for one set of predictions: sum over coords and positive rows of smooth L1 / N.

    pred: [N, 4] weighted deltas from D; label: [N] int64 (0 = background); target: [N, 4]
    raw deltas (multiplied by BOX_WEIGHTS here). Background rows contribute nothing (their
    targets are ignored, whatever they hold).
    """
    n = pred.shape[0]
    pred = pred.float()
    weights = torch.tensor(BOX_WEIGHTS, dtype=torch.float32, device=pred.device)
    tgt = target.to(device=pred.device, dtype=torch.float32) * weights
    pos = (label >= 1).to(pred.device)
    per = F.smooth_l1_loss(pred, tgt, beta=1.0, reduction="none").sum(dim=1)
    # where() rather than indexing: same value, no host sync, and NaN-free for bad background targets
    return torch.where(pos, per, torch.zeros_like(per)).sum() / max(n, 1)


def total_variation(img: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Isotropic TV (Gu et al.): mean over pixels and channels of ||grad img||_2 (forward
    differences on the (H-1) x (W-1) grid; `eps` keeps the gradient finite at 0). img [B, C, H, W]."""
    img = img.float()
    dx = img[:, :, :-1, 1:] - img[:, :, :-1, :-1]
    dy = img[:, :, 1:, :-1] - img[:, :, :-1, :-1]
    return torch.sqrt(dx * dx + dy * dy + eps).mean()


def generator_loss(sr, hr, d_out_sr, label, target, w: LossWeights):
    """Eq. 10, the generator step (D fixed: freeze D's parameters before calling D(sr)).

    sr: G(x) float [N, 3, S, S]; hr: y float [N, 3, S, S] in [0, 1]; d_out_sr: DiscOut of D(sr)
    (NOT detached: the gradient reaches G through D); label: [N] int64 0..K; target: [N, 4]
    raw deltas. Returns (total scalar tensor, terms dict) as in the module docstring.
    """
    _check(label, target, d_out_sr.cls.shape[0])
    label = label.to(device=d_out_sr.cls.device, dtype=torch.int64)
    terms: dict[str, torch.Tensor] = {}
    mse = F.mse_loss(sr.float(), hr.float())
    terms["g_mse"] = mse
    total = mse
    if w.adv:
        logit = d_out_sr.adv.float()
        adv = (-F.softplus(logit) if w.adversarial == "paper" else F.softplus(-logit)).mean()
        terms["g_adv"] = adv
        total = total + w.alpha * adv
    if w.cls:
        ce = F.cross_entropy(d_out_sr.cls.float(), label)
        terms["g_cls"] = ce
        total = total + w.beta * ce
    if w.reg and d_out_sr.reg is not None:
        reg = box_loss(d_out_sr.reg, label, target)
        terms["g_reg"] = reg
        total = total + w.gamma * reg
    if w.tv > 0:
        tv = total_variation(sr)
        terms["g_tv"] = tv
        total = total + w.tv * tv
    terms["g_total"] = total
    return total, {k: v.detach() for k, v in terms.items()}


def discriminator_loss(d_out_hr, d_out_sr, label, target, w: LossWeights):
    """Eq. 11, the discriminator step (G fixed: d_out_sr = D(G(x).detach())).

    d_out_hr / d_out_sr: DiscOut of D(y) and D(G(x)); label: [N] int64; target: [N, 4] raw
    deltas. The classification and regression terms stay when w.cls / w.reg are off (they
    switch off the generator's terms only, see the module docstring); the adversarial terms go
    with w.adv. Returns (total, terms).
    """
    n = d_out_hr.cls.shape[0]
    if d_out_sr.cls.shape[0] != n:
        raise ValueError(f"real and fake batches differ in size: {n} vs {d_out_sr.cls.shape[0]}")
    _check(label, target, n)
    label = label.to(device=d_out_hr.cls.device, dtype=torch.int64)
    terms: dict[str, torch.Tensor] = {}
    total = torch.zeros((), dtype=torch.float32, device=d_out_hr.cls.device)
    if w.adv:
        real = F.binary_cross_entropy_with_logits(d_out_hr.adv.float(), torch.ones_like(d_out_hr.adv, dtype=torch.float32))
        fake = F.binary_cross_entropy_with_logits(d_out_sr.adv.float(), torch.zeros_like(d_out_sr.adv, dtype=torch.float32))
        terms["d_adv_real"], terms["d_adv_fake"] = real, fake
        total = total + w.alpha * (real + fake)
    cls_real = F.cross_entropy(d_out_hr.cls.float(), label)
    cls_fake = F.cross_entropy(d_out_sr.cls.float(), label)
    terms["d_cls_real"], terms["d_cls_fake"] = cls_real, cls_fake
    total = total + w.beta * (cls_real + cls_fake)
    if d_out_hr.reg is not None and d_out_sr.reg is not None:
        reg_real = box_loss(d_out_hr.reg, label, target)
        reg_fake = box_loss(d_out_sr.reg, label, target)
        terms["d_reg_real"], terms["d_reg_fake"] = reg_real, reg_fake
        total = total + w.gamma * (reg_real + reg_fake)
    terms["d_total"] = total
    return total, {k: v.detach() for k, v in terms.items()}


def _check(label: torch.Tensor, target: torch.Tensor, n: int) -> None:
    if label.dim() != 1 or label.shape[0] != n:
        raise ValueError(f"label must be [N={n}], got shape {tuple(label.shape)}")
    if label.dtype not in (torch.int64, torch.int32, torch.uint8):
        raise ValueError(f"label must be an integer tensor, got {label.dtype}")
    if target.shape != (n, 4):
        raise ValueError(f"target must be [N={n}, 4], got shape {tuple(target.shape)}")
