"""quantizer/fsq: the code grid, the index mapping, the straight-through gradient, fp32 under autocast."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import yaml

from arlab.config import build
from arlab.errors import ConfigError
from arlab.quantizer.fsq import FSQ

REPO = Path(__file__).resolve().parents[2]
PAPER_LEVELS = [[8, 6, 5], [8, 5, 5, 5], [7, 5, 5, 5, 5], [8, 8, 8, 6, 5], [8, 8, 8, 5, 5, 5]]
SMALL_LEVELS = [[2], [3], [2, 3], [4, 2, 3]]  # L < 5 corners (L = 2 is where (1 - eps) gave NaN)


def make(levels: list[int]) -> FSQ:
    return FSQ(FSQ.Config(levels=list(levels)))


def reference_bound(z_bdhw: torch.Tensor, levels: list[int]) -> torch.Tensor:
    """The paper's bound, written independently per channel, *unrounded* and normalised by L // 2."""
    out = []
    for i, lv in enumerate(levels):
        half_l = (lv - 1) * (1 + 1e-3) / 2
        offset = 0.5 if lv % 2 == 0 else 0.0
        shift = math.atanh(offset / half_l)
        out.append((torch.tanh(z_bdhw[:, i] + shift) * half_l - offset) / (lv // 2))
    return torch.stack(out, 1)


@pytest.mark.parametrize("levels", PAPER_LEVELS + SMALL_LEVELS, ids=str)
def test_index_code_index_is_identity_over_the_full_range(levels):
    q = make(levels)
    n = math.prod(levels)
    assert (q.codebook_size, q.code_dim) == (n, len(levels))
    idx_bhw = torch.arange(n).view(1, 1, n)
    codes_bdhw = q.indices_to_codes(idx_bhw)
    assert codes_bdhw.shape == (1, len(levels), 1, n)
    assert torch.equal(q.codes_to_indices(codes_bdhw), idx_bhw)
    assert torch.unique(codes_bdhw[0, :, 0].t(), dim=0).shape[0] == n  # all codes distinct
    assert torch.equal(q.decode_indices(idx_bhw), codes_bdhw)


def test_mixed_radix_first_channel_least_significant():
    levels = [8, 6, 5]
    q = make(levels)
    hw = [lv // 2 for lv in levels]
    # index 1: channel 0 has digit 1, the others digit 0; index 8: channel 1 has digit 1
    for index, digits in [(0, [0, 0, 0]), (1, [1, 0, 0]), (8, [0, 1, 0]), (48, [0, 0, 1]), (239, [7, 5, 4])]:
        code = q.indices_to_codes(torch.tensor([[[index]]]))[0, :, 0, 0]
        expect = torch.tensor([(dg - h) / h for dg, h in zip(digits, hw)])
        assert torch.equal(code, expect), (index, code, expect)


@pytest.mark.parametrize("levels", PAPER_LEVELS + SMALL_LEVELS, ids=str)
def test_codes_take_exactly_the_paper_values(levels):
    q = make(levels)
    d = len(levels)
    z = torch.linspace(-8, 8, 4001).expand(1, d, 1, 4001).contiguous()
    out = q(z)
    for i, lv in enumerate(levels):
        h = lv // 2
        got = torch.unique(out.zq_bdhw[0, i])  # sorted
        expect = (torch.arange(lv, dtype=torch.float32) - h) / h  # {(k - L//2) / (L//2) : k < L}
        assert torch.equal(got, expect), (lv, got, expect)
        if lv % 2 == 0:  # asymmetric: reaches -1 but not +1
            assert got[0] == -1.0 and got[-1] < 1.0 and len(got) == 2 * h
        else:
            assert got[0] == -1.0 and got[-1] == 1.0 and torch.equal(got, -got.flip(0))
    # the forward's indices are the mixed-radix indices of its codes, and decode back to them
    assert torch.equal(q.codes_to_indices(out.zq_bdhw), out.indices)
    assert torch.equal(q.decode_indices(out.indices), out.zq_bdhw)


@pytest.mark.parametrize("levels", PAPER_LEVELS + SMALL_LEVELS, ids=str)
def test_zero_maps_to_code_zero_and_large_inputs_to_the_extremes(levels):
    q = make(levels)
    d = len(levels)
    zero = q(torch.zeros(1, d, 1, 1)).zq_bdhw[0, :, 0, 0]
    assert torch.equal(zero, torch.zeros(d))  # odd L by symmetry; even L thanks to the shift
    hi = q(torch.full((1, d, 1, 1), 50.0)).zq_bdhw[0, :, 0, 0]
    lo = q(torch.full((1, d, 1, 1), -50.0)).zq_bdhw[0, :, 0, 0]
    assert torch.equal(lo, -torch.ones(d))
    assert torch.equal(hi, torch.tensor([((lv - 1) - lv // 2) / (lv // 2) for lv in levels]))
    idx_hi = q(torch.full((1, d, 1, 1), 50.0)).indices
    idx_lo = q(torch.full((1, d, 1, 1), -50.0)).indices
    assert idx_lo.item() == 0 and idx_hi.item() == math.prod(levels) - 1


@pytest.mark.parametrize("levels", [[8, 5, 5, 5], [2, 3], [8, 8, 8, 6, 5]], ids=str)
def test_gradient_is_that_of_the_unrounded_bound(levels):
    q = make(levels)
    z = (torch.randn(2, len(levels), 3, 5) * 2).requires_grad_(True)
    w = torch.randn(2, len(levels), 3, 5)
    out = q(z)
    (out.zq_bdhw * w).sum().backward()
    z_ref = z.detach().clone().requires_grad_(True)
    (reference_bound(z_ref, levels) * w).sum().backward()
    torch.testing.assert_close(z.grad, z_ref.grad, rtol=1e-5, atol=1e-6)
    assert z.grad.abs().sum() > 0
    # and the forward value is the rounded bound
    torch.testing.assert_close(out.zq_bdhw, torch.round(reference_bound(z.detach(), levels) *
                               torch.tensor([lv // 2 for lv in levels]).view(1, -1, 1, 1)) /
                               torch.tensor([lv // 2 for lv in levels]).view(1, -1, 1, 1))
    assert out.loss.item() == 0.0 and out.loss.ndim == 0
    assert set(out.stats) == {"perplexity"}


@pytest.mark.parametrize("levels", [[8, 5, 5, 5], [8, 8, 8, 5, 5, 5]], ids=str)
def test_bf16_autocast_gives_the_fp32_indices(levels):
    q = make(levels)
    # values already representable in bf16, so only the quantizer's own arithmetic can differ;
    # dense near rounding boundaries, where bf16 tanh/scaling would move codes
    z = (torch.randn(4, len(levels), 16, 16) * 1.5).bfloat16()
    ref = q(z.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_bf = q(z)  # bf16 input
        out_f = q(z.float())  # fp32 input under autocast
    assert torch.equal(out_bf.indices, ref.indices)
    assert torch.equal(out_f.indices, ref.indices)
    assert out_bf.zq_bdhw.dtype == torch.bfloat16  # returned in the input's dtype
    assert torch.equal(out_bf.zq_bdhw.float(), ref.zq_bdhw.bfloat16().float())
    # the check has teeth: the same bound computed in bf16 rounds some positions differently
    naive = torch.round(reference_bound(z, levels)[:, 0] * (levels[0] // 2))  # bf16 all the way
    exact = torch.round(reference_bound(z.float(), levels)[:, 0] * (levels[0] // 2))
    assert (naive.float() != exact).any()


def test_indices_are_exact_for_large_codebooks_in_int64():
    q = make([8, 8, 8, 5, 5, 5])
    idx = torch.tensor([[[63999, 63998, 1000, 1001, 1002, 1003]]])
    assert torch.equal(q.codes_to_indices(q.indices_to_codes(idx)), idx)
    assert q(torch.randn(1, 6, 2, 2)).indices.dtype == torch.int64


def test_wrong_channel_count_is_a_clear_error():
    with pytest.raises(ValueError, match=r"expects z of shape \(B, 4, h, w\)"):
        make([8, 5, 5, 5])(torch.randn(1, 3, 2, 2))


@pytest.mark.parametrize("levels, match", [
    ([8, 1, 5], r"levels \[8, 1, 5\]: every level must be >= 2"),
    ([0], r"every level must be >= 2"),
    ([], r"at least one level"),
    ([5] * 17, r"at most 16"),
    ([2**16, 2**16], r"exceeds 2\*\*31"),
])
def test_invalid_levels_raise_config_error(levels, match):
    with pytest.raises(ConfigError, match=match):
        FSQ.Config(levels=levels)
    with pytest.raises(ConfigError, match=match):  # and through the registry, as from a YAML file
        build("quantizer", {"type": "fsq", "levels": levels})


def test_no_parameters_and_no_state():
    q = make([8, 5, 5, 5])
    assert list(q.parameters()) == [] and q.state_dict() == {}
    q.to(torch.bfloat16)  # integer buffers only: converting the module cannot change the grid
    z = torch.linspace(-4, 4, 512).view(1, 4, 8, 16)
    assert torch.equal(q(z).indices, make([8, 5, 5, 5])(z).indices)


@pytest.mark.skipif(importlib.util.find_spec("vector_quantize_pytorch") is None,
                    reason="vector_quantize_pytorch not installed (optional cross-check against lucidrains' FSQ)")
@pytest.mark.parametrize("levels", PAPER_LEVELS, ids=str)
def test_matches_vector_quantize_pytorch(levels):
    from vector_quantize_pytorch import FSQ as VqpFSQ

    theirs = VqpFSQ(levels=list(levels))
    ours = make(levels)
    z_bnd = torch.randn(2, 64, len(levels)) * 2
    codes_bnd, idx_bn = theirs(z_bnd)
    out = ours(z_bnd.transpose(1, 2).unsqueeze(2))  # (B, d, 1, n)
    assert torch.equal(out.indices[:, 0], idx_bn.long())
    torch.testing.assert_close(out.zq_bdhw[:, :, 0].transpose(1, 2), codes_bnd.float())


# ----------------------------------------------------------------------------- presets


def _presets(kind_type: str) -> list[Path]:
    files = sorted((REPO / "registry" / "quantizer").glob("*.yaml"))
    return [f for f in files if (yaml.safe_load(f.read_text()) or {}).get("type") == kind_type]


def test_the_papers_level_sets_have_presets():
    got = sorted(yaml.safe_load(f.read_text())["levels"] for f in _presets("fsq"))
    assert sorted(PAPER_LEVELS) == [lv for lv in got if lv in PAPER_LEVELS]
    assert len(got) >= len(PAPER_LEVELS)


@pytest.mark.parametrize("path", _presets("fsq"), ids=lambda p: p.stem)
def test_preset_builds_and_runs(path):
    text = path.read_text()
    assert text.startswith("#"), f"{path.name}: the first line should be a comment saying what it is"
    node = yaml.safe_load(text)
    q = build("quantizer", node)
    assert isinstance(q, FSQ)
    assert q.codebook_size == math.prod(node["levels"]) and q.code_dim == len(node["levels"])
    out = q(torch.randn(2, q.code_dim, 4, 4))
    assert out.zq_bdhw.shape == (2, q.code_dim, 4, 4) and out.indices.shape == (2, 4, 4)
    assert 0 <= int(out.indices.min()) and int(out.indices.max()) < q.codebook_size
