"""``metric/shapes_checker``: class accuracy of images of the embedded ``shapes`` set, by its non-neural
checker (:func:`arlab.data.shapes.classify_batch`, 99.97% on real images)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from arlab.data.shapes import classify_batch
from arlab.errors import ConfigError
from arlab.metric.base import Direction, Metric
from arlab.registry import register


def is_shapes_data(data_node: dict[str, Any]) -> bool:
    """Whether a resolved ``data`` node reads the shapes set (directly, or as token shards of it)."""
    if data_node.get("type") == "shapes":
        return True
    return data_node.get("type") == "tokens" and str(data_node.get("images", "")).startswith("shapes")


@register("metric", "shapes_checker")
class ShapesChecker(Metric):
    """Class accuracy on shapes images by the non-neural checker (``class_acc``)."""

    needs_labels = True

    @dataclass
    class Config:
        pass

    def __init__(self, cfg: Config | None = None):
        self.cfg = cfg or ShapesChecker.Config()

    def compute(self, images_nhwc: np.ndarray, labels_n: np.ndarray, meta: dict[str, Any]) -> dict[str, float]:
        known = labels_n >= 0
        if not known.any():
            return {}
        pred = classify_batch(images_nhwc[known])
        return {"class_acc": float((pred == labels_n[known]).mean())}

    @classmethod
    def directions(cls, cfg: Config) -> dict[str, Direction]:
        return {"class_acc": "max"}

    @classmethod
    def check_data(cls, cfg: Config, data_node: dict[str, Any]) -> None:
        if not is_shapes_data(data_node):
            what = (f"data.images={data_node.get('images')}" if data_node.get("type") == "tokens" else
                    f"data.type={data_node.get('type')} ({data_node.get('root', '')})")
            raise ConfigError(f"metric shapes_checker scores images of the shapes set, but {what} is not the shapes "
                              "set; remove it from task.eval_metrics")
