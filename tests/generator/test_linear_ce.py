"""The chunked head + cross-entropy equals the plain ``F.cross_entropy(head(h), y)`` (+ z-loss) in loss and in
gradients w.r.t. the hidden states and the head weight, alone (float64, float32, chunk boundaries) and inside the
generator for every order × Token-Shuffle window (NAR's two heads, Token-Shuffle's unshuffled tokens)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from arlab.generator.linear_ce import linear_cross_entropy
from arlab.registry import names
from tests.generator.test_model import conditions, make, random_codes


def plain(h, w, y, z):
    logits = (h @ w.T).float() if h.dtype != torch.float64 else h @ w.T
    lse = logits.logsumexp(-1)
    return F.cross_entropy(logits, y) + z * lse.pow(2).mean(), lse


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
@pytest.mark.parametrize("chunk", [1, 7, 50, 1000])
@pytest.mark.parametrize("z", [0.0, 1e-2])
def test_equals_plain_cross_entropy_in_loss_and_gradients(dtype, tol, chunk, z):
    g = torch.Generator().manual_seed(chunk)
    n, d, v = 50, 24, 97
    h = (torch.randn(n, d, generator=g) * 2).to(dtype).requires_grad_()
    w = torch.randn(v, d, generator=g).to(dtype).requires_grad_()
    y = torch.randint(v, (n,), generator=g)
    want, want_lse = plain(h, w, y, z)
    gh, gw = torch.autograd.grad(3.0 * want, (h, w))  # an upstream gradient other than 1
    loss, ce_n, lse_n = linear_cross_entropy(h, w, y, chunk=chunk, z_weight=z)
    ch, cw = torch.autograd.grad(3.0 * loss, (h, w))
    assert loss.dtype == want.dtype and ce_n.shape == (n,) and not ce_n.requires_grad
    torch.testing.assert_close(loss, want, rtol=tol, atol=tol)
    torch.testing.assert_close(lse_n, want_lse.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(ce_n.mean(), F.cross_entropy(h @ w.T, y).detach().to(ce_n.dtype), rtol=tol, atol=tol)
    torch.testing.assert_close(ch, gh, rtol=tol, atol=tol)
    torch.testing.assert_close(cw, gw, rtol=tol, atol=tol)
    with torch.no_grad():  # the no-grad path (validation) gives the same values
        torch.testing.assert_close(linear_cross_entropy(h, w, y, chunk, z)[0], want.detach(), rtol=tol, atol=tol)


@pytest.mark.parametrize("chunk", [7, 64])
def test_training_and_evaluation_give_the_same_statistics(chunk):
    """With and without gradients the loss, per-row CE and logsumexp are the same bits (one chunk routine)."""
    torch.manual_seed(0)
    h, w = torch.randn(50, 16, requires_grad=True), torch.randn(30, 16, requires_grad=True)
    y = torch.randint(0, 30, (50,))
    train = linear_cross_entropy(h, w, y, chunk, 1e-3)
    with torch.no_grad():
        ev = linear_cross_entropy(h, w, y, chunk, 1e-3)
    for a, b in zip(train, ev):
        assert torch.equal(a.detach(), b)


def test_bad_shapes_and_chunk_are_refused():
    h, w, y = torch.randn(4, 8), torch.randn(5, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        linear_cross_entropy(h, w, y, chunk=0)
    with pytest.raises(ValueError, match=r"needs h \(N, D\), w \(V, D\), y \(N,\)"):
        linear_cross_entropy(h, torch.randn(5, 7), y)


@pytest.mark.parametrize("order,s", [(o, s) for o in names("order") for s in (1, 2, 4)])
def test_generator_chunked_loss_equals_full_logits_loss(order, s):
    """Same loss, per-position / per-scale CE and gradients of every parameter, with a chunk that splits
    the B·N tokens unevenly; with z-loss."""
    g = make(order, s).train()
    g.z_loss_weight, g.loss_chunk = 1e-2, 37
    codes, cond = random_codes(g, 3), conditions(g, 3)
    params = [p for p in g.parameters() if p.requires_grad]
    full = g(codes, cond)
    want = torch.autograd.grad(full.loss, params, allow_unused=True)
    chunked = g(codes, cond, return_logits=False)
    got = torch.autograd.grad(chunked.loss, params, allow_unused=True)
    assert chunked.logits_bnv is None and full.logits_bnv is not None
    torch.testing.assert_close(chunked.loss, full.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked.ce, full.ce.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked.z_loss, full.z_loss.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked.ce_per_window_pos, full.ce_per_window_pos, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked.ce_per_scale, full.ce_per_scale, rtol=1e-5, atol=1e-5)
    for (name, _), a, b in zip([(n, p) for n, p in g.named_parameters() if p.requires_grad], got, want):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()), msg=name)


def test_generator_chunked_loss_in_float64():
    g = make("neighbor", 2).double().train()
    g.loss_chunk = 5
    codes, cond = random_codes(g, 2), conditions(g, 2)
    full, chunked = g(codes, cond), g(codes, cond, return_logits=False)
    assert chunked.loss.dtype == torch.float64
    torch.testing.assert_close(chunked.loss, full.loss, rtol=1e-12, atol=1e-12)
    gw = torch.autograd.grad(full.loss, g.head2.weight)[0]
    torch.testing.assert_close(torch.autograd.grad(chunked.loss, g.head2.weight)[0], gw, rtol=1e-10, atol=1e-12)
