"""``metric/precision_recall``: improved precision and recall (Kynkäänniemi et al. 2019), k = 3.

Each feature vector gets a ball whose radius is the distance to its k-th nearest neighbour within its own
set (itself excluded). **Precision** is the share of generated vectors inside at least one reference
ball (how many samples look real); **recall** the share of reference vectors inside at least one
generated ball (how much of the real distribution is covered). Both sets are cut to the same size
``n = min(N, bank, max_samples)`` (their first n: the generated images come in balanced class order, the
bank in manifest order); the distances are exact (float64, chunked), O(n² · d).

Outputs ``precision{suffix}``, ``recall{suffix}`` and ``pr{suffix}_n`` (the n used on each side).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from arlab.errors import ConfigError
from arlab.metric.base import Direction
from arlab.metric.reference import Reference, ReferenceConfig, ReferenceMetric, check_reference
from arlab.registry import register

CHUNK = 1024


def _sq_dists(a: np.ndarray, b: np.ndarray, b_sq: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + b_sq[None, :] - 2.0 * (a @ b.T)
    return np.maximum(d, 0.0)


def knn_radii(x: np.ndarray, k: int = 3) -> np.ndarray:
    """Squared distance of every row of x to its k-th nearest other row."""
    if len(x) <= k:
        raise ValueError(f"need more than k={k} vectors for k-NN radii, got {len(x)}")
    x = np.asarray(x, np.float64)
    x_sq = (x * x).sum(1)
    out = np.empty(len(x))
    for i in range(0, len(x), CHUNK):
        d = _sq_dists(x[i: i + CHUNK], x, x_sq)
        d[np.arange(len(d)), np.arange(i, i + len(d))] = -1.0  # itself: always the smallest, never a neighbour
        out[i: i + CHUNK] = np.partition(d, k, axis=1)[:, k]
    return out


def coverage(points: np.ndarray, centres: np.ndarray, radii_sq: np.ndarray) -> np.ndarray:
    """For each point, whether it lies inside at least one ball (centre, radius)."""
    points, centres = np.asarray(points, np.float64), np.asarray(centres, np.float64)
    c_sq = (centres * centres).sum(1)
    inside = np.empty(len(points), bool)
    for i in range(0, len(points), CHUNK):
        inside[i: i + CHUNK] = (_sq_dists(points[i: i + CHUNK], centres, c_sq) <= radii_sq[None, :]).any(1)
    return inside


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """(precision, recall) of the fake feature set against the real one with k-NN balls."""
    precision = coverage(fake, real, knn_radii(real, k)).mean()
    recall = coverage(real, fake, knn_radii(fake, k)).mean()
    return float(precision), float(recall)


@register("metric", "precision_recall")
class PrecisionRecall(ReferenceMetric):
    """Improved precision and recall with k-NN balls (Kynkäänniemi et al., k = 3): precision, recall."""

    @dataclass
    class Config(ReferenceConfig):
        k: int = 3  # neighbour whose distance is a ball's radius
        max_samples: int = 10000  # n per side at most (O(n²) distances)

        def __post_init__(self) -> None:
            super().__post_init__()
            if self.k < 1 or self.max_samples <= self.k:
                raise ConfigError(f"k must be >= 1 and max_samples > k, got {self.k}, {self.max_samples}")

    def __init__(self, cfg: Config | None = None):
        self.cfg = cfg or PrecisionRecall.Config()

    def score_features(self, gen_nd: np.ndarray, ref: Reference) -> dict[str, float]:
        n = min(len(gen_nd), len(ref.bank), self.cfg.max_samples)
        p, r = precision_recall(ref.bank[:n], gen_nd[:n], self.cfg.k)
        s = self.cfg.suffix
        return {f"precision{s}": p, f"recall{s}": r, f"pr{s}_n": float(n)}

    @classmethod
    def directions(cls, cfg: Config) -> dict[str, Direction]:
        s = cfg.suffix
        return {f"precision{s}": "max", f"recall{s}": "max", f"pr{s}_n": None}

    @classmethod
    def check_data(cls, cfg: Config, data_node: dict[str, Any]) -> None:
        check_reference(cfg, data_node, "precision_recall")
