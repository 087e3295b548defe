"""backbone/hybrid beyond the registry contract (which runs its preset, after-step readout, on every structure
and order): the before-step readout, the scan following NAR's feed order, padded condition keys, the refusal
of a mask that is not block-causal over steps, adaLN (identity at init, decode = forward) and the presets."""

from __future__ import annotations

import pytest
import torch

from arlab.backbone.hybrid import Hybrid, step_plan
from arlab.backbone.mamba import MambaBlock
from arlab.config import build

L = 12
NAR_STEPS = torch.tensor([0, 1, 2, 3, 2, 3, 4, 3, 4, 5, 4, 5])  # steps interleave over positions
VAR_STEPS = torch.tensor([0, 1, 1, 2, 2, 2, 3, 3, 3, 3, 4, 4])


def tiny(**over) -> Hybrid:
    torch.manual_seed(0)
    cfg = dict(type="hybrid", dim=32, depth=3, pattern=["mamba", "attn"], heads=2, multiple_of=32, ssm_head_dim=16,
               d_state=8, chunk=4)
    bb = build("backbone", {**cfg, **over}).eval()
    with torch.no_grad():
        for p in bb.parameters():
            if p.ndim >= 2:
                p.normal_(std=0.3)  # every path carries signal (the zero-initialised adaLN gates too)
    return bb.double()


def tables(bb: Hybrid):
    rows, cols = (torch.arange(L) // 4).double(), (torch.arange(L) % 4).double()
    ident = torch.zeros(L, dtype=torch.bool)
    ident[0] = True
    return tuple(t.double() for t in bb.position_tables(rows, cols, ident))


def decode(bb, x, tabs, steps, mask, cond=None):
    """Feed call by call through a fresh state (``steps``: the call of each position; one prefill per call,
    ``step`` for single positions)."""
    state = bb.init_state(x.shape[0], L, torch.float64, torch.device("cpu"))
    out = torch.zeros_like(x)
    for k in range(int(steps.max()) + 1):
        idx = torch.nonzero(steps == k).flatten()
        call = bb.step if len(idx) == 1 else bb.prefill
        rows = mask[idx] if mask.ndim == 2 else mask[:, :, idx]
        out[:, idx] = call(x[:, idx], state, idx, tuple(t[idx] for t in tabs), rows, cond)
    return out


@pytest.mark.parametrize("readout", ["after_step", "before_step"])
@pytest.mark.parametrize("steps", [VAR_STEPS, NAR_STEPS], ids=["block_causal", "arbitrary"])
def test_both_readouts_honour_the_mask_and_decode_equals_forward(readout, steps):
    bb = tiny(scan_readout=readout)
    x, tabs = torch.randn(2, L, 32, dtype=torch.float64), tables(bb)
    mask = steps[None, :] <= steps[:, None]
    full = bb(x, tabs, mask=mask)
    for q in range(L):
        y = x.clone()
        y[:, ~mask[q]] = torch.randn_like(y[:, ~mask[q]])
        assert torch.allclose(bb(y, tabs, mask=mask)[:, q], full[:, q], atol=1e-9), q
    assert torch.allclose(decode(bb, x, tabs, steps, mask), full, atol=1e-9)


def test_readouts_differ_where_a_step_has_several_positions():
    """after_step lets a step's positions read each other through the scan; before_step does not (a Mamba-only
    stack shows the rule: the step's earlier positions reach a position only through the conv window)."""
    x = torch.randn(1, L, 32, dtype=torch.float64)
    mask = VAR_STEPS[None, :] <= VAR_STEPS[:, None]
    a, b = tiny(scan_readout="after_step"), tiny(scan_readout="before_step")
    ya, yb = a(x, tables(a), mask=mask), b(x, tables(b), mask=mask)
    assert not torch.allclose(ya[:, 1:], yb[:, 1:])
    m = tiny(scan_readout="before_step", pattern=["mamba"], depth=1)
    base = m(x, tables(m), mask=mask)
    y = x.clone()
    y[:, 2] += 1.0  # position 2 is in step 1 with position 1, fed after it
    assert torch.allclose(m(y, tables(m), mask=mask)[:, 1], base[:, 1], atol=1e-12)
    y = x.clone()
    y[:, 1] += 1.0  # fed before position 2 in the same step: reaches it only through the conv window
    assert not torch.allclose(m(y, tables(m), mask=mask)[:, 2], base[:, 2])


def test_the_scan_follows_the_feed_order_not_the_sequence():
    """NAR's steps scatter over the sequence: a Mamba-only stack would leak later steps in sequence order."""
    m = tiny(pattern=["mamba"], depth=2)
    x, tabs = torch.randn(1, L, 32, dtype=torch.float64), tables(m)
    mask = NAR_STEPS[None, :] <= NAR_STEPS[:, None]
    base = m(x, tabs, mask=mask)
    y = x.clone()
    y[:, 4] += 1.0  # step 2, before position 3 (step 3) in the sequence... and before it in the feed order
    assert not torch.allclose(m(y, tabs, mask=mask)[:, 3], base[:, 3])
    y = x.clone()
    y[:, 3] += 1.0  # step 3: position 4 (step 2) must not see it although it comes first in the sequence
    assert torch.allclose(m(y, tabs, mask=mask)[:, 4], base[:, 4], atol=1e-12)


def test_padded_condition_keys_reach_nobody_and_decoding_still_matches():
    """The generator's padding mask (left-padded caption): padded keys are hidden from all but themselves."""
    bb = tiny()
    x, tabs = torch.randn(2, L, 32, dtype=torch.float64), tables(bb)
    steps = torch.tensor([0, 1, 2, 3, 4, 4, 5, 5, 5, 6, 6, 7])  # a 4-token caption (causal), then image steps
    valid = torch.ones(2, L, dtype=torch.bool)
    valid[0, :2] = False  # sample 0: two pad tokens
    self_pos = torch.eye(L, dtype=torch.bool)
    mask = (((steps[None, :] <= steps[:, None])[None] & valid[:, None]) | self_pos[None])[:, None]  # (B, 1, L, L)
    full = bb(x, tabs, mask=mask)
    y = x.clone()
    y[0, :2] = torch.randn(2, 32, dtype=torch.float64)
    assert torch.allclose(bb(y, tabs, mask=mask)[0, 2:], full[0, 2:], atol=1e-9)
    calls = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 4])  # the caption in one prefill, as the generator
    assert torch.allclose(decode(bb, x, tabs, calls, mask), full, atol=1e-9)


def test_a_mask_that_hides_an_earlier_step_is_refused():
    """A sliding window hides positions fed earlier: the scan would carry them, so the call is refused."""
    pos = torch.arange(L)
    window = (pos[None, :] <= pos[:, None]) & (pos[:, None] - pos[None, :] < 3)
    with pytest.raises(ValueError, match="block-causal over decoding steps"):
        step_plan(window, pos, L, "after_step", None)
    with pytest.raises(ValueError, match="block-causal over decoding steps"):
        tiny()(torch.randn(1, L, 32, dtype=torch.float64), tables(tiny()), mask=window)


@pytest.mark.parametrize("groups", [0, 2])
def test_adaln_starts_as_identity_blocks_and_decodes_like_the_forward(groups):
    torch.manual_seed(0)
    bb = build("backbone", dict(type="hybrid", dim=32, depth=3, heads=2, multiple_of=32, ssm_head_dim=16, d_state=8,
                                chunk=4, cond_mode="adaln", adaln_groups=groups)).double()
    x, cond = torch.randn(2, L, 32, dtype=torch.float64), torch.randn(2, 32, dtype=torch.float64)
    mods = bb.ada(cond)
    for b, mod in zip(bb.blocks, mods):
        if isinstance(b, MambaBlock):
            assert torch.equal(b(x, None, None, mod)[0], x)
        else:
            tabs = tables(bb)
            assert torch.equal(b(x, tabs[0], tabs[1], None, mod, None, None), x)
    bb = tiny(cond_mode="adaln", adaln_groups=groups)
    tabs, mask = tables(bb), NAR_STEPS[None, :] <= NAR_STEPS[:, None]
    full = bb(x, tabs, mask=mask, cond_bd=cond)
    assert not torch.allclose(full, bb(x, tabs, mask=mask, cond_bd=torch.randn_like(cond)))  # the condition acts
    assert torch.allclose(decode(bb, x, tabs, NAR_STEPS, mask, cond), full, atol=1e-9)


def test_branch_and_learned_positions():
    bb = tiny(pos_embed="learned")
    br = bb.branch(1)
    assert br.cfg.pos_embed == "none" and br.kinds == ["mamba"] and len(tables(bb)) == 3
    x, tabs = torch.randn(2, L, 32, dtype=torch.float64), tables(bb)
    mask = VAR_STEPS[None, :] <= VAR_STEPS[:, None]
    assert torch.allclose(decode(bb, x, tabs, VAR_STEPS, mask), bb(x, tabs, mask=mask), atol=1e-9)


@pytest.mark.parametrize("llama,hybrid", [("shapes", "hybrid-shapes"), ("s", "hybrid-s")])
def test_presets_are_parameter_matched_to_the_llama_presets(llama, hybrid):
    with torch.device("meta"):
        a, b = (sum(p.numel() for p in build("backbone", n).parameters()) for n in (llama, hybrid))
    assert abs(b - a) / a < 0.05, (a, b)
