"""metric/kid, metric/precision_recall, metric/inception_score on synthetic features with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from arlab.metric.inception_score import inception_score
from arlab.metric.kid import kernel_distance, mmd2_unbiased
from arlab.metric.precision_recall import knn_radii, precision_recall


def test_kid_is_about_zero_on_two_draws_of_one_distribution_and_positive_when_shifted():
    rng = np.random.default_rng(0)
    d = 32
    x, y = rng.normal(size=(600, d)), rng.normal(size=(600, d))
    same, same_std, m = kernel_distance(x, y, subsets=20, subset_size=300, seed=0)
    assert m == 300 and abs(same) < max(3 * same_std, 1e-3)
    shifted, shifted_std, _ = kernel_distance(x, y + 0.5, subsets=20, subset_size=300, seed=0)
    assert shifted > 10 * max(shifted_std, abs(same)) and shifted > 0.01
    assert kernel_distance(x, y, subsets=5, subset_size=100, seed=1) == kernel_distance(x, y, 5, 100, 1)


def test_mmd2_is_unbiased_not_zero_floor():
    rng = np.random.default_rng(1)
    vals = [mmd2_unbiased(rng.normal(size=(50, 8)), rng.normal(size=(50, 8))) for _ in range(40)]
    assert min(vals) < 0 < max(vals)  # an unbiased estimator of 0 takes both signs
    assert abs(np.mean(vals)) < 3 * np.std(vals) / np.sqrt(len(vals))


def modes(rng: np.random.Generator, n: int, centres: np.ndarray) -> np.ndarray:
    return centres[rng.integers(len(centres), size=n)] + 0.3 * rng.normal(size=(n, centres.shape[1]))


def test_precision_and_recall_are_one_on_identical_sets():
    x = np.random.default_rng(2).normal(size=(300, 16))
    assert precision_recall(x, x.copy(), k=3) == (1.0, 1.0)


def test_recall_drops_when_modes_are_removed_and_precision_stays():
    rng = np.random.default_rng(3)
    centres = np.eye(8)[:4] * 10  # 4 well-separated modes
    real = modes(rng, 800, centres)
    full = modes(rng, 800, centres)
    half = modes(rng, 800, centres[:2])  # two modes dropped
    p_full, r_full = precision_recall(real, full)
    p_half, r_half = precision_recall(real, half)
    assert p_full > 0.85 and r_full > 0.85  # k = 3 balls miss some of a Gaussian's tails in 8-d
    assert p_half > 0.85 and 0.4 < r_half < 0.6 and r_half < r_full - 0.3
    far = real + 100.0
    assert precision_recall(real, far) == (0.0, 0.0)


def test_knn_radius_excludes_the_point_itself():
    x = np.array([[0.0], [1.0], [3.0], [6.0]])
    np.testing.assert_allclose(knn_radii(x, k=1), [1.0, 1.0, 4.0, 9.0])  # squared distances


def test_inception_score_bounds():
    k = 10
    assert inception_score(np.zeros((100, k)), splits=10)[0] == pytest.approx(1.0)  # no confidence: 1
    confident = np.eye(k)[np.arange(200) % k] * 50.0  # sure and balanced: the number of classes
    mean, std = inception_score(confident, splits=10)
    assert mean == pytest.approx(k, rel=1e-6) and std < 1e-6
    one_class = np.eye(k)[np.zeros(200, int)] * 50.0  # sure but one class: 1
    assert inception_score(one_class)[0] == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError):
        inception_score(np.zeros((5, k)), splits=10)
