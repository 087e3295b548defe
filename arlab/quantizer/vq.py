"""``quantizer/vq``: vector quantization (VQ-VAE, VQGAN, ViT-VQGAN / LlamaGen cosine codebook).

Each position of ``z_bdhw`` (B, d, h, w) is replaced by its nearest row of a (K, d) codebook
(van den Oord et al. 2017, "Neural Discrete Representation Learning"), with a straight-through
gradient to the encoder. Options, each from the paper that introduced it:

* ``l2_norm`` — L2-normalise z and the codebook rows before the lookup (ViT-VQGAN, Yu et al. 2022;
  LlamaGen, Sun et al. 2024): nearest by cosine similarity; the decoder sees unit-norm vectors.
* ``ema`` — update the codebook with exponential moving averages of the assigned inputs instead of
  the codebook loss (VQ-VAE appendix; VQ-VAE-2, Razavi et al. 2019; Sonnet ``VectorQuantizerEMA``).
* ``restart_dead`` — re-initialise codes unused for ``dead_after`` training steps from recent
  encoder outputs (Dhariwal et al. 2020 "Jukebox"; Zeghidour et al. 2021 "SoundStream").
* ``entropy_weight`` — LlamaGen's entropy penalty (sample entropy − average entropy of
  ``softmax(−distance / temperature)``), which pushes towards confident *and* diverse assignments.

The state-dict names follow taming-transformers / LlamaGen (``embedding.weight``) so their
codebooks load directly. All quantizer math runs in float32 with autocast (and TF32 matmuls)
disabled: bf16 rounding of distances changes the chosen codes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from arlab.errors import ConfigError
from arlab.quantizer.base import DeadCodeRestarts, Quantizer, QuantOut, distributed, exact_fp32_matmul, perplexity
from arlab.registry import register

# distances are computed for at most this many (position, code) pairs at once (64 MiB of float32)
CHUNK_ELEMS = 2**24


@register("quantizer", "vq")
class VectorQuantizer(DeadCodeRestarts, Quantizer):
    """Vector quantization (VQ-VAE / VQGAN / LlamaGen): nearest of K learned d-dim codes, straight-through.

    Shapes: ``z_bdhw`` (B, d, h, w) → ``zq_bdhw`` (B, d, h, w) in z's dtype (the l2-normalised value
    when ``l2_norm``), ``indices`` (B, h, w) int64 in [0, K).

    Losses (computed in training and eval; ``losses`` holds them unweighted, ``z`` being the
    normalised encoder output when ``l2_norm``)::

        codebook = mean((e_idx - sg(z))²)        # 0 when ema: the codebook moves by EMA instead
        commit   = mean((sg(e_idx) - z)²)
        entropy  = H(per-position p) mean − H(mean p),  p = softmax(−‖z − e‖² / temperature)
        loss     = codebook + beta · commit + entropy_weight · entropy

    ``entropy`` is only computed when ``entropy_weight > 0`` (it needs an (N, K) matrix).

    Training-mode side effects (under ``torch.no_grad``; never in eval mode): the EMA codebook
    update, the dead-code counters and restarts. Under ``torch.distributed`` the per-code counts and
    sums are all-reduced, so every rank makes the same update, and rank 0 picks restart vectors and
    broadcasts them.

    ``stats``: ``perplexity`` (batch), ``usage`` (fraction of the K codes used in the batch) and
    ``dead`` (codes unused for ``dead_after`` or more training steps before this call's restarts).
    """

    @dataclass
    class Config:
        codebook_size: int = 1024  # K, number of codes (VQGAN 1024, LlamaGen 16384)
        code_dim: int = 8  # d, channels per code (LlamaGen 8, VQGAN 256)
        l2_norm: bool = True  # cosine lookup on L2-normalised z and codes (ViT-VQGAN, LlamaGen: true)
        beta: float = 0.25  # commitment weight (VQ-VAE, VQGAN, LlamaGen: 0.25)
        ema: bool = False  # move codes by EMA of their assigned inputs, not the codebook loss (VQ-VAE-2)
        ema_decay: float = 0.99  # EMA decay per training step, in (0, 1) (VQ-VAE / Sonnet: 0.99)
        ema_eps: float = 1e-5  # Laplace smoothing of the EMA cluster sizes (Sonnet: 1e-5)
        restart_dead: bool = True  # re-initialise dead codes from recent encoder outputs (training only)
        dead_after: int = 100  # training forwards without any use after which a code counts as dead
        restart_buffer: int = 4096  # recent encoder vectors kept (per rank) to draw restarts from
        entropy_weight: float = 0.0  # weight of LlamaGen's entropy loss (LlamaGen default: 0 = off)
        entropy_temperature: float = 0.01  # softmax temperature over -distances for it (LlamaGen: 0.01)

        def __post_init__(self) -> None:
            if not 2 <= self.codebook_size <= 2**31:
                raise ConfigError(f"codebook_size {self.codebook_size}: must be between 2 and 2**31 "
                                  "(VQGAN uses 1024, LlamaGen 16384)")
            if self.code_dim < 1:
                raise ConfigError(f"code_dim {self.code_dim}: must be >= 1 (LlamaGen uses 8, VQGAN 256)")
            if self.l2_norm and self.code_dim < 2:
                raise ConfigError(f"code_dim {self.code_dim} with l2_norm: unit vectors in 1-d are only "
                                  "+-1, so l2_norm needs code_dim >= 2 (or set l2_norm: false)")
            if not (self.beta >= 0 and math.isfinite(self.beta)):
                raise ConfigError(f"beta {self.beta}: the commitment weight must be finite and >= 0 "
                                  "(the papers use 0.25)")
            if not 0 < self.ema_decay < 1:
                raise ConfigError(f"ema_decay {self.ema_decay}: must be in (0, 1), e.g. 0.99")
            if not self.ema_eps > 0:
                raise ConfigError(f"ema_eps {self.ema_eps}: the Laplace smoothing must be > 0, e.g. 1e-5")
            if self.dead_after < 1:
                raise ConfigError(f"dead_after {self.dead_after}: must be >= 1 training step, e.g. 100")
            if self.restart_buffer < 1:
                raise ConfigError(f"restart_buffer {self.restart_buffer}: must hold >= 1 vector, e.g. 4096")
            if not (self.entropy_weight >= 0 and math.isfinite(self.entropy_weight)):
                raise ConfigError(f"entropy_weight {self.entropy_weight}: must be finite and >= 0 "
                                  "(0 disables it; LlamaGen's default)")
            if not self.entropy_temperature > 0:
                raise ConfigError(f"entropy_temperature {self.entropy_temperature}: must be > 0, e.g. 0.01")

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        k, d = cfg.codebook_size, cfg.code_dim
        self.codebook_size = k
        self.code_dim = d
        self.embedding = nn.Embedding(k, d)
        with torch.no_grad():
            self.embedding.weight.uniform_(-1.0 / k, 1.0 / k)  # taming / LlamaGen init
            if cfg.l2_norm:
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=1))
        # training steps since each code was last used (dead-code detection; reported even without restarts)
        self._init_dead_codes(k, d, cfg.restart_dead, cfg.restart_buffer)
        if cfg.ema:
            self.embedding.weight.requires_grad_(False)
            # EMA statistics start as if every code had been assigned itself once, so the first update
            # is a convex step from the initial code towards the batch mean (no zero-bias correction)
            self.register_buffer("cluster_size", torch.ones(k))
            self.register_buffer("embed_avg", self.embedding.weight.detach().clone())

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"codebook_size={c.codebook_size}, code_dim={c.code_dim}, l2_norm={c.l2_norm}, "
                f"ema={c.ema}, restart_dead={c.restart_dead}")

    # ------------------------------------------------------------------------------ lookup
    def codebook(self, copy: bool = False) -> Tensor:
        """The effective (K, d) float32 codebook: rows L2-normalised when ``l2_norm``.

        ``copy``: differentiate through a copy of the weight, so that in-place updates of
        ``embedding.weight`` after the forward (EMA, restarts) leave the autograd graph valid.
        """
        w_kd = self.embedding.weight.float()
        if copy:
            w_kd = w_kd.clone()
        return F.normalize(w_kd, dim=1) if self.cfg.l2_norm else w_kd

    @staticmethod
    def _distances(z_nd: Tensor, e_kd: Tensor) -> Tensor:
        """Squared Euclidean distances (N, K) = ‖z‖² − 2 z·e + ‖e‖² (float32, exact matmul)."""
        with exact_fp32_matmul():
            return z_nd.pow(2).sum(1, keepdim=True) - 2 * (z_nd @ e_kd.t()) + e_kd.pow(2).sum(1)

    @torch.no_grad()
    def nearest(self, z_nd: Tensor, e_kd: Tensor) -> Tensor:
        """Index (N,) int64 of the nearest row of ``e_kd`` (K, d) for each row of ``z_nd`` (N, d), chunked."""
        n, k = z_nd.shape[0], e_kd.shape[0]
        rows = max(1, CHUNK_ELEMS // k)
        if n <= rows:
            return self._distances(z_nd, e_kd).argmin(1)
        return torch.cat([self._distances(z_nd[s:s + rows], e_kd).argmin(1) for s in range(0, n, rows)])

    def _entropy_loss(self, z_nd: Tensor, e_kd: Tensor) -> Tensor:
        """LlamaGen's ``compute_entropy_loss``: mean per-position entropy − entropy of the mean."""
        logits_nk = -self._distances(z_nd, e_kd) / self.cfg.entropy_temperature
        p_nk = logits_nk.softmax(1)
        sample_entropy = -(p_nk * logits_nk.log_softmax(1)).sum(1).mean()
        avg_p_k = p_nk.mean(0)
        avg_entropy = -(avg_p_k * torch.log(avg_p_k + 1e-5)).sum()
        return sample_entropy - avg_entropy

    # ------------------------------------------------------------------------------ forward
    def forward(self, z_bdhw: Tensor) -> QuantOut:
        if z_bdhw.ndim != 4 or z_bdhw.shape[1] != self.code_dim:
            raise ValueError(f"VQ with code_dim {self.code_dim} expects z of shape (B, {self.code_dim}, h, w), "
                             f"got {tuple(z_bdhw.shape)}")
        cfg = self.cfg
        in_dtype = z_bdhw.dtype
        b, d, h, w = z_bdhw.shape
        with torch.autocast(device_type=z_bdhw.device.type, enabled=False):
            z = z_bdhw.float()
            if cfg.l2_norm:
                z = F.normalize(z, dim=1)
            z_nd = z.permute(0, 2, 3, 1).reshape(-1, d)
            # a copy, so the in-place EMA / restart updates below cannot invalidate saved tensors
            e_kd = self.codebook(copy=self.training)
            idx_n = self.nearest(z_nd.detach(), e_kd.detach())
            q_bdhw = F.embedding(idx_n, e_kd).view(b, h, w, d).permute(0, 3, 1, 2)

            zero = z.new_zeros(())
            commit = F.mse_loss(z, q_bdhw.detach())
            codebook = zero if cfg.ema else F.mse_loss(q_bdhw, z.detach())
            entropy = self._entropy_loss(z_nd, e_kd) if cfg.entropy_weight > 0 else zero
            loss = codebook + cfg.beta * commit + cfg.entropy_weight * entropy
            zq_bdhw = z + (q_bdhw - z).detach()  # straight-through

            if self.training:
                dead = self._training_update(z_nd.detach(), idx_n)
            else:
                dead = (self.steps_unused >= cfg.dead_after).sum()
        idx_bhw = idx_n.view(b, h, w)
        with torch.no_grad():
            used = torch.bincount(idx_n, minlength=self.codebook_size).gt(0).float().mean()
            stats = {"perplexity": perplexity(idx_n, self.codebook_size), "usage": used,
                     "dead": dead.float()}
        return QuantOut(zq_bdhw=zq_bdhw.to(in_dtype), indices=idx_bhw, loss=loss,
                        losses={"codebook": codebook, "commit": commit, "entropy": entropy}, stats=stats)

    def decode_indices(self, indices: Tensor) -> Tensor:
        """Indices (B, h, w) → ``zq_bdhw`` (B, d, h, w) float32: codebook rows (normalised when l2_norm)."""
        return F.embedding(indices.long(), self.codebook()).permute(0, 3, 1, 2)

    # ------------------------------------------------------------------------------ training updates
    @torch.no_grad()
    def _training_update(self, z_nd: Tensor, idx_n: Tensor) -> Tensor:
        """EMA update, dead-code counters and restarts after a training forward; returns the dead count."""
        cfg = self.cfg
        counts_k = torch.bincount(idx_n, minlength=self.codebook_size).float()
        sums_kd = None
        if cfg.ema:
            sums_kd = torch.zeros_like(self.embed_avg, dtype=torch.float32).index_add_(0, idx_n, z_nd)
        if distributed():
            if sums_kd is None:
                dist.all_reduce(counts_k)
            else:  # one collective for both
                packed = torch.cat([counts_k[:, None], sums_kd], 1)
                dist.all_reduce(packed)
                counts_k, sums_kd = packed[:, 0].contiguous(), packed[:, 1:].contiguous()
        used_k = counts_k > 0
        dead_k = self._age_codes(used_k, cfg.dead_after)
        if cfg.ema:
            self._ema_update(counts_k, sums_kd, used_k)
        n_dead = dead_k.sum()
        if cfg.restart_dead:
            self._remember(z_nd)
            if int(n_dead) > 0:
                self._restart(dead_k)
        return n_dead

    def _ema_update(self, counts_k: Tensor, sums_kd: Tensor, used_k: Tensor) -> None:
        """Sonnet / VQ-VAE-2 EMA: N ← γN + (1−γ)n, m ← γm + (1−γ)Σz, e = m / Laplace-smoothed N.

        Only the rows of codes used in this step are rewritten; unused codes keep their vectors
        (their statistics still decay).
        """
        cfg = self.cfg
        g = cfg.ema_decay
        self.cluster_size.mul_(g).add_(counts_k, alpha=1 - g)
        self.embed_avg.mul_(g).add_(sums_kd, alpha=1 - g)
        n = self.cluster_size.sum()
        smoothed_k = (self.cluster_size + cfg.ema_eps) / (n + self.codebook_size * cfg.ema_eps) * n
        new_kd = self.embed_avg / smoothed_k[:, None]
        weight = self.embedding.weight
        weight.copy_(torch.where(used_k[:, None], new_kd.to(weight.dtype), weight))

    def _restarted(self, dead_idx: Tensor, new_md: Tensor) -> None:
        if self.cfg.ema:  # the EMA statistics restart as if each new code had been assigned itself once
            self.embed_avg[dead_idx] = new_md
            self.cluster_size[dead_idx] = 1.0
