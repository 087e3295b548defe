"""arlab.layers.attention: SDPA everywhere; on CPU, bf16/fp16 inputs are attended in float32 (torch 2.14's CPU
flash-attention kernel is several times slower in bf16) — same values as float32 attention of the same inputs,
the input dtype out, gradients in the input dtype, and autocast does not undo it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from arlab.layers import attention


def qkv(dtype, shape=(3, 4, 9, 16), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g).to(dtype).requires_grad_() for _ in range(3)]


@pytest.mark.parametrize("causal", [False, True])
def test_float32_inputs_are_plain_sdpa(causal):
    q, k, v = qkv(torch.float32)
    assert torch.equal(attention(q, k, v, causal=causal), F.scaled_dot_product_attention(q, k, v, is_causal=causal))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mask_kind", ["causal", "bool", "none"])
def test_half_inputs_are_attended_in_float32_and_returned_in_their_dtype(dtype, mask_kind):
    q, k, v = qkv(dtype)
    mask = torch.rand(9, 9, generator=torch.Generator().manual_seed(1)) > 0.3 if mask_kind == "bool" else None
    mask = mask | torch.eye(9, dtype=torch.bool) if mask is not None else None  # every row attends somewhere
    out = attention(q, k, v, mask, causal=mask_kind == "causal")
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                         is_causal=mask_kind == "causal").to(dtype)
    assert out.dtype == dtype and torch.equal(out, ref)  # exactly the float32 result, rounded once
    grads = torch.autograd.grad(out.float().square().sum(), [q, k, v])
    assert all(g.dtype == dtype and torch.isfinite(g.float()).all() and g.abs().sum() > 0 for g in grads)


def test_autocast_does_not_cast_the_float32_attention_back_to_bf16(monkeypatch):
    import arlab.layers as layers

    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        out = sdpa(q, k, v, **kw)
        seen.append((q.dtype, out.dtype))
        return out

    monkeypatch.setattr(layers.F, "scaled_dot_product_attention", spy)
    w = torch.nn.Linear(16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = w(torch.randn(3, 4, 9, 16))  # a bf16 activation, as in an autocast step
        assert x.dtype == torch.bfloat16
        out = attention(x, x, x, causal=True)
    assert seen == [(torch.float32, torch.float32)] and out.dtype == torch.bfloat16
