"""Every attention path of backbone/llama equals the explicit-mask SDPA path on the orders' real masks:
flex attention with a BlockMask built once (``attn: flex``) for VAR's block-causal mask on msvq scales and
NAR's proximity mask (forward: torch 2.14 has no flex backward on CPU, where a step with gradients takes SDPA
with the cached boolean mask — checked too); captions' per-sample padding still goes through SDPA."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from arlab.backbone.llama import FlexMask, Llama
from arlab.errors import ConfigError
from tests.generator.test_model import conditions, make, random_codes

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def with_attn(g, attn: str):
    g.backbone.cfg = dataclasses.replace(g.backbone.cfg, attn=attn)
    g._masks.clear()
    return g


@pytest.mark.parametrize("order,s", [("next_scale", 1), ("next_scale", 2), ("neighbor", 1), ("neighbor", 2)])
def test_flex_equals_explicit_mask_in_outputs_and_gradients(order, s):
    g = make(order, s).train()
    assert g.plan.attention != "causal"  # a real non-causal mask
    codes, cond = random_codes(g, 2), conditions(g, 2)
    ref = g(codes, cond)
    ref_grads = torch.autograd.grad(ref.loss, [p for p in g.parameters() if p.requires_grad])
    with_attn(g, "flex")
    assert isinstance(g.static_mask(), FlexMask) and g.static_mask() is g.static_mask()  # built once
    tol = 1e-5 * float(ref.logits_bnv.abs().max())  # float32 rounding of logits of size ~10
    with torch.no_grad():  # through flex_attention itself
        torch.testing.assert_close(g(codes, cond).logits_bnv, ref.logits_bnv, rtol=1e-5, atol=tol)
    out = g(codes, cond)  # with gradients on CPU: SDPA with the cached mask
    grads = torch.autograd.grad(out.loss, [p for p in g.parameters() if p.requires_grad])
    torch.testing.assert_close(out.logits_bnv, ref.logits_bnv, rtol=1e-5, atol=tol)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))
    g.eval()  # decoding (KV cache, boolean mask rows) is unchanged and still equals recomputation
    a = g.sample(cond, cfg_scale=2.0, generator=torch.Generator().manual_seed(0))
    b = g.sample(cond, cfg_scale=2.0, generator=torch.Generator().manual_seed(0), use_cache=False)
    assert torch.equal(a, b)


def test_block_mask_holds_the_dense_mask_across_blocks():
    """A 300-position random mask (3 blocks of 128, partial last block): flex with it = SDPA with it."""
    g = torch.Generator().manual_seed(0)
    S = 300
    step = torch.randint(0, 12, (S,), generator=g).sort().values
    mask = (step[None, :] <= step[:, None]) | (torch.rand(S, S, generator=g) < 0.1)
    mask.fill_diagonal_(True)
    bb = Llama(Llama.Config(dim=32, depth=1, heads=2, multiple_of=32, attn="flex"))
    x = torch.randn(1, S, 32, generator=g)
    tables = bb.position_tables(torch.arange(S).float(), torch.zeros(S), torch.zeros(S, dtype=torch.bool))
    with torch.no_grad():
        torch.testing.assert_close(bb(x, tables, mask=FlexMask.of(mask)), bb(x, tables, mask=mask), rtol=1e-5,
                                   atol=1e-5)


def test_padded_conditions_fall_back_to_sdpa_and_agree():
    g = make("raster", 2, cond="text")
    codes, cond = random_codes(g, 3), conditions(g, 3)
    ref = g(codes, cond).logits_bnv
    torch.testing.assert_close(with_attn(g, "flex")(codes, cond).logits_bnv, ref)


def test_bad_attn_is_refused():
    with pytest.raises(ConfigError, match="attn 'flash' is not one of sdpa, flex"):
        Llama.Config(dim=64, heads=4, attn="flash")
