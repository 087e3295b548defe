"""The generator over every order × Token-Shuffle window: causality through the model, KV cache ==
full recomputation, steps per image, CFG equivalences, loss bookkeeping."""

from __future__ import annotations

import pytest
import torch

from arlab.backbone.llama import Llama
from arlab.conditioner.label import ClassConditioner
from arlab.errors import ConfigError
from arlab.generator.model import Generator
from arlab.generator.sampling import CFG_SCHEDULES
from arlab.registry import build, names
from arlab.shuffle.window import TokenShuffle, window_grid

GRID = (8, 8)
V = 37


def make(order: str = "raster", s: int = 1, cond_mode: str = "prefix", seed: int = 0) -> Generator:
    torch.manual_seed(seed)
    bb = Llama(Llama.Config(dim=64, depth=2, heads=4, multiple_of=32, cond_mode=cond_mode, qk_norm=True))
    g = Generator(bb, build("order", order), TokenShuffle(TokenShuffle.Config(s=s), 64),
                  ClassConditioner(ClassConditioner.Config(), 64, num_classes=10), V, GRID).eval()
    with torch.no_grad():  # leave the zero / identity inits so every path carries signal
        for m in g.modules():
            if isinstance(m, torch.nn.Linear):
                torch.nn.init.normal_(m.weight, std=0.3)
    return g


CASES = [(o, s) for o in names("order") for s in (1, 2, 4)]


@pytest.mark.parametrize("order,s", CASES)
def test_changing_a_later_token_leaves_earlier_logits_unchanged(order, s):
    g = make(order, s)
    plan = g.plan
    codes = torch.randint(0, V, (2, *GRID))
    labels = torch.tensor([1, 7])
    base = window_grid(g(codes, labels).logits_bhwv, s).flatten(1, 2)  # (B, cells, s², V)
    step = plan.step_of_slot()
    slot_of_cell = torch.argsort(plan.perm)
    for t in [1, plan.length // 2, plan.length - 1]:
        cell = int(plan.perm[t])
        changed = window_grid(codes.clone(), s).flatten(1, 2)
        changed[:, cell] = (changed[:, cell] + 1) % V
        from arlab.shuffle.window import grid_from_windows

        new_codes = grid_from_windows(changed.unflatten(1, (GRID[0] // s, GRID[1] // s)), s)
        new = window_grid(g(new_codes, labels).logits_bhwv, s).flatten(1, 2)
        earlier = step[slot_of_cell] <= step[t]  # cells whose step is not after t's: unaffected
        assert torch.allclose(new[:, earlier], base[:, earlier], atol=1e-5), (order, s, t)
        if t + 1 < plan.length:
            later = step[slot_of_cell] > step[t]
            assert not torch.allclose(new[:, later], base[:, later], atol=1e-4)  # the change is seen later


@pytest.mark.parametrize("order,s", CASES)
@pytest.mark.parametrize("cond_mode", ["prefix", "adaln"])
def test_kv_cached_decoding_gives_the_full_recomputation_logits(order, s, cond_mode):
    g = make(order, s, cond_mode)
    labels = torch.tensor([0, 4, 9])
    for cfg in (1.0, 3.0):
        gen = torch.Generator().manual_seed(5)
        codes, logits = g.sample(labels, cfg_scale=cfg, cfg_schedule="half-linear", generator=gen, return_logits=True)
        gen = torch.Generator().manual_seed(5)
        codes_ref, logits_ref = g.sample(labels, cfg_scale=cfg, cfg_schedule="half-linear", generator=gen,
                                         return_logits=True, use_cache=False)
        tol = 1e-5 * float(logits_ref.abs().max())  # logits reach ~70 with these weights
        assert torch.allclose(logits, logits_ref, atol=tol), (logits - logits_ref).abs().max()
        assert torch.equal(codes, codes_ref)
        if cfg == 1.0:  # and both equal the teacher-forced forward on the sampled grid
            assert torch.allclose(g(codes, labels).logits_bhwv, logits, atol=tol)


@pytest.mark.parametrize("s,steps", [(1, 64), (2, 16), (4, 4)])
def test_raster_steps_per_image(s, steps):
    assert make("raster", s).steps_per_image == steps == GRID[0] * GRID[1] // (s * s)


@pytest.mark.parametrize("schedule", CFG_SCHEDULES)
def test_cfg_scale_one_equals_plain_conditional_sampling_for_every_schedule(schedule):
    g = make("raster", 2)
    labels = torch.tensor([3, 3, 8])
    a = g.sample(labels, cfg_scale=1.0, cfg_schedule=schedule, generator=torch.Generator().manual_seed(1))
    b = g.sample(labels, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_cfg_uses_the_null_class_and_changes_the_samples():
    g = make("raster", 2)
    labels = torch.tensor([3, 3, 8])
    _, lc = g.sample(labels, generator=torch.Generator().manual_seed(1), temperature=0, return_logits=True)
    _, lg = g.sample(labels, cfg_scale=4.0, generator=torch.Generator().manual_seed(1), temperature=0,
                     return_logits=True)
    assert not torch.allclose(lc, lg)


def test_sampling_is_deterministic_for_a_seed():
    g = make("raster", 2)
    labels = torch.arange(4)
    a = g.sample(labels, cfg_scale=2.0, generator=torch.Generator().manual_seed(3), top_k=10)
    b = g.sample(labels, cfg_scale=2.0, generator=torch.Generator().manual_seed(3), top_k=10)
    c = g.sample(labels, cfg_scale=2.0, generator=torch.Generator().manual_seed(4), top_k=10)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_loss_is_ce_over_every_original_token_and_per_window_position():
    g = make("raster", 2)
    codes = torch.randint(0, V, (2, *GRID))
    out = g(codes, torch.tensor([0, 1]))
    ce = torch.nn.functional.cross_entropy(out.logits_bhwv.reshape(-1, V), codes.reshape(-1))
    assert torch.allclose(out.ce, ce, atol=1e-6) and torch.allclose(out.loss, ce)
    assert out.ce_per_window_pos.shape == (4,)
    assert torch.allclose(out.ce_per_window_pos.mean(), ce, atol=1e-5)
    g.z_loss_weight = 1e-2
    out2 = g(codes, torch.tensor([0, 1]))
    assert torch.allclose(out2.loss, out2.ce + 1e-2 * out2.z_loss) and out2.z_loss > 0


def test_bad_inputs():
    with pytest.raises(ConfigError, match="token grid 6x6 is not divisible by the Token-Shuffle window s=4"):
        bb = Llama(Llama.Config(dim=64, depth=1, heads=4, multiple_of=32))
        Generator(bb, build("order", "raster"), TokenShuffle(TokenShuffle.Config(s=4), 64),
                  ClassConditioner(ClassConditioner.Config(), 64, 10), V, (6, 6))
    g = make()
    with pytest.raises(ValueError, match=r"class labels \[11\] are outside 0..9"):
        g.sample(torch.tensor([1, 11]))
    with pytest.raises(ConfigError, match="CFG schedule 'ramp' does not exist"):
        g.sample(torch.tensor([1]), cfg_schedule="ramp")
