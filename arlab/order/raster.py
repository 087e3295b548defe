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
        return OrderPlan.walk(torch.arange(layout.num_cells))
