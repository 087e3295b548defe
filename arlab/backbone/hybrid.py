"""``backbone/hybrid``: attention and Mamba-2 layers in one stack (in the manner of M-VAR, Zhao et al. 2024;
Jamba's interleaving), so next-scale (VAR) and next-neighbour (NAR) orders can use a scan.

Layers follow ``pattern`` repeated over ``depth`` (``[attn, mamba]``: attention, Mamba, attention, ...).
An **attention layer** is a Llama block (RMSNorm, masked SDPA with 2D RoPE, SwiGLU) that honours the
order's mask as given. A **Mamba layer** is a Mamba-2 block (:mod:`arlab.backbone.mamba`) whose scan is
made to honour it too. Every mask an order produces is block-causal over *decoding steps* (an input sees
exactly the inputs fed at its own step or earlier, and the condition; :class:`arlab.order.base.OrderPlan`);
VAR's steps are contiguous scales, NAR's are anti-diagonals scattered over a raster sequence. So:

* the scan runs over the positions in **feed order** (by step, then position) — the order decoding feeds
  them — which for NAR is a permutation of the sequence; a position's step is read off the mask (its row
  count: more steps seen, more positions seen);
* each position **reads** the scan state at the end of its own step (``scan_readout: after_step``: what the
  mask allows, as a step's positions see each other; plain Mamba when every step is one position) or at
  the end of the previous step (``before_step``: the step's own positions reach it only through
  attention and the conv window). Computed as one ordinary chunked scan over 2L items: each position's
  write (its dt, B, x) and, after (or before) every write of its step, a read copy with dt = 0 (no decay,
  no input) that returns ``C·h`` at that point;
* a position hidden from some position fed after it (a padded caption token) does not write (dt and its
  conv input zeroed), so it cannot reach anyone through the scan; one that is moreover seen by no later
  position reaches nobody at all, so what it reads does not matter;
* a mask that is not of this form (a position that would receive, through the scan or the conv window, a
  position its mask hides) is refused with a ValueError: the guard runs on every call.

Decoding: the state holds a :class:`KVCache` per attention layer, the conv inputs and SSM state per Mamba
layer, and which positions wrote; ``prefill`` feeds whole steps (the generator feeds every input of a
step at once), ``step`` one position. Full recomputation and state decoding agree (the contract tests).

Conditioning as :mod:`arlab.backbone.modulation` (prefix tokens; or AiM's adaLN, per block or grouped,
over both kinds of layer); optional learned absolute positions; ``branch(n)`` (NAR's extra layers) is n
more layers of the same pattern without the position table.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from arlab.backbone.base import Backbone, Capabilities, DecodeState
from arlab.backbone.llama import Attention, KVCache, Llama, SwiGLU, rope_2d
from arlab.backbone.mamba import Mamba, MambaBlock, Mixer, init_projections, ssd_chunked
from arlab.backbone.modulation import AdaLN, FinalModulation, LearnedPositions, check_cond, modulated
from arlab.errors import ConfigError
from arlab.layers import RMSNorm
from arlab.registry import register

LAYER_KINDS = ("attn", "mamba")
READOUTS = ("after_step", "before_step")


def gather(t: Tensor, idx: Tensor) -> Tensor:
    """``t`` (B, L, ...) at indices ``idx`` (B' ∈ {1, B}, n) along dim 1 → (B, n, ...). One index row shared by
    the batch (every mask but a padded caption's) is an ``index_select``: ``take_along_dim`` would expand the
    index to t's full shape and wrap it (a ``remainder`` over B·n·... int64s), then scatter-add it back in the
    backward: about a fifth of an M-VAR training step's CPU time in the profiler."""
    if idx.shape[0] == 1:
        return t.index_select(1, idx[0])
    return torch.take_along_dim(t, idx.view(*idx.shape, *([1] * (t.ndim - 2))), dim=1)


@dataclass
class StepPlan:
    """How one call's L new positions go through the Mamba layers (shared by every Mamba layer)."""

    feed: Tensor  # (B', L) the new positions in feed order (indices into the call's positions)
    rank: Tensor  # (B', L) feed rank of each position
    stream: Tensor  # (B', 2L) scan items in order: 0..L-1 the writes, L..2L-1 the reads
    unstream: Tensor  # (B', 2L) inverse of stream
    write: Tensor  # (B', L) bool: the position writes into the state


def step_plan(mask: Tensor | None, pos_l: Tensor, S: int, readout: str, written: Tensor | None) -> StepPlan:
    """The feed order and scan items of new positions ``pos_l`` (L,) given their mask rows (None: causal;
    (L, S); (B, 1, L, S)); ``written`` (B, S): positions of earlier calls that wrote. Raises ValueError when
    the scan would carry a hidden position to a query."""
    if mask is None:
        mask = torch.arange(S, device=pos_l.device)[None, :] <= pos_l[:, None]
    mb = mask[None] if mask.ndim == 2 else mask[:, 0]  # (B', L, S)
    key = mb.sum(-1)  # (B', L): positions seen, increasing with the step
    big = S + 1
    feed = (key * big + pos_l).argsort(dim=1)
    rank = feed.argsort(dim=1)
    cols = mb[:, :, pos_l]  # (B', L, L): query i sees new position j
    later = rank[:, :, None] > rank[:, None, :]
    write = ~(later & ~cols).any(1)
    fw, fr = (0, 1) if readout == "after_step" else (1, 0)
    stream = torch.cat([(key * 2 + fw) * big + pos_l, (key * 2 + fr) * big + pos_l], 1).argsort(dim=1)
    unstream = stream.argsort(dim=1)
    L = pos_l.shape[0]
    reaches = (unstream[:, None, :L] < unstream[:, L:, None]) | later  # j's write or its conv input reaches query i
    dead = ~write & ~(later & cols).any(1)  # writes nothing and no later position sees it (a padded key)
    live = ~dead[:, :, None]  # a dead position may read anything: its output reaches nobody
    leak = (reaches & write[:, None, :] & ~cols & live).any()
    if written is not None:
        leak = leak | (written[:, None, :] & ~mb & live).any()
    if bool(leak):
        raise ValueError("backbone/hybrid: a Mamba layer's scan would carry a position to one whose mask hides it; "
                         "the mask must be block-causal over decoding steps (an order plan's mask), fed step by step")
    return StepPlan(feed, rank, stream, unstream, write)


class StepMixer(Mixer):
    """The Mamba-2 mixer scanning in feed order with per-step readout (:func:`step_plan`)."""

    def forward(self, u_bld: Tensor, conv_state: Tensor | None = None, ssm_state: Tensor | None = None,
                plan: StepPlan | None = None) -> tuple[Tensor, Tensor, Tensor]:
        if plan is None:  # plain causal with after-step readout: the ordinary scan
            return super().forward(u_bld, conv_state, ssm_state)
        L = u_bld.shape[1]
        z, xbc, dt = self.project(u_bld)
        xbc = xbc * plan.write[..., None].to(xbc.dtype)
        xbc_feed, new_conv = self.conv_in(gather(xbc, plan.feed), conv_state)
        x, B, C, dt, A = self.ssm_inputs(gather(xbc_feed, plan.rank), dt)  # back in position order
        both = lambda t, t2: gather(torch.cat([t, t2], 1), plan.stream)  # noqa: E731
        dt_w = dt * plan.write[..., None].to(dt.dtype)
        y, h = ssd_chunked(both(x, x), both(dt_w, torch.zeros_like(dt)), A, both(B, B), both(C, C), self.chunk,
                           ssm_state)
        return self.finish(gather(y, plan.unstream)[:, L:], x, z), new_conv, h


class AttnBlock(nn.Module):
    """A Llama block, ``x + Attn(norm(x))``, ``+ SwiGLU(norm(·))``, each branch optionally adaLN-modulated."""

    branches = 2

    def __init__(self, cfg: Hybrid.Config):
        super().__init__()
        affine = cfg.cond_mode != "adaln"
        self.attn_norm, self.ffn_norm = RMSNorm(cfg.dim, affine=affine), RMSNorm(cfg.dim, affine=affine)
        self.attn = Attention(cfg.dim, cfg.heads, cfg.kv_heads or cfg.heads, cfg.qk_norm, cfg.dropout)
        self.ffn = SwiGLU(cfg.dim, cfg.multiple_of, cfg.dropout)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, mod: Tensor | None,
                cache: KVCache | None, pos_l: Tensor | None) -> Tensor:
        x = modulated(x, self.attn_norm, lambda u: self.attn(u, cos, sin, mask, cache, pos_l), mod, 0)
        return modulated(x, self.ffn_norm, self.ffn, mod, 1)


class HybridState(DecodeState):
    """A KV cache per attention layer, conv inputs (B, C, d_conv − 1) and SSM state (B, H, P, N) per Mamba layer,
    ``written`` (B, S): positions that wrote into the scan."""

    def __init__(self, kv: list[KVCache], conv: list[Tensor], ssm: list[Tensor], written: Tensor):
        self.kv, self.conv, self.ssm, self.written = kv, conv, ssm, written


@register("backbone", "hybrid")
class Hybrid(Backbone):
    """Attention layers (the order's mask) interleaved with Mamba-2 layers scanning step by step (M-VAR-like)."""

    @dataclass
    class Config:
        dim: int = 768
        depth: int = 12  # layers in all (attention + Mamba)
        pattern: list[str] = field(default_factory=lambda: ["attn", "mamba"])  # repeated over depth
        heads: int = 12  # attention heads
        kv_heads: int = 0  # grouped KV heads; 0 = heads
        multiple_of: int = 256  # SwiGLU hidden = 8d/3 rounded up to this
        qk_norm: bool = False
        dropout: float = 0.0
        rope: bool = True  # 2D RoPE in the attention layers
        rope_base: float = 10000.0
        expand: int = 2  # Mamba: d_inner = expand · d
        ssm_head_dim: int = 64  # Mamba: P
        d_state: int = 64  # Mamba: N
        groups: int = 1  # Mamba: groups of heads sharing B and C
        d_conv: int = 4
        chunk: int = 64
        mamba_mlp_ratio: float = 0.0  # SwiGLU after each Mamba mixer (0: none, AiM)
        dt_min: float = 0.001
        dt_max: float = 0.1
        scan_readout: str = "after_step"  # after_step or before_step (see the module docstring)
        cond_mode: str = "prefix"
        adaln_groups: int = 0
        pos_embed: str = "none"
        max_grid: int = 32
        init_std: float = 0.02

        def __post_init__(self) -> None:
            if not self.pattern or any(k not in LAYER_KINDS for k in self.pattern):
                raise ConfigError(f"pattern {list(self.pattern)} must be a non-empty list of {', '.join(LAYER_KINDS)}")
            if self.scan_readout not in READOUTS:
                raise ConfigError(f"scan_readout {self.scan_readout!r} is not one of {', '.join(READOUTS)}")
            check_cond(self.cond_mode, self.adaln_groups, self.pos_embed, self.max_grid)
            self.llama_config()  # validates the attention options
            self.mamba_config()  # and the Mamba ones

        def llama_config(self) -> Llama.Config:
            return Llama.Config(dim=self.dim, depth=self.depth, heads=self.heads, kv_heads=self.kv_heads,
                                multiple_of=self.multiple_of, qk_norm=self.qk_norm, dropout=self.dropout,
                                rope_base=self.rope_base, rope=self.rope, init_std=self.init_std,
                                cond_mode=self.cond_mode)

        def mamba_config(self) -> Mamba.Config:
            return Mamba.Config(dim=self.dim, depth=self.depth, expand=self.expand, head_dim=self.ssm_head_dim,
                                d_state=self.d_state, groups=self.groups, d_conv=self.d_conv, chunk=self.chunk,
                                mlp_ratio=self.mamba_mlp_ratio, dt_min=self.dt_min, dt_max=self.dt_max,
                                init_std=self.init_std, cond_mode=self.cond_mode)

        def kinds(self) -> list[str]:
            return [self.pattern[i % len(self.pattern)] for i in range(self.depth)]

    @classmethod
    def capabilities(cls, cfg: Config) -> Capabilities:
        """Those of its attention layers (every order plan's mask is block-causal over steps, which the scan
        follows): every structure, prefix or adaLN, NAR's branch."""
        return Llama.capabilities(cfg.llama_config())

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg, self.dim, self.head_dim = cfg, cfg.dim, cfg.dim // cfg.heads
        mcfg = cfg.mamba_config()
        self.kinds = cfg.kinds()
        self.blocks = nn.ModuleList([AttnBlock(cfg) if k == "attn" else MambaBlock(mcfg, StepMixer(mcfg))
                                     for k in self.kinds])
        adaln = cfg.cond_mode == "adaln"
        self.norm = RMSNorm(cfg.dim, affine=not adaln)
        init_projections(self, cfg.init_std, [b.mixer.out_proj for b in self.blocks if isinstance(b, MambaBlock)],
                         cfg.depth)
        self.ada = AdaLN(cfg.dim, [b.branches for b in self.blocks], cfg.adaln_groups) if adaln else None
        self.final_ada = FinalModulation(cfg.dim) if adaln else None
        self.pos = LearnedPositions(cfg.dim, cfg.max_grid) if cfg.pos_embed == "learned" else None

    def position_tables(self, rows: Tensor, cols: Tensor, identity: Tensor) -> tuple[Tensor, ...]:
        """(cos, sin) 2D RoPE tables (L, head_dim / 2) (identity rotations with ``rope: false``), then the
        learned positions (L, d) with ``pos_embed: learned``."""
        rot = identity if self.cfg.rope else torch.ones_like(rows, dtype=torch.bool)
        tables = rope_2d(rows, cols, self.head_dim, self.cfg.rope_base, rot)
        return tables if self.pos is None else (*tables, self.pos(rows, cols, identity))

    def branch(self, depth: int) -> Hybrid:
        """``depth`` more layers of the same pattern, own final norm, no position table (NAR's extra layers)."""
        return Hybrid(dataclasses.replace(self.cfg, depth=depth, pos_embed="none"))

    def init_state(self, batch: int, max_len: int, dtype: torch.dtype, device: torch.device) -> HybridState:
        kv_heads = self.cfg.kv_heads or self.cfg.heads
        mixers = [b.mixer for b in self.blocks if isinstance(b, MambaBlock)]
        f = torch.float64 if dtype == torch.float64 else torch.float32
        return HybridState(
            [KVCache(batch, kv_heads, max_len, self.head_dim, dtype, device) for k in self.kinds if k == "attn"],
            [torch.zeros(batch, m.conv.in_channels, m.d_conv - 1, dtype=dtype, device=device) for m in mixers],
            [torch.zeros(batch, m.heads, m.head_dim, m.d_state, dtype=f, device=device) for m in mixers],
            torch.zeros(batch, max_len, dtype=torch.bool, device=device))

    def forward(self, x_bld: Tensor, pos: tuple[Tensor, ...], mask: Tensor | None = None,
                cond_bd: Tensor | None = None, return_trunk: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """``x_bld`` (B, L, d) with ``mask`` (None: causal; (L, L) or (B, 1, L, L)) → ``h_bld`` (B, L, d)."""
        return self._run(x_bld, pos, mask, cond_bd, None, None, return_trunk)

    def prefill(self, x_bld: Tensor, state: HybridState, pos_l: Tensor, pos: tuple[Tensor, ...],
                mask: Tensor | None, cond_bd: Tensor | None = None,
                return_trunk: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """New positions ``pos_l`` (whole decoding steps) into the KV caches and the scan states; ``mask`` rows
        over the state's S positions (None: causal)."""
        if mask is None:
            S = state.written.shape[1]
            mask = torch.arange(S, device=pos_l.device)[None, :] <= pos_l[:, None]
        return self._run(x_bld, pos, mask, cond_bd, state, pos_l, return_trunk)

    def _run(self, x: Tensor, pos: tuple[Tensor, ...], mask: Tensor | None, cond_bd: Tensor | None,
             state: HybridState | None, pos_l: Tensor | None, return_trunk: bool) -> Tensor | tuple[Tensor, Tensor]:
        cos, sin = pos[0], pos[1]
        if self.pos is not None:
            x = x + pos[2].to(x.dtype)
        plan = None
        if "mamba" in self.kinds:
            q_pos = torch.arange(x.shape[1], device=x.device) if pos_l is None else pos_l
            S = x.shape[1] if state is None else state.written.shape[1]
            simple = state is None and mask is None and self.cfg.scan_readout == "after_step"
            plan = None if simple else step_plan(mask, q_pos, S, self.cfg.scan_readout,
                                                 None if state is None else state.written)
            if state is not None and plan is not None:
                state.written[:, q_pos] = plan.write
        mods = self.ada(cond_bd) if self.ada is not None else [None] * len(self.blocks)
        ia = im = 0
        for b, mod in zip(self.blocks, mods):
            if isinstance(b, AttnBlock):
                x = b(x, cos, sin, mask, mod, None if state is None else state.kv[ia], pos_l)
                ia += 1
                continue
            conv = None if state is None else state.conv[im]
            ssm = None if state is None else state.ssm[im]
            x, conv, ssm = b(x, conv, ssm, mod, plan=plan)
            if state is not None:
                state.conv[im], state.ssm[im] = conv, ssm
            im += 1
        h = self.norm(x)
        if self.final_ada is not None:
            h = self.final_ada(h, cond_bd)
        return (h, x) if return_trunk else h
