"""``backbone/mamba``: Mamba-2 blocks in plain PyTorch (Dao & Gu 2024, "Transformers are SSMs"; the mixer
AiM uses, Li et al. 2024, "Scalable Autoregressive Image Generation with Mamba").

Block (pre-norm, as AiM): ``x + Mixer(RMSNorm(x))`` and, with ``mlp_ratio > 0``, ``+ SwiGLU(RMSNorm(·))``.
Mixer, for ``x_bld`` (B, L, d), ``d_inner = expand·d`` = H heads of P = ``head_dim``, state size N:

1. ``in_proj``: d → [z (d_inner), xBC (d_inner + 2·G·N), dt (H)];
2. ``xBC`` through a causal depthwise conv (kernel ``d_conv``) and SiLU, split into x (B, L, H, P),
   B and C (B, L, G, N), each of the G groups shared by H/G heads;
3. ``dt = softplus(dt + dt_bias)``, ``A = −exp(A_log)`` (one scalar per head), and the selective SSM
   ``h_t = exp(dt_t·A)·h_{t−1} + dt_t·B_t ⊗ x_t``, ``y_t = C_t·h_t + D·x_t`` with h (B, H, P, N);
4. ``y · SiLU(z)``, gated RMSNorm, ``out_proj`` d_inner → d.

Training computes the scan with the chunked SSD algorithm (state-spaces/mamba ``ssd_minimal``; written
here): inside each chunk of Q positions a masked quadratic form with ``exp(segsum(dt·A))``, the chunks'
end states, a recurrence over chunks, and the states' contribution to each chunk — linear in L for a
fixed Q, any L (the tail is padded with dt = 0, which leaves the state unchanged). The same code runs a
block from a given state, so ``prefill`` of a condition, a Token-Shuffle window or a whole step starts
from the decode state, and ``step`` is the recurrence itself.

Decode state per layer: the last ``d_conv − 1`` conv inputs (B, d_inner + 2GN, d_conv − 1) and the SSM
state (B, H, P, N): constant in the position (no KV cache). ``A_log``, ``D``, ``dt_bias`` and norm gains
are exempt from weight decay. Causal only: VAR's block-causal and NAR's proximity masks need attention
inside a step (``backbone/hybrid``), and the capability check refuses them at config time, naming it.

Conditioning (AiM): ``cond_mode: adaln`` modulates each block from the condition vector (per block, or
AiM's adaLN-group with ``adaln_groups: G``; gates start at 0, so blocks start as the identity) and the
final norm; ``pos_embed: learned`` adds a learned absolute 2D position table
(:mod:`arlab.backbone.modulation`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from arlab.backbone.base import CAUSAL, Backbone, Capabilities, DecodeState
from arlab.backbone.modulation import AdaLN, FinalModulation, LearnedPositions, check_cond, modulated
from arlab.errors import ConfigError
from arlab.layers import RMSNorm, find_multiple, no_weight_decay
from arlab.registry import register


def segsum(x: Tensor) -> Tensor:
    """(..., T) → (..., T, T): ``out[..., i, j] = sum(x[..., j+1 : i+1])`` for j ≤ i, −inf above the diagonal."""
    T = x.shape[-1]
    xr = repeat(x, "... t -> ... t e", e=T)
    below = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device), diagonal=-1)
    s = torch.cumsum(xr.masked_fill(~below, 0), dim=-2)
    return s.masked_fill(~torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device)), float("-inf"))


def ssd_chunked(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk: int,
                h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The selective scan by chunks. ``x`` (b, l, h, p), ``dt`` (b, l, h) (after softplus), ``A`` (h,),
    ``B``/``C`` (b, l, h, n), ``h0`` (b, h, p, n) or None → (y (b, l, h, p) without the D term, final state)."""
    b, L, H, P = x.shape
    chunk = max(1, min(chunk, L))  # a chunk longer than the sequence would only scan padding
    pad = (-L) % chunk
    if pad:  # dt = 0 at the padding: no decay, no input, so the final state is the state at L
        x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
    xs = rearrange(x * dt[..., None], "b (c q) h p -> b c q h p", q=chunk)
    a = rearrange(dt * A, "b (c q) h -> b h c q", q=chunk)
    Bc, Cc = (rearrange(t, "b (c q) h n -> b c q h n", q=chunk) for t in (B, C))
    a_cum = torch.cumsum(a, dim=-1)  # (b, h, c, q)
    # 1. inside each chunk: y_i = sum_{j<=i} C_i·B_j exp(a_{j+1..i}) x_j
    y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", Cc, Bc, torch.exp(segsum(a)), xs)
    # 2. each chunk's end state from its own inputs
    decay_to_end = torch.exp(a_cum[..., -1:] - a_cum)  # (b, h, c, q)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", Bc, decay_to_end, xs)
    # 3. the recurrence over chunks (the initial state first)
    init = torch.zeros_like(states[:, :1]) if h0 is None else h0[:, None].to(states.dtype)
    states = torch.cat([init, states], dim=1)  # (b, c + 1, h, p, n)
    decay_chunk = torch.exp(segsum(F.pad(a_cum[..., -1], (1, 0))))  # (b, h, c + 1, c + 1)
    states = torch.einsum("bhzc,bchpn->bzhpn", decay_chunk, states)
    states, final = states[:, :-1], states[:, -1]
    # 4. the state entering each chunk, decayed to each position
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", Cc, states, torch.exp(a_cum))
    y = rearrange(y_diag + y_off, "b c q h p -> b (c q) h p")
    return y[:, :L], final


class MambaState(DecodeState):
    """Per layer: ``conv`` (B, C_conv, d_conv − 1) last conv inputs, ``ssm`` (B, H, P, N) SSM state."""

    def __init__(self, conv: list[Tensor], ssm: list[Tensor]):
        self.conv, self.ssm = conv, ssm


class Mixer(nn.Module):
    def __init__(self, cfg: Mamba.Config):
        super().__init__()
        d_inner = cfg.expand * cfg.dim
        self.heads, self.head_dim = d_inner // cfg.head_dim, cfg.head_dim
        self.groups, self.d_state = cfg.groups, cfg.d_state
        self.d_conv, self.chunk = cfg.d_conv, cfg.chunk
        conv_ch = d_inner + 2 * cfg.groups * cfg.d_state
        self.in_proj = nn.Linear(cfg.dim, d_inner + conv_ch + self.heads, bias=False)
        self.conv = nn.Conv1d(conv_ch, conv_ch, cfg.d_conv, groups=conv_ch, bias=True)
        # dt initialised log-uniform in [dt_min, dt_max] through the inverse softplus (Mamba)
        dt = torch.exp(torch.rand(self.heads) * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min))
        self.dt_bias = no_weight_decay(nn.Parameter(dt + torch.log(-torch.expm1(-dt))))
        self.A_log = no_weight_decay(nn.Parameter(torch.log(torch.empty(self.heads).uniform_(1, 16))))
        self.D = no_weight_decay(nn.Parameter(torch.ones(self.heads)))
        self.norm = RMSNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, cfg.dim, bias=False)

    def _split(self, xbc: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        d_inner, gn = self.heads * self.head_dim, self.groups * self.d_state
        x, B, C = xbc.split([d_inner, gn, gn], dim=-1)
        x = rearrange(x, "b l (h p) -> b l h p", p=self.head_dim)
        B, C = (repeat(t, "b l (g n) -> b l (g r) n", g=self.groups, r=self.heads // self.groups) for t in (B, C))
        return x, B, C

    def project(self, u_bld: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, L, d) → z (B, L, d_inner), conv input xBC (B, L, C_conv), raw dt (B, L, H)."""
        return self.in_proj(u_bld).split([self.heads * self.head_dim, self.conv.in_channels, self.heads], dim=-1)

    def conv_in(self, xbc: Tensor, conv_state: Tensor | None) -> tuple[Tensor, Tensor]:
        """Causal depthwise conv + SiLU of (B, L, C) after the state's last d_conv − 1 inputs (None: zeros)
        → (activations (B, L, C), the new conv state)."""
        xbc_t = xbc.transpose(1, 2)  # (B, C, L)
        if conv_state is None:
            conv_state = xbc_t.new_zeros(xbc_t.shape[0], xbc_t.shape[1], self.d_conv - 1)
        full = torch.cat([conv_state.to(xbc_t.dtype), xbc_t], dim=-1)  # causal: the previous inputs first
        return F.silu(self.conv(full)).transpose(1, 2), full[..., full.shape[-1] - (self.d_conv - 1):]

    def ssm_inputs(self, xbc: Tensor, dt: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Activated xBC and raw dt → x (B, L, H, P), B, C (B, L, H, N), dt (B, L, H), A (H,), in fp32 at least."""
        x, B, C = self._split(xbc)
        f = torch.float64 if x.dtype == torch.float64 else torch.float32  # the scan in fp32 at least
        dt = F.softplus(dt.to(f) + self.dt_bias.to(f))
        return x.to(f), B.to(f), C.to(f), dt, -torch.exp(self.A_log.to(f))

    def finish(self, y: Tensor, x: Tensor, z: Tensor) -> Tensor:
        """SSM output y (B, L, H, P) (without the D term) → ``out_proj(norm((y + D·x) · SiLU(z)))`` (B, L, d)."""
        y = (y + x * self.D.to(x.dtype)[:, None]).to(z.dtype)
        return self.out_proj(self.norm(rearrange(y, "b l h p -> b l (h p)") * F.silu(z)))

    def forward(self, u_bld: Tensor, conv_state: Tensor | None = None,
                ssm_state: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(B, L, d) from the given state (None: zeros) → (out (B, L, d), new conv state, new SSM state)."""
        z, xbc, dt = self.project(u_bld)
        xbc, new_conv = self.conv_in(xbc, conv_state)
        x, B, C, dt, A = self.ssm_inputs(xbc, dt)
        if x.shape[1] == 1 and ssm_state is not None:  # the recurrence, one position
            h = ssm_state.to(x.dtype) * torch.exp(dt[:, 0] * A)[..., None, None] + torch.einsum(
                "bh,bhp,bhn->bhpn", dt[:, 0], x[:, 0], B[:, 0])
            y = torch.einsum("bhpn,bhn->bhp", h, C[:, 0])[:, None]
        else:
            y, h = ssd_chunked(x, dt, A, B, C, self.chunk, ssm_state)
        return self.finish(y, x, z), new_conv, h


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1, self.w3 = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MambaBlock(nn.Module):
    """``x + Mixer(norm(x))`` (+ ``SwiGLU(norm(·))``); with adaLN each branch is modulated (:func:`modulated`)."""

    def __init__(self, cfg: Mamba.Config, mixer: nn.Module | None = None):
        super().__init__()
        affine = cfg.cond_mode != "adaln"
        self.norm = RMSNorm(cfg.dim, affine=affine)
        self.mixer = mixer if mixer is not None else Mixer(cfg)
        self.mlp = None
        if cfg.mlp_ratio > 0:
            self.mlp_norm = RMSNorm(cfg.dim, affine=affine)
            self.mlp = SwiGLU(cfg.dim, find_multiple(int(cfg.mlp_ratio * cfg.dim), 64))

    @property
    def branches(self) -> int:
        return 1 if self.mlp is None else 2

    def forward(self, x: Tensor, conv: Tensor | None, ssm: Tensor | None, mod: Tensor | None = None,
                **scan) -> tuple[Tensor, Tensor, Tensor]:
        """``scan``: passed to the mixer (the hybrid's step plan)."""
        new: list[Tensor] = []

        def mix(u: Tensor) -> Tensor:
            out, c, h = self.mixer(u, conv, ssm, **scan)
            new.extend([c, h])
            return out

        x = modulated(x, self.norm, mix, mod, 0)
        if self.mlp is not None:
            x = modulated(x, self.mlp_norm, self.mlp, mod, 1)
        return x, new[0], new[1]


def init_projections(model: nn.Module, std: float, residual_outs: list[nn.Linear], depth: int) -> None:
    """N(0, std) linears with zero biases; residual outputs N(0, std / sqrt(2·depth)) (GPT-2)."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    for lin in residual_outs:
        nn.init.normal_(lin.weight, std=std / math.sqrt(2 * depth))


@register("backbone", "mamba")
class Mamba(Backbone):
    """Mamba-2 (SSD) blocks in plain PyTorch: chunked scan for training, constant-size recurrent decode state."""

    @dataclass
    class Config:
        dim: int = 768  # model width d (AiM-B 768)
        depth: int = 24  # blocks (AiM-B 24)
        expand: int = 2  # d_inner = expand · d
        head_dim: int = 64  # P, channels per SSM head
        d_state: int = 64  # N, state size per head and channel
        groups: int = 1  # G, groups of heads sharing B and C
        d_conv: int = 4  # causal depthwise conv kernel
        chunk: int = 64  # SSD chunk length Q (any sequence length works)
        mlp_ratio: float = 0.0  # SwiGLU between mixers, hidden = ratio · d (AiM: 0, none)
        dt_min: float = 0.001
        dt_max: float = 0.1
        init_std: float = 0.02  # N(0, std) init of the projections
        cond_mode: str = "prefix"  # prefix: condition tokens only; adaln: also AiM's adaLN from the condition vector
        adaln_groups: int = 0  # 0: one modulation per block; G: AiM's adaLN-group (G shared sets + per-block tables)
        pos_embed: str = "none"  # none, or learned absolute 2D positions (AiM)
        max_grid: int = 32  # rows/cols of the learned position table

        def __post_init__(self) -> None:
            check_cond(self.cond_mode, self.adaln_groups, self.pos_embed, self.max_grid)
            if min(self.dim, self.depth, self.expand, self.head_dim, self.d_state, self.groups, self.chunk) < 1:
                raise ConfigError("dim, depth, expand, head_dim, d_state, groups and chunk must be >= 1")
            if (self.expand * self.dim) % self.head_dim:
                raise ConfigError(f"expand·dim = {self.expand * self.dim} is not divisible by head_dim "
                                  f"{self.head_dim}")
            heads = (self.expand * self.dim) // self.head_dim
            if heads % self.groups:
                raise ConfigError(f"groups {self.groups} must divide the {heads} heads")
            if self.d_conv < 2:
                raise ConfigError(f"d_conv {self.d_conv} must be >= 2")
            if not 0 < self.dt_min <= self.dt_max:
                raise ConfigError(f"need 0 < dt_min <= dt_max, got {self.dt_min}, {self.dt_max}")

    @classmethod
    def capabilities(cls, cfg: Config) -> Capabilities:
        hint = ("a causal scan cannot let the positions of one decoding step see each other; use backbone/hybrid "
                "(attention inside each step, Mamba-2 across steps)")
        return Capabilities(attention=frozenset({CAUSAL}), cond_modes=frozenset({"prefix", "adaln"}),
                            cond_mode=cfg.cond_mode, branch=False, notes={"block_causal": hint, "arbitrary": hint})

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg, self.dim = cfg, cfg.dim
        self.blocks = nn.ModuleList([MambaBlock(cfg) for _ in range(cfg.depth)])
        adaln = cfg.cond_mode == "adaln"
        self.norm = RMSNorm(cfg.dim, affine=not adaln)
        init_projections(self, cfg.init_std, [b.mixer.out_proj for b in self.blocks], cfg.depth)
        # after the N(0, std) init: the modulation linears stay zero (blocks start as the identity)
        self.ada = AdaLN(cfg.dim, [b.branches for b in self.blocks], cfg.adaln_groups) if adaln else None
        self.final_ada = FinalModulation(cfg.dim) if adaln else None
        self.pos = LearnedPositions(cfg.dim, cfg.max_grid) if cfg.pos_embed == "learned" else None

    def position_tables(self, rows: Tensor, cols: Tensor, identity: Tensor) -> tuple[Tensor, ...]:
        """``(pe,)`` (L, d) learned absolute positions (none for condition tokens) with ``pos_embed: learned``."""
        return () if self.pos is None else (self.pos(rows, cols, identity),)

    def _run(self, x: Tensor, pos: tuple[Tensor, ...], cond_bd: Tensor | None, state: MambaState | None,
             return_trunk: bool) -> Tensor | tuple[Tensor, Tensor]:
        if self.pos is not None:
            x = x + pos[0].to(x.dtype)
        mods = self.ada(cond_bd) if self.ada is not None else [None] * len(self.blocks)
        for i, b in enumerate(self.blocks):
            conv = None if state is None else state.conv[i]
            ssm = None if state is None else state.ssm[i]
            x, conv, ssm = b(x, conv, ssm, mods[i])
            if state is not None:
                state.conv[i], state.ssm[i] = conv, ssm
        h = self.norm(x)
        if self.final_ada is not None:
            h = self.final_ada(h, cond_bd)
        return (h, x) if return_trunk else h

    def forward(self, x_bld: Tensor, pos: tuple[Tensor, ...], mask: Tensor | None = None,
                cond_bd: Tensor | None = None, return_trunk: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """The whole sequence from a zero state (causal by construction; ``mask`` must be causal)."""
        return self._run(x_bld, pos, cond_bd, None, return_trunk)

    def init_state(self, batch: int, max_len: int, dtype: torch.dtype, device: torch.device) -> MambaState:
        mx = self.blocks[0].mixer
        f = torch.float64 if dtype == torch.float64 else torch.float32
        conv = [torch.zeros(batch, mx.conv.in_channels, mx.d_conv - 1, dtype=dtype, device=device)
                for _ in self.blocks]
        ssm = [torch.zeros(batch, mx.heads, mx.head_dim, mx.d_state, dtype=f, device=device) for _ in self.blocks]
        return MambaState(conv, ssm)

    def prefill(self, x_bld: Tensor, state: MambaState, pos_l: Tensor, pos: tuple[Tensor, ...],
                mask: Tensor | None, cond_bd: Tensor | None = None,
                return_trunk: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """The next L positions of the sequence from ``state`` (positions must continue it: a scan has no
        random access), chunked SSD from the state's SSM state; ``step`` for L = 1 is the recurrence."""
        return self._run(x_bld, pos, cond_bd, state, return_trunk)
