"""backbone/mamba: the chunked SSD scan equals the sequential recurrence (float64, several chunk sizes and
lengths that are not multiples of the chunk), splits at any point through the state, and the backbone's
decode state stays constant in size (the registry-parametrized contract in tests/contracts covers masks,
prefill and step against the full forward)."""

from __future__ import annotations

import pytest
import torch

from arlab.backbone.mamba import Mamba, ssd_chunked
from arlab.config import build
from arlab.layers import is_decayed


def sequential(x, dt, A, B, C, h0):
    """h_t = exp(dt_t A) h_{t-1} + dt_t B_t ⊗ x_t; y_t = C_t · h_t (the definition, one step at a time)."""
    h, ys = h0.clone(), []
    for t in range(x.shape[1]):
        h = h * torch.exp(dt[:, t] * A)[..., None, None] + torch.einsum("bh,bhp,bhn->bhpn", dt[:, t], x[:, t], B[:, t])
        ys.append(torch.einsum("bhpn,bhn->bhp", h, C[:, t]))
    return torch.stack(ys, 1), h


def inputs(L: int, b=2, h=3, p=4, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    x, B, C = r(b, L, h, p), r(b, L, h, n), r(b, L, h, n)
    dt = torch.nn.functional.softplus(r(b, L, h))
    A = -torch.rand(h, generator=g, dtype=torch.float64) * 2
    return x, dt, A, B, C, r(b, h, p, n)


@pytest.mark.parametrize("chunk", [1, 3, 8, 64])
@pytest.mark.parametrize("L", [1, 5, 16, 17])
def test_chunked_scan_equals_the_recurrence(chunk, L):
    x, dt, A, B, C, h0 = inputs(L)
    y, h = ssd_chunked(x, dt, A, B, C, chunk, h0)
    y_ref, h_ref = sequential(x, dt, A, B, C, h0)
    assert torch.allclose(y, y_ref, atol=1e-10) and torch.allclose(h, h_ref, atol=1e-10)
    y0, _ = ssd_chunked(x, dt, A, B, C, chunk)  # no initial state = zeros
    assert torch.allclose(y0, sequential(x, dt, A, B, C, torch.zeros_like(h0))[0], atol=1e-10)


@pytest.mark.parametrize("cut", [1, 7, 8, 13])
def test_a_split_scan_through_its_state_equals_one_scan(cut):
    x, dt, A, B, C, _ = inputs(21, seed=1)
    y, h = ssd_chunked(x, dt, A, B, C, 8)
    ya, ha = ssd_chunked(x[:, :cut], dt[:, :cut], A, B[:, :cut], C[:, :cut], 8)
    yb, hb = ssd_chunked(x[:, cut:], dt[:, cut:], A, B[:, cut:], C[:, cut:], 8, ha)
    assert torch.allclose(torch.cat([ya, yb], 1), y, atol=1e-10) and torch.allclose(hb, h, atol=1e-10)


def test_decode_state_is_constant_in_the_position_and_exempt_parameters_say_so():
    m = build("backbone", "mamba-tiny")
    short = m.init_state(1, 16, torch.float32, torch.device("cpu")).nbytes
    long = m.init_state(1, 4096, torch.float32, torch.device("cpu")).nbytes
    assert short == long  # no KV cache: (d_conv - 1) conv inputs + an H·P·N state per layer
    exempt = {n.split(".")[-1] for n, p in m.named_parameters() if not is_decayed(p)}
    assert {"A_log", "D", "dt_bias", "weight"} <= exempt  # weight: norm gains (1-D)
    assert not any(n.endswith(("A_log", "D", "dt_bias")) for n, p in m.named_parameters() if is_decayed(p))


def test_bad_configs():
    from arlab.errors import ConfigError

    with pytest.raises(ConfigError, match="not divisible by head_dim"):
        Mamba(Mamba.Config(dim=48, head_dim=64, expand=1))


@pytest.mark.parametrize("llama,mamba", [("shapes", "mamba-shapes"), ("s", "mamba-s"), ("b", "mamba-b")])
def test_presets_are_parameter_matched_to_the_llama_presets(llama, mamba):
    count = lambda name: sum(p.numel() for p in build("backbone", name).parameters())
    a, b = count(llama), count(mamba)
    assert abs(b - a) / a < 0.05, (a, b)


@pytest.mark.parametrize("order", ["next_scale", "neighbor"])
def test_a_pure_mamba_is_refused_for_step_orders_in_one_line_naming_the_hybrid(order):
    from arlab.config import load_experiment
    from arlab.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        load_experiment({"next_scale": "shapes/var", "neighbor": "shapes/nar"}[order], ["backbone=mamba-shapes"])
    msg = str(e.value)
    assert "\n" not in msg and f"order/{order}" in msg and "backbone/mamba cannot honour" in msg
    assert "use backbone/hybrid" in msg


def adaln_mamba(groups: int, **over) -> Mamba:
    torch.manual_seed(0)
    return build("backbone", dict(type="mamba", dim=32, depth=3, head_dim=16, d_state=8, chunk=4, mlp_ratio=1.0,
                                  cond_mode="adaln", adaln_groups=groups, **over)).double()


@pytest.mark.parametrize("groups", [0, 2])
def test_adaln_blocks_start_as_the_identity(groups):
    m = adaln_mamba(groups)
    x, cond = torch.randn(2, 9, 32, dtype=torch.float64), torch.randn(2, 32, dtype=torch.float64)
    mods = m.ada(cond)
    assert [t.shape for t in mods] == [(2, 6, 32)] * 3  # (shift, scale, gate) for the mixer and the MLP
    for b, mod in zip(m.blocks, mods):
        assert torch.equal(b(x, None, None, mod)[0], x)
    if groups:  # blocks 0 and 2 share a group's linear but keep their own tables
        assert m.ada.shared.out_features == groups * 6 * 32 and len(m.ada.tables) == 3


@pytest.mark.parametrize("groups", [0, 2])
def test_decode_with_state_equals_recompute_with_adaln_and_learned_positions(groups):
    m = adaln_mamba(groups, pos_embed="learned", max_grid=4)
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim >= 2:
                p.normal_(std=0.3)  # gates and modulation away from their zero init
    L = 11
    x, cond = torch.randn(2, L, 32, dtype=torch.float64), torch.randn(2, 32, dtype=torch.float64)
    ident = torch.zeros(L, dtype=torch.bool)
    ident[0] = True
    tabs = tuple(t.double() for t in m.position_tables((torch.arange(L) // 4).double(), (torch.arange(L) % 4).double(),
                                                       ident))
    assert torch.equal(tabs[0][0], torch.zeros(32, dtype=torch.float64))  # the condition token has no position
    full = m(x, tabs, cond_bd=cond)
    assert not torch.allclose(full, m(x, tabs, cond_bd=torch.randn_like(cond)))
    state = m.init_state(2, L, torch.float64, torch.device("cpu"))
    out = [m.prefill(x[:, :4], state, torch.arange(4), tuple(t[:4] for t in tabs), None, cond)]
    for i in range(4, L):
        out.append(m.step(x[:, i:i + 1], state, torch.tensor([i]), tuple(t[i:i + 1] for t in tabs), None, cond))
    assert torch.allclose(torch.cat(out, 1), full, atol=1e-9)


def test_learned_positions_refuse_a_grid_beyond_the_table():
    from arlab.errors import ConfigError

    m = adaln_mamba(0, pos_embed="learned", max_grid=4)
    with pytest.raises(ConfigError, match="raise the backbone's max_grid"):
        m.position_tables(torch.tensor([5.0]), torch.tensor([0.0]), torch.tensor([False]))


def test_aim_b_has_aims_parameter_count():
    """AiM-B: 148M with its 16,384-code head (tied to the token embedding) and 1,000 classes + the null class."""
    with torch.device("meta"):
        m = build("backbone", "aim-b")
    n = sum(p.numel() for p in m.parameters()) + 16384 * 768 + 1001 * 768
    assert m.cfg.dim == 768 and m.cfg.depth == 24 and abs(n - 148e6) / 148e6 < 0.05, n
