"""Generator / discriminator shapes, initialisation, ImageNet weight loading, checkpoints."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from sodtool.errors import InputError
from sodtool.models.networks import (
    DiscOut,
    Discriminator,
    Generator,
    discriminator_checkpoint,
    discriminator_config,
    discriminator_from_checkpoint,
    generator_checkpoint,
    generator_config,
    generator_file,
    generator_from_checkpoint,
)
from sodtool.checkpoint import save as save_checkpoint
from sodtool.resample import bicubic_up

LIGHT = dict(channels=32, up_channels=64, num_blocks=2)


def _convs(m: nn.Module):
    return [x for x in m.modules() if isinstance(x, (nn.Conv2d, nn.ConvTranspose2d))]


def test_generator_paper_size_shapes():
    torch.manual_seed(0)
    g = Generator()  # 64 / 256 / 5 blocks: paper Table 1
    assert len(g.blocks) == 5 and len(_convs(g)) == 2 + 2 * 5 + 2 + 1
    up = [m for m in g.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert [(m.out_channels, m.kernel_size, m.stride) for m in up] == [(256, (3, 3), (2, 2))] * 2
    assert g.head[0].kernel_size == (9, 9) and g.tail.kernel_size == (9, 9) and g.tail.out_channels == 3
    with torch.no_grad():
        out = g(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 3, 128, 128) and out.dtype == torch.float32


@pytest.mark.parametrize("residual_bicubic", [True, False])
def test_generator_light_sizes_any_shape(residual_bicubic):
    g = Generator(**LIGHT, residual_bicubic=residual_bicubic).eval()
    with torch.no_grad():
        assert g(torch.rand(1, 3, 8, 8)).shape == (1, 3, 32, 32)
        assert g(torch.rand(3, 3, 12, 20)).shape == (3, 3, 48, 80)  # fully convolutional, non-square


def test_generator_residual_bicubic_adds_the_bicubic_image():
    torch.manual_seed(1)
    g = Generator(**LIGHT, residual_bicubic=True).eval()
    plain = Generator(**LIGHT, residual_bicubic=False).eval()
    plain.load_state_dict(g.state_dict())
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(g(x), plain(x) + bicubic_up(x, 4))


def test_generator_init_statistics():
    torch.manual_seed(0)
    g = Generator()
    w = torch.cat([m.weight.detach().flatten() for m in _convs(g)])
    assert w.numel() > 1_000_000
    assert abs(w.std().item() - 0.02) < 0.0005 and abs(w.mean().item()) < 0.0005
    for m in _convs(g):
        assert torch.count_nonzero(m.bias) == 0
        assert abs(m.weight.std().item() - 0.02) < 0.02 * 0.25  # every layer, not just the pool
    bns = [m for m in g.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 2 * 5 + 1
    for bn in bns:
        assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)


def test_generator_rejects_bad_widths():
    with pytest.raises(InputError, match="channels"):
        Generator(channels=0)


@pytest.mark.parametrize("arch,feat", [("resnet18", 512), ("resnet50", 2048)])
def test_discriminator_shapes_paper_size(arch, feat):
    torch.manual_seed(0)
    d = Discriminator(num_classes=10, arch=arch).eval()
    with torch.no_grad():
        out = d(torch.rand(2, 3, 128, 128))
    assert isinstance(out, DiscOut)
    assert out.adv.shape == (2,) and out.cls.shape == (2, 11) and out.reg.shape == (2, 4)
    assert d.cls_head.in_features == feat


def test_discriminator_without_reg_branch_and_light_input():
    d = Discriminator(num_classes=3, arch="resnet18", reg_branch=False).eval()
    assert d.reg_head is None and not any("reg_head" in k for k in d.state_dict())
    with torch.no_grad():
        out = d(torch.rand(3, 3, 32, 32))
    assert out.reg is None and out.adv.shape == (3,) and out.cls.shape == (3, 4)


def test_discriminator_head_init_and_normalisation_inside():
    torch.manual_seed(0)
    d = Discriminator(num_classes=80, arch="resnet50").eval()
    for head in (d.adv_head, d.cls_head, d.reg_head):
        assert torch.count_nonzero(head.bias) == 0
        assert abs(head.weight.std().item() - 0.1) < 0.1 * 0.06
    assert abs(d.cls_head.weight.std().item() - 0.1) < 0.002  # 81 x 2048 samples
    x = torch.rand(2, 3, 64, 64)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(d.features(x), d.trunk((x - mean) / std))
        torch.testing.assert_close(d(x).cls, d.cls_head(d.trunk((x - mean) / std)))
    assert "mean" not in d.state_dict()  # constants, not weights


def test_discriminator_unknown_arch():
    with pytest.raises(InputError, match="unknown discriminator arch 'vgg16'"):
        Discriminator(3, arch="vgg16")


def test_imagenet_weights_loaded_fc_ignored(tmp_path):
    torch.manual_seed(3)
    ref = torchvision.models.resnet18(weights=None)
    state = ref.state_dict()
    state["fc.weight"] = torch.zeros(1000, 512)  # an ImageNet classifier: must be ignored
    plain = tmp_path / "resnet18.pth"
    torch.save(state, plain)
    wrapped = tmp_path / "wrapped.pth"  # a training checkpoint of a DDP model
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, wrapped)
    for path in (plain, wrapped):
        torch.manual_seed(4)
        d = Discriminator(5, arch="resnet18", imagenet_weights=str(path))
        for k, v in ref.state_dict().items():
            if not k.startswith("fc."):
                torch.testing.assert_close(d.trunk.state_dict()[k], v)
        assert abs(d.cls_head.weight.std().item() - 0.1) < 0.01


def test_imagenet_weights_mismatch_and_bad_files(tmp_path):
    wrong = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), wrong)
    with pytest.raises(InputError, match="does not fit a torchvision resnet18"):
        Discriminator(5, arch="resnet18", imagenet_weights=wrong)
    with pytest.raises(InputError, match="ImageNet weights file not found"):
        Discriminator(5, arch="resnet18", imagenet_weights=tmp_path / "nope.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file at all")
    with pytest.raises(InputError, match="cannot be read as a weights-only torch file"):
        Discriminator(5, arch="resnet18", imagenet_weights=junk)
    # code in a pickle is refused by weights_only=True
    evil = tmp_path / "evil.pth"
    torch.save({"x": nn.Linear(2, 2)}, evil)
    with pytest.raises(InputError, match="weights-only"):
        Discriminator(5, arch="resnet18", imagenet_weights=evil)


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(5)
    g = Generator(**LIGHT, residual_bicubic=False)
    d = Discriminator(4, arch="resnet18", reg_branch=False)
    # run a train-mode forward so BN running stats differ from their defaults
    g(torch.rand(4, 3, 8, 8))
    d(torch.rand(4, 3, 32, 32))
    assert generator_config(g) == {
        "channels": 32, "up_channels": 64, "num_blocks": 2, "long_skip": True, "residual_bicubic": False, "scale": 4,
    }
    assert discriminator_config(d) == {"num_classes": 4, "arch": "resnet18", "reg_branch": False}
    obj = {**generator_checkpoint(g), **discriminator_checkpoint(d), "categories": [{"id": 1, "name": "a"}], "step": 7}
    path = save_checkpoint(obj, tmp_path / "mtgan" / "model.pt")
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.pt"]  # no temp file left
    g2 = generator_from_checkpoint(path, "cpu")
    d2 = discriminator_from_checkpoint(path, torch.device("cpu"))
    assert not g2.training and not d2.training
    g.eval(), d.eval()
    x, y = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(g2(x), g(x), rtol=0, atol=0)
        o, o2 = d(y), d2(y)
    torch.testing.assert_close(o2.cls, o.cls, rtol=0, atol=0)
    assert o2.reg is None


def test_checkpoint_of_wrapped_model_loads(tmp_path):
    g = Generator(**LIGHT)
    obj = generator_checkpoint(g)
    obj["generator"] = {"module." + k: v for k, v in obj["generator"].items()}
    torch.save(obj, tmp_path / "g.pt")
    g2 = generator_from_checkpoint(tmp_path / "g.pt", "cpu")
    torch.testing.assert_close(g2.tail.weight, g.tail.weight)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(InputError, match="generator checkpoint not found"):
        generator_from_checkpoint(tmp_path / "missing.pt", "cpu")
    only_g = tmp_path / "sr.pt"
    save_checkpoint(generator_checkpoint(Generator(**LIGHT)), only_g)
    with pytest.raises(InputError, match="has no discriminator"):
        discriminator_from_checkpoint(only_g, "cpu")
    mismatch = generator_checkpoint(Generator(**LIGHT))
    mismatch["generator_config"]["channels"] = 16
    torch.save(mismatch, tmp_path / "bad.pt")
    with pytest.raises(InputError, match="do not match its generator_config"):
        generator_from_checkpoint(tmp_path / "bad.pt", "cpu")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(InputError, match="does not hold a dict"):
        generator_from_checkpoint(tmp_path / "list.pt", "cpu")
    unknown = generator_checkpoint(Generator(**LIGHT))
    unknown["generator_config"]["depth"] = 3
    torch.save(unknown, tmp_path / "unknown.pt")
    with pytest.raises(InputError, match="unknown keys"):
        generator_from_checkpoint(tmp_path / "unknown.pt", "cpu")


def test_same_seed_same_init():
    torch.manual_seed(11)
    a = Generator(**LIGHT).state_dict()
    torch.manual_seed(11)
    b = Generator(**LIGHT).state_dict()
    for k in a:
        assert torch.equal(a[k], b[k])


@pytest.mark.parametrize("det_arch,trunk_arch", [("resnet18_fpn", "resnet18"), ("mobilenet_v3_fpn", "mobilenet_v3_large"),
                                                 ("resnet50_c4", "resnet50")])
def test_discriminator_trunk_from_a_detector(tmp_path, det_arch, trunk_arch):
    # `train mtgan --disc-init RUN/detector/model.pt`: D's trunk is the detector's, with its
    # weights (backbone body; for C4 also the res5 box head); the heads stay the paper's.
    from sodtool.coco import CategoryMap
    from sodtool.models.detector_weights import detector_trunk, save_detector
    from sodtool.models.frcnn import build_detector, resolve_build

    cats = CategoryMap.from_json([{"id": 1, "name": "a"}, {"id": 2, "name": "b"}])
    torch.manual_seed(0)
    build = resolve_build(det_arch, min_size=64, max_size=64)
    det = build_detector(det_arch, 3, **build)
    path = save_detector(tmp_path / "model.pt", det, det_arch, build, cats)
    arch, trunk, got_det_arch = detector_trunk(path)
    assert (arch, got_det_arch) == (trunk_arch, det_arch)
    d = Discriminator(2, arch)
    loaded = d.load_trunk(trunk, str(path))
    assert loaded == len(trunk) > 0
    sd = det.state_dict()
    own = d.trunk.state_dict()
    if trunk_arch.startswith("resnet"):
        assert torch.equal(own["conv1.weight"], sd["backbone.body.conv1.weight"])
        src = "roi_heads.box_head.layer4.0.conv1.weight" if det_arch.endswith("c4") else "backbone.body.layer4.0.conv1.weight"
        assert torch.equal(own["layer4.0.conv1.weight"], sd[src])
    else:
        assert torch.equal(own["features.0.0.weight"], sd["backbone.body.0.0.weight"])
    out = d(torch.rand(2, 3, 64, 64))
    assert out.cls.shape == (2, 3) and out.reg.shape == (2, 4) and out.adv.shape == (2,)
    with pytest.raises(InputError, match="do not fit"):
        Discriminator(2, "resnet34" if trunk_arch != "resnet34" else "resnet18").load_trunk(
            {"nope.weight": torch.zeros(1)}, "x")


def test_generator_file_takes_a_file_or_the_first_named_checkpoint_in_a_run_folder(tmp_path):
    sr, mtgan = tmp_path / "sr", tmp_path / "mtgan"
    sr.mkdir(), mtgan.mkdir()
    (sr / "generator.pt").write_bytes(b"g")
    (mtgan / "model.pt").write_bytes(b"m")
    assert generator_file(sr) == sr / "generator.pt"
    assert generator_file(mtgan) == mtgan / "model.pt"
    assert generator_file(str(mtgan / "model.pt")) == mtgan / "model.pt"
    # --pretrained-g takes train sr's G only: an MTGAN folder is refused, not read for its adversarial G
    with pytest.raises(InputError, match=r"--pretrained-g: .*mtgan is a folder without generator.pt: pass"):
        generator_file(mtgan, names=("generator.pt",), what="--pretrained-g")
    with pytest.raises(InputError, match="generator checkpoint not found: .*nowhere.pt"):
        generator_file(tmp_path / "nowhere.pt")
