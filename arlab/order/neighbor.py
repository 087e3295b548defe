"""``order/neighbor``: NAR's next-neighbour prediction (He et al. 2025, "Neighboring Autoregressive
Modeling for Efficient Visual Generation"; reference ThisisBillhe/NAR ``autoregressive/models/gpt.py``).

Cells are walked in ascending Manhattan distance ``r + c`` from the top-left (within a distance,
by row): an h×w grid takes ``h + w − 1`` decoding steps, the whole next anti-diagonal in parallel.
As in NAR the sequence keeps the raster order: input j is the token of grid cell j − 1 (its KV-cache
position is its grid position), fed at step (its distance) + 1; the walk lives in the mask, NAR's
proximity mask: an input at distance c sees every input at distance
≤ c (bidirectional within an anti-diagonal) and the condition.

Two dimension-oriented heads (NAR): head 0 reads the trunk (``norm → head``) and predicts each
token's *right* neighbour; head 1 reads ``extra_layers`` more transformer blocks (1, NAR's
``medusa_attention_num``) and predicts the token *below*. A target with both a left and an upper
neighbour gets the mean of the two logits; row 0 uses the right-head only, column 0 the lower-head
only; the top-left token gets the mean of both heads at the last condition token (NAR's
``(R + B) / 2`` at the class position). Only the averaged logits are supervised (NAR).

Difference from NAR: the bottom-right token, whose neighbours do not exist, is not fed (NAR feeds
all N tokens and ignores its two predictions).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from arlab.backbone.base import ARBITRARY
from arlab.errors import ConfigError
from arlab.order.base import Order, OrderPlan
from arlab.registry import register


@register("order", "neighbor")
class Neighbor(Order):
    """NAR next-neighbour order: anti-diagonals in parallel (h+w−1 steps), proximity mask, right/lower heads."""

    attention = ARBITRARY  # the proximity mask over a raster sequence is not block-causal
    heads = 2

    @dataclass
    class Config:
        extra_layers: int = 1  # transformer blocks between the trunk and the lower-neighbour head (NAR: 1)

        def __post_init__(self) -> None:
            if self.extra_layers < 1:
                raise ConfigError(f"extra_layers {self.extra_layers} must be >= 1 (the lower head reads extra blocks)")

    def __init__(self, cfg: Config | None = None):
        super().__init__()
        self.cfg = cfg or Neighbor.Config()
        self.extra_layers = self.cfg.extra_layers

    def make_plan(self, layout) -> OrderPlan:
        h, w = layout.fused[0]  # one grid (check_layout)
        L = h * w
        r, c = torch.arange(L) // w, torch.arange(L) % w
        dist = r + c
        perm = torch.argsort(dist * L + r)  # by distance, then by row
        step_sizes = torch.bincount(dist, minlength=h + w - 1).tolist()
        slot_of_cell = torch.argsort(perm)
        in_cells = torch.arange(-1, L - 1)  # raster order: input j = the token of cell j - 1
        src = torch.cat([torch.tensor([-1]), slot_of_cell[:-1]])  # the target slot that drew it
        in_step = torch.cat([torch.tensor([0]), dist[:-1] + 1])  # fed the step after its anti-diagonal
        reads = torch.full((L, 2), -1, dtype=torch.long)
        tr, tc = r[perm], c[perm]
        left = tr * w + tc - 1 + 1  # input slot holding the left neighbour (cell + 1)
        up = (tr - 1) * w + tc + 1
        reads[:, 0] = torch.where(tc > 0, left, -1)
        reads[:, 1] = torch.where(tr > 0, up, -1)
        reads[0] = 0  # the top-left token: both heads at the last condition token
        return OrderPlan(perm=perm, step_sizes=step_sizes, in_cells=in_cells, in_step=in_step, reads=reads, src=src)
