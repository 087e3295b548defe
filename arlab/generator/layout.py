"""Token layout: a tokenizer's index maps (one grid, or VAR's scales) and their Token-Shuffle windows.

A tokenizer gives ``N`` tokens per image: one ``h×w`` map (VQ, FSQ) or, for ``msvq``, one map per
scale ``(h_k, w_k)``, coarsest first (VAR: 1, 2, 3, 4, 5, 6, 8, 10, 13, 16), flattened row-major and
concatenated (``codes_bn``, the order of token shards). Token-Shuffle fuses every non-overlapping
``s×s`` window of each map into one *cell*; cells are numbered scale-major, row-major over the fused
maps ``(h_k/s, w_k/s)``. Orders walk cells; the generator moves between tokens and cells with:

* :meth:`Layout.windows`: per-token values (B, N, ...) → per-cell windows (B, C, s², ...), the s²
  tokens of a window row-major inside it (Token-Shuffle's concatenation order);
* :meth:`Layout.tokens`: the inverse, (B, C, s², ...) → (B, N, ...).

Both are one gather with a precomputed index table (buffers: they follow the model's device).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from arlab.errors import ConfigError


def take(x_bn: Tensor, index: Tensor) -> Tensor:
    """``x_bn[:, index]`` for an integer ``index`` of any shape → (B, *index.shape, ...), through ``index_select``:
    the same values, and a backward that adds rows (``index_add``) instead of ``x[:, i] +=``'s accumulating
    ``index_put`` (on a 2-core CPU 1.9 ms against 5.4 ms forward + backward for the shapes generator's (64, 64,
    192) windows)."""
    return x_bn.index_select(1, index.flatten()).unflatten(1, index.shape)


class Layout(nn.Module):
    def __init__(self, scales: list[tuple[int, int]] | list[int], s: int = 1):
        super().__init__()
        self.scales = [(int(x), int(x)) if isinstance(x, int) else (int(x[0]), int(x[1])) for x in scales]
        if not self.scales or any(h < 1 or w < 1 for h, w in self.scales):
            raise ConfigError(f"a token layout needs at least one scale of positive size, got {scales}")
        if any(b[0] <= a[0] or b[1] <= a[1] for a, b in zip(self.scales, self.scales[1:])):
            raise ConfigError(f"multi-scale token maps must grow strictly, coarse to fine; got {self.scales} "
                              "(a single grid is one (h, w) pair)")
        self.s = int(s)
        bad = [f"{h}x{w}" for h, w in self.scales if h % s or w % s]
        if bad:
            what = "token grid" if len(self.scales) == 1 else "scale"
            raise ConfigError(f"Token-Shuffle s={s} needs every {what} divisible by {s}; "
                              f"{', '.join(bad)} {'is' if len(bad) == 1 else 'are'} not "
                              f"(all scales: {[f'{h}x{w}' for h, w in self.scales]})")
        self.fused = [(h // s, w // s) for h, w in self.scales]
        win, scale, row, col = [], [], [], []
        tok_off = 0
        for k, ((h, w), (hf, wf)) in enumerate(zip(self.scales, self.fused)):
            r = torch.arange(hf).repeat_interleave(wf)
            c = torch.arange(wf).repeat(hf)
            i = torch.arange(s).repeat_interleave(s)  # row inside the window
            j = torch.arange(s).repeat(s)
            win.append(tok_off + (r[:, None] * s + i) * w + (c[:, None] * s + j))  # (cells_k, s²)
            scale.append(torch.full((hf * wf,), k))
            row.append(r)
            col.append(c)
            tok_off += h * w
        self.num_tokens = tok_off
        self.register_buffer("win_index", torch.cat(win), persistent=False)  # (C, s²) token of each window slot
        self.register_buffer("inv_index", torch.argsort(self.win_index.flatten()), persistent=False)  # (N,)
        self.register_buffer("cell_scale", torch.cat(scale), persistent=False)  # (C,)
        self.register_buffer("cell_row", torch.cat(row), persistent=False)  # (C,) fused row in its scale
        self.register_buffer("cell_col", torch.cat(col), persistent=False)
        self.num_cells = int(self.win_index.shape[0])

    @property
    def multiscale(self) -> bool:
        return len(self.scales) > 1

    @property
    def tokens_per_cell(self) -> int:
        return self.s * self.s

    def scale_cells(self) -> list[int]:
        """Cells per scale (fused)."""
        return [h * w for h, w in self.fused]

    def scale_tokens(self) -> list[int]:
        return [h * w for h, w in self.scales]

    def windows(self, x_bn: Tensor) -> Tensor:
        """(B, N, ...) per token → (B, C, s², ...) per cell window."""
        return take(x_bn, self.win_index)

    def tokens(self, x_bck: Tensor) -> Tensor:
        """(B, C, s², ...) per cell window → (B, N, ...) per token (inverse of :meth:`windows`)."""
        return take(x_bck.flatten(1, 2), self.inv_index)

    def flat(self, codes: Tensor) -> Tensor:
        """Accept (B, h, w) for a one-grid layout or (B, N); return (B, N)."""
        if codes.ndim == 3 and not self.multiscale and tuple(codes.shape[1:]) == self.scales[0]:
            return codes.flatten(1)
        if codes.ndim >= 2 and codes.shape[1] == self.num_tokens:
            return codes
        want = f"(B, {self.scales[0][0]}, {self.scales[0][1]}) or " if not self.multiscale else ""
        raise ValueError(f"the generator's token layout (scales {self.scales}) needs codes of shape "
                         f"{want}(B, {self.num_tokens}), got {tuple(codes.shape)}")

    def extra_repr(self) -> str:
        return f"scales={self.scales}, s={self.s}, tokens={self.num_tokens}, cells={self.num_cells}"
