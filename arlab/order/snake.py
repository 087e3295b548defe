"""``order/snake``: boustrophedon raster — row-major with every other row walked right to left.

One token (or Token-Shuffle window) per step, like raster, but consecutive steps are always grid neighbours:
at the end of a row the walk steps down instead of jumping back to column 0. A proposal for causal scans
(Mamba), whose recurrent state forgets with distance along the sequence: in raster order the cell above
is w steps back, at the turn it is 1, in between 2·(w − c) − 1 or 2c + 1 steps. Positions (2-D RoPE,
learned tables) come from each input's (row, col), so a position-aware backbone sees the true geometry.

Plan: ``perm`` is the snake walk over the fused h×w grid; input j is the token of target slot j − 1
(``in_cells[j] = perm[j − 1]``); causal mask; one head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from arlab.order.base import Order, OrderPlan
from arlab.registry import register


@register("order", "snake")
class Snake(Order):
    """Boustrophedon order: rows top to bottom, even rows left→right, odd rows right→left; causal mask."""

    @dataclass
    class Config:
        pass

    def __init__(self, cfg: Config | None = None):
        super().__init__()
        self.cfg = cfg or Snake.Config()

    def make_plan(self, layout) -> OrderPlan:
        h, w = layout.fused[0]  # one grid (check_layout)
        grid_hw = torch.arange(h * w).view(h, w)
        grid_hw[1::2] = grid_hw[1::2].flip(1)
        return OrderPlan.walk(grid_hw.reshape(-1))
