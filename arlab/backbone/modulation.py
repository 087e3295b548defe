"""AiM-style conditioning shared by ``backbone/mamba`` and ``backbone/hybrid`` (Li et al. 2024, "Scalable
Autoregressive Image Generation with Mamba"; DiT's adaLN-Zero), and learned absolute positions.

**adaLN.** Each residual branch ``f`` of a block is modulated by the condition vector ``cond_bd`` (B, d):
``x + gate · f(norm(x) · (1 + scale) + shift)``; a block with k branches takes k (shift, scale, gate)
triples, i.e. ``3k`` vectors of width d. :class:`AdaLN` produces them for every block at once:

* ``groups = 0`` (adaLN): each block has its own ``SiLU → Linear(d, 3k·d)``;
* ``groups = G`` (AiM's adaLN-group): one shared ``SiLU → Linear(d, G·3k_max·d)`` gives G sets; block i
  uses set ``i mod G`` (its first ``3k_i`` vectors) plus its own learned table (3k_i, d). G = 1 is
  PixArt's adaLN-single; G = depth with a zero table is plain adaLN.

Initialisation: the linears are zero, so every shift, scale and gate starts at 0 and every block starts
as the identity (AiM's per-layer adaLN and DiT's adaLN-Zero). AiM draws its group tables' three vectors
from N(0, 1/d); here the shift and scale rows are drawn so, the gate rows are zero, so grouped blocks
start as the identity too. The final norm is modulated by (shift, scale) from a zero-initialised
``SiLU → Linear(d, 2d)`` (AiM's FinalLayer).

**Learned positions** (:class:`LearnedPositions`): a (max_grid, max_grid, d) table looked up at each
position's (row, col) (bilinear between cells for fractional positions); condition tokens get none.
The generator gives train and decode the same (row, col) per input slot, so the two cannot drift
apart (AiM's code gives the first image token position 0 in training and 1 when decoding).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from arlab.errors import ConfigError
from arlab.layers import no_weight_decay

COND_MODES = ("prefix", "adaln")


def check_cond(cond_mode: str, adaln_groups: int, pos_embed: str, max_grid: int) -> None:
    """The conditioning / position options of a Mamba or hybrid Config (one line naming the option)."""
    if cond_mode not in COND_MODES:
        raise ConfigError(f"cond_mode {cond_mode!r} is not one of {', '.join(COND_MODES)}")
    if adaln_groups < 0:
        raise ConfigError(f"adaln_groups {adaln_groups} must be >= 0 (0: one modulation per block)")
    if pos_embed not in ("none", "learned"):
        raise ConfigError(f"pos_embed {pos_embed!r} is not one of none, learned")
    if max_grid < 1:
        raise ConfigError(f"max_grid {max_grid} must be >= 1")


class AdaLN(nn.Module):
    """Modulation vectors for every block: ``forward(cond_bd)`` → a list of (B, 3k_i, d) tensors, laid out as
    (shift, scale, gate) for branch 0, then branch 1, ...; ``branches[i]`` = k_i."""

    def __init__(self, dim: int, branches: list[int], groups: int):
        super().__init__()
        self.dim, self.branches, self.groups = dim, list(branches), groups
        if groups == 0:
            self.per_block = nn.ModuleList([nn.Linear(dim, 3 * k * dim) for k in branches])
            for lin in self.per_block:
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)
        else:
            self.kmax = max(branches)
            self.shared = nn.Linear(dim, groups * 3 * self.kmax * dim)
            nn.init.zeros_(self.shared.weight)
            nn.init.zeros_(self.shared.bias)
            self.tables = nn.ParameterList()
            for k in branches:
                t = torch.randn(k, 3, dim) / dim ** 0.5
                t[:, 2] = 0  # gates start at 0: the block starts as the identity
                self.tables.append(nn.Parameter(t.reshape(3 * k, dim)))

    def forward(self, cond_bd: Tensor) -> list[Tensor]:
        c = nn.functional.silu(cond_bd)
        if self.groups == 0:
            return [lin(c).unflatten(-1, (-1, self.dim)) for lin in self.per_block]
        sets = self.shared(c).unflatten(-1, (self.groups, 3 * self.kmax, self.dim))  # (B, G, 3k, d)
        return [sets[:, i % self.groups, : 3 * k] + t for i, (k, t) in enumerate(zip(self.branches, self.tables))]


def modulated(x: Tensor, norm: nn.Module, f, mod: Tensor | None, branch: int) -> Tensor:
    """``x + f(norm(x))`` or, with ``mod`` (B, 3k, d), ``x + gate · f(norm(x)·(1 + scale) + shift)`` with the
    (shift, scale, gate) of ``branch``."""
    if mod is None:
        return x + f(norm(x))
    shift, scale, gate = mod[:, 3 * branch: 3 * branch + 3, None].unbind(1)  # each (B, 1, d)
    return x + gate * f(norm(x) * (1 + scale) + shift)


class FinalModulation(nn.Module):
    """``norm(x) · (1 + scale) + shift`` with (shift, scale) from ``SiLU → Linear(d, 2d)``, zero-initialised."""

    def __init__(self, dim: int):
        super().__init__()
        self.lin = nn.Linear(dim, 2 * dim)
        nn.init.zeros_(self.lin.weight)
        nn.init.zeros_(self.lin.bias)

    def forward(self, h: Tensor, cond_bd: Tensor) -> Tensor:
        shift, scale = self.lin(nn.functional.silu(cond_bd))[:, None].chunk(2, dim=-1)
        return h * (1 + scale) + shift


class LearnedPositions(nn.Module):
    """A learned (max_grid, max_grid, d) table of absolute 2D positions (AiM: learned absolute positions)."""

    def __init__(self, dim: int, max_grid: int, std: float = 0.02):
        super().__init__()
        self.max_grid = max_grid
        self.table = no_weight_decay(nn.Parameter(torch.randn(max_grid, max_grid, dim) * std))

    def forward(self, rows: Tensor, cols: Tensor, identity: Tensor | None) -> Tensor:
        """(L, d) embeddings of positions (rows, cols) (L,) float, bilinear between cells; 0 where ``identity``."""
        g = self.max_grid
        if rows.numel() and float(torch.maximum(rows.max(), cols.max())) > g - 1:
            raise ConfigError(f"a position (row/col up to {float(torch.maximum(rows.max(), cols.max())):g}) lies "
                              f"outside the learned position table; raise the backbone's max_grid ({g})")
        r, c = rows.float().clamp(0, g - 1), cols.float().clamp(0, g - 1)
        r0, c0 = r.floor().long(), c.floor().long()
        r1, c1 = (r0 + 1).clamp(max=g - 1), (c0 + 1).clamp(max=g - 1)
        fr, fc = (r - r0)[:, None], (c - c0)[:, None]
        t = self.table
        out = ((1 - fr) * (1 - fc) * t[r0, c0] + (1 - fr) * fc * t[r0, c1]
               + fr * (1 - fc) * t[r1, c0] + fr * fc * t[r1, c1])
        if identity is not None:
            out = out.masked_fill(identity[:, None], 0.0)
        return out
