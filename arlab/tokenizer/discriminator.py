"""PatchGAN discriminator and the GAN losses of the VQGAN recipe.

:class:`PatchGAN` is pix2pix's ``NLayerDiscriminator`` (Isola et al. 2017), the discriminator of
VQGAN (Esser et al. 2021, taming-transformers) and of LlamaGen's tokenizer
(``tokenizer_image/discriminator_patchgan.py``, ndf 64, 3 layers, BatchNorm). It maps images
``x_b3HW`` (B, 3, H, W) in [-1, 1] to a map of patch logits (B, 1, h', w'), each scoring one
receptive field (70×70 pixels for n_layers=3) as real (> 0) or fake (< 0).

The losses are plain functions of logits (any shape; means over all elements):

* ``hinge_d_loss`` / ``hinge_g_loss``: VQGAN's and LlamaGen's defaults;
* ``vanilla_d_loss`` (softplus form of the BCE) / ``non_saturating_g_loss`` (BCE with target 1).
  LlamaGen's ``non_saturating_*`` functions pass ``(target, logits)`` to
  ``binary_cross_entropy_with_logits`` in the wrong order (its issue #84); these do not.
* ``adopt_weight``: 0 before ``disc_start`` (LlamaGen/taming), the weight from then on;
* ``adaptive_weight``: VQGAN's λ = ‖∇_L rec‖ / (‖∇_L G_adv‖ + 1e-4) at the decoder's last layer L.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from arlab.errors import ConfigError

NORMS = ("batch", "group", "none")


@dataclass
class PatchGANConfig:
    """PatchGAN hyper-parameters (built by the tokenizer trainer; not a registered component).

    ``norm``: ``"batch"`` reproduces LlamaGen/taming (BatchNorm2d). BatchNorm statistics depend on
    the per-device batch: with DDP each rank normalises its own slice (unless converted to
    SyncBatchNorm), small batches make them noisy, and real and fake batches passed separately
    get different statistics — the discriminator can then tell them apart by the batch statistics
    alone. ``"group"`` (GroupNorm, 32 groups or fewer when channels are few) is per-sample and has
    none of these problems; ``"none"`` uses no normalisation (biases on every conv).
    """

    ndf: int = 64  # channels of the first conv; doubled per layer up to 8 * ndf
    n_layers: int = 3  # stride-2 convs (3 → 70×70 receptive field, as pix2pix/LlamaGen)
    norm: str = "group"  # batch (LlamaGen), group or none
    in_channels: int = 3  # image channels

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ConfigError(f"norm={self.norm!r}: the PatchGAN norm must be one of {list(NORMS)}")
        if self.ndf < 1:
            raise ConfigError(f"ndf={self.ndf}: must be a positive integer (LlamaGen uses 64)")
        if self.n_layers < 1:
            raise ConfigError(f"n_layers={self.n_layers}: must be >= 1 (LlamaGen uses 3)")
        if self.in_channels < 1:
            raise ConfigError(f"in_channels={self.in_channels}: must be a positive integer")


def _norm_layer(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(32, channels), channels)
    return nn.Identity()


class PatchGAN(nn.Module):
    """pix2pix ``NLayerDiscriminator`` (as VQGAN/LlamaGen): images (B, C, H, W) → patch logits (B, 1, h', w').

    Layers (kernel 4, padding 1 throughout; c = ndf)::

        conv(C → c, stride 2) → LeakyReLU(0.2)
        n_layers - 1 × [conv(c·m_prev → c·m, stride 2) → norm → LeakyReLU(0.2)]    m = min(2**n, 8)
        conv(c·m_prev → c·min(2**n_layers, 8), stride 1) → norm → LeakyReLU(0.2)
        conv(→ 1, stride 1)

    so each side shrinks as ``s → ⌊(s + 2 - 4) / stride⌋ + 1``: 256 → 128 → 64 → 32 → 31 → 30 and
    32 → 16 → 8 → 4 → 3 → 2 for n_layers=3. Conv weights ~ N(0, 0.02), norm scales ~ N(1, 0.02),
    biases 0 (pix2pix ``weights_init``). Convs followed by a norm have no bias.
    """

    def __init__(self, cfg: PatchGANConfig | None = None):
        super().__init__()
        cfg = cfg or PatchGANConfig()
        self.cfg = cfg
        ndf, norm = cfg.ndf, cfg.norm
        bias = norm == "none"
        layers: list[nn.Module] = [nn.Conv2d(cfg.in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, cfg.n_layers):
            prev, mult = mult, min(2**n, 8)
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=2, padding=1, bias=bias),
                       _norm_layer(norm, ndf * mult), nn.LeakyReLU(0.2)]
        prev, mult = mult, min(2**cfg.n_layers, 8)
        layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=1, padding=1, bias=bias),
                   _norm_layer(norm, ndf * mult), nn.LeakyReLU(0.2),
                   nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1)]
        self.main = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x_b3HW: Tensor) -> Tensor:
        """(B, C, H, W) → patch logits (B, 1, h', w')."""
        return self.main(x_b3HW)


# ----------------------------------------------------------------------------- losses


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """0.5 · (mean relu(1 − D(x)) + mean relu(1 + D(x̂))) (VQGAN/LlamaGen default)."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: Tensor) -> Tensor:
    """−mean D(x̂)."""
    return -logits_fake.mean()


def vanilla_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """0.5 · (mean softplus(−D(x)) + mean softplus(D(x̂))): the BCE of real→1, fake→0."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def non_saturating_g_loss(logits_fake: Tensor) -> Tensor:
    """BCE-with-logits of D(x̂) against target 1 = mean softplus(−D(x̂)) (Goodfellow et al. 2014).

    The logits are the *input* and the ones the *target* (LlamaGen swaps them; issue #84).
    """
    return F.binary_cross_entropy_with_logits(logits_fake, torch.ones_like(logits_fake))


def adopt_weight(weight: float, step: int, start: int) -> float:
    """``weight`` from step ``start`` on, 0 before it (taming/LlamaGen ``adopt_weight``)."""
    return 0.0 if step < start else weight


def adaptive_weight(rec_loss: Tensor, g_loss: Tensor, last_layer: Tensor, max: float = 1e4) -> Tensor:
    """VQGAN's adaptive GAN weight λ = ‖∇_L rec_loss‖ / (‖∇_L g_loss‖ + 1e-4), clamped to [0, max], detached.

    ``L`` is ``last_layer`` (the decoder's ``conv_out.weight``); both losses must depend on it. The
    graphs are kept (``retain_graph``) for the backward of the total loss.
    """
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    w = rec_grad.norm() / (g_grad.norm() + 1e-4)
    return w.clamp(0.0, max).detach()
