"""The backbone contract, checked for every registered backbone (plug-ins included): shapes, every declared
attention structure honoured (no leak through an ignored mask), decode state equal to the full forward
(step by step, block by block, split prefills), and the capability check that refuses the rest."""

from __future__ import annotations

import re

import pytest
import torch

from arlab.backbone.base import ARBITRARY, ATTENTION_STRUCTURES, BLOCK_CAUSAL, CAUSAL, Backbone, check_serves
from arlab.conditioner.label import ClassConditioner
from arlab.conditioner.text import TextConditioner
from arlab.config import build, presets, resolve_node
from arlab.errors import ConfigError
from arlab.generator.model import Generator
from arlab.quantizer.msvq import MultiScaleVQ
from arlab.registry import get, names
from arlab.shuffle.window import TokenShuffle
from tests.generator.test_model import assert_causal

L = 12


def small_node(name: str):
    """The smallest preset of backbone ``name`` ('tiny' in its name first), else its defaults."""
    mine = [p for p in presets("backbone") if resolve_node("backbone", p)["type"] == name]
    tiny = [p for p in mine if "tiny" in p]
    if tiny:
        return tiny[0]
    if mine:
        return min(mine, key=lambda p: resolve_node("backbone", p).get("dim", 0))
    return {"type": name}


def make(name: str, seed: int = 0) -> Backbone:
    torch.manual_seed(seed)
    bb = build("backbone", small_node(name)).eval()
    with torch.no_grad():  # every path carries signal (zero-initialised gates, heads)
        for p in bb.parameters():
            if p.ndim >= 2:
                p.normal_(std=0.3)
    return bb.double()


def step_of(structure: str) -> torch.Tensor:
    """The feed step of each of L positions: causal (one each), block-causal (contiguous blocks), arbitrary."""
    if structure == CAUSAL:
        return torch.arange(L)
    if structure == BLOCK_CAUSAL:
        return torch.tensor([0, 1, 1, 2, 2, 2, 3, 3, 3, 3, 4, 4])
    return torch.tensor([0, 1, 2, 3, 2, 3, 4, 3, 4, 5, 4, 5])  # NAR-like: steps interleave over positions


def mask_of(steps: torch.Tensor) -> torch.Tensor:
    return steps[None, :] <= steps[:, None]


def inputs(bb: Backbone, b: int = 2):
    x = torch.randn(b, L, bb.dim, dtype=torch.float64)
    rows, cols = (torch.arange(L) // 4).double(), (torch.arange(L) % 4).double()
    ident = torch.zeros(L, dtype=torch.bool)
    ident[0] = True
    tables = tuple(t.double() for t in bb.position_tables(rows, cols, ident))
    cond = torch.randn(b, bb.dim, dtype=torch.float64) if bb.cond_mode == "adaln" else None
    return x, tables, cond


def take(tables: tuple[torch.Tensor, ...], idx) -> tuple[torch.Tensor, ...]:
    return tuple(t[idx] for t in tables)


def declared(name: str) -> list[str]:
    bb = get("backbone", name)
    return sorted(bb.cls.capabilities(build("backbone", small_node(name)).cfg).attention)


CASES = [(n, s) for n in names("backbone") for s in ATTENTION_STRUCTURES]
DECLARED = [(n, s) for n in names("backbone") for s in declared(n)]


@pytest.mark.parametrize("name", names("backbone"))
def test_shapes_and_interface(name):
    bb = make(name)
    assert isinstance(bb, Backbone) and CAUSAL in bb.caps.attention
    x, tables, cond = inputs(bb)
    h = bb(x, tables, cond_bd=cond)
    assert h.shape == x.shape and h.dtype == x.dtype
    h2, trunk = bb(x, tables, cond_bd=cond, return_trunk=True)
    assert torch.equal(h, h2) and trunk.shape == x.shape
    state = bb.init_state(2, L, torch.float64, torch.device("cpu"))
    assert state.nbytes > 0


@pytest.mark.parametrize("name,structure", CASES)
def test_declared_attention_is_honoured_or_refused(name, structure):
    """A position's output ignores every input its mask hides (an ignored mask would leak the future)."""
    bb = make(name)
    if structure not in bb.caps.attention:
        with pytest.raises(ConfigError, match=f"needs {structure} attention, which backbone .* cannot honour"):
            check_serves(type(bb), bb.cfg, attention=structure, heads=1, order_name="order/x")
        return
    x, tables, cond = inputs(bb)
    steps = step_of(structure)
    mask = None if structure == CAUSAL else mask_of(steps)
    base = bb(x, tables, mask=mask, cond_bd=cond)
    if structure == CAUSAL:  # the explicit causal mask means the same as None
        assert torch.allclose(bb(x, tables, mask=mask_of(steps), cond_bd=cond), base, atol=1e-9)
    for q in range(L):
        hidden = ~mask_of(steps)[q]
        if not hidden.any():
            continue
        y = x.clone()
        y[:, hidden] = torch.randn_like(y[:, hidden])
        out = bb(y, tables, mask=mask, cond_bd=cond)
        assert torch.allclose(out[:, q], base[:, q], atol=1e-9), (name, structure, q)
    assert not torch.allclose(bb(torch.randn_like(x), tables, mask=mask, cond_bd=cond), base)


@pytest.mark.parametrize("name,structure", DECLARED)
def test_decode_state_equals_full_forward(name, structure):
    """Feeding the positions step by step (each step's positions as one prefill, or one ``step``) through a
    fresh decode state gives the full forward's outputs; so does a prefill split in two."""
    bb = make(name)
    x, tables, cond = inputs(bb)
    steps = step_of(structure)
    full_mask = mask_of(steps)
    full = bb(x, tables, mask=None if structure == CAUSAL else full_mask, cond_bd=cond)
    state = bb.init_state(2, L, torch.float64, torch.device("cpu"))
    out = torch.zeros_like(full)
    for k in range(int(steps.max()) + 1):
        idx = torch.nonzero(steps == k).flatten()
        call = bb.step if len(idx) == 1 else bb.prefill
        out[:, idx] = call(x[:, idx], state, idx, take(tables, idx), full_mask[idx], cond)
    assert torch.allclose(out, full, atol=1e-9), (out - full).abs().max()
    if structure == ARBITRARY:
        return
    cut = 6  # a block boundary of both contiguous structures
    state = bb.init_state(2, L, torch.float64, torch.device("cpu"))
    a = bb.prefill(x[:, :cut], state, torch.arange(cut), take(tables, slice(0, cut)), full_mask[:cut], cond)
    b = bb.prefill(x[:, cut:], state, torch.arange(cut, L), take(tables, slice(cut, L)), full_mask[cut:], cond)
    assert torch.allclose(torch.cat([a, b], 1), full, atol=1e-9)


ORDERS = [o for o in names("order")]
# every backbone x order x Token-Shuffle window with a class prefix; AiM's adaLN and a padded text prefix at s = 2
GEN_CASES = ([(b, o, s, "class") for b in names("backbone") for o in ORDERS for s in (1, 2, 4)]
             + [(b, o, 2, c) for b in names("backbone") for o in ORDERS for c in ("class-adaln", "text")])
PATCH = {1: [1, 2, 4, 8], 2: [2, 4, 8], 4: [4, 8]}  # msvq scales per window (each divisible by s)


def conditioner_of(cond: str, dim: int):
    if cond == "text":
        return TextConditioner(TextConditioner.Config(max_bytes=12), dim)
    return ClassConditioner(ClassConditioner.Config(), dim, 10)


def generator_or_refusal(backbone: str, order: str, s: int, cond: str = "class") -> Generator | None:
    """A small generator on the backbone's smallest preset, weights widened so every path carries signal; None
    (after asserting that the generator refuses it with the capability check's message) when the backbone
    cannot serve the order."""
    torch.manual_seed(0)
    bb = build("backbone", small_node(backbone))
    o = build("order", order)
    try:
        check_serves(type(bb), bb.cfg, attention=o.attention, heads=o.heads, order_name=o.registry_key)
    except ConfigError as e:
        with pytest.raises(ConfigError, match=re.escape(str(e))):
            Generator(bb, o, TokenShuffle(TokenShuffle.Config(s=s), bb.dim), conditioner_of(cond, bb.dim), 17,
                      (8, 8))
        return None
    if cond == "class-adaln":
        if "adaln" not in type(bb).capabilities(bb.cfg).cond_modes:
            pytest.skip(f"backbone {backbone} declares no adaLN conditioning")
        torch.manual_seed(0)
        bb = build("backbone", {**resolve_node("backbone", small_node(backbone)), "cond_mode": "adaln"})
    scales, quant = (8, 8), None
    if o.multiscale:
        pn = PATCH[s]
        quant = MultiScaleVQ(MultiScaleVQ.Config(codebook_size=17, code_dim=8, patch_nums=pn, latent_size=8,
                                                 phi_k=min(4, len(pn))))
        scales = [(p, p) for p in pn]
    g = Generator(bb, o, TokenShuffle(TokenShuffle.Config(s=s), bb.dim), conditioner_of(cond, bb.dim), 17, scales,
                  quantizer=quant).eval()
    with torch.no_grad():
        for m in g.modules():
            if isinstance(m, torch.nn.Linear):
                torch.nn.init.normal_(m.weight, std=0.3)
    return g


@pytest.mark.parametrize("backbone,order,s,cond", GEN_CASES)
def test_generator_decoding_with_state_equals_recomputation(backbone, order, s, cond):
    """Every backbone × order × window × conditioning: either the backbone serves the order and state decoding
    gives the recomputation's logits and tokens (with and without CFG), or the generator refuses it by name."""
    g = generator_or_refusal(backbone, order, s, cond)
    if g is None:
        return
    # text: captions of different lengths, so every row's prefix is padded differently
    cond_b = g.conditioner.encode(["a red ring", "a large blue square!"]) if cond == "text" else torch.tensor([1, 7])
    for cfg in (1.0, 3.0):
        runs = []
        for use_cache in (True, False):
            gen = torch.Generator().manual_seed(5)
            runs.append(g.sample(cond_b, cfg_scale=cfg, cfg_schedule="linear", generator=gen, return_logits=True,
                                 use_cache=use_cache))
        (codes, logits), (codes_ref, logits_ref) = runs
        assert torch.allclose(logits, logits_ref, atol=1e-5 * float(logits_ref.abs().max()))
        assert torch.equal(codes, codes_ref)


@pytest.mark.parametrize("backbone,order", [(b, o) for b in names("backbone") for o in ORDERS])
def test_changing_a_later_step_leaves_earlier_logits_unchanged(backbone, order):
    """Causality through the whole generator (s = 2): a target's logits depend only on tokens drawn at earlier
    decoding steps, and a change is seen at later steps."""
    g = generator_or_refusal(backbone, order, 2)
    if g is None:
        return
    torch.manual_seed(1)
    assert_causal(g, torch.randint(0, 17, (2, g.layout.num_tokens)), torch.tensor([1, 7]), 17)
