"""Eq. 10 / Eq. 11 losses against hand-computed numbers, switches, and gradient flow."""

from __future__ import annotations

import math

import pytest
import torch

from sodtool.errors import InputError
from sodtool.losses import LossWeights, box_loss, discriminator_loss, generator_loss, total_variation
from sodtool.models.networks import DiscOut, Discriminator, Generator, set_requires_grad

# A tiny batch: N = 3, K = 2; row 0 is background.
LABEL = torch.tensor([0, 1, 2])
TARGET = torch.tensor([[9.0, 9.0, 9.0, 9.0], [0.01, -0.02, 0.1, 0.3], [0.2, 0.05, -0.1, 0.0]])  # raw deltas
W = (10.0, 10.0, 5.0, 5.0)
ADV_SR = [0.5, -1.0, 2.0]
ADV_HR = [1.5, 0.2, -0.3]
CLS_SR = [[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-1.0, 0.0, 3.0]]
CLS_HR = [[0.0, 0.0, 0.0], [1.0, 2.0, 0.5], [0.3, -0.4, 0.1]]
REG_SR = [[5.0, 5.0, 5.0, 5.0], [0.3, -0.1, 2.0, 1.2], [1.5, 0.0, -0.9, 0.4]]
REG_HR = [[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [2.5, 0.2, -0.5, 0.0]]


def out(adv, cls, reg=None) -> DiscOut:
    return DiscOut(torch.tensor(adv), torch.tensor(cls), None if reg is None else torch.tensor(reg))


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def ce(logits, u):
    return -math.log(math.exp(logits[u]) / sum(math.exp(v) for v in logits))


def sl1(x):
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def reg_expected(pred):
    total = 0.0
    for i in range(3):
        if LABEL[i] >= 1:
            total += sum(sl1(pred[i][j] - TARGET[i, j].item() * W[j]) for j in range(4))
    return total / 3  # divided by N, background rows included


def images():
    sr = torch.tensor([0.1, 0.5, 0.9, 0.0]).view(1, 1, 2, 2).repeat(3, 3, 1, 1)
    hr = torch.tensor([0.0, 0.5, 1.0, 0.2]).view(1, 1, 2, 2).repeat(3, 3, 1, 1)
    mse = (0.1**2 + 0 + 0.1**2 + 0.2**2) / 4
    return sr, hr, mse


def test_box_loss_hand_computed_and_background_ignored():
    got = box_loss(torch.tensor(REG_SR), LABEL, TARGET).item()
    # row 1: diffs 0.2, 0.1, 1.5, -0.3 -> 0.02 + 0.005 + 1.0 + 0.045; row 2: diffs -0.5, -0.5, -0.4, 0.4
    hand = ((0.02 + 0.005 + 1.0 + 0.045) + (0.125 + 0.125 + 0.08 + 0.08)) / 3
    assert got == pytest.approx(hand, rel=1e-6)
    assert got == pytest.approx(reg_expected(REG_SR), rel=1e-6)
    # whatever the background row holds (even NaN) changes nothing
    t = TARGET.clone()
    t[0] = float("nan")
    p = torch.tensor(REG_SR)
    p[0] = 1e6
    assert box_loss(p, LABEL, t).item() == pytest.approx(got, rel=1e-6)
    assert box_loss(p, torch.zeros(3, dtype=torch.long), t).item() == 0.0


@pytest.mark.parametrize("form", ["paper", "nonsaturating"])
def test_generator_loss_hand_computed(form):
    sr, hr, mse = images()
    w = LossWeights(adversarial=form)
    total, terms = generator_loss(sr, hr, out(ADV_SR, CLS_SR, REG_SR), LABEL, TARGET, w)
    if form == "paper":  # Eq. 5: mean log(1 - D(G(x)))
        adv = sum(math.log(1 - sigmoid(v)) for v in ADV_SR) / 3
    else:  # mean -log D(G(x))
        adv = sum(-math.log(sigmoid(v)) for v in ADV_SR) / 3
    cls = sum(ce(CLS_SR[i], int(LABEL[i])) for i in range(3)) / 3
    reg = reg_expected(REG_SR)
    assert set(terms) == {"g_mse", "g_adv", "g_cls", "g_reg", "g_total"}
    assert terms["g_mse"].item() == pytest.approx(mse, rel=1e-5)
    assert terms["g_adv"].item() == pytest.approx(adv, rel=1e-6)
    assert terms["g_cls"].item() == pytest.approx(cls, rel=1e-6)
    assert terms["g_reg"].item() == pytest.approx(reg, rel=1e-6)
    expected = mse + 1e-3 * adv + 1e-2 * cls + 1e-2 * reg
    assert total.item() == pytest.approx(expected, rel=1e-6)
    assert terms["g_total"].item() == total.item()
    assert all(not t.requires_grad for t in terms.values())


def test_discriminator_loss_hand_computed():
    w = LossWeights(alpha=0.5, beta=0.25, gamma=0.125)
    total, terms = discriminator_loss(out(ADV_HR, CLS_HR, REG_HR), out(ADV_SR, CLS_SR, REG_SR), LABEL, TARGET, w)
    real = sum(-math.log(sigmoid(v)) for v in ADV_HR) / 3
    fake = sum(-math.log(1 - sigmoid(v)) for v in ADV_SR) / 3
    cls_r = sum(ce(CLS_HR[i], int(LABEL[i])) for i in range(3)) / 3
    cls_f = sum(ce(CLS_SR[i], int(LABEL[i])) for i in range(3)) / 3
    reg_r, reg_f = reg_expected(REG_HR), reg_expected(REG_SR)
    expect = {"d_adv_real": real, "d_adv_fake": fake, "d_cls_real": cls_r, "d_cls_fake": cls_f,
              "d_reg_real": reg_r, "d_reg_fake": reg_f}
    assert set(terms) == set(expect) | {"d_total"}
    for k, v in expect.items():
        assert terms[k].item() == pytest.approx(v, rel=1e-6), k
    total_expected = 0.5 * (real + fake) + 0.25 * (cls_r + cls_f) + 0.125 * (reg_r + reg_f)
    assert total.item() == pytest.approx(total_expected, rel=1e-6)


def test_total_variation_hand_computed():
    img = torch.tensor([[0.0, 3.0], [4.0, 1.0]]).view(1, 1, 2, 2)
    # one (H-1) x (W-1) point: dx = 3, dy = 4 -> 5
    assert total_variation(img).item() == pytest.approx(5.0, rel=1e-6)
    sr, hr, mse = images()
    w = LossWeights(tv=0.5, adv=False, cls=False, reg=False)
    total, terms = generator_loss(sr, hr, out(ADV_SR, CLS_SR, REG_SR), LABEL, TARGET, w)
    # each channel image [[0.1, 0.5], [0.9, 0.0]]: dx = 0.4, dy = 0.8
    tv = math.sqrt(0.4**2 + 0.8**2 + 1e-6)
    assert terms["g_tv"].item() == pytest.approx(tv, rel=1e-5)
    assert total.item() == pytest.approx(mse + 0.5 * tv, rel=1e-5)


@pytest.mark.parametrize(
    "switch,g_keys,d_keys",
    [
        ("adv", {"g_mse", "g_cls", "g_reg"}, {"d_cls_real", "d_cls_fake", "d_reg_real", "d_reg_fake"}),
        ("cls", {"g_mse", "g_adv", "g_reg"}, {"d_adv_real", "d_adv_fake", "d_cls_real", "d_cls_fake", "d_reg_real", "d_reg_fake"}),
        ("reg", {"g_mse", "g_adv", "g_cls"}, {"d_adv_real", "d_adv_fake", "d_cls_real", "d_cls_fake", "d_reg_real", "d_reg_fake"}),
    ],
)
def test_each_switch_removes_exactly_its_terms(switch, g_keys, d_keys):
    sr, hr, _ = images()
    w = LossWeights(**{switch: False})
    weight = {"g_mse": 1.0, "g_adv": w.alpha, "g_cls": w.beta, "g_reg": w.gamma}
    total, terms = generator_loss(sr, hr, out(ADV_SR, CLS_SR, REG_SR), LABEL, TARGET, w)
    assert set(terms) == g_keys | {"g_total"}
    assert total.item() == pytest.approx(sum(weight[k] * terms[k].item() for k in g_keys), rel=1e-6)
    _, full = generator_loss(sr, hr, out(ADV_SR, CLS_SR, REG_SR), LABEL, TARGET, LossWeights())
    for k in g_keys:  # the remaining terms are unchanged
        assert terms[k].item() == full[k].item()
    dw = {"d_adv_real": w.alpha, "d_adv_fake": w.alpha, "d_cls_real": w.beta, "d_cls_fake": w.beta,
          "d_reg_real": w.gamma, "d_reg_fake": w.gamma}
    total, terms = discriminator_loss(out(ADV_HR, CLS_HR, REG_HR), out(ADV_SR, CLS_SR, REG_SR), LABEL, TARGET, w)
    assert set(terms) == d_keys | {"d_total"}
    assert total.item() == pytest.approx(sum(dw[k] * terms[k].item() for k in d_keys), rel=1e-6)


def test_no_reg_branch_means_no_reg_terms_anywhere():
    sr, hr, _ = images()
    _, g_terms = generator_loss(sr, hr, out(ADV_SR, CLS_SR), LABEL, TARGET, LossWeights())
    _, d_terms = discriminator_loss(out(ADV_HR, CLS_HR), out(ADV_SR, CLS_SR), LABEL, TARGET, LossWeights())
    assert "g_reg" not in g_terms and not any(k.startswith("d_reg") for k in d_terms)


def test_extreme_logits_stay_finite():
    sr, hr, _ = images()
    big = [200.0, -200.0, 90.0]
    cls = [[300.0, -300.0, 0.0]] * 3
    for form in ("paper", "nonsaturating"):
        total, terms = generator_loss(sr, hr, out(big, cls, REG_SR), LABEL, TARGET, LossWeights(adversarial=form))
        assert torch.isfinite(total) and all(torch.isfinite(v) for v in terms.values())
    # paper form: log(1 - sigmoid(200)) = -200 (not -inf)
    _, terms = generator_loss(sr, hr, out(big, cls, REG_SR), LABEL, TARGET, LossWeights())
    assert terms["g_adv"].item() == pytest.approx((-200.0 - 0.0 - 90.0) / 3, rel=1e-6)
    total, _ = discriminator_loss(out(big, cls, REG_SR), out(big, cls, REG_SR), LABEL, TARGET, LossWeights())
    assert torch.isfinite(total)


def test_loss_weights_validation():
    with pytest.raises(InputError, match="unknown adversarial loss form 'wgan'"):
        LossWeights(adversarial="wgan")
    with pytest.raises(InputError, match="alpha"):
        LossWeights(alpha=-1.0)


def _nets():
    torch.manual_seed(0)
    g = Generator(channels=8, up_channels=8, num_blocks=1)
    d = Discriminator(num_classes=2, arch="resnet18")
    lr = torch.rand(3, 3, 8, 8)
    hr = torch.rand(3, 3, 32, 32)
    return g, d, lr, hr


def test_generator_step_gradients_reach_g_not_d():
    g, d, lr, hr = _nets()
    set_requires_grad(d, False)  # D fixed during the G step
    d_before = {k: v.clone() for k, v in d.state_dict().items() if "running" not in k and "num_batches" not in k}
    opt = torch.optim.Adam(g.parameters(), lr=1e-3)
    for name, only in (("cls", dict(adv=False, reg=False)), ("reg", dict(adv=False, cls=False))):
        g.zero_grad(set_to_none=True)
        sr = g(lr)
        with_term, _ = generator_loss(sr, hr, d(sr), LABEL, TARGET, LossWeights(**only))
        mse_only, _ = generator_loss(sr, hr, d(sr), LABEL, TARGET, LossWeights(adv=False, cls=False, reg=False))
        (with_term - mse_only).backward()  # = beta * CE or gamma * reg: the task term alone
        grads = [p.grad for p in g.parameters()]
        assert all(gr is not None for gr in grads), name
        assert g.head[0].weight.grad.abs().sum() > 0, name  # reaches the first layer through D
        assert g.tail.weight.grad.abs().sum() > 0, name
    g.zero_grad(set_to_none=True)
    sr = g(lr)
    total, _ = generator_loss(sr, hr, d(sr), LABEL, TARGET, LossWeights())
    total.backward()
    opt.step()
    assert all(p.grad is None for p in d.parameters())
    for k, v in d.state_dict().items():
        if k in d_before:
            assert torch.equal(v, d_before[k]), k


def test_discriminator_step_gives_g_no_gradient():
    g, d, lr, hr = _nets()
    opt = torch.optim.SGD(d.parameters(), lr=0.01)
    sr = g(lr).detach()  # G fixed during the D step
    total, _ = discriminator_loss(d(hr), d(sr), LABEL, TARGET, LossWeights())
    total.backward()
    assert all(p.grad is None for p in g.parameters())
    for head in (d.adv_head, d.cls_head, d.reg_head):
        assert head.weight.grad.abs().sum() > 0
    w0 = d.cls_head.weight.clone()
    opt.step()
    assert not torch.equal(w0, d.cls_head.weight)
