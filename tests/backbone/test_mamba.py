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
