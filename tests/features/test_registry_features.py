"""Every registered feature network (``registry.names("features")``, plug-ins included): shapes, dtype,
determinism, batch-size invariance, logits where declared, and a non-empty identity and preprocessing.
A network whose resources are missing (weights package, checkpoint) is skipped with its ConfigError."""

from __future__ import annotations

import numpy as np
import pytest

from arlab import registry
from arlab.config import build
from arlab.data.shapes import render
from arlab.errors import ConfigError


def node_for(name: str, tiny_ckpt) -> dict:
    node: dict = {"type": name}
    fields = {p.name for p in registry.params(registry.get("features", name))}
    if "checkpoint" in fields:
        node["checkpoint"] = str(tiny_ckpt)
    if "device" in fields:
        node["device"] = "cpu"
    return node


@pytest.mark.parametrize("name", registry.names("features"))
def test_feature_network_contract(name, tiny_classifier):
    try:
        net = build("features", node_for(name, tiny_classifier[0]))
    except ConfigError as e:
        pytest.skip(str(e))
    images = np.stack([render(10**9 + i).image for i in range(4)])
    f = net.features(images, batch_size=4)
    assert f.shape == (4, net.dim) and f.dtype == np.float64 and np.isfinite(f).all()
    again = net.features_and_logits(images, batch_size=3, remember=False)[0]
    np.testing.assert_allclose(again, f, rtol=1e-4, atol=1e-5)
    assert net.preprocessing and ":" in net.identity()
    if net.has_logits:
        lg = net.logits(images)
        assert lg.shape[0] == 4 and lg.dtype == np.float64
        assert not net.classes or len(net.classes) == lg.shape[1]
    else:
        with pytest.raises(ConfigError, match="no class logits"):
            net.logits(images)
