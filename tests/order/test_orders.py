"""Every registered order: plan invariants on its layouts; raster, neighbor and next-scale specifics."""

from __future__ import annotations

import pytest
import torch

from arlab.config import build
from arlab.errors import ConfigError
from arlab.generator.layout import Layout
from arlab.registry import get, names

ORDERS = names("order")
GRIDS = [[(1, 1)], [(2, 2)], [(4, 4)], [(8, 8)], [(4, 2)]]
SCALES = [[(1, 1), (2, 2)], [(1, 1), (2, 2), (3, 3), (4, 4), (6, 6), (8, 8)], [(1, 1), (2, 3), (4, 6)]]


def layouts(name: str) -> list[Layout]:
    return [Layout(sc) for sc in (SCALES if get("order", name).cls.multiscale else GRIDS)]


@pytest.mark.parametrize("name", ORDERS)
def test_plan_invariants(name):
    for lay in layouts(name):
        plan = build("order", name).plan(lay)
        plan.check()  # perm is a permutation, inputs come from earlier steps, heads read their own step
        full = plan.full_mask(prefix=2)
        assert full.shape == (2 + plan.length - 1,) * 2
        assert bool(full[1:, :2].all())  # every image input sees the whole prefix
        assert not bool(full[0, 1:].any())  # the first prefix token sees only itself
        assert plan.heads == build("order", name).heads


@pytest.mark.parametrize("name", ORDERS)
def test_orders_refuse_the_wrong_kind_of_layout(name):
    multi = get("order", name).cls.multiscale
    wrong = Layout([(8, 8)]) if multi else Layout([(1, 1), (2, 2)])
    with pytest.raises(ConfigError, match="multi-scale"):
        build("order", name).plan(wrong)


def test_raster_is_row_major_one_token_per_step():
    plan = build("order", "raster").plan(Layout([(3, 4)]))
    assert plan.perm.tolist() == list(range(12))
    assert plan.src.tolist() == [-1] + list(range(11))
    assert plan.steps == 12 and plan.mask is None
    assert plan.in_cells[1:].tolist() == list(range(11))
    assert torch.equal(plan.full_mask(1), torch.ones(12, 12, dtype=torch.bool).tril())


def test_snake_walks_rows_alternately_through_grid_neighbours():
    plan = build("order", "snake").plan(Layout([(3, 4)]))
    assert plan.perm.tolist() == [0, 1, 2, 3, 7, 6, 5, 4, 8, 9, 10, 11]
    r, c = plan.perm // 4, plan.perm % 4
    assert ((r.diff().abs() + c.diff().abs()) == 1).all()  # every step moves to a grid neighbour
    assert plan.in_cells.tolist() == [-1] + plan.perm[:-1].tolist() and plan.src.tolist() == list(range(-1, 11))
    assert plan.steps == 12 and plan.mask is None  # causal: SDPA's fast path, any causal scan
    # a Token-Shuffle layout walks the fused grid: s = 2 on 4x4 tokens is a 2x2 grid of windows
    assert build("order", "snake").plan(Layout([(4, 4)], s=2)).perm.tolist() == [0, 1, 3, 2]


def test_neighbor_walks_anti_diagonals():
    plan = build("order", "neighbor").plan(Layout([(3, 4)]))
    cells = plan.perm.tolist()
    dist = [c // 4 + c % 4 for c in cells]
    assert dist == sorted(dist) and plan.step_sizes == [1, 2, 3, 3, 2, 1] and plan.steps == 3 + 4 - 1
    assert cells[:6] == [0, 1, 4, 2, 5, 8]  # by distance, then by row
    # NAR's sequence is raster: input j is the token of cell j - 1 (KV position = grid position), fed the
    # step after its anti-diagonal is drawn; the bottom-right token (cell 11) is never an input
    assert plan.in_cells.tolist() == list(range(-1, 11))
    assert plan.in_step.tolist() == [0] + [c // 4 + c % 4 + 1 for c in range(11)]
    assert [s.tolist() for s in plan.input_slots()][:3] == [[0], [1], [2, 5]]
    # heads: (0, 1) reads its left neighbour (0, 0) = input 1 with the right-head only
    assert plan.reads[cells.index(1)].tolist() == [1, -1]
    assert plan.reads[cells.index(4)].tolist() == [-1, 1]  # (1, 0): the lower-head from (0, 0)
    assert plan.reads[cells.index(5)].tolist() == [5, 2]  # (1, 1): left (1, 0) = input 5, up (0, 1) = input 2
    assert plan.reads[0].tolist() == [0, 0]


def test_next_scale_is_one_block_per_scale():
    lay = Layout([(1, 1), (2, 2), (3, 3)])
    plan = build("order", "next_scale").plan(lay)
    assert plan.step_sizes == [1, 4, 9] and plan.perm.tolist() == list(range(14))
    m = plan.mask
    scale = torch.tensor([0] + [1] * 4 + [2] * 9)
    assert torch.equal(m, scale[None, :] <= scale[:, None])  # VAR's block-causal mask
    assert plan.reads[:, 0].tolist() == list(range(14))  # the input at a cell predicts that cell
