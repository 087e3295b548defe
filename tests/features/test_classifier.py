"""task/classifier and features/classifier: a few training steps on shapes-tiny, then the checkpoint as a
feature network (shapes of features and logits, determinism, resizing, class names, errors)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from arlab.config import build
from arlab.data.shapes import CLASSES, render
from arlab.errors import ConfigError


def shapes_images(n: int, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    samples = [render(10**9 + i, size=size) for i in range(n)]
    return np.stack([s.image for s in samples]), np.array([s.label for s in samples])


def test_classifier_trains_and_reports_val_acc(tiny_classifier):
    ckpt, metrics = tiny_classifier
    assert ckpt.is_file()
    saved = json.loads((ckpt.parent.parent / "metrics.json").read_text())
    assert saved["train/steps"] == 8
    assert 0.0 <= saved["val/acc"] <= 1.0 and np.isfinite(saved["val/loss"])
    assert "train/acc" in saved


def test_features_and_logits_have_the_right_shapes(tiny_classifier):
    net = build("features", {"type": "classifier", "checkpoint": str(tiny_classifier[0]), "device": "cpu"})
    images, _ = shapes_images(12)
    f, lg = net.features(images, batch_size=5), net.logits(images, batch_size=5)
    assert f.shape == (12, 16) and f.dtype == np.float64 and net.dim == 16
    assert lg.shape == (12, 10) and lg.dtype == np.float64 and net.has_logits
    assert net.classes == CLASSES
    assert (f >= 0).all()  # features are taken after the ReLU
    np.testing.assert_allclose(net.features(images, batch_size=12), f, rtol=1e-5, atol=1e-6)
    big, _ = shapes_images(3, size=64)  # other sizes are resized to the training size
    assert net.features(big).shape == (3, 16)
    assert net.identity().startswith("classifier:") and "32px" in net.preprocessing


def test_missing_checkpoint_is_a_one_line_config_error(tmp_path):
    with pytest.raises(ConfigError) as e:
        build("features", {"type": "classifier", "checkpoint": str(tmp_path / "none.ckpt")})
    assert "\n" not in str(e.value) and "arlab train shapes/classifier" in str(e.value)


def test_a_checkpoint_of_another_task_is_refused(tmp_path):
    import torch

    path = tmp_path / "other.ckpt"
    torch.save({"hyper_parameters": {"experiment": {"task": {"type": "tokenizer"}}}, "state_dict": {}}, path)
    with pytest.raises(ConfigError, match="not a classifier checkpoint"):
        build("features", {"type": "classifier", "checkpoint": str(path)})
