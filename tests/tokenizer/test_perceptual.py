"""PerceptualLoss: LPIPS-style distance with a frozen, pluggable feature net and no download."""

from __future__ import annotations

import socket
import urllib.request

import pytest
import torch
import torchvision

from arlab.errors import ConfigError
from arlab.tokenizer.perceptual import PerceptualConfig, PerceptualLoss


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to reach the network fails the test."""

    def refuse(*a, **k):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def images(n: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def test_random_network_distance_properties():
    loss = PerceptualLoss(PerceptualConfig(network="random"))
    assert loss.comparable is False
    x, y = images(seed=0), images(seed=1)
    d_xx = loss(x, x)
    assert d_xx.shape == (2,) and torch.all(d_xx == 0)
    d_xy = loss(x, y)
    assert torch.all(d_xy > 0)
    torch.testing.assert_close(d_xy, loss(y, x))
    # closer images are closer
    assert torch.all(loss(x, x + 0.05 * (y - x)) < d_xy)


def test_random_network_is_seeded_and_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    a = PerceptualLoss(PerceptualConfig(network="random"))
    assert torch.equal(state, torch.get_rng_state())
    torch.manual_seed(123)
    b = PerceptualLoss(PerceptualConfig(network="random"))
    for pa, pb in zip(a.net.parameters(), b.net.parameters()):
        assert torch.equal(pa, pb)


def test_gradients_reach_the_input_not_the_frozen_net():
    loss = PerceptualLoss(PerceptualConfig(network="random"))
    x = images(seed=0).requires_grad_(True)
    loss(x, images(seed=1)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    params = list(loss.net.parameters())
    assert params and all(not p.requires_grad and p.grad is None for p in params)


def test_feature_net_stays_in_eval_mode():
    loss = PerceptualLoss(PerceptualConfig(network="random"))
    loss.train()
    assert loss.training and not loss.net.training
    assert not any(m.training for m in loss.net.modules())
    loss.train(False)
    assert not loss.training and not loss.net.training


def test_vgg16_without_weights_path_is_a_config_error(no_network, tmp_path):
    with pytest.raises(ConfigError, match="weights_path") as e:
        PerceptualLoss(PerceptualConfig(network="vgg16"))
    assert "never downloads" in str(e.value) and "vgg16-397923af.pth" in str(e.value)
    with pytest.raises(ConfigError, match="does not exist"):
        PerceptualLoss(PerceptualConfig(network="vgg16", weights_path=str(tmp_path / "missing.pth")))


def test_vgg16_loads_a_local_weights_file(no_network, tmp_path):
    torch.manual_seed(0)
    vgg = torchvision.models.vgg16(weights=None)
    # only the features are used; skip the 120M-parameter classifier to keep the file small
    sd = {k: v for k, v in vgg.state_dict().items() if k.startswith("features.")}
    path = tmp_path / "vgg16.pth"
    torch.save(sd, path)
    loss = PerceptualLoss(PerceptualConfig(network="vgg16", weights_path=str(path)))
    assert loss.comparable is True and loss.channels == [64, 128, 256, 512, 512]
    torch.testing.assert_close(loss.net.layers[0].weight, sd["features.0.weight"])
    torch.testing.assert_close(loss.net.layers[28].weight, sd["features.28.weight"])
    x, y = images(seed=0), images(seed=1)
    assert torch.all(loss(x, x) == 0) and torch.all(loss(x, y) > 0)
    loss.train()
    assert not loss.net.training

    cfg = PerceptualConfig(network="vgg16", weights_path=str(path), layers=["relu1_2", "relu2_2"])
    two = PerceptualLoss(cfg)
    assert two.channels == [64, 128] and len(two.net.layers) == 9  # runs only up to relu2_2
    with pytest.raises(ConfigError, match="relu2_3"):
        PerceptualLoss(PerceptualConfig(network="vgg16", weights_path=str(path), layers=["relu2_3"]))


def test_vgg16_rejects_a_foreign_state_dict(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(3)}, path)
    with pytest.raises(ConfigError, match="VGG16"):
        PerceptualLoss(PerceptualConfig(network="vgg16", weights_path=str(path)))


def test_timm_model_with_local_weights(no_network, tmp_path):
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet10t", pretrained=False)
    path = tmp_path / "resnet10t.pth"
    torch.save(model.state_dict(), path)
    cfg = PerceptualConfig(network="resnet10t", weights_path=str(path), layers=["0", "layer2"])
    loss = PerceptualLoss(cfg)
    assert loss.comparable and loss.channels == [64, 128]
    torch.testing.assert_close(loss.net.model.layer2[0].conv1.weight, model.layer2[0].conv1.weight)
    x, y = images(seed=0), images(seed=1)
    assert torch.all(loss(x, x) == 0) and torch.all(loss(x, y) > 0)
    with pytest.raises(ConfigError, match="weights_path"):
        PerceptualLoss(PerceptualConfig(network="resnet10t"))


def test_unknown_network_is_a_config_error():
    with pytest.raises(ConfigError, match="resnet1Ot"):
        PerceptualLoss(PerceptualConfig(network="resnet1Ot", weights_path="x.pth"))


def test_linear_heads_weight_the_channels(tmp_path):
    plain = PerceptualLoss(PerceptualConfig(network="random"))
    path = tmp_path / "heads.pth"
    heads = {f"lin{i}.model.1.weight": torch.full((1, c, 1, 1), 2.0) for i, c in enumerate(plain.channels)}
    torch.save(heads, path)
    weighted = PerceptualLoss(PerceptualConfig(network="random", heads_path=str(path)))
    x, y = images(seed=0), images(seed=1)
    torch.testing.assert_close(weighted(x, y), 2 * plain(x, y))
    torch.save({"lin0.model.1.weight": torch.ones(1, 3, 1, 1)}, path)
    with pytest.raises(ConfigError, match="heads_path"):
        PerceptualLoss(PerceptualConfig(network="random", heads_path=str(path)))


def test_distance_by_hand_for_one_layer():
    """Σ_c (f̂(x) − f̂(y))², f̂ unit-normalised over channels, spatial mean (uniform heads)."""
    loss = PerceptualLoss(PerceptualConfig(network="random", layers=["0"]))
    x, y = images(seed=0), images(seed=1)
    fx, fy = loss.features(x)[0], loss.features(y)[0]
    fx = fx / (fx.norm(dim=1, keepdim=True) + 1e-10)
    fy = fy / (fy.norm(dim=1, keepdim=True) + 1e-10)
    torch.testing.assert_close(loss(x, y), (fx - fy).square().sum(1).mean((1, 2)))
