"""``order/next_scale``: VAR's next-scale prediction (Tian et al. 2024, "Visual Autoregressive
Modeling: Scalable Image Generation via Next-Scale Prediction"; reference FoundationVision/VAR
``models/var.py``).

Trains on the ``msvq`` tokenizer's per-scale index maps (scales ``p_0 … p_{S−1}``, coarsest first).
One decoding step per scale, every token of a scale drawn in parallel; the mask is VAR's
block-causal one (a token sees every token of its own scale and of earlier scales).

Inputs are *continuous*: scale 0 (one cell, VAR's 1×1) is predicted from the last condition token
(VAR's start token); for each scale k ≥ 1 the input at a cell is the tokenizer's teacher-forcing
input there — the running f̂ of scales < k, area-downsampled to p_k × p_k
(:meth:`MultiScaleVQ.teacher_forcing_inputs`, VAR ``idxBl_to_var_input``) — through
``word_embed = Linear(C_vae, d)``, plus a learned level embedding per scale and a learned position
embedding per input (VAR ``lvl_embed``, ``pos_1LC``; trunc-normal, std √(1/(3d))). Sampling rebuilds
the next scale's input from the tokens just drawn with :meth:`MultiScaleVQ.next_autoregressive_input`
(VAR ``get_next_autoregressive_input``), so the final index list decodes to the tokenizer's own f̂.

With Token-Shuffle (s > 1) each scale's s×s windows are fused; every scale must be divisible by s
and the first scale must fuse to one cell (patch_nums 2, 4, 6, 8 with s = 2).

2D RoPE positions (``rope: scaled``): each cell's centre on the finest fused grid,
``(r + ½)·h_{S−1}/h_k − ½``, so the scales share one coordinate frame; VAR itself has no RoPE
(backbone ``rope: false`` with the ``var-d16`` preset).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from arlab.backbone.base import BLOCK_CAUSAL
from arlab.errors import ConfigError
from arlab.layers import no_weight_decay
from arlab.optim import adamw_only
from arlab.order.base import Order, OrderPlan
from arlab.quantizer.msvq import MultiScaleVQ
from arlab.registry import register


@register("order", "next_scale")
class NextScale(Order):
    """VAR next-scale order: one step per scale, block-causal mask, continuous f̂ inputs from the msvq tokenizer."""

    attention = BLOCK_CAUSAL
    multiscale = True
    continuous = True
    needs_quantizer = True

    @dataclass
    class Config:
        level_embed: bool = True  # learned embedding per scale added to its inputs (VAR lvl_embed)
        pos_embed: bool = True  # learned embedding per input position (VAR pos_1LC)
        rope: str = "scaled"  # RoPE positions: scaled (cell centres on the finest grid) or grid (per-scale row/col)

        def __post_init__(self) -> None:
            if self.rope not in ("scaled", "grid"):
                raise ConfigError(f"rope {self.rope!r} is not one of scaled, grid")

    def __init__(self, cfg: Config | None = None):
        super().__init__()
        self.cfg = cfg or NextScale.Config()
        self.quant: nn.Module | None = None

    def make_plan(self, layout) -> OrderPlan:
        cells = layout.scale_cells()
        if cells[0] != 1:
            raise ConfigError("next_scale predicts the first scale from the start token alone, so it must be one "
                              f"cell; scale 0 is {layout.scales[0][0]}x{layout.scales[0][1]} tokens with Token-Shuffle "
                              f"s={layout.s} ({cells[0]} cells). Use patch_nums starting at {layout.s}")
        L = layout.num_cells
        in_cells = torch.arange(L)
        in_cells[0] = -1
        return OrderPlan(perm=torch.arange(L), step_sizes=cells, in_cells=in_cells,
                         in_step=layout.cell_scale.detach().cpu().clone(), reads=torch.arange(L)[:, None])

    def setup(self, layout, dim: int, quantizer: nn.Module | None = None) -> None:
        self.check_layout(layout)
        if not isinstance(quantizer, MultiScaleVQ):
            raise ConfigError("order next_scale needs the tokenizer's multi-scale quantizer (msvq) to build its "
                              "inputs; pass quantizer=tokenizer.quantizer (task/generator does this)")
        patch = [int(p) for p in quantizer.patch_nums]
        if patch != [h for h, _ in layout.scales]:
            raise ConfigError(f"the msvq quantizer's patch_nums {patch} do not match the token layout "
                              f"{[h for h, _ in layout.scales]}")
        self.plan(layout)  # config errors (first scale) at build time
        self.quant = quantizer.requires_grad_(False)
        object.__setattr__(self, "_layout", layout)  # not a submodule: the generator owns it
        std = math.sqrt(1 / (3 * dim))
        self.word_embed = nn.Linear(quantizer.code_dim, dim)
        nn.init.trunc_normal_(self.word_embed.weight, std=std)
        nn.init.zeros_(self.word_embed.bias)
        adamw_only(self.word_embed.weight)  # the input embedding: AdamW under task.optimizer=muon (arlab.optim)
        if self.cfg.level_embed:
            self.lvl_embed = nn.Embedding(len(patch), dim)
            nn.init.trunc_normal_(self.lvl_embed.weight, std=std)
            no_weight_decay(self.lvl_embed.weight)  # VAR exempts its level and position embeddings
        if self.cfg.pos_embed:
            self.pos_ld = no_weight_decay(nn.Parameter(torch.empty(layout.num_cells, dim)))
            nn.init.trunc_normal_(self.pos_ld, std=std)

    # ------------------------------------------------------------------------------ inputs
    def _maps(self, codes_bn: Tensor) -> list[Tensor]:
        out, off = [], 0
        for h, w in self._layout.scales:
            out.append(codes_bn[:, off:off + h * w].reshape(-1, h, w))
            off += h * w
        return out

    def tf_features(self, codes_bn: Tensor) -> Tensor:
        """(B, N) codes → (B, N − p_0², C_vae) float32: the tokenizer's teacher-forcing inputs, scales ≥ 1."""
        return self.quant.teacher_forcing_inputs(self._maps(codes_bn))

    def token_inputs(self, codes_bn: Tensor) -> Tensor:
        """Per-token inputs (B, N, d) for training; the rows of scale 0 are zeros (never fed)."""
        x = self.word_embed(self.tf_features(codes_bn))
        first = self._layout.scale_tokens()[0]
        return torch.cat([x.new_zeros(x.shape[0], first, x.shape[2]), x], dim=1)

    def train(self, mode: bool = True) -> NextScale:
        super().train(mode)
        if self.quant is not None:
            self.quant.eval()  # the tokenizer's quantizer stays frozen (no dead-code restarts)
        return self

    def start_sampling(self) -> dict:
        return {"f_hat": None}

    def step_inputs(self, state: dict, k: int, codes_bn: Tensor) -> tuple[Tensor, int]:
        """Inputs of scale k ≥ 1 from the drawn tokens of scale k − 1 (in ``codes_bn``, (B, N)): per-token
        (B, p_k², d) and the token offset of scale k. Updates ``state['f_hat']`` (B, C, H, W)."""
        f_hat, nxt = self.add_scale(state["f_hat"], k - 1, codes_bn)
        state["f_hat"] = f_hat
        off = sum(self._layout.scale_tokens()[:k])
        return self.word_embed(nxt.flatten(2).transpose(1, 2)), off

    def add_scale(self, f_hat: Tensor | None, k: int, codes_bn: Tensor) -> tuple[Tensor, Tensor]:
        """Add scale k's tokens to f̂ exactly as the tokenizer does; returns (f̂, next input or f̂)."""
        idx = self._maps(codes_bn)[k]
        return self.quant.next_autoregressive_input(k, f_hat, self.quant.embed_scale(k, idx))

    def input_bias(self) -> Tensor | None:
        bias = None
        if self.cfg.pos_embed:
            bias = self.pos_ld
        if self.cfg.level_embed:
            lvl = self.lvl_embed(self._layout.cell_scale)
            bias = lvl if bias is None else bias + lvl
        return bias

    def input_positions(self, layout, plan: OrderPlan) -> tuple[Tensor, Tensor]:
        rows, cols = super().input_positions(layout, plan)
        if self.cfg.rope == "grid":
            return rows, cols
        cells = plan.in_cells.clamp(min=0).to(layout.cell_scale.device)
        hf, wf = layout.fused[-1]
        scale = layout.cell_scale[cells]
        sh = torch.tensor([h for h, _ in layout.fused], dtype=torch.float32, device=rows.device)[scale]
        sw = torch.tensor([w for _, w in layout.fused], dtype=torch.float32, device=rows.device)[scale]
        return (rows + 0.5) * hf / sh - 0.5, (cols + 0.5) * wf / sw - 0.5
