"""PatchGAN (pix2pix NLayerDiscriminator, as VQGAN/LlamaGen) and the GAN loss functions."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from arlab.errors import ConfigError
from arlab.tokenizer.discriminator import (
    PatchGAN,
    PatchGANConfig,
    adaptive_weight,
    adopt_weight,
    hinge_d_loss,
    hinge_g_loss,
    non_saturating_g_loss,
    vanilla_d_loss,
)


def patch_side(size: int, n_layers: int) -> int:
    """Kernel 4, padding 1: n_layers stride-2 convs, then two stride-1 convs."""
    for stride in [2] * n_layers + [1, 1]:
        size = (size + 2 * 1 - 4) // stride + 1
    return size


@pytest.mark.parametrize("size,n_layers,ndf", [(32, 3, 64), (256, 3, 16), (64, 2, 8), (64, 4, 8)])
def test_patch_map_size_follows_the_conv_arithmetic(size, n_layers, ndf):
    d = PatchGAN(PatchGANConfig(ndf=ndf, n_layers=n_layers))
    out = d(torch.randn(2, 3, size, size))
    side = patch_side(size, n_layers)
    assert out.shape == (2, 1, side, side)
    assert (patch_side(32, 3), patch_side(256, 3)) == (2, 30)  # pix2pix: 256 → 30×30 patches


def test_llamagen_shape_and_parameter_count():
    """ndf 64, 3 layers, BatchNorm: pix2pix's 2.765M-parameter NLayerDiscriminator."""
    d = PatchGAN(PatchGANConfig(ndf=64, n_layers=3, norm="batch"))
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride[0]) for c in convs] == [
        (3, 64, 2), (64, 128, 2), (128, 256, 2), (256, 512, 1), (512, 1, 1)]
    assert all(c.kernel_size == (4, 4) for c in convs)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in d.modules()) == 3
    assert sum(p.numel() for p in d.parameters()) == 2_765_633
    slopes = {m.negative_slope for m in d.modules() if isinstance(m, nn.LeakyReLU)}
    assert slopes == {0.2}


@pytest.mark.parametrize("norm,cls", [("batch", nn.BatchNorm2d), ("group", nn.GroupNorm), ("none", None)])
def test_norm_choices(norm, cls):
    d = PatchGAN(PatchGANConfig(norm=norm))
    norms = [m for m in d.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm))]
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    if cls is None:
        assert not norms and all(c.bias is not None for c in convs)
    else:
        assert len(norms) == 3 and all(isinstance(m, cls) for m in norms)
        assert [c.bias is not None for c in convs] == [True, False, False, False, True]


def test_weight_init():
    torch.manual_seed(0)
    d = PatchGAN(PatchGANConfig(norm="group"))
    w = torch.cat([m.weight.flatten() for m in d.modules() if isinstance(m, nn.Conv2d)])
    assert abs(w.mean().item()) < 1e-3 and abs(w.std().item() - 0.02) < 1e-3
    g = torch.cat([m.weight for m in d.modules() if isinstance(m, nn.GroupNorm)])
    assert abs(g.mean().item() - 1.0) < 5e-3 and abs(g.std().item() - 0.02) < 5e-3
    assert all((m.bias == 0).all() for m in d.modules() if isinstance(m, (nn.Conv2d, nn.GroupNorm))
               and m.bias is not None)


@pytest.mark.parametrize("kw", [{"norm": "instance"}, {"n_layers": 0}, {"ndf": 0}])
def test_bad_config(kw):
    with pytest.raises(ConfigError, match=next(iter(kw))):
        PatchGANConfig(**kw)


def test_hinge_losses_by_hand():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 0.5])
    # relu(1 - real) = [0, 0.5, 2] → 2.5/3; relu(1 + fake) = [0, 1, 1.5] → 2.5/3
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (2.5 / 3 + 2.5 / 3))
    assert hinge_g_loss(fake).item() == pytest.approx(0.5)
    # D is satisfied (zero loss) once real ≥ 1 and fake ≤ -1
    assert hinge_d_loss(torch.tensor([1.0, 3.0]), torch.tensor([-1.0, -4.0])).item() == 0.0


def test_vanilla_d_loss_by_hand():
    real = torch.tensor([2.0, -1.0])
    fake = torch.tensor([0.0, 1.0])
    sp = lambda t: math.log1p(math.exp(t))
    expected = 0.5 * ((sp(-2.0) + sp(1.0)) / 2 + (sp(0.0) + sp(1.0)) / 2)
    assert vanilla_d_loss(real, fake).item() == pytest.approx(expected, rel=1e-6)
    bce = 0.5 * (F.binary_cross_entropy_with_logits(real, torch.ones(2))
                 + F.binary_cross_entropy_with_logits(fake, torch.zeros(2)))
    assert vanilla_d_loss(real, fake).item() == pytest.approx(bce.item(), rel=1e-6)


def test_non_saturating_g_loss_has_the_logits_as_input():
    logits = torch.tensor([[-3.0, -0.5], [0.0, 2.0]])
    expected = F.softplus(-logits).mean()
    torch.testing.assert_close(non_saturating_g_loss(logits), expected)
    swapped = F.binary_cross_entropy_with_logits(torch.ones_like(logits), logits)  # LlamaGen issue #84
    assert not torch.isclose(non_saturating_g_loss(logits), swapped)


def test_adopt_weight():
    assert adopt_weight(0.5, 0, 100) == 0.0
    assert adopt_weight(0.5, 99, 100) == 0.0
    assert adopt_weight(0.5, 100, 100) == 0.5
    assert adopt_weight(0.5, 10**6, 100) == 0.5
    assert adopt_weight(0.5, 0, 0) == 0.5


def test_adaptive_weight_matches_manual_gradient_norms():
    torch.manual_seed(0)
    last = nn.Parameter(torch.randn(3, 4, 3, 3))
    x = torch.randn(2, 4, 6, 6)
    y = F.conv2d(x, last, padding=1)
    rec = (y - 1).abs().mean()
    g = -(y * 0.3).mean()
    (g_rec,) = torch.autograd.grad(rec, last, retain_graph=True)
    (g_adv,) = torch.autograd.grad(g, last, retain_graph=True)
    expected = g_rec.norm() / (g_adv.norm() + 1e-4)
    w = adaptive_weight(rec, g, last)
    torch.testing.assert_close(w, expected)
    assert not w.requires_grad
    (rec + w * g).backward()  # the graph is still there for the total loss
    assert last.grad is not None


def test_adaptive_weight_is_clamped():
    last = nn.Parameter(torch.ones(2, 2))
    rec = (last * 10.0).sum()
    g = (last * 1e-9).sum()
    assert adaptive_weight(rec, g, last).item() == pytest.approx(1e4)
    assert adaptive_weight(rec, g, last, max=5.0).item() == pytest.approx(5.0)
