"""Every registered metric (``registry.names("metric")``, plug-ins included) on a few shapes images with the
tiny shapes classifier as feature network and shapes-tiny as reference: finite numbers, deterministic, and
its config-time data check. Plus one sanity check that the reference metrics rank real images above noise."""

from __future__ import annotations

import math

import numpy as np
import pytest

from arlab import registry
from arlab.config import build, resolve_node
from arlab.data.shapes import CLASSES, render


def metric_node(name: str, ckpt, **extra) -> dict:
    node: dict = {"type": name}
    params = registry.params(registry.get("metric", name))
    for p in params:
        if p.slot == "features":
            node[p.name] = {"type": "classifier", "checkpoint": str(ckpt), "device": "cpu"}
        elif p.name == "reference":
            node[p.name] = "shapes-tiny"
        elif p.name == "split":
            node[p.name] = "test"
    node.update({k: v for k, v in extra.items() if k in {p.name for p in params}})
    return node


def shapes(n: int) -> tuple[np.ndarray, np.ndarray]:
    s = [render(10**9 + i) for i in range(n)]
    return np.stack([x.image for x in s]), np.array([x.label for x in s])


META = {"dataset": "shapes-32px-s0-2000-200", "classes": CLASSES, "num_classes": 10, "image_size": 32,
        "images": "shapes-tiny"}


@pytest.mark.parametrize("name", registry.names("metric"))
def test_metric_contract(name, tiny_classifier):
    node = metric_node(name, tiny_classifier[0], subsets=5, subset_size=50)
    metric = build("metric", node)
    images, labels = shapes(20)
    out = metric.compute(images, labels, META)
    assert out and all(isinstance(v, float) and math.isfinite(v) for v in out.values()), out
    assert metric.compute(images, labels, META) == out  # deterministic
    entry = registry.get("metric", name)
    entry.cls.check_data(metric.cfg, {"type": "tokens", "images": "shapes-tiny"})
    directions = entry.cls.directions(metric.cfg)  # arlab eval ranks sweep settings with it
    assert set(directions) == set(out), f"{name} declares directions for {sorted(directions)}, returns {sorted(out)}"
    assert set(directions.values()) <= {"min", "max", None}, directions
    if name != "toy_brightness":  # every metric of arlab's ranks at least one of its outputs
        assert {"min", "max"} & set(directions.values()), directions


@pytest.mark.parametrize("name", ["fid", "kid", "precision_recall", "inception_score", "class_acc",
                                  "shapes_checker"])
def test_directions_say_which_way_is_better(name):
    cfg = registry.get("metric", name).cls.Config()
    want = {"fid": {"fid": "min"}, "kid": {"kid": "min"}, "precision_recall": {"precision": "max", "recall": "max"},
            "inception_score": {"inception_score": "max"}, "class_acc": {"classifier_acc": "max"},
            "shapes_checker": {"class_acc": "max"}}[name]
    got = registry.get("metric", name).cls.directions(cfg)
    assert {k: v for k, v in got.items() if v is not None} == want


def test_reference_metrics_rank_real_images_above_noise(tiny_classifier):
    ckpt = tiny_classifier[0]
    real, labels = shapes(100)
    noise = np.random.default_rng(0).integers(0, 256, real.shape, dtype=np.uint8)
    fid = build("metric", metric_node("fid", ckpt) | {"split": "train"})
    pr = build("metric", metric_node("precision_recall", ckpt) | {"split": "train"})
    f_real, f_noise = fid.compute(real, labels, META), fid.compute(noise, labels, META)
    assert f_real["fid_n_ref"] == 2000 and f_real["fid"] < f_noise["fid"]
    assert pr.compute(real, labels, META)["recall"] > pr.compute(noise, labels, META)["recall"]


def test_repo_presets_name_their_outputs_apart():
    """Presets on different feature networks give different output names (fid vs fid_cnn)."""
    assert resolve_node("metric", "fid")["suffix"] == ""
    assert resolve_node("metric", "fid-shapes-cnn")["suffix"] == "_cnn"
