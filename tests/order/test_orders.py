"""Every registered order: plan invariants; raster specifics."""

from __future__ import annotations

import pytest
import torch

from arlab.registry import build, names

ORDERS = names("order")


@pytest.mark.parametrize("name", ORDERS)
@pytest.mark.parametrize("hw", [(1, 1), (2, 2), (4, 4), (8, 8), (4, 2)])
def test_plan_invariants(name, hw):
    plan = build("order", name).plan(*hw)
    plan.check()  # perm is a permutation, inputs come from earlier steps, the mask never sees later steps
    full = plan.full_mask(prefix=2)
    assert full.shape == (2 + plan.length - 1,) * 2
    assert bool(full[1:, :2].all())  # every image input sees the whole prefix
    assert not bool(full[0, 1:].any())  # the first prefix token sees only itself


def test_raster_is_row_major_one_token_per_step():
    plan = build("order", "raster").plan(3, 4)
    assert plan.perm.tolist() == list(range(12))
    assert plan.src.tolist() == [-1] + list(range(11))
    assert plan.steps == 12 and plan.mask is None
    rows, cols = plan.rows_cols()
    assert rows[1:].tolist() == [i // 4 for i in range(11)] and cols[1:].tolist() == [i % 4 for i in range(11)]
    assert torch.equal(plan.full_mask(1), torch.ones(12, 12, dtype=torch.bool).tril())
