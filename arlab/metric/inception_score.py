"""``metric/inception_score``: exp(E_x KL(p(y|x) ‖ p(y))) over 10 splits, from a feature network's logits.

Salimans et al. 2016: the N images are cut into ``splits`` consecutive parts; in each, ``p(y)`` is the mean
of the softmax of the logits and the score ``exp(mean_x Σ_y p(y|x) (log p(y|x) − log p(y)))``; the result
is the mean and standard deviation over the parts (float64, log-softmax for stability). It needs class
logits (``has_logits``): the TF-FID Inception export has none, so arlab computes it with a classifier
trained on the data set (``features/classifier``) — a "classifier score" whose maximum is the number of
classes, comparable only with itself. Outputs ``inception_score{suffix}`` and ``…_std``; the caller
records N. No reference set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from arlab.config import build
from arlab.errors import ConfigError
from arlab.metric.base import Direction, Metric
from arlab.registry import register, slot


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """(mean, std) of the Inception Score over ``splits`` consecutive parts of the (N, classes) logits."""
    if len(logits) < splits:
        raise ValueError(f"Inception Score over {splits} splits needs at least {splits} images, got {len(logits)}")
    scores = []
    for part in np.array_split(log_softmax(logits), splits):
        p = np.exp(part)
        log_py = np.log(p.mean(axis=0))
        scores.append(np.exp((p * (part - log_py)).sum(axis=1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


def check_logits(features: Any, what: str) -> None:
    net = build("features", features, where=f"metric {what}.features")
    if not net.has_logits:
        raise ConfigError(f"metric {what} needs class logits, but feature network {net.identity()} has none; use a "
                          "classifier (features: shapes-cnn or cifar10-cnn)")


@register("metric", "inception_score")
class InceptionScore(Metric):
    """Inception Score from a feature network's class logits, 10 splits: inception_score, inception_score_std."""

    @dataclass
    class Config:
        features: Any = slot("features", default="shapes-cnn")  # a feature network with logits
        splits: int = 10
        batch_size: int = 64
        suffix: str = ""  # appended to the output names (e.g. _cnn)

        def __post_init__(self) -> None:
            if self.splits < 1:
                raise ConfigError(f"splits must be >= 1, got {self.splits}")

    def __init__(self, cfg: Config | None = None):
        self.cfg = cfg or InceptionScore.Config()

    def compute(self, images_nhwc: np.ndarray, labels_n: np.ndarray, meta: dict[str, Any]) -> dict[str, float]:
        net = build("features", self.cfg.features)
        mean, std = inception_score(net.logits(images_nhwc, self.cfg.batch_size), self.cfg.splits)
        name = f"inception_score{self.cfg.suffix}"
        return {name: mean, f"{name}_std": std}

    @classmethod
    def directions(cls, cfg: Config) -> dict[str, Direction]:
        name = f"inception_score{cfg.suffix}"
        return {name: "max", f"{name}_std": None}

    @classmethod
    def check_data(cls, cfg: Config, data_node: dict[str, Any]) -> None:
        check_logits(cfg.features, "inception_score")
