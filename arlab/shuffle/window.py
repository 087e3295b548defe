"""``shuffle/window``: Token-Shuffle (Ma et al. 2025, "Token-Shuffle: Towards High-Resolution Image
Generation with Autoregressive Models").

Shuffle (before the backbone): a linear map compresses each token embedding d → d/s², the s²
compressed tokens of each non-overlapping s×s window are concatenated back to d (windows raster
over the (h/s, w/s) grid, row-major inside a window), then ``blocks`` residual MLP blocks refine the
fused token. Unshuffle (after the backbone), the mirror image: ``blocks`` residual MLP blocks, a
split into s² chunks of d/s², a linear map expands each chunk d/s² → d; the generator's shared head
then gives logits for each of the s² tokens, which are sampled in parallel.

s = 1 is the identity: no parameters, so s ∈ {1, 2, 4} runs differ only by the window.

Shapes: ``shuffle(e_bhwd)`` (B, h, w, d) → (B, h/s, w/s, d); ``unshuffle(h_bld)`` (B, L, d) →
(B, L, s², d). :func:`window_grid` / :func:`grid_from_windows` do the same regrouping on index grids.
"""

from __future__ import annotations

from dataclasses import dataclass

from einops import rearrange
from torch import Tensor, nn

from arlab.errors import ConfigError
from arlab.layers import ResidualMLP
from arlab.registry import register


def window_grid(codes_bhw: Tensor, s: int) -> Tensor:
    """(B, h, w, ...) → (B, h/s, w/s, s², ...): the tokens of each s×s window, row-major inside it."""
    return rearrange(codes_bhw, "b (h s1) (w s2) ... -> b h w (s1 s2) ...", s1=s, s2=s)


def grid_from_windows(win_bhwk: Tensor, s: int) -> Tensor:
    """Inverse of :func:`window_grid`: (B, h/s, w/s, s², ...) → (B, h, w, ...)."""
    return rearrange(win_bhwk, "b h w (s1 s2) ... -> b (h s1) (w s2) ...", s1=s, s2=s)


@register("shuffle", "window")
class TokenShuffle(nn.Module):
    """Token-Shuffle (Ma et al. 2025): fuse s×s token windows into one (d → d/s² each) and split after."""

    @dataclass
    class Config:
        s: int = 2  # window side: 1 (identity), 2 (the paper's default) or 4
        blocks: int = 2  # residual MLP blocks on each side (the paper: 2 suffice)
        mlp_ratio: float = 4.0  # hidden width of those blocks, in units of d

        def __post_init__(self) -> None:
            if self.s not in (1, 2, 4):
                raise ConfigError(f"shuffle window s={self.s}: must be 1 (identity), 2 or 4 (Token-Shuffle)")
            if self.blocks < 0 or self.mlp_ratio <= 0:
                raise ConfigError(f"blocks {self.blocks} must be >= 0 and mlp_ratio {self.mlp_ratio} > 0")

    def __init__(self, cfg: Config, dim: int):
        super().__init__()
        self.cfg, self.s, self.dim = cfg, cfg.s, dim
        s2 = cfg.s * cfg.s
        if dim % s2:
            raise ConfigError(f"Token-Shuffle s={cfg.s} needs the backbone width {dim} divisible by s²={s2}")
        if cfg.s == 1:
            return
        self.compress = nn.Linear(dim, dim // s2)
        self.fuse = nn.Sequential(*[ResidualMLP(dim, cfg.mlp_ratio) for _ in range(cfg.blocks)])
        self.unfuse = nn.Sequential(*[ResidualMLP(dim, cfg.mlp_ratio) for _ in range(cfg.blocks)])
        self.expand = nn.Linear(dim // s2, dim)

    def check_grid(self, h: int, w: int, where: str = "token grid") -> None:
        if h % self.s or w % self.s:
            raise ConfigError(f"{where} {h}x{w} is not divisible by the Token-Shuffle window s={self.s}; "
                              f"use s in {[s for s in (1, 2, 4) if h % s == 0 and w % s == 0]}")

    def shuffle(self, e_bhwd: Tensor) -> Tensor:
        """Token embeddings (B, h, w, d) → fused tokens (B, h/s, w/s, d)."""
        if self.s == 1:
            return e_bhwd
        self.check_grid(e_bhwd.shape[1], e_bhwd.shape[2])
        win = window_grid(e_bhwd, self.s)  # (B, h/s, w/s, s², d)
        return self.shuffle_windows(win.flatten(1, 2)).unflatten(1, win.shape[1:3])

    def shuffle_windows(self, e_bnkd: Tensor) -> Tensor:
        """The s² token embeddings of n windows (B, n, s², d), row-major inside each window → fused (B, n, d)."""
        if self.s == 1:
            return e_bnkd[:, :, 0]
        c = self.compress(e_bnkd)  # (B, n, s², d/s²)
        return self.fuse(rearrange(c, "b n k c -> b n (k c)"))

    def unshuffle(self, h_bld: Tensor) -> Tensor:
        """Backbone states (B, L, d) → per-token states (B, L, s², d) for the shared head."""
        if self.s == 1:
            return h_bld[:, :, None]
        chunks = rearrange(self.unfuse(h_bld), "b l (k c) -> b l k c", k=self.s * self.s)
        return self.expand(chunks)
