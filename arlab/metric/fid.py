"""``metric/fid``: Fréchet distance between Gaussians fitted to generated and reference features.

``FID = ‖μ_g − μ_r‖² + Tr(Σ_g) + Tr(Σ_r) − 2 Tr((Σ_g Σ_r)^½)`` in float64 (Heusel et al. 2017). The trace of
the matrix square root uses the symmetric eigen formulation (no ``scipy.linalg.sqrtm``): with
``R = Σ_g^½`` (from ``eigh``, negative round-off eigenvalues clipped to 0), ``Σ_g Σ_r`` is similar to the
symmetric PSD ``R Σ_r R``, so ``Tr((Σ_g Σ_r)^½) = Σ_i √λ_i(R Σ_r R)``. It needs no complex arithmetic, is
exact for singular covariances (N < D) and gives FID(x, x) = 0 up to round-off (clamped at 0).

Outputs ``fid{suffix}`` and ``fid{suffix}_n_ref`` (reference images); the caller records N, the number of
generated images. FID is biased in N (smaller N, larger FID): compare values only at equal N, equal
reference split and equal feature network / resize (:mod:`arlab.metric.reference` for the reference).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from arlab.metric.base import Direction
from arlab.metric.reference import Reference, ReferenceConfig, ReferenceMetric, check_reference
from arlab.registry import register


def sqrt_psd(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (negative round-off eigenvalues clipped)."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> float:
    """Tr((s1 s2)^½) for symmetric PSD s1, s2, via the eigenvalues of s1^½ s2 s1^½."""
    r = sqrt_psd(s1)
    m = r @ s2 @ r
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), float64, clamped at 0."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics differ in shape: {mu1.shape}/{sigma1.shape} vs {mu2.shape}/{sigma2.shape}")
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2)
    return max(float(value), 0.0)


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of (N, D) features, float64."""
    f = np.asarray(features, np.float64)
    if len(f) < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {len(f)}")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


@register("metric", "fid")
class FID(ReferenceMetric):
    """Fréchet Inception Distance (or on another feature network) to a reference split: fid, fid_n_ref."""

    @dataclass
    class Config(ReferenceConfig):
        pass

    def __init__(self, cfg: Config | None = None):
        self.cfg = cfg or FID.Config()

    def score_features(self, gen_nd: np.ndarray, ref: Reference) -> dict[str, float]:
        mu, sigma = gaussian_stats(gen_nd)
        name = f"fid{self.cfg.suffix}"
        return {name: frechet_distance(mu, sigma, ref.mu, ref.sigma), f"{name}_n_ref": float(ref.n)}

    @classmethod
    def directions(cls, cfg: Config) -> dict[str, Direction]:
        return {f"fid{cfg.suffix}": "min", f"fid{cfg.suffix}_n_ref": None}

    @classmethod
    def check_data(cls, cfg: Config, data_node: dict[str, Any]) -> None:
        check_reference(cfg, data_node, "fid")
