"""``order/raster``: row-major next-token prediction (VQGAN, LlamaGen): h·w steps of one token."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from arlab.order.base import Order, OrderPlan
from arlab.registry import register


@register("order", "raster")
class Raster(Order):
    """Raster order (LlamaGen): row-major, one token per step, causal mask (SDPA fast path)."""

    @dataclass
    class Config:
        pass

    def __init__(self, cfg: Config | None = None):
        super().__init__()
        self.cfg = cfg or Raster.Config()

    def make_plan(self, layout) -> OrderPlan:
        L = layout.num_cells
        src = torch.arange(-1, L - 1)  # input j is the token of target slot j - 1
        return OrderPlan(perm=torch.arange(L), step_sizes=[1] * L, in_cells=src.clone(), in_step=torch.arange(L),
                         reads=torch.arange(L)[:, None], src=src)
