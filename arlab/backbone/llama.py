"""``backbone/llama``: the Llama decoder used by LlamaGen (Sun et al. 2024) and Token-Shuffle (Ma et al. 2025).

Pre-norm blocks ``h = x + Attn(RMSNorm(x))``, ``out = h + SwiGLU(RMSNorm(h))``; no biases; SwiGLU
hidden ``8d/3`` rounded up to a multiple of 256 (LlamaGen ``find_multiple``: GPT-B 768 → 2048);
2D axial RoPE (half of each head's rotary pairs turn with the token's row, half with its column;
LlamaGen ``precompute_freqs_cis_2d``) where condition tokens get the *identity* rotation
(LlamaGen zeroes their q and k instead, its issue #54); optional QK-norm (RMSNorm on q and k per
head) and grouped KV heads; attention through ``F.scaled_dot_product_attention`` (``attn: sdpa``: the causal
fast path, or the explicit boolean mask) or, for a fixed mask (VAR's block-causal, NAR's proximity mask),
``torch.nn.attention.flex_attention`` with a BlockMask built once (``attn: flex``, :meth:`Llama.prepare_mask`;
compiled on CUDA, the unfused reference on CPU unless the whole step is compiled). torch 2.14 has no flex
backward on CPU: there a step that needs gradients takes SDPA with the same cached boolean mask. Decoding
with a KV cache always takes SDPA with the mask rows.

Conditioning ``prefix``: the condition tokens are ordinary sequence positions. ``adaln``: VAR's
AdaLNSelfAttn modulation — each block maps the condition vector ``cond_bd`` through
``SiLU → Linear(d, 6d)`` to (γ1, γ2, s1, s2, β1, β2) and computes
``x + γ1·Attn(norm(x)·(1+s1)+β1)``, ``x + γ2·FFN(norm(x)·(1+s2)+β2)`` (norms without affine weight);
the final norm is modulated the same way (VAR AdaLNBeforeHead).

Shapes: ``x_bld`` (B, L, d) → ``h_bld`` (B, L, d). The decode state (:class:`LlamaState`) is a
:class:`KVCache` per block, a static (B, H_kv, S, d_head) buffer written at absolute positions
(gpt-fast): no host syncs, no reallocation; prefill and step are the same masked attention.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from arlab.backbone.base import ARBITRARY, BLOCK_CAUSAL, CAUSAL, Backbone, Capabilities, DecodeState
from arlab.errors import ConfigError
from arlab.layers import RMSNorm, attention, find_multiple
from arlab.registry import register


def rope_2d(rows: Tensor, cols: Tensor, head_dim: int, base: float = 10000.0,
            identity: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """2D axial RoPE tables ``(cos, sin)``, each (L, head_dim / 2) float32, for positions (rows, cols) (L,).

    The first head_dim/4 rotary pairs turn with the row, the last head_dim/4 with the column, with
    frequencies ``base^(-2k / (head_dim/2))`` per axis (LlamaGen). ``identity`` (L,) bool marks
    positions (condition tokens) that get cos = 1, sin = 0.
    """
    if head_dim % 4:
        raise ConfigError(f"2D RoPE needs head_dim divisible by 4, got {head_dim}")
    half = head_dim // 2  # rotary dims per axis
    freqs = 1.0 / (base ** (torch.arange(0, half, 2, dtype=torch.float32, device=rows.device) / half))
    ang = torch.cat([rows.float()[:, None] * freqs, cols.float()[:, None] * freqs], dim=1)  # (L, head_dim/2)
    cos, sin = ang.cos(), ang.sin()
    if identity is not None:
        cos = torch.where(identity[:, None], torch.ones_like(cos), cos)
        sin = torch.where(identity[:, None], torch.zeros_like(sin), sin)
    return cos, sin


def apply_rope(x_bhld: Tensor, cos_ld: Tensor, sin_ld: Tensor) -> Tensor:
    """Rotate adjacent channel pairs (2i, 2i+1) of ``x_bhld`` (B, H, L, Dh) in float32; cos/sin (L, Dh/2) or
    (B, L, Dh/2): ``(x0, x1) → (x0·cos − x1·sin, x0·sin + x1·cos)``.

    Eager, the pairs are complex numbers times ``cos + i·sin`` (one kernel forward and one backward instead
    of a dozen strided ones: 2.5× faster forward + backward at the shapes generator's (64, 4, 16, 48); the same
    values to float32 rounding, the same bits at that shape, ``tests/backbone/test_llama.py``). Inside
    ``torch.compile``, the real-valued form, which inductor fuses (it handles complex tensors poorly)."""
    if cos_ld.ndim == 3:  # per-sample positions
        cos_ld, sin_ld = cos_ld[:, None], sin_ld[:, None]
    x = x_bhld.float()
    if torch.compiler.is_compiling():
        x0, x1 = x.unflatten(-1, (-1, 2)).unbind(-1)
        out = torch.stack([x0 * cos_ld - x1 * sin_ld, x0 * sin_ld + x1 * cos_ld], dim=-1)
        return out.flatten(-2).type_as(x_bhld)
    if x.stride(-1) != 1 or x.storage_offset() % 2 or any(st % 2 for st in x.stride()[:-1]):
        x = x.clone(memory_format=torch.contiguous_format)  # view_as_complex needs (re, im) adjacent, every other
        # stride even and an even storage offset: a fresh copy has all three (.contiguous() may return x itself)
    rot = torch.view_as_complex(x.unflatten(-1, (-1, 2))) * torch.complex(cos_ld.float(), sin_ld.float())
    return torch.view_as_real(rot).flatten(-2).type_as(x_bhld)


class KVCache(DecodeState):
    """Static per-layer key/value cache (B, H_kv, S, Dh) addressed by absolute position (gpt-fast).

    ``update(pos_l, k, v)`` writes the new keys/values at positions ``pos_l`` (L,) and returns the
    whole buffers; attention then masks the positions not yet written.
    """

    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str | None = None):
        shape = (batch, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def update(self, pos_l: Tensor, k_bhld: Tensor, v_bhld: Tensor) -> tuple[Tensor, Tensor]:
        self.k.index_copy_(2, pos_l, k_bhld.to(self.k.dtype))
        self.v.index_copy_(2, pos_l, v_bhld.to(self.v.dtype))
        return self.k, self.v


class LlamaState(DecodeState):
    """One :class:`KVCache` per block: ``2 · depth · H_kv · S · Dh`` values per sequence."""

    def __init__(self, layers: list[KVCache]):
        self.layers = layers


_FLEX_COMPILED = None  # flex_attention compiled once (CUDA, outside a compiled step)


def flex(q: Tensor, k: Tensor, v: Tensor, block_mask: BlockMask) -> Tensor:
    """``flex_attention`` with ``block_mask``: traced as is inside a compiled step; otherwise compiled once on
    CUDA (fused kernel) and the unfused reference on CPU."""
    global _FLEX_COMPILED
    if torch.compiler.is_compiling() or q.device.type != "cuda":
        return flex_attention(q, k, v, block_mask=block_mask)
    if _FLEX_COMPILED is None:
        _FLEX_COMPILED = torch.compile(flex_attention, dynamic=False)
    return _FLEX_COMPILED(q, k, v, block_mask=block_mask)


@dataclass(frozen=True)
class FlexMask:
    """A fixed (S, S) boolean mask (True = may attend) and its flex-attention BlockMask."""

    dense: Tensor
    block: BlockMask

    @classmethod
    def of(cls, mask_ss: Tensor) -> FlexMask:
        S = mask_ss.shape[-1]
        dense = mask_ss.bool().contiguous()
        block = create_block_mask(lambda b, h, q_idx, kv_idx: dense[q_idx, kv_idx], None, None, S, S,
                                  device=dense.device)
        return cls(dense, block)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, qk_norm: bool, dropout: float):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.wqkv = nn.Linear(dim, (heads + 2 * kv_heads) * self.head_dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else None
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x_bld: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | FlexMask | None,
                cache: KVCache | None = None, pos_l: Tensor | None = None) -> Tensor:
        hd = self.head_dim
        q, k, v = self.wqkv(x_bld).split([self.heads * hd, self.kv_heads * hd, self.kv_heads * hd], dim=-1)
        q = rearrange(q, "b l (h d) -> b h l d", d=hd)
        k = rearrange(k, "b l (h d) -> b h l d", d=hd)
        v = rearrange(v, "b l (h d) -> b h l d", d=hd)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            assert pos_l is not None, "decoding with a KV cache needs the positions of the new tokens"
            k, v = cache.update(pos_l, k, v)
        causal = mask is None
        if causal and q.shape[2] != k.shape[2]:
            raise ValueError("the causal fast path needs a full sequence; pass an explicit mask with a cache")
        if self.kv_heads != self.heads:  # grouped KV heads: each serves heads / kv_heads query heads
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        if isinstance(mask, FlexMask):
            if cache is not None:
                raise ValueError("a flex-attention BlockMask serves full sequences; decode with boolean mask rows")
            if q.device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad:
                mask = mask.dense  # no flex backward on CPU (torch 2.14): SDPA with the cached boolean mask
            else:
                out = flex(q, k, v, mask.block)
        if not isinstance(mask, FlexMask):
            out = attention(q, k, v, mask, causal)  # SDPA; float32 for bf16/fp16 inputs on CPU
        return self.resid_drop(self.wo(rearrange(out, "b h l d -> b l (h d)")))


class SwiGLU(nn.Module):
    """``w2(silu(w1 x) ⊙ w3 x)``, hidden = 8d/3 rounded up to a multiple of 256 (LlamaGen)."""

    def __init__(self, dim: int, multiple_of: int, dropout: float):
        super().__init__()
        hidden = find_multiple(int(2 * 4 * dim / 3), multiple_of)
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class Block(nn.Module):
    def __init__(self, cfg: Llama.Config):
        super().__init__()
        adaln = cfg.cond_mode == "adaln"
        self.attn_norm = RMSNorm(cfg.dim, affine=not adaln)
        self.ffn_norm = RMSNorm(cfg.dim, affine=not adaln)
        self.attn = Attention(cfg.dim, cfg.heads, cfg.kv_heads or cfg.heads, cfg.qk_norm, cfg.dropout)
        self.ffn = SwiGLU(cfg.dim, cfg.multiple_of, cfg.dropout)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 6 * cfg.dim)) if adaln else None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cond_bd: Tensor | None,
                cache: KVCache | None = None, pos_l: Tensor | None = None) -> Tensor:
        if self.ada is None:
            x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, pos_l)
            return x + self.ffn(self.ffn_norm(x))
        assert cond_bd is not None, "adaln blocks need the condition vector"
        g1, g2, s1, s2, b1, b2 = self.ada(cond_bd)[:, None].chunk(6, dim=-1)
        x = x + g1 * self.attn(self.attn_norm(x) * (1 + s1) + b1, cos, sin, mask, cache, pos_l)
        return x + g2 * self.ffn(self.ffn_norm(x) * (1 + s2) + b2)


@register("backbone", "llama")
class Llama(Backbone):
    """Llama decoder (LlamaGen / Token-Shuffle): RMSNorm, SwiGLU, 2D RoPE, optional QK-norm, GQA, adaLN."""

    @dataclass
    class Config:
        dim: int = 768  # model width d (LlamaGen GPT-B 768, GPT-L 1024)
        depth: int = 12  # number of blocks (GPT-B 12, GPT-L 24)
        heads: int = 12  # attention heads (GPT-B 12, GPT-L 16)
        kv_heads: int = 0  # grouped KV heads; 0 = heads (no grouping)
        multiple_of: int = 256  # SwiGLU hidden = 8d/3 rounded up to this (LlamaGen 256)
        qk_norm: bool = False  # RMSNorm on q and k per head (Token-Shuffle's stabiliser)
        dropout: float = 0.0  # residual and FFN dropout (LlamaGen 0.1)
        rope_base: float = 10000.0  # RoPE base per axis
        rope: bool = True  # 2D RoPE; false = no rotary positions (VAR: learned absolute positions only)
        cond_mode: str = "prefix"  # prefix: condition tokens in the sequence; adaln: VAR's modulation
        init_std: float = 0.02  # N(0, std) init of the linear layers (LlamaGen 0.02)
        attn: str = "sdpa"  # fixed training masks through sdpa (explicit boolean mask) or flex (cached BlockMask)

        def __post_init__(self) -> None:
            if self.dim < 1 or self.depth < 1 or self.heads < 1:
                raise ConfigError(f"dim, depth and heads must be >= 1, got {self.dim}, {self.depth}, {self.heads}")
            if self.dim % self.heads:
                raise ConfigError(f"dim {self.dim} is not divisible by heads {self.heads}")
            if (self.dim // self.heads) % 4:
                raise ConfigError(f"head_dim {self.dim // self.heads} (dim {self.dim} / heads {self.heads}) must be "
                                  "divisible by 4 for 2D RoPE (two axes of rotary pairs)")
            kv = self.kv_heads or self.heads
            if kv < 1 or self.heads % kv:
                raise ConfigError(f"kv_heads {self.kv_heads} must divide heads {self.heads}")
            if self.cond_mode not in ("prefix", "adaln"):
                raise ConfigError(f"cond_mode {self.cond_mode!r} is not one of prefix, adaln")
            if self.attn not in ("sdpa", "flex"):
                raise ConfigError(f"attn {self.attn!r} is not one of sdpa, flex")
            if not 0 <= self.dropout < 1:
                raise ConfigError(f"dropout {self.dropout} must be in [0, 1)")

    @classmethod
    def capabilities(cls, cfg: Config) -> Capabilities:
        """Any boolean mask through SDPA (causal uses its fast path); prefix or adaLN; NAR branches."""
        return Capabilities(attention=frozenset({CAUSAL, BLOCK_CAUSAL, ARBITRARY}),
                            cond_modes=frozenset({"prefix", "adaln"}), cond_mode=cfg.cond_mode, branch=True)

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.dim, self.head_dim = cfg.dim, cfg.dim // cfg.heads
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.depth)])
        adaln = cfg.cond_mode == "adaln"
        self.norm = RMSNorm(cfg.dim, affine=not adaln)
        self.head_ada = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 2 * cfg.dim)) if adaln else None
        self.apply(self._init)
        for b in self.blocks:  # VAR / DiT: modulation starts near the identity (γ = 0 residual branches)
            if b.ada is not None:
                nn.init.zeros_(b.ada[1].weight)
                nn.init.zeros_(b.ada[1].bias)
                with torch.no_grad():
                    b.ada[1].bias[: 2 * cfg.dim].fill_(1.0)  # γ1, γ2 = 1: plain pre-norm blocks at init
        if self.head_ada is not None:
            nn.init.zeros_(self.head_ada[1].weight)
            nn.init.zeros_(self.head_ada[1].bias)

    def _init(self, m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=self.cfg.init_std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def position_tables(self, rows: Tensor, cols: Tensor, identity: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """2D RoPE (cos, sin), each (L, head_dim / 2); all identity with ``rope: false``."""
        if not self.cfg.rope:
            identity = torch.ones_like(rows, dtype=torch.bool)
        return rope_2d(rows, cols, self.head_dim, self.cfg.rope_base, identity)

    def prepare_mask(self, mask_ss: Tensor) -> Tensor | FlexMask:
        """``attn: flex``: the (S, S) mask with its BlockMask (build once, reuse every step); ``sdpa``: unchanged."""
        return FlexMask.of(mask_ss) if self.cfg.attn == "flex" else mask_ss

    def branch(self, depth: int) -> Llama:
        """``depth`` more blocks with their own final norm, fed the trunk's pre-norm stream (NAR's extra
        layers before the lower-neighbour head): ``branch(x_trunk, ...)``."""
        return Llama(dataclasses.replace(self.cfg, depth=depth))

    # ------------------------------------------------------------------------------ decode state
    def init_state(self, batch: int, max_len: int, dtype: torch.dtype, device: torch.device) -> LlamaState:
        kv = self.cfg.kv_heads or self.cfg.heads
        return LlamaState([KVCache(batch, kv, max_len, self.head_dim, dtype, device) for _ in self.blocks])

    def prefill(self, x_bld: Tensor, state: LlamaState, pos_l: Tensor, pos: tuple[Tensor, ...],
                mask: Tensor | None, cond_bd: Tensor | None = None,
                return_trunk: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """New positions ``pos_l`` written into every block's KV cache; ``mask`` over the cache length."""
        if mask is None:
            raise ValueError("decoding with a KV cache needs an explicit mask over the cache positions")
        return self._run(x_bld, pos, mask, cond_bd, return_trunk, state.layers, pos_l)

    # ------------------------------------------------------------------------------ forward
    def forward(self, x_bld: Tensor, pos: tuple[Tensor, ...], mask: Tensor | FlexMask | None = None,
                cond_bd: Tensor | None = None, return_trunk: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """``x_bld`` (B, L, d) → ``h_bld`` (B, L, d), final norm applied.

        ``pos``: (cos, sin) for the L positions (:meth:`position_tables`); ``mask``: None for plain causal
        attention, else a bool (L, L) / (B, 1, L, L) mask, True = may attend, or :meth:`prepare_mask`'s form of
        an (L, L) one; ``cond_bd`` (B, d): the
        adaLN condition; ``return_trunk``: also return the last block's output before the final norm
        (the input of a :meth:`branch`).
        """
        return self._run(x_bld, pos, mask, cond_bd, return_trunk, None, None)

    def _run(self, x_bld: Tensor, pos: tuple[Tensor, ...], mask: Tensor | None, cond_bd: Tensor | None,
             return_trunk: bool, caches: list[KVCache] | None, pos_l: Tensor | None) -> Tensor | tuple[Tensor, Tensor]:
        cos, sin = pos
        for i, b in enumerate(self.blocks):
            x_bld = b(x_bld, cos, sin, mask, cond_bd, None if caches is None else caches[i], pos_l)
        h = self.norm(x_bld)
        if self.head_ada is not None:
            assert cond_bd is not None
            scale, shift = self.head_ada(cond_bd)[:, None].chunk(2, dim=-1)
            h = h * (1 + scale) + shift
        return (h, x_bld) if return_trunk else h
