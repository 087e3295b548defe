"""``backbone/toy_mixer``: a plug-in backbone from outside arlab — a causal MLP mixer with a recurrent
decode state. Each block mixes a position with the running mean of every position up to it:

    y_t = x_t + W2 · GELU(W1 · [n_t, mean(n_0 … n_t)]),   n = RMSNorm(x)

It cannot honour block-causal or arbitrary masks (every position sees exactly its past), and says so
in its capabilities: the generator refuses it with ``next_scale`` or ``neighbor`` at config time.
Its decode state is one running sum (B, d) per block plus the number of positions seen: constant in
the position, like a Mamba's. One file, one preset; nothing under ``arlab/`` names it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from arlab.backbone.base import CAUSAL, Backbone, Capabilities, DecodeState
from arlab.errors import ConfigError
from arlab.layers import RMSNorm
from arlab.registry import register


class MixerState(DecodeState):
    def __init__(self, sums: list[Tensor]):
        self.sums = sums  # per block (B, d) float32: sum of the normed inputs seen so far
        self.length = 0  # positions seen


class MixerBlock(nn.Module):
    def __init__(self, dim: int, ratio: int):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.fc1 = nn.Linear(2 * dim, ratio * dim)
        self.fc2 = nn.Linear(ratio * dim, dim)

    def forward(self, x_bld: Tensor, start: int, carry_bd: Tensor | None) -> tuple[Tensor, Tensor]:
        """Positions start … start + L − 1; ``carry_bd`` the sum over positions before ``start``."""
        n = self.norm(x_bld)
        csum = n.float().cumsum(1)
        if carry_bd is not None:
            csum = csum + carry_bd[:, None]
        count = torch.arange(start + 1, start + 1 + x_bld.shape[1], device=x_bld.device, dtype=torch.float32)
        mean = (csum / count[None, :, None]).to(n.dtype)
        return x_bld + self.fc2(nn.functional.gelu(self.fc1(torch.cat([n, mean], dim=-1)))), csum[:, -1]


@register("backbone", "toy_mixer")
class ToyMixer(Backbone):
    """Causal running-mean MLP mixer (plug-in example): causal only, recurrent decode state."""

    @dataclass
    class Config:
        dim: int = 32  # model width
        depth: int = 2  # mixer blocks
        ratio: int = 2  # MLP hidden width in units of dim

        def __post_init__(self) -> None:
            if self.dim < 1 or self.depth < 1 or self.ratio < 1:
                raise ConfigError("toy_mixer needs dim, depth and ratio >= 1")

    @classmethod
    def capabilities(cls, cfg: Config) -> Capabilities:
        return Capabilities(attention=frozenset({CAUSAL}), cond_modes=frozenset({"prefix"}), cond_mode="prefix",
                            branch=False, notes={"block_causal": "a running mean cannot see later positions"})

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg, self.dim = cfg, cfg.dim
        self.blocks = nn.ModuleList([MixerBlock(cfg.dim, cfg.ratio) for _ in range(cfg.depth)])
        self.norm = RMSNorm(cfg.dim)

    def forward(self, x_bld: Tensor, pos: tuple[Tensor, ...], mask: Tensor | None = None,
                cond_bd: Tensor | None = None, return_trunk: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        for b in self.blocks:
            x_bld, _ = b(x_bld, 0, None)
        h = self.norm(x_bld)
        return (h, x_bld) if return_trunk else h

    def init_state(self, batch: int, max_len: int, dtype: torch.dtype, device: torch.device) -> MixerState:
        return MixerState([torch.zeros(batch, self.dim, device=device) for _ in self.blocks])

    def prefill(self, x_bld: Tensor, state: MixerState, pos_l: Tensor, pos: tuple[Tensor, ...],
                mask: Tensor | None, cond_bd: Tensor | None = None,
                return_trunk: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """New positions must continue the sequence (a causal scan has no random access)."""
        start = state.length
        for i, b in enumerate(self.blocks):
            x_bld, state.sums[i] = b(x_bld, start, state.sums[i] if start else None)
        state.length = start + x_bld.shape[1]
        h = self.norm(x_bld)
        return (h, x_bld) if return_trunk else h
