"""metric/fid: the Fréchet distance is 0 on identical statistics and equals the closed form on Gaussians."""

from __future__ import annotations

import numpy as np

from arlab.metric.fid import frechet_distance, gaussian_stats, trace_sqrt_product


def random_psd(rng: np.random.Generator, d: int, rank: int | None = None) -> np.ndarray:
    a = rng.normal(size=(d, rank or d))
    return a @ a.T / d


def test_fid_of_a_set_with_itself_is_zero():
    rng = np.random.default_rng(0)
    for n, d in ((500, 16), (40, 64)):  # full rank and singular (N < D) covariances
        x = rng.normal(size=(n, d)) * 3 + 5
        mu, sigma = gaussian_stats(x)
        assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * np.trace(sigma)


def test_diagonal_gaussians_match_the_closed_form():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    s1, s2 = rng.uniform(0.1, 3, 8), rng.uniform(0.1, 3, 8)  # standard deviations
    expected = ((mu1 - mu2) ** 2).sum() + ((s1 - s2) ** 2).sum()
    assert np.isclose(frechet_distance(mu1, np.diag(s1**2), mu2, np.diag(s2**2)), expected, rtol=1e-10)


def test_trace_sqrt_product_of_non_commuting_matrices():
    rng = np.random.default_rng(2)
    a, b = random_psd(rng, 2), random_psd(rng, 2)
    m = a @ b  # 2x2 with positive eigenvalues: Tr √M = √(Tr M + 2 √det M)
    closed = np.sqrt(np.trace(m) + 2 * np.sqrt(np.linalg.det(m)))
    assert np.isclose(trace_sqrt_product(a, b), closed, rtol=1e-10)
    a, b = random_psd(rng, 30), random_psd(rng, 30, rank=10)
    eig = np.linalg.eigvals(a @ b).real  # independent route: eigenvalues of the non-symmetric product
    assert np.isclose(trace_sqrt_product(a, b), np.sqrt(np.clip(eig, 0, None)).sum(), rtol=1e-6)


def test_fid_of_samples_approaches_the_population_value():
    rng = np.random.default_rng(3)
    d = 4
    c1, c2 = random_psd(rng, d) + 0.1 * np.eye(d), random_psd(rng, d) + 0.1 * np.eye(d)
    mu1, mu2 = np.zeros(d), np.full(d, 0.5)
    exact = frechet_distance(mu1, c1, mu2, c2)
    x = rng.multivariate_normal(mu1, c1, size=50_000)
    y = rng.multivariate_normal(mu2, c2, size=50_000)
    est = frechet_distance(*gaussian_stats(x), *gaussian_stats(y))
    assert abs(est - exact) < 0.02 * exact + 5e-3
