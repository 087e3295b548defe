"""``quantizer/msvq``: VAR's multi-scale residual quantizer (Tian et al. 2024, "Visual Autoregressive
Modeling: Scalable Image Generation via Next-Scale Prediction"; reference ``VectorQuantizer2`` in
FoundationVision/VAR ``models/quant.py``).

A latent ``f_BChw`` (B, C, H, W) with H = W = ``patch_nums[-1]`` is quantized coarse to fine. With
``f_rest = f`` and ``f_hat = 0``, for each scale k with p = ``patch_nums[k]``:

1. ``z = area(f_rest → p×p)`` (the last scale is not interpolated), nearest of K codes by squared
   L2 distance (or cosine when ``l2_norm``) → ``idx_Bpp`` (B, p, p);
2. ``h = φ_k(bicubic(embedding(idx) → H×W))`` (the last scale is not interpolated);
3. ``f_hat += h``, ``f_rest -= h``.

φ is a 3×3 convolution blended with its input, ``(1 − r)·h + r·conv(h)`` (VAR quant.py ``Phi``:
r = ``quant_resi`` = 0.5), applied at full resolution after upsampling. ``phi_k`` convolutions are
shared across scales by position (VAR ``share_quant_resi``: 4): see :func:`phi_mapping`.

The indices a next-scale generator trains on are the per-scale maps; its inputs are *continuous*:
:meth:`MultiScaleVQ.teacher_forcing_inputs` (VAR ``idxBl_to_var_input``) and, at sampling time,
:meth:`MultiScaleVQ.next_autoregressive_input` (VAR ``get_next_autoregressive_input``).

Facts taken from VAR (``models/quant.py``, ``models/vqvae.py``; arlab notes
``reference/var_nar.md`` §1, §6-7):

* V = 4096, Cvae = 32, beta 0.25, ``using_znorm`` False, ``quant_resi`` 0.5, ``share_quant_resi`` 4,
  patch_nums (1, 2, 3, 4, 5, 6, 8, 10, 13, 16) (L = 680) on a 16×16 latent.
* Interpolation: ``area`` down, ``bicubic`` up (``align_corners`` default), none at the last scale.
* Distances are ``‖z‖² + ‖e‖² − 2 z·e`` (``addmm``) on ``embedding.weight.data`` (no gradient
  through the lookup); cosine lookup normalises z and the codes for the *search only* — the
  contribution ``h`` uses the raw ``embedding`` rows, as in VAR.
* Loss: ``mean_k [beta · mse(sg(f_hat_k), f) + mse(f_hat_k, sg(f))]`` with ``f_hat_k`` the running
  sum after scale k; the quantizer runs in float32 with autocast off.
* φ index for scale k: the tick of ``linspace(1/(3K), 1 − 1/(3K), K)`` (K = 4) or
  ``linspace(1/(2K), 1 − 1/(2K), K)`` (other K) nearest to k/(S−1). For 10 scales and K = 4:
  [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]. Two of those positions (2/9 and 7/9) lie exactly half-way between
  ticks, so the float64 rounding of numpy's ``linspace`` decides them; this module uses the same
  numpy computation.
* ``quant_resi`` ≈ 0 makes φ the identity (no convolution parameters).

Where arlab differs (and why):

* ``zq = sg(f_hat) + (f − sg(f))``: the same straight-through gradient as VAR's
  ``(sg(f_hat) − sg(f)) + f``, but its value is f_hat bit for bit (VAR's differs by rounding), so
  ``decode_indices(out.indices)`` equals ``out.zq_bdhw`` exactly.
* One scale (``patch_nums = [H]``): VAR divides by S − 1 = 0; here the only scale sits at position 0.
* No ``ema_vocab_hit_SV`` buffer (it needs ``torch.distributed``); per-scale perplexity is in ``stats``.
* ``restart_dead`` (off by default, as VAR has none): codes that no scale chose for ``dead_after``
  training steps are re-initialised from recent residual vectors (the ``z`` looked up at any scale),
  as ``quantizer/vq`` does. VAR's 4096 codes see millions of ImageNet latents; a 1024-code book
  trained on CIFAR-sized data collapses to a handful of codes in a few hundred steps without it.
* Codebook init follows VAR's ``eini`` (0, VAR's released default: ``nn.Embedding``'s N(0, 1)).

Loading a VAR checkpoint: ``quantize.embedding.weight`` → ``embedding.weight`` and
``quantize.quant_resi.qresi_ls.{i}.{weight,bias}`` → ``phis.{i}.{weight,bias}`` (``share_quant_resi`` 4).

Longer than 400 lines because the quantizer and the f̂ bookkeeping that VAR's next-scale order reuses
(teacher-forcing inputs, the next autoregressive input, per-scale embedding) must be one piece of
arithmetic: training, tokenizing and sampling then cannot drift apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from arlab.errors import ConfigError
from arlab.quantizer.base import DeadCodeRestarts, Quantizer, QuantOut, distributed, exact_fp32_matmul, perplexity
from arlab.registry import register

# distances are computed for at most this many (position, code) pairs at once (64 MiB of float32)
CHUNK_ELEMS = 2**24

VAR_PATCH_NUMS = [1, 2, 3, 4, 5, 6, 8, 10, 13, 16]


def phi_mapping(num_scales: int, num_phi: int) -> list[int]:
    """Which of ``num_phi`` φ convolutions each of ``num_scales`` scales uses (VAR's rule).

    Scale k sits at ``k / (S − 1)`` in [0, 1] (0 when S = 1, where VAR would divide by zero); it
    uses the φ whose tick is nearest (first on ties), ticks being ``np.linspace(1/3/K, 1 − 1/3/K, K)``
    when K == 4 and ``np.linspace(1/2/K, 1 − 1/2/K, K)`` otherwise (VAR quant.py
    ``PhiPartiallyShared`` / ``PhiNonShared``). 10 scales, K = 4 → [0, 0, 1, 1, 1, 2, 2, 3, 3, 3].
    """
    if num_scales < 1 or num_phi < 1:
        raise ValueError(f"need >= 1 scale and >= 1 phi, got {num_scales} scales and {num_phi} phis")
    k = num_phi
    ticks = np.linspace(1 / 3 / k, 1 - 1 / 3 / k, k) if k == 4 else np.linspace(1 / 2 / k, 1 - 1 / 2 / k, k)
    out = []
    for si in range(num_scales):
        at = si / (num_scales - 1) if num_scales > 1 else 0.0
        out.append(int(np.argmin(np.abs(ticks - at)).item()))
    return out


class Phi(nn.Conv2d):
    """VAR's φ: a 3×3 conv (padding 1), C → C, blended ``(1 − r)·h + r·conv(h)`` (VAR quant.py: r = 0.5).

    ``h_BCHW`` (B, C, H, W) → (B, C, H, W). Runs with float32 copies of the weights, so a module cast
    to bf16 still refines float32 latents.
    """

    def __init__(self, channels: int, ratio: float):
        super().__init__(channels, channels, kernel_size=3, stride=1, padding=1)
        self.ratio = float(ratio)

    def forward(self, h_BCHW: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.float()
        conv = F.conv2d(h_BCHW, self.weight.float(), bias, stride=1, padding=1)
        return h_BCHW.mul(1 - self.ratio) + conv.mul(self.ratio)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ratio={self.ratio}"


@register("quantizer", "msvq")
class MultiScaleVQ(DeadCodeRestarts, Quantizer):
    """VAR's multi-scale residual VQ (Tian et al. 2024): next-scale token maps, coarse to fine, φ-refined.

    Shapes (VAR names): ``f_BChw`` (B, C, H, W) with C = ``code_dim`` and H = W = ``patch_nums[-1]``
    → :class:`QuantOut` with ``zq_bdhw`` = f̂ (B, C, H, W) in f's dtype (straight-through to f) and
    ``indices`` a list of S int64 maps ``idx_Bpp`` (B, p_k, p_k) in [0, K).

    Loss (VAR quant.py forward): ``loss = mean_k [beta · commit_k + codebook_k]`` with
    ``commit_k = mse(sg(f_hat_k), f)`` and ``codebook_k = mse(f_hat_k, sg(f))``, f_hat_k the running
    f̂ after scale k. ``losses``: ``commit`` and ``codebook`` (means over scales, unweighted).
    ``stats``: ``perplexity`` (all scales' indices together), ``usage`` (fraction of the K codes used
    by any scale), and per scale ``perplexity_s{k}`` and ``mse_s{k}`` (mse(f_hat_k, f): the residual
    error left after scales 0..k).

    Generator helpers: :meth:`indices_to_fhat` (= :meth:`decode_indices`),
    :meth:`teacher_forcing_inputs`, :meth:`next_autoregressive_input`, :attr:`scale_lengths`,
    :attr:`phi_indices`.
    """

    multiscale = True

    @dataclass
    class Config:
        codebook_size: int = 4096  # K, number of codes shared by all scales (VAR: V = 4096)
        code_dim: int = 32  # C, channels of the latent and of each code (VAR: Cvae = 32)
        patch_nums: list[int] = field(default_factory=lambda: list(VAR_PATCH_NUMS))  # side p_k of scale k
        beta: float = 0.25  # commitment weight (VAR: 0.25)
        phi_k: int = 4  # φ convs shared by scale position (VAR share_quant_resi: 4); 0 = one per scale
        phi_ratio: float = 0.5  # φ blend r in (1-r)·h + r·conv(h) (VAR quant_resi: 0.5); 0 = no φ
        l2_norm: bool = False  # cosine lookup instead of L2 (VAR using_znorm: false); h uses raw codes
        latent_size: int = 0  # H = W of the latent; 0 = patch_nums[-1] (must equal it)
        eini: float = 0.0  # codebook init (VAR eini): >0 trunc-normal std, <0 uniform ±|eini|/K, 0 = N(0, 1)
        restart_dead: bool = False  # re-init codes no scale chose for dead_after steps (VAR: false; arlab)
        dead_after: int = 20  # training forwards without any use after which a code is restarted
        restart_buffer: int = 4096  # recent residual vectors kept (per rank) to draw restarts from

        def __post_init__(self) -> None:
            if not 2 <= self.codebook_size <= 2**31:
                raise ConfigError(f"codebook_size {self.codebook_size}: must be between 2 and 2**31 "
                                  "(VAR uses 4096)")
            if self.code_dim < 1:
                raise ConfigError(f"code_dim {self.code_dim}: must be >= 1 (VAR uses 32)")
            if self.l2_norm and self.code_dim < 2:
                raise ConfigError(f"code_dim {self.code_dim} with l2_norm: cosine lookup needs code_dim >= 2 "
                                  "(or set l2_norm: false)")
            pn = list(self.patch_nums)
            if not pn or any(isinstance(p, bool) or not isinstance(p, int) or p < 1 for p in pn):
                raise ConfigError(f"patch_nums {pn}: must be a non-empty list of positive integers, "
                                  f"e.g. VAR's {VAR_PATCH_NUMS}")
            if any(b <= a for a, b in zip(pn, pn[1:])):
                raise ConfigError(f"patch_nums {pn}: must be strictly increasing (coarse to fine), "
                                  f"e.g. VAR's {VAR_PATCH_NUMS}")
            if self.latent_size < 0:
                raise ConfigError(f"latent_size {self.latent_size}: must be >= 0 (0 = patch_nums[-1])")
            if self.latent_size and self.latent_size != pn[-1]:
                raise ConfigError(f"patch_nums {pn} ends at {pn[-1]} but latent_size is {self.latent_size}: "
                                  f"the last scale must be the full {self.latent_size}x{self.latent_size} "
                                  "latent (append it to patch_nums, or set latent_size to 0)")
            if not (self.beta >= 0 and math.isfinite(self.beta)):
                raise ConfigError(f"beta {self.beta}: the commitment weight must be finite and >= 0 "
                                  "(VAR: 0.25)")
            if not 0 <= self.phi_ratio <= 1:
                raise ConfigError(f"phi_ratio {self.phi_ratio}: must be in [0, 1] (VAR: 0.5; 0 disables φ)")
            if self.phi_k < 0:
                raise ConfigError(f"phi_k {self.phi_k}: must be >= 0 (VAR: 4; 1 = one shared φ, "
                                  "0 = one φ per scale)")
            if abs(self.phi_ratio) > 1e-6:
                n_phi = self.phi_k or len(pn)
                used = set(phi_mapping(len(pn), n_phi))
                unused = sorted(set(range(n_phi)) - used)
                if unused:
                    raise ConfigError(
                        f"phi_k {self.phi_k} with patch_nums {pn}: the scales use φ "
                        f"{phi_mapping(len(pn), n_phi)}, so φ {unused} would never train (and DDP fails on "
                        f"unused parameters); use phi_k <= {len(pn)} such that every φ is used, e.g. 1")
            if self.dead_after < 1:
                raise ConfigError(f"dead_after {self.dead_after}: must be >= 1 training step, e.g. 20")
            if self.restart_buffer < 1:
                raise ConfigError(f"restart_buffer {self.restart_buffer}: must hold >= 1 vector, e.g. 4096")
            if not math.isfinite(self.eini):
                raise ConfigError(f"eini {self.eini}: must be finite (0 = N(0, 1), VAR's default)")

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.codebook_size = cfg.codebook_size
        self.code_dim = cfg.code_dim
        self.patch_nums: list[int] = [int(p) for p in cfg.patch_nums]
        self.latent_size: int = self.patch_nums[-1]
        self.beta = float(cfg.beta)
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.code_dim)
        with torch.no_grad():  # VAR VectorQuantizer2.eini
            if cfg.eini > 0:
                nn.init.trunc_normal_(self.embedding.weight, std=cfg.eini)
            elif cfg.eini < 0:
                bound = abs(cfg.eini) / cfg.codebook_size
                self.embedding.weight.uniform_(-bound, bound)
        n_scales = len(self.patch_nums)
        n_phi = cfg.phi_k or n_scales
        use_phi = abs(cfg.phi_ratio) > 1e-6  # VAR: nn.Identity when |quant_resi| <= 1e-6
        self.phis = nn.ModuleList([Phi(cfg.code_dim, cfg.phi_ratio) if use_phi else nn.Identity()
                                   for _ in range(n_phi)])
        self.phi_indices: list[int] = phi_mapping(n_scales, n_phi)  # φ used by each scale
        if cfg.restart_dead:  # no extra buffers otherwise, so VAR checkpoints load strictly
            self._init_dead_codes(cfg.codebook_size, cfg.code_dim, True, cfg.restart_buffer)

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"codebook_size={c.codebook_size}, code_dim={c.code_dim}, patch_nums={self.patch_nums}, "
                f"phi_indices={self.phi_indices}, phi_ratio={c.phi_ratio}, l2_norm={c.l2_norm}, "
                f"beta={c.beta}")

    @property
    def scale_lengths(self) -> list[int]:
        """Tokens per scale, ``[p * p for p in patch_nums]`` (VAR 256px: sum 680)."""
        return [p * p for p in self.patch_nums]

    # ------------------------------------------------------------------------------ building blocks
    def _autocast_off(self, device: torch.device):
        return torch.autocast(device_type=device.type, enabled=False)

    @torch.no_grad()
    def _nearest(self, z_NC: Tensor) -> Tensor:
        """Index (N,) int64 of the nearest code for each row of ``z_NC`` (N, C) float32, chunked."""
        e_VC = self.embedding.weight.detach().float()
        if self.cfg.l2_norm:  # VAR using_znorm: argmax of cosine similarity
            z_NC = F.normalize(z_NC, dim=-1)
            e_CV = F.normalize(e_VC, dim=1).t()

            def best(z: Tensor) -> Tensor:
                return (z @ e_CV).argmax(1)
        else:  # VAR: ‖z‖² + ‖e‖², then addmm −2 z·e, then argmin
            e2_V = e_VC.square().sum(1)

            def best(z: Tensor) -> Tensor:
                d = z.square().sum(1, keepdim=True) + e2_V
                return d.addmm_(z, e_VC.t(), beta=1, alpha=-2).argmin(1)

        n = z_NC.shape[0]
        rows = max(1, CHUNK_ELEMS // self.codebook_size)
        with exact_fp32_matmul():
            if n <= rows:
                return best(z_NC)
            return torch.cat([best(z_NC[s:s + rows]) for s in range(0, n, rows)])

    def _check_k(self, k: int) -> None:
        if not 0 <= k < len(self.patch_nums):
            raise IndexError(f"scale {k} out of range: patch_nums {self.patch_nums} has "
                             f"{len(self.patch_nums)} scales")

    def _refine(self, k: int, h_BCpp: Tensor) -> Tensor:
        """Scale k's contribution to f̂: ``φ_k(bicubic(h → H×W))`` (no upsampling at the last scale).

        ``h_BCpp`` (B, C, p_k, p_k) code vectors → (B, C, H, W) float32. Every path (forward, decoding,
        teacher forcing, sampling) goes through here, so they agree bit for bit.
        """
        h = h_BCpp.float().contiguous()
        if k != len(self.patch_nums) - 1:
            hw = self.latent_size
            h = F.interpolate(h, size=(hw, hw), mode="bicubic").contiguous()
        return self.phis[self.phi_indices[k]](h)

    def embed_scale(self, k: int, idx: Tensor) -> Tensor:
        """Scale k's indices, (B, p, p) or flattened (B, p·p) (VAR idx_Bl) → codes ``h_BCpp`` (B, C, p, p)."""
        p = self.patch_nums[k]
        if idx.ndim == 2 and idx.shape[1] == p * p:
            idx = idx.view(idx.shape[0], p, p)
        if idx.ndim != 3 or tuple(idx.shape[1:]) != (p, p):
            raise ValueError(f"scale {k} (patch_nums {self.patch_nums}) needs indices of shape (B, {p}, {p}) "
                             f"or (B, {p * p}), got {tuple(idx.shape)}")
        return F.embedding(idx.long(), self.embedding.weight.float()).permute(0, 3, 1, 2)

    def _check_indices(self, indices: list[Tensor]) -> None:
        if len(indices) != len(self.patch_nums):
            raise ValueError(f"expected {len(self.patch_nums)} index maps (patch_nums {self.patch_nums}), "
                             f"got {len(indices)}")

    # ------------------------------------------------------------------------------ forward
    def forward(self, f_BChw: Tensor) -> QuantOut:
        if f_BChw.ndim != 4 or f_BChw.shape[1] != self.code_dim:
            raise ConfigError(f"msvq with code_dim {self.code_dim} expects f of shape "
                              f"(B, {self.code_dim}, H, W), got {tuple(f_BChw.shape)}")
        b, c, h, w = f_BChw.shape
        if h != self.latent_size or w != self.latent_size:
            raise ConfigError(f"msvq got a {h}x{w} latent (H={h}, W={w}) but patch_nums {self.patch_nums} "
                              f"ends at {self.latent_size}: the last scale must equal the latent size")
        in_dtype = f_BChw.dtype
        n_scales = len(self.patch_nums)
        with self._autocast_off(f_BChw.device):
            f = f_BChw.float()
            f_ng = f.detach()
            f_rest = f_ng.clone()
            f_hat = torch.zeros_like(f_ng)
            indices: list[Tensor] = []
            queried: list[Tensor] = []  # the vectors looked up at each scale (restart candidates)
            commit: Tensor = f.new_zeros(())
            codebook: Tensor = f.new_zeros(())
            mses: list[Tensor] = []
            for k, p in enumerate(self.patch_nums):
                z = f_rest if k == n_scales - 1 else F.interpolate(f_rest, size=(p, p), mode="area")
                z_NC = z.permute(0, 2, 3, 1).reshape(-1, c)
                idx_N = self._nearest(z_NC)
                queried.append(z_NC)
                idx_Bpp = idx_N.view(b, p, p)
                h_BChw = self._refine(k, self.embed_scale(k, idx_Bpp))
                f_hat = f_hat + h_BChw
                f_rest = f_rest - h_BChw.detach()
                indices.append(idx_Bpp)
                commit_k = F.mse_loss(f_hat.detach(), f)
                codebook_k = F.mse_loss(f_hat, f_ng)
                commit = commit + commit_k
                codebook = codebook + codebook_k
                mses.append(codebook_k.detach())
            commit = commit / n_scales
            codebook = codebook / n_scales
            loss = self.beta * commit + codebook
            zq = f_hat.detach() + (f - f_ng)  # straight-through; value is f_hat exactly
        with torch.no_grad():
            all_idx = torch.cat([i.reshape(-1) for i in indices])
            extra = {}
            if self.cfg.restart_dead:
                extra["dead"] = self._restart_dead(torch.cat(queried), all_idx).float()
            stats = {"perplexity": perplexity(all_idx, self.codebook_size),
                     "usage": torch.bincount(all_idx, minlength=self.codebook_size).gt(0).float().mean()}
            for k, idx in enumerate(indices):
                stats[f"perplexity_s{k}"] = perplexity(idx, self.codebook_size)
                stats[f"mse_s{k}"] = mses[k]
            stats.update(extra)
        return QuantOut(zq_bdhw=zq.to(in_dtype), indices=indices, loss=loss,
                        losses={"commit": commit, "codebook": codebook}, stats=stats)

    @torch.no_grad()
    def _restart_dead(self, z_NC: Tensor, idx_N: Tensor) -> Tensor:
        """Dead-code bookkeeping after a forward: in training, age the codes no scale chose, remember
        this step's residual vectors and restart codes unused for ``dead_after`` steps from them.
        Returns the number of dead codes (before this call's restarts). The lookup contributions
        ``h`` are gathered by ``F.embedding``, whose backward does not read the weight, so rewriting
        rows here leaves the autograd graph valid."""
        if not self.training:
            return (self.steps_unused >= self.cfg.dead_after).sum()
        counts_k = torch.bincount(idx_N, minlength=self.codebook_size).float()
        if distributed():
            dist.all_reduce(counts_k)
        dead_k = self._age_codes(counts_k > 0, self.cfg.dead_after)
        n_dead = dead_k.sum()
        self._remember(z_NC.float())
        if int(n_dead) > 0:
            self._restart(dead_k)
        return n_dead

    # ------------------------------------------------------------------------- decoding / generator helpers
    def indices_to_fhat(self, indices: list[Tensor]) -> Tensor:
        """Per-scale indices ((B, p_k, p_k) each, or VAR's flat (B, p_k²)) → f̂ ``f_hat_BChw`` (B, C, H, W).

        Float32, accumulated exactly as :meth:`forward` does (``f_hat = f_hat + φ_k(up(e[idx_k]))``),
        so decoding the forward's indices reproduces its f̂ bit for bit (VAR ``embed_to_fhat``).
        """
        self._check_indices(indices)
        device = indices[0].device
        with self._autocast_off(device):
            b = indices[0].shape[0]
            hw = self.latent_size
            f_hat = torch.zeros(b, self.code_dim, hw, hw, device=device, dtype=torch.float32)
            for k, idx in enumerate(indices):
                f_hat = f_hat + self._refine(k, self.embed_scale(k, idx))
        return f_hat

    def decode_indices(self, indices: list[Tensor]) -> Tensor:
        """= :meth:`indices_to_fhat`: the quantized latent ``zq_bdhw`` (B, C, H, W) float32."""
        return self.indices_to_fhat(indices)

    def teacher_forcing_inputs(self, indices: list[Tensor]) -> Tensor:
        """VAR ``idxBl_to_var_input``: the generator's continuous inputs for scales 1..S−1, (B, L − p_0², C).

        For each k ≥ 1 the running f̂ of scales < k (full resolution, φ-refined) is area-downsampled
        to p_k × p_k and flattened row-major; scales are concatenated coarse to fine. Row j of scale k
        is the input at the position that predicts ``idx_k`` there (no shift by one). With VAR's
        patch_nums (first scale 1×1) that is (B, L − 1, C) = (B, 679, C). Float32. A single-scale
        quantizer returns (B, 0, C) (VAR returns None).
        """
        self._check_indices(indices)
        device = indices[0].device
        b, c, hw = indices[0].shape[0], self.code_dim, self.latent_size
        with self._autocast_off(device):
            f_hat = torch.zeros(b, c, hw, hw, device=device, dtype=torch.float32)
            rows: list[Tensor] = []
            for k in range(len(self.patch_nums) - 1):
                f_hat = f_hat + self._refine(k, self.embed_scale(k, indices[k]))
                p_next = self.patch_nums[k + 1]
                nxt = F.interpolate(f_hat, size=(p_next, p_next), mode="area")
                rows.append(nxt.reshape(b, c, -1).transpose(1, 2))
            if not rows:
                return torch.zeros(b, 0, c, device=device, dtype=torch.float32)
            return torch.cat(rows, dim=1)

    def next_autoregressive_input(self, k: int, f_hat: Tensor | None,
                                  h_k_BCpp: Tensor) -> tuple[Tensor, Tensor]:
        """VAR ``get_next_autoregressive_input``: add scale k's contribution and make the next input.

        ``f_hat`` (B, C, H, W) float32 running f̂ of scales < k (None or zeros at k = 0);
        ``h_k_BCpp`` (B, C, p_k, p_k) the code vectors of scale k (``embedding(idx_Bpp)`` permuted to
        channels-first). Returns ``(f_hat_BChw, next_BCpp)``: the new f̂ = f_hat + φ_k(up(h_k)) (a new
        tensor; the argument is not modified, unlike VAR's in-place add), and f̂ area-downsampled to
        (B, C, p_{k+1}, p_{k+1}) — flatten it with ``.flatten(2).transpose(1, 2)`` to get that scale's
        (B, p_{k+1}², C) input rows — or, at the last scale, f̂ itself (the latent to decode).
        """
        self._check_k(k)
        hw, c = self.latent_size, self.code_dim
        p = self.patch_nums[k]
        if h_k_BCpp.ndim != 4 or tuple(h_k_BCpp.shape[1:]) != (c, p, p):
            raise ValueError(f"scale {k} needs h of shape (B, {c}, {p}, {p}), got {tuple(h_k_BCpp.shape)}")
        with self._autocast_off(h_k_BCpp.device):
            if f_hat is None:
                f_hat = torch.zeros(h_k_BCpp.shape[0], c, hw, hw, device=h_k_BCpp.device, dtype=torch.float32)
            if tuple(f_hat.shape[1:]) != (c, hw, hw):
                raise ValueError(f"f_hat must be (B, {c}, {hw}, {hw}), got {tuple(f_hat.shape)}")
            f_hat = f_hat.float() + self._refine(k, h_k_BCpp)
            if k == len(self.patch_nums) - 1:
                return f_hat, f_hat
            p_next = self.patch_nums[k + 1]
            return f_hat, F.interpolate(f_hat, size=(p_next, p_next), mode="area")
