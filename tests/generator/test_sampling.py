"""CFG schedules and logit filtering."""

from __future__ import annotations

import math

import pytest
import torch

from arlab.generator.sampling import cfg_weight, draw, filter_logits


def test_schedules():
    w, T = 5.0, 11
    assert [cfg_weight("constant", w, k, T) for k in (0, 5, 10)] == [5.0, 5.0, 5.0]
    assert [cfg_weight("linear", w, k, T) for k in (0, 5, 10)] == pytest.approx([1.0, 3.0, 5.0])
    # Token-Shuffle's half-linear: 1 -> w over the first half of the steps, then hold
    assert [cfg_weight("half-linear", w, k, T) for k in (0, 2, 5, 8, 10)] == pytest.approx([1.0, 2.6, 5.0, 5.0, 5.0])
    assert [cfg_weight("cosine", w, k, T) for k in (0, 5, 10)] == pytest.approx([1.0, 3.0, 5.0])
    assert cfg_weight("cosine", w, 2, T) == pytest.approx(1 + 4 * (1 - math.cos(math.pi * 0.2)) / 2)
    for s in ("constant", "linear", "half-linear", "cosine"):
        assert cfg_weight(s, 1.0, 3, T) == 1.0


def test_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    k2 = filter_logits(logits, top_k=2)
    assert torch.isfinite(k2).tolist() == [[True, True, False, False, False]]
    p = filter_logits(logits, top_p=0.8)  # 0.5 + 0.2 < 0.8 <= 0.5 + 0.2 + 0.15: keep three
    assert torch.isfinite(p).tolist() == [[True, True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.4)).sum() == 1


def test_draw_follows_the_distribution_and_argmax_at_zero_temperature():
    logits = torch.log(torch.tensor([0.7, 0.2, 0.1])).expand(20000, 3)
    x = draw(logits, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(x, minlength=3).float() / len(x)
    assert torch.allclose(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.02)
    assert draw(logits[:5], temperature=0).tolist() == [0] * 5
