"""Chunked linear + cross-entropy: the vocabulary head and its loss without the full (N, V) logits.

``linear_cross_entropy(h_nd, w_vd, y_n, chunk, z_weight)`` equals, in value and in its gradients with
respect to ``h_nd`` and ``w_vd``::

    logits = (h_nd @ w_vd.T).float()                    # (N, V)
    ce_n = F.cross_entropy(logits, y_n, reduction="none")
    lse_n = logits.logsumexp(-1)
    loss = ce_n.mean() + z_weight * lse_n.pow(2).mean()  # PaLM z-loss when z_weight > 0

but walks the N rows ``chunk`` at a time, so at most (chunk, V) logits exist at once (the plain path
keeps the (N, V) logits, their float32 copy and their gradient: for LlamaGen GPT-B at batch 64,
16,384 tokens × 16,384 codes, about 3 GiB). The gradients are computed in the forward pass, chunk by
chunk (``dlogits = p · (1 + 2 z lse) / N − onehot / N``; ``dh = dlogits @ W``, ``dW += dlogitsᵀ @ h``,
the idea of Liger-Kernel's fused linear cross-entropy), so the head costs the same three matmuls as
the plain path; backward only scales them by the incoming gradient of ``loss``. Each chunk's logits take one
pass of ``exp`` (``e = exp(logits − max)`` in place; ``lse = max + log Σe``; the softmax is ``e / Σe``) and
``dW`` accumulates in place: on a 2-core CPU the quickstart generator's head + loss (4,096 rows × 1,000 codes)
took 24 ms instead of 33 (``docs/performance.md``, session 11).

Under autocast (bf16 on CUDA) the matmuls run in the autocast dtype and the softmax in float32, as
the plain path's ``head(h).float()``. ``ce_n`` and ``lse_n`` (per row, float32 or float64) are
returned for statistics and are not differentiable: only ``loss`` carries gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _compute_dtype(h: Tensor) -> torch.dtype:
    dev = h.device.type
    if h.dtype == torch.float32 and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return h.dtype


def _chunk_stats(hc: Tensor, wc: Tensor, yc: Tensor, acc: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One chunk's ``e = exp(logits − max)`` (n, V) in ``acc`` (the logits' buffer, overwritten), ``Σe`` (n,), the
    logsumexp ``max + log Σe`` (n,) and CE (n,): one pass of ``exp``; the softmax is ``e / Σe``."""
    logits = (hc @ wc.T).to(acc)
    target = logits.gather(1, yc[:, None]).squeeze(1)
    top = logits.amax(-1, keepdim=True)
    e = logits.sub_(top).exp_()
    total = e.sum(-1)
    lse = top.squeeze(1) + total.log()
    return e, total, lse, lse - target


class _LinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_nd: Tensor, w_vd: Tensor, y_n: Tensor, chunk: int, z_weight: float,
                cdt: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        n = h_nd.shape[0]
        acc = torch.float64 if h_nd.dtype == torch.float64 else torch.float32
        hc_all, wc = h_nd.to(cdt), w_vd.to(cdt)
        ce_n = h_nd.new_empty(n, dtype=acc)
        lse_n = h_nd.new_empty(n, dtype=acc)
        dh = torch.empty(h_nd.shape, dtype=cdt, device=h_nd.device)
        dw = torch.zeros(w_vd.shape, dtype=acc, device=w_vd.device)
        for a in range(0, n, chunk):
            hc, yc = hc_all[a:a + chunk], y_n[a:a + chunk]
            e, total, lse, ce = _chunk_stats(hc, wc, yc, acc)  # e: (n_c, V)
            ce_n[a:a + chunk], lse_n[a:a + chunk] = ce, lse
            g = e.mul_(((1.0 + 2.0 * z_weight * lse) / (n * total))[:, None])  # (n_c, V)
            g.scatter_add_(1, yc[:, None], g.new_full((yc.shape[0], 1), -1.0 / n))
            g = g.to(cdt)
            torch.mm(g, wc, out=dh[a:a + chunk])
            if g.dtype == acc:
                dw.addmm_(g.T, hc)
            else:
                dw += (g.T @ hc).to(acc)
        loss = ce_n.mean() + z_weight * lse_n.pow(2).mean()
        ctx.save_for_backward(dh, dw)
        ctx.dtypes = (h_nd.dtype, w_vd.dtype)
        ctx.mark_non_differentiable(ce_n, lse_n)
        return loss, ce_n, lse_n

    @staticmethod
    def backward(ctx, g_loss: Tensor, _g_ce: Tensor, _g_lse: Tensor):
        dh, dw = ctx.saved_tensors
        h_dt, w_dt = ctx.dtypes
        gh = (dh * g_loss.to(dh.dtype)).to(h_dt) if ctx.needs_input_grad[0] else None
        gw = (dw * g_loss.to(dw.dtype)).to(w_dt) if ctx.needs_input_grad[1] else None
        return gh, gw, None, None, None, None


def linear_cross_entropy(h_nd: Tensor, w_vd: Tensor, y_n: Tensor, chunk: int = 4096,
                         z_weight: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """Mean CE (+ ``z_weight`` · mean logsumexp²) of ``h_nd @ w_vd.T`` (N, D) × (V, D) against ``y_n`` (N,),
    ``chunk`` rows at a time → (loss, ce_n, lse_n); gradients flow to ``h_nd`` and ``w_vd`` through ``loss``."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 rows, got {chunk}")
    if h_nd.ndim != 2 or w_vd.ndim != 2 or h_nd.shape[1] != w_vd.shape[1] or y_n.shape != h_nd.shape[:1]:
        raise ValueError(f"linear_cross_entropy needs h (N, D), w (V, D), y (N,); got {tuple(h_nd.shape)}, "
                         f"{tuple(w_vd.shape)}, {tuple(y_n.shape)}")
    cdt = _compute_dtype(h_nd)
    y_n = y_n.long()
    with torch.autocast(h_nd.device.type, enabled=False):
        if torch.is_grad_enabled() and (h_nd.requires_grad or w_vd.requires_grad):
            return _LinearCE.apply(h_nd, w_vd, y_n, chunk, float(z_weight), cdt)
        acc = torch.float64 if h_nd.dtype == torch.float64 else torch.float32
        hc_all, wc = h_nd.to(cdt), w_vd.to(cdt)
        stats = [_chunk_stats(hc_all[a:a + chunk], wc, y_n[a:a + chunk], acc)[2:]  # the same bits as training's
                 for a in range(0, h_nd.shape[0], chunk)]
        lse_n, ce_n = torch.cat([s[0] for s in stats]), torch.cat([s[1] for s in stats])
        return ce_n.mean() + z_weight * lse_n.pow(2).mean(), ce_n, lse_n
