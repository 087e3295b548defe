"""``metric/toy_brightness``: a plug-in metric from outside arlab — the mean pixel value of the images in
[0, 1] (any dataset). One file, one preset; nothing under ``arlab/`` names it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from arlab.metric.base import Direction, Metric
from arlab.registry import register


@register("metric", "toy_brightness")
class ToyBrightness(Metric):
    """Mean pixel value in [0, 1] (plug-in example): ``brightness``."""

    @dataclass
    class Config:
        channel: int = -1  # -1: all channels; else 0, 1 or 2

    def __init__(self, cfg: Config | None = None):
        self.cfg = cfg or ToyBrightness.Config()

    def compute(self, images_nhwc: np.ndarray, labels_n: np.ndarray, meta: dict[str, Any]) -> dict[str, float]:
        x = images_nhwc if self.cfg.channel < 0 else images_nhwc[..., self.cfg.channel]
        return {"brightness": float(x.astype(np.float64).mean() / 255.0)}

    @classmethod
    def directions(cls, cfg: Config) -> dict[str, Direction]:
        return {"brightness": None}  # a property of the images, neither better high nor low
