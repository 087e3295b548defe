"""``metric/kid``: Kernel Inception Distance, the unbiased MMD² with the cubic polynomial kernel.

``k(x, y) = (x·y / d + 1)³`` (Bińkowski et al. 2018). On each of ``subsets`` random subsets (``subset_size``
generated and as many reference feature vectors, drawn without replacement with a fixed seed) the
unbiased estimate ``mean_{i≠j} k(x_i, x_j) + mean_{i≠j} k(y_i, y_j) − 2 mean_{i,j} k(x_i, y_j)``; the
result is the mean and the standard deviation over subsets (torch-fidelity's defaults: 100 subsets of
1000). Unbiased, so it may be slightly negative and is usable at small N. The dot products are float32
matrix products (their round-off averages out over the ~10⁶ kernel entries of a subset), the kernel and
its sums float64.

The reference vectors are the bank of :mod:`arlab.metric.reference` (its first ``bank_size`` images).
Outputs ``kid{suffix}``, ``kid{suffix}_std``, ``kid{suffix}_n_ref`` (reference vectors) and
``kid{suffix}_subset`` (subset size); the caller records N.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from arlab.errors import ConfigError
from arlab.metric.base import Direction
from arlab.metric.reference import Reference, ReferenceConfig, ReferenceMetric, check_reference
from arlab.registry import register


def _kernel(a: np.ndarray, b: np.ndarray, d: int) -> np.ndarray:
    return (a.astype(np.float32) @ b.astype(np.float32).T).astype(np.float64) / d + 1.0


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² between equal-sized sets x, y (m, d) with the cubic polynomial kernel."""
    m, d = len(x), x.shape[1]
    kxx, kyy, kxy = _kernel(x, x, d) ** 3, _kernel(y, y, d) ** 3, _kernel(x, y, d) ** 3
    off = m * (m - 1)
    return float((kxx.sum() - np.trace(kxx)) / off + (kyy.sum() - np.trace(kyy)) / off - 2.0 * kxy.mean())


def kernel_distance(x: np.ndarray, y: np.ndarray, subsets: int = 100, subset_size: int = 1000,
                    seed: int = 0) -> tuple[float, float, int]:
    """(mean, std, subset size) of the unbiased MMD² over random subsets of x and y."""
    m = min(subset_size, len(x), len(y))
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples on each side, got {len(x)} and {len(y)}")
    rng = np.random.default_rng(seed)
    vals = [mmd2_unbiased(x[rng.choice(len(x), m, replace=False)], y[rng.choice(len(y), m, replace=False)])
            for _ in range(subsets)]
    return float(np.mean(vals)), float(np.std(vals)), m


@register("metric", "kid")
class KID(ReferenceMetric):
    """Kernel Inception Distance (unbiased MMD², cubic kernel, mean and std over subsets): kid, kid_std."""

    @dataclass
    class Config(ReferenceConfig):
        subsets: int = 100  # random subsets averaged
        subset_size: int = 1000  # samples per side and subset (capped by N and the reference bank)
        seed: int = 0  # of the subset draws

        def __post_init__(self) -> None:
            super().__post_init__()
            if self.subsets < 1 or self.subset_size < 2:
                raise ConfigError(f"subsets must be >= 1 and subset_size >= 2, got {self.subsets}, {self.subset_size}")

    def __init__(self, cfg: Config | None = None):
        self.cfg = cfg or KID.Config()

    def score_features(self, gen_nd: np.ndarray, ref: Reference) -> dict[str, float]:
        mean, std, m = kernel_distance(gen_nd, ref.bank, self.cfg.subsets, self.cfg.subset_size, self.cfg.seed)
        name = f"kid{self.cfg.suffix}"
        return {name: mean, f"{name}_std": std, f"{name}_n_ref": float(len(ref.bank)), f"{name}_subset": float(m)}

    @classmethod
    def directions(cls, cfg: Config) -> dict[str, Direction]:
        name = f"kid{cfg.suffix}"
        return {name: "min", f"{name}_std": None, f"{name}_n_ref": None, f"{name}_subset": None}

    @classmethod
    def check_data(cls, cfg: Config, data_node: dict[str, Any]) -> None:
        check_reference(cfg, data_node, "kid")
