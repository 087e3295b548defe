"""``quantizer/fsq``: Finite Scalar Quantization (Mentzer et al. 2023, arXiv 2309.15505, ICLR 2024).

Each of the d = len(levels) channels of ``z_bdhw`` (B, d, h, w) is bounded with tanh to an interval
that rounds to exactly L_i integers, rounded with a straight-through estimator and divided by
⌊L_i/2⌋, so codes lie in [-1, 1]. The implicit codebook is the Cartesian product of the per-channel
grids (∏ L_i codes); there are no parameters and no auxiliary losses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from arlab.errors import ConfigError
from arlab.quantizer.base import Quantizer, QuantOut, perplexity
from arlab.registry import register

BOUND_EPS = 1e-3  # widens the tanh range by (1 + eps) so the extreme levels are reachable (paper App. A.1)
MAX_LEVELS = 16
MAX_CODEBOOK = 2**31


@register("quantizer", "fsq")
class FSQ(Quantizer):
    """Finite Scalar Quantization (Mentzer et al. 2023): per-channel rounding to L_i levels, ∏ L_i codes.

    Forward, per channel i with L = L_i (all in float32, autocast disabled)::

        half_l  = (L - 1)(1 + eps) / 2        offset = 0.5 if L is even else 0
        shift   = atanh(offset / half_l)      bounded = tanh(z + shift) · half_l - offset
        code    = round_ste(bounded) / (L // 2)

    so z = 0 maps to code 0, odd L gives the symmetric grid {-1, …, 1} and even L the asymmetric
    grid {-1, …, (L/2 - 1)/(L/2)}. Indices are mixed radix with the *first* channel least
    significant (``basis = [1, L_1, L_1 L_2, …]``), matching the paper's code and
    ``vector_quantize_pytorch``.

    Choosing levels: the paper recommends L_i ≥ 5 for every channel (Table 1 sets: [8, 6, 5],
    [8, 5, 5, 5], [7, 5, 5, 5, 5], [8, 8, 8, 6, 5], [8, 8, 8, 5, 5, 5]); smaller L (down to 2) is
    accepted but gives coarse channels the encoder struggles to use.

    Shapes: ``z_bdhw`` (B, d, h, w) → ``zq_bdhw`` (B, d, h, w) in z's dtype, ``indices`` (B, h, w) int64.
    """

    @dataclass
    class Config:
        levels: list[int] = field(default_factory=lambda: [8, 5, 5, 5])  # L_i per channel (>= 2; paper: >= 5)

        def __post_init__(self) -> None:
            levels = list(self.levels)
            if not levels:
                raise ConfigError("levels []: give at least one level, e.g. [8, 5, 5, 5] (Mentzer et al. 2023)")
            if any(isinstance(x, bool) or not isinstance(x, int) for x in levels):
                raise ConfigError(f"levels {levels}: every level must be an integer >= 2, e.g. [8, 5, 5, 5]")
            if any(x < 2 for x in levels):
                raise ConfigError(
                    f"levels {levels}: every level must be >= 2 (a channel with one level carries no "
                    "information; the paper recommends >= 5, e.g. [8, 5, 5, 5])"
                )
            if len(levels) > MAX_LEVELS:
                raise ConfigError(
                    f"levels {levels}: at most {MAX_LEVELS} channels are supported, got {len(levels)} "
                    "(the paper uses 3-6)"
                )
            size = math.prod(levels)
            if size > MAX_CODEBOOK:
                raise ConfigError(
                    f"levels {levels}: the codebook size prod(levels) = {size} exceeds 2**31; "
                    "use fewer or smaller levels"
                )

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        levels = [int(x) for x in cfg.levels]
        self.levels = levels
        self.code_dim = len(levels)
        self.codebook_size = math.prod(levels)
        basis = torch.cumprod(torch.tensor([1] + levels[:-1], dtype=torch.int64), 0)
        # integer buffers only (not persistent: derived from the config), so ``.to(bfloat16)`` cannot
        # round the float constants; those are recomputed in float32 by :meth:`_constants`
        self.register_buffer("_levels", torch.tensor(levels, dtype=torch.int64).view(1, -1, 1, 1),
                             persistent=False)
        self.register_buffer("_basis", basis.view(1, -1, 1, 1), persistent=False)

    def extra_repr(self) -> str:
        return f"levels={self.levels}, codebook_size={self.codebook_size}"

    # ------------------------------------------------------------------------------ math
    def _constants(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per-channel (1, d, 1, 1) float32 ``half_l``, ``offset``, ``shift`` and ``half_width = L // 2``."""
        lv = self._levels.double()
        half_l = (lv - 1) * (1 + BOUND_EPS) / 2
        offset = (self._levels % 2 == 0).double() * 0.5
        shift = torch.atanh(offset / half_l)
        half_width = (self._levels // 2).double()
        return half_l.float(), offset.float(), shift.float(), half_width.float()

    def bound(self, z_bdhw: Tensor) -> Tensor:
        """The tanh bound in float32, before rounding: channel i lies in (-L_i/2 - e, L_i/2 - 1 + e) for
        even L_i and in (-(L_i-1)/2 - e, (L_i-1)/2 + e) for odd L_i, with e = (L_i - 1)·eps/2."""
        half_l, offset, shift, _ = self._constants()
        return torch.tanh(z_bdhw.float() + shift) * half_l - offset

    def forward(self, z_bdhw: Tensor) -> QuantOut:
        if z_bdhw.ndim != 4 or z_bdhw.shape[1] != self.code_dim:
            raise ValueError(
                f"FSQ with levels {self.levels} expects z of shape (B, {self.code_dim}, h, w), "
                f"got {tuple(z_bdhw.shape)}"
            )
        in_dtype = z_bdhw.dtype
        with torch.autocast(device_type=z_bdhw.device.type, enabled=False):
            z = z_bdhw.float()
            bounded = self.bound(z)
            rounded = bounded + (torch.round(bounded) - bounded).detach()  # straight-through
            codes_bdhw = rounded / self._constants()[3]
            idx_bhw = self.codes_to_indices(codes_bdhw.detach())
        zero = torch.zeros((), device=z_bdhw.device)
        return QuantOut(
            zq_bdhw=codes_bdhw.to(in_dtype),
            indices=idx_bhw,
            loss=zero,
            losses={},
            stats={"perplexity": perplexity(idx_bhw, self.codebook_size)},
        )

    def codes_to_indices(self, codes_bdhw: Tensor) -> Tensor:
        """Codes (B, d, h, w) with values on the FSQ grid → indices (B, h, w) int64 (mixed radix)."""
        with torch.autocast(device_type=codes_bdhw.device.type, enabled=False):
            half_width = self._constants()[3]
            digits = torch.round(codes_bdhw.float() * half_width + half_width).long()
            return (digits * self._basis).sum(dim=1)

    def indices_to_codes(self, idx_bhw: Tensor) -> Tensor:
        """Indices (B, h, w) → codes (B, d, h, w) float32 in [-1, 1]."""
        idx = idx_bhw.long().unsqueeze(1)  # (B, 1, h, w)
        digits = (idx // self._basis) % self._levels
        half_width = self._constants()[3]
        return (digits.float() - half_width) / half_width

    def decode_indices(self, indices: Tensor) -> Tensor:
        """Indices (B, h, w) → ``zq_bdhw`` (B, d, h, w) float32; same as :meth:`indices_to_codes`."""
        return self.indices_to_codes(indices)
