"""The interface every quantizer implements.

A quantizer maps an encoder output ``z_bdhw`` (B, d, h, w) to a quantized ``zq_bdhw`` of the same
shape (straight-through gradients to ``z``) and to integer indices: one ``(B, h, w)`` map for
single-scale quantizers, or a list of per-scale ``(B, p_k, p_k)`` maps for multi-scale ones.
Quantizer math runs in float32 even under bf16/fp16 autocast (bf16 rounding changes indices).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass
class QuantOut:
    zq_bdhw: Tensor  # (B, d, h, w) quantized latent; gradients flow straight through to z
    indices: Tensor | list[Tensor]  # (B, h, w) int64, or per-scale [(B, p, p)] for multi-scale
    loss: Tensor  # scalar: weighted sum of the auxiliary losses (0 when there are none)
    losses: dict[str, Tensor] = field(default_factory=dict)  # named unweighted terms, for logging
    stats: dict[str, Tensor] = field(default_factory=dict)  # e.g. batch perplexity, for logging


class Quantizer(nn.Module):
    """Base class: subclasses set ``codebook_size`` (K) and ``code_dim`` (d) and implement both methods."""

    codebook_size: int  # number of distinct indices K
    code_dim: int  # channels d of the latent the encoder must produce
    multiscale: bool = False

    def forward(self, z_bdhw: Tensor) -> QuantOut:
        raise NotImplementedError

    def decode_indices(self, indices: Tensor | list[Tensor]) -> Tensor:
        """Indices (as returned in :class:`QuantOut`) → the quantized latent ``zq_bdhw``."""
        raise NotImplementedError


def perplexity(indices: Tensor, codebook_size: int) -> Tensor:
    """exp(entropy) of the index histogram: K when every code is used equally, 1 when one is."""
    counts = torch.bincount(indices.reshape(-1), minlength=codebook_size).float()
    p = counts / counts.sum().clamp_min(1)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class DeadCodeRestarts:
    """Mixin for codebook quantizers: dead-code counting and restarts from recent encoder vectors.

    Jukebox (Dhariwal et al. 2020) and SoundStream (Zeghidour et al. 2021) re-initialise codes that
    no input chose for a while with random recent encoder outputs; without it a small codebook trained
    on a small dataset collapses to a handful of codes within a few hundred steps.

    Buffers (names kept flat on the quantizer, so state dicts read ``steps_unused``, ``recent_z``...):
    ``steps_unused`` (K,) training steps since each code was chosen; with restarts also ``recent_z``
    (buffer, d) a ring of recent vectors, ``recent_count`` and ``recent_ptr``. Under
    ``torch.distributed`` the caller all-reduces the counts, rank 0 draws the restart vectors and
    broadcasts them, so every rank makes the same update.
    """

    embedding: nn.Embedding
    steps_unused: Tensor
    recent_z: Tensor
    recent_count: Tensor
    recent_ptr: Tensor

    def _init_dead_codes(self, codebook_size: int, code_dim: int, restart: bool, buffer: int) -> None:
        self.register_buffer("steps_unused", torch.zeros(codebook_size, dtype=torch.int64))  # type: ignore[attr-defined]
        if restart:
            self.register_buffer("recent_z", torch.zeros(buffer, code_dim))  # type: ignore[attr-defined]
            self.register_buffer("recent_count", torch.zeros((), dtype=torch.int64))  # type: ignore[attr-defined]
            self.register_buffer("recent_ptr", torch.zeros((), dtype=torch.int64))  # type: ignore[attr-defined]

    @torch.no_grad()
    def _age_codes(self, used_k: Tensor, dead_after: int) -> Tensor:
        """Count one more training step for the codes not in ``used_k`` (K,) bool; returns the dead mask."""
        self.steps_unused.add_(1).masked_fill_(used_k, 0)
        return self.steps_unused >= dead_after

    @torch.no_grad()
    def _remember(self, z_nd: Tensor) -> None:
        """Write a random subset of this step's vectors ``z_nd`` (N, d) into the ring buffer ``recent_z``."""
        size = self.recent_z.shape[0]
        n = min(z_nd.shape[0], size)
        if n == 0:
            return
        pick = torch.randperm(z_nd.shape[0], device=z_nd.device)[:n]
        rows = (self.recent_ptr + torch.arange(n, device=z_nd.device)) % size
        self.recent_z[rows] = z_nd[pick].to(self.recent_z.dtype)
        self.recent_ptr.copy_((self.recent_ptr + n) % size)
        self.recent_count.copy_((self.recent_count + n).clamp(max=size))

    @torch.no_grad()
    def _restart(self, dead_k: Tensor) -> Tensor:
        """Replace the codes in ``dead_k`` (K,) bool by random recent vectors; returns their indices."""
        dead_idx = dead_k.nonzero().squeeze(1)  # identical on every rank: counts were all-reduced
        n_dead = dead_idx.numel()
        weight = self.embedding.weight
        new_md = torch.empty(n_dead, weight.shape[1], device=weight.device, dtype=torch.float32)
        if not distributed() or dist.get_rank() == 0:
            avail = int(self.recent_count)
            if avail == 0:  # nothing seen yet (empty batches): keep the current vectors
                pick = None
            elif avail >= n_dead:  # distinct vectors where possible
                pick = torch.randperm(avail, device=weight.device)[:n_dead]
            else:
                pick = torch.randint(avail, (n_dead,), device=weight.device)
            new_md.copy_(weight[dead_idx] if pick is None else self.recent_z[pick])
        if distributed():
            dist.broadcast(new_md, src=0)
        weight[dead_idx] = new_md.to(weight.dtype)
        self.steps_unused[dead_idx] = 0
        self._restarted(dead_idx, new_md)
        return dead_idx

    def _restarted(self, dead_idx: Tensor, new_md: Tensor) -> None:
        """Hook: extra state to reset for restarted codes (the EMA statistics of ``vq``)."""


@contextlib.contextmanager
def exact_fp32_matmul() -> Iterator[None]:
    """Run float32 matmuls in full IEEE precision (no TF32 / bf16 shortcuts) inside the block.

    ``torch.set_float32_matmul_precision("high")`` (often set for speed) lets cuBLAS / oneDNN use
    TF32, whose 10-bit mantissa changes nearest-code decisions just as bf16 does.
    """
    backends = [b for b in (getattr(torch.backends.cuda, "matmul", None),
                            getattr(getattr(torch.backends, "mkldnn", None), "matmul", None))
                if b is not None and hasattr(b, "fp32_precision")]
    if not backends:  # torch < 2.9: only the legacy TF32 switch exists
        legacy = torch.backends.cuda.matmul
        old_tf32 = legacy.allow_tf32
        try:
            legacy.allow_tf32 = False
            yield
        finally:
            legacy.allow_tf32 = old_tf32
        return
    saved = [(b, b.fp32_precision) for b in backends]
    try:
        for b, old in saved:
            if old != "ieee":
                b.fp32_precision = "ieee"
        yield
    finally:
        for b, old in saved:
            if b.fp32_precision != old:
                b.fp32_precision = old
