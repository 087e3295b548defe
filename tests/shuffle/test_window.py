"""shuffle/window (Token-Shuffle): round trips, shapes, s = 1 identity, the fused embedding."""

from __future__ import annotations

import pytest
import torch

from arlab.config import build, presets
from arlab.errors import ConfigError
from arlab.shuffle.window import TokenShuffle, grid_from_windows, window_grid


@pytest.mark.parametrize("s", [1, 2, 4])
def test_shuffle_then_unshuffle_of_a_token_grid_is_the_identity(s):
    codes = torch.randint(0, 1000, (3, 8, 8))
    win = window_grid(codes, s)
    assert win.shape == (3, 8 // s, 8 // s, s * s)
    assert torch.equal(grid_from_windows(win, s), codes)
    # window (0, 0) holds the top-left s x s block, row-major
    assert win[0, 0, 0].tolist() == codes[0, :s, :s].flatten().tolist()
    if s > 1:
        assert win[0, 0, 1].tolist() == codes[0, :s, s:2 * s].flatten().tolist()


@pytest.mark.parametrize("name", sorted(presets("shuffle")))
def test_presets_shapes_and_param_counts(name):
    d = 64
    ts = build("shuffle", name, dim=d)
    s = ts.s
    e = torch.randn(2, 8, 8, d)
    fused = ts.shuffle(e)
    assert fused.shape == (2, 8 // s, 8 // s, d)
    out = ts.unshuffle(fused.flatten(1, 2))
    assert out.shape == (2, (8 // s) ** 2, s * s, d)
    n = sum(p.numel() for p in ts.parameters())
    if s == 1:
        assert n == 0 and torch.equal(fused, e)  # the identity: nothing to learn
    else:
        c = d // (s * s)
        hidden = int(d * ts.cfg.mlp_ratio)
        mlp = d + (d * hidden + hidden) + (hidden * d + d)
        assert n == (d * c + c) + (c * d + d) + 2 * ts.cfg.blocks * mlp


def test_fused_token_is_the_concatenation_of_compressed_tokens_before_the_mlps():
    torch.manual_seed(0)
    ts = TokenShuffle(TokenShuffle.Config(s=2, blocks=0), dim=16)
    e = torch.randn(1, 4, 4, 16)
    fused = ts.shuffle(e)
    c = ts.compress(e)
    expect = torch.cat([c[0, 0, 2], c[0, 0, 3], c[0, 1, 2], c[0, 1, 3]])  # window (0, 1), row-major
    assert torch.allclose(fused[0, 0, 1], expect)
    h = torch.randn(1, 3, 16)
    out = ts.unshuffle(h)  # split into 4 chunks of 4, each expanded to 16
    assert torch.allclose(out[0, 1, 2], ts.expand(h[0, 1, 8:12]))


def test_residual_blocks_start_as_the_identity():
    ts = TokenShuffle(TokenShuffle.Config(s=2, blocks=2), dim=16)
    x = torch.randn(2, 5, 16)
    assert torch.allclose(ts.fuse(x), x) and torch.allclose(ts.unfuse(x), x)


def test_bad_windows():
    with pytest.raises(ConfigError, match="s=3: must be 1"):
        TokenShuffle.Config(s=3)
    with pytest.raises(ConfigError, match="width 66 divisible by s²=4"):
        TokenShuffle(TokenShuffle.Config(s=2), dim=66)
    ts = TokenShuffle(TokenShuffle.Config(s=4), dim=64)
    msg = "token grid 6x6 is not divisible by the Token-Shuffle window s=4; use s in \\[1, 2\\]"
    with pytest.raises(ConfigError, match=msg):
        ts.check_grid(6, 6)
