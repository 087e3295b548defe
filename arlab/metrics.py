"""Image and codebook metrics that need no downloaded weights: PSNR, SSIM, codebook usage."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def to_unit(x: Tensor) -> Tensor:
    """Images in [-1, 1] → [0, 1], clamped."""
    return x.float().add(1).div(2).clamp(0, 1)


def psnr(x: Tensor, y: Tensor) -> Tensor:
    """Per-image PSNR in dB of (B, C, H, W) images in [-1, 1] (data range 1 after mapping to [0, 1])."""
    mse = (to_unit(x) - to_unit(y)).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def _gaussian(size: int, sigma: float, device, dtype) -> Tensor:
    coords = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-coords.pow(2) / (2 * sigma**2))
    return g / g.sum()


def ssim(x: Tensor, y: Tensor, window: int = 11, sigma: float = 1.5) -> Tensor:
    """Per-image SSIM (Wang et al. 2004: Gaussian window 11, σ 1.5, K1 0.01, K2 0.03) of images in [-1, 1].

    Computed on [0, 1] images per channel with 'valid' filtering, then averaged over channels and
    positions. The window shrinks to the image size for images smaller than 11 pixels.
    """
    a, b = to_unit(x), to_unit(y)
    c = a.shape[1]
    window = min(window, a.shape[-1], a.shape[-2])
    g = _gaussian(window, sigma, a.device, a.dtype)
    k = (g[:, None] * g[None, :]).expand(c, 1, window, window).contiguous()
    blur = lambda t: F.conv2d(t, k, groups=c)  # noqa: E731
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a.pow(2)
    var_b = blur(b * b) - mu_b.pow(2)
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a.pow(2) + mu_b.pow(2) + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)


class CodebookUsage:
    """Counts index use over a window (an epoch), not a batch: batch perplexity depends on batch size.

    ``usage`` is the fraction of the K codes used at least once; ``perplexity`` is exp(entropy) of the
    index histogram (K when all codes are used equally). Call ``reduce()`` under DDP to sum counts.
    """

    def __init__(self, codebook_size: int):
        self.k = codebook_size
        self.counts = torch.zeros(codebook_size, dtype=torch.long)

    def update(self, indices: Tensor | list[Tensor]) -> None:
        if isinstance(indices, (list, tuple)):
            for idx in indices:
                self.update(idx)
            return
        self.counts += torch.bincount(indices.detach().reshape(-1).cpu(), minlength=self.k)[: self.k]

    def reduce(self) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            t = self.counts.clone()
            torch.distributed.all_reduce(t)
            self.counts = t

    def reset(self) -> None:
        self.counts.zero_()

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def usage(self) -> float:
        return float((self.counts > 0).float().mean()) if self.total else 0.0

    def perplexity(self) -> float:
        if not self.total:
            return 0.0
        p = self.counts.float() / self.total
        return float(torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum()))
