"""``order/toy_column``: a plug-in order from outside arlab — column-major next-token prediction (the
raster walk transposed: down each column, then the next column), one cell per step, causal mask.

One file, one preset (``registry/order/toy_column.yaml``); nothing under ``arlab/`` names it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from arlab.order.base import Order, OrderPlan
from arlab.registry import register


@register("order", "toy_column")
class ToyColumn(Order):
    """Column-major order (plug-in example): h·w steps of one cell, causal."""

    @dataclass
    class Config:
        pass

    def __init__(self, cfg: Config | None = None):
        super().__init__()
        self.cfg = cfg or ToyColumn.Config()

    def make_plan(self, layout) -> OrderPlan:
        h, w = layout.fused[0]
        L = h * w
        perm = torch.arange(L).view(h, w).t().reshape(-1)  # cell of target slot t, column by column
        src = torch.arange(-1, L - 1)  # input j is the token drawn at target slot j - 1
        in_cells = torch.cat([torch.tensor([-1]), perm[:-1]])
        return OrderPlan(perm=perm, step_sizes=[1] * L, in_cells=in_cells, in_step=torch.arange(L),
                         reads=torch.arange(L)[:, None], src=src)
