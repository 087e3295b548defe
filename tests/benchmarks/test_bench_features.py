"""benchmarks/bench_features.py: each feature network timed on real-sized inputs, a missing one named with its
reason rather than crashing the bench."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from arlab.errors import ConfigError
from arlab.features.inception import weights_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_features  # noqa: E402


def test_inception_is_timed_on_its_full_2048_d_features():
    try:
        weights_file()
    except ConfigError as e:  # the eval extra is not installed: its test says how to get it
        pytest.skip(str(e))
    row = bench_features.time_network("inception", n=3, batch=2)
    assert row["dim"] == 2048 and row["n"] == 3 and row["seconds"] > 0
    assert row["images_per_s"] == pytest.approx(3 / row["seconds"], rel=0.05)
    assert row["s_per_1000"] == pytest.approx(1000 / row["images_per_s"], rel=0.05)


def test_a_missing_classifier_is_listed_with_its_reason(tmp_path):
    node = {"type": "classifier", "checkpoint": str(tmp_path / "none.ckpt")}
    row = bench_features.time_network(node, n=4, batch=2)
    assert set(row) == {"features", "skipped"} and "does not exist" in row["skipped"]
