"""``metric/class_acc``: how often a trained classifier recognises the class each image was asked for.

The argmax of the feature network's logits (``features/classifier``, e.g. the ``shapes-cnn`` preset) is
compared with ``labels_n``; images whose class is unknown (−1, e.g. free-text prompts) are left out.
The classifier's class names (from its training manifest) must equal the evaluated data's ``meta
["classes"]``, else label indices would mean different classes. Outputs ``classifier_acc{suffix}`` and
``classifier_acc{suffix}_n`` (images with a known class). Unlike ``metric/shapes_checker`` (``class_acc``,
a non-neural checker for the shapes set only) it works on any labelled set with a trained classifier.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from arlab.config import build
from arlab.errors import ConfigError
from arlab.metric.base import Direction, Metric
from arlab.metric.inception_score import check_logits
from arlab.registry import register, slot


@register("metric", "class_acc")
class ClassAccuracy(Metric):
    """Accuracy of a trained classifier's argmax against the requested class: classifier_acc."""

    needs_labels = True

    @dataclass
    class Config:
        features: Any = slot("features", default="shapes-cnn")  # a classifier (feature network with logits)
        batch_size: int = 64
        suffix: str = ""  # appended to the output names

    def __init__(self, cfg: Config | None = None):
        self.cfg = cfg or ClassAccuracy.Config()

    def compute(self, images_nhwc: np.ndarray, labels_n: np.ndarray, meta: dict[str, Any]) -> dict[str, float]:
        labels_n = np.asarray(labels_n)
        known = labels_n >= 0
        if not known.any():
            return {}
        net = build("features", self.cfg.features)
        classes = list(meta.get("classes") or [])
        if net.classes and classes and net.classes != classes:
            raise ConfigError(f"classifier {net.identity()} was trained on classes {net.classes[:4]}..., but the "
                              f"images are of {classes[:4]}...; use a classifier of this data set")
        pred = net.logits(images_nhwc[known], self.cfg.batch_size).argmax(axis=1)
        name = f"classifier_acc{self.cfg.suffix}"
        return {name: float((pred == labels_n[known]).mean()), f"{name}_n": float(known.sum())}

    @classmethod
    def directions(cls, cfg: Config) -> dict[str, Direction]:
        name = f"classifier_acc{cfg.suffix}"
        return {name: "max", f"{name}_n": None}

    @classmethod
    def check_data(cls, cfg: Config, data_node: dict[str, Any]) -> None:
        check_logits(cfg.features, "class_acc")
