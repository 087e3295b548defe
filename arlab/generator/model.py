"""The AR generator: token embedding → Token-Shuffle → order → backbone → unshuffle → shared head.

One model for raster AR (LlamaGen), Token-Shuffle (s = 2, 4) and the orders of the baselines
issue; every part is picked by name. Plain ``nn.Module``: usable without Lightning.

Training (teacher forcing), for a token grid ``codes_bhw`` (B, h, w) and labels (B,):

1. ``e = embed(codes)`` (B, h, w, d); ``f = shuffle(e)`` (B, h', w', d) with h' = h/s;
2. the order's plan over the (h', w') grid gives the input sequence
   ``[prefix (B, P, d), f[src[1]], ..., f[src[L−1]]]`` (B, P + L − 1, d) and its mask;
3. ``hid = backbone(seq)[:, P − 1:]`` (B, L, d): hidden t predicts slot t;
4. ``logits = head(unshuffle(hid))`` (B, L, s², V), put back on the grid → ``logits_bhwv`` (B, h, w, V).

Sampling: :meth:`Generator.sample` with the static KV cache, one order step at a time; the s²
tokens of a window are drawn in parallel; CFG on logits with a schedule.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from arlab.generator.sampling import cfg_weight, check_schedule, draw
from arlab.order.base import Order, OrderPlan
from arlab.shuffle.window import TokenShuffle, grid_from_windows, window_grid


@dataclass
class GenOut:
    logits_bhwv: Tensor  # (B, h, w, V) float32
    loss: Tensor  # scalar: CE over every token (+ z-loss)
    ce: Tensor  # scalar CE
    ce_per_window_pos: Tensor  # (s²,) CE per position inside a Token-Shuffle window
    z_loss: Tensor


class Generator(nn.Module):
    def __init__(self, backbone: nn.Module, order: Order, shuffle: TokenShuffle, conditioner: nn.Module,
                 vocab_size: int, grid: tuple[int, int], z_loss: float = 0.0, token_dropout: float = 0.0):
        super().__init__()
        self.backbone, self.order, self.shuffle, self.conditioner = backbone, order, shuffle, conditioner
        self.vocab_size, self.grid = vocab_size, tuple(grid)
        self.z_loss_weight = z_loss
        d = backbone.dim
        h, w = self.grid
        shuffle.check_grid(h, w)
        self.fused = (h // shuffle.s, w // shuffle.s)
        self.tok_embedding = nn.Embedding(vocab_size, d)
        nn.init.normal_(self.tok_embedding.weight, std=0.02)
        self.token_drop = nn.Dropout(token_dropout)
        self.head = nn.Linear(d, vocab_size, bias=False)
        nn.init.zeros_(self.head.weight)  # LlamaGen: zero-initialised output layer
        self.adaln = getattr(backbone.cfg, "cond_mode", "prefix") == "adaln"

    # ------------------------------------------------------------------------------ plan helpers
    @property
    def plan(self) -> OrderPlan:
        return self.order.plan(*self.fused)

    @property
    def prefix_len(self) -> int:
        return int(self.conditioner.prefix_len)

    @property
    def steps_per_image(self) -> int:
        return self.plan.steps

    def _condition(self, labels_b: Tensor) -> tuple[Tensor, Tensor | None]:
        prefix, vec = self.conditioner(labels_b)
        return prefix, (vec if self.adaln else None)

    def _rope(self, slots: Tensor, with_prefix: bool) -> tuple[Tensor, Tensor]:
        """RoPE tables for the inputs of ``slots`` (n,), optionally preceded by the P prefix tokens (identity)."""
        rows, cols = self.plan.rows_cols()
        rows, cols = rows.to(slots.device)[slots], cols.to(slots.device)[slots]
        ident = torch.zeros_like(slots, dtype=torch.bool)
        if with_prefix:
            p = self.prefix_len
            zeros = torch.zeros(p, dtype=rows.dtype, device=slots.device)
            rows, cols = torch.cat([zeros, rows]), torch.cat([zeros, cols])
            ident = torch.cat([torch.ones(p, dtype=torch.bool, device=slots.device), ident])
        return self.backbone.rope(rows, cols, ident)

    def embed_windows(self, win_bnk: Tensor) -> Tensor:
        """Tokens of n fused cells, (B, n, s²) → fused embeddings (B, n, d) (shuffle of a 1×n strip)."""
        b, n, k = win_bnk.shape
        s = self.shuffle.s
        e = self.tok_embedding(win_bnk)  # (B, n, s², d)
        grid = grid_from_windows(e.view(b, 1, n, k, -1), s)  # (B, s, n·s, d)
        return self.shuffle.shuffle(grid).view(b, n, -1)

    # ------------------------------------------------------------------------------ training forward
    def forward(self, codes_bhw: Tensor, labels_b: Tensor) -> GenOut:
        b, h, w = codes_bhw.shape
        if (h, w) != self.grid:
            raise ValueError(f"generator built for a {self.grid} token grid, got {(h, w)}")
        plan, p = self.plan, self.prefix_len
        prefix, vec = self._condition(labels_b)
        fused = self.shuffle.shuffle(self.tok_embedding(codes_bhw)).flatten(1, 2)  # (B, h'w', d)
        src_cells = plan.perm.to(codes_bhw.device)[plan.src[1:].to(codes_bhw.device)]
        seq = torch.cat([prefix.to(fused.dtype), fused[:, src_cells]], dim=1)  # (B, P + L - 1, d)
        seq = self.token_drop(seq)
        slots = torch.arange(1, plan.length, device=codes_bhw.device)
        mask = None if plan.mask is None else plan.full_mask(p, codes_bhw.device)
        hid = self.backbone(seq, self._rope(slots, with_prefix=True), mask=mask, cond_bd=vec)[:, p - 1:]
        logits_blkv = self.head(self.shuffle.unshuffle(hid)).float()  # (B, L, s², V) in slot order
        logits_bhwv = self.slots_to_grid(logits_blkv)
        ce_bhw = F.cross_entropy(logits_bhwv.permute(0, 3, 1, 2), codes_bhw, reduction="none")
        ce = ce_bhw.mean()
        z = torch.logsumexp(logits_bhwv, dim=-1).pow(2).mean() if self.z_loss_weight > 0 else ce.new_zeros(())
        per_pos = window_grid(ce_bhw.detach(), self.shuffle.s).flatten(0, 2).mean(0)  # (s²,)
        return GenOut(logits_bhwv, ce + self.z_loss_weight * z, ce, per_pos, z)

    def slots_to_grid(self, x_blk: Tensor) -> Tensor:
        """Per-slot values (B, L, s², ...) in order → the token grid (B, h, w, ...)."""
        plan = self.plan
        inv = torch.argsort(plan.perm).to(x_blk.device)  # cell -> slot
        cells = x_blk[:, inv]  # (B, h'w', s², ...)
        hp, wp = self.fused
        return grid_from_windows(cells.unflatten(1, (hp, wp)), self.shuffle.s)

    # ------------------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, labels_b: Tensor, cfg_scale: float = 1.0, cfg_schedule: str = "constant",
               temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
               generator: torch.Generator | None = None, use_cache: bool = True,
               return_logits: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Draw token grids (B, h, w) for ``labels_b`` (B,); with ``return_logits`` also the guided
        logits each token was drawn from (B, h, w, V)."""
        check_schedule(cfg_schedule)
        self.conditioner.check(labels_b)
        if not use_cache:
            return self._sample_recompute(labels_b, cfg_scale, cfg_schedule, temperature, top_k, top_p,
                                          generator, return_logits)
        plan, p, dev = self.plan, self.prefix_len, labels_b.device
        b, k = labels_b.shape[0], self.shuffle.tokens_per_slot
        guided = cfg_scale != 1.0
        cond_labels = torch.cat([labels_b, self.conditioner.null_like(labels_b)]) if guided else labels_b
        prefix, vec = self._condition(cond_labels)
        nb, total = prefix.shape[0], p + plan.length - 1
        dtype = next(self.backbone.parameters()).dtype
        if dev.type != "cpu" and torch.is_autocast_enabled(dev.type):
            dtype = torch.get_autocast_dtype(dev.type)
        self.backbone.setup_cache(nb, total, dtype, dev)
        vis = self._visibility(dev)  # (L, total) bool: what input t sees
        slots_out = torch.zeros(b, plan.length, k, dtype=torch.long, device=dev)
        logits_out = torch.zeros(b, plan.length, k, self.vocab_size, device=dev) if return_logits else None
        src = plan.src.to(dev)
        cos_all, sin_all = self._rope(torch.arange(plan.length, device=dev), with_prefix=False)  # once, on device
        try:
            for step, sl in enumerate(plan.step_slices()):
                if step == 0:  # prefill: the prefix, causal among itself
                    pos = torch.arange(p, device=dev)
                    mask = torch.ones(p, total, dtype=torch.bool, device=dev).tril()
                    x = prefix
                    rope = self.backbone.rope(torch.zeros_like(pos), torch.zeros_like(pos),
                                              torch.ones_like(pos, dtype=torch.bool))
                    assert sl == slice(0, 1), "the first step of an order emits slot 0 alone"
                else:
                    slots = torch.arange(sl.start, sl.stop, device=dev)
                    pos = p - 1 + slots
                    mask = vis[slots]
                    win = slots_out[:, src[slots]]  # (B, n, s²): the tokens that feed these slots
                    x = self.embed_windows(torch.cat([win, win]) if guided else win)
                    rope = (cos_all[sl], sin_all[sl])
                hid = self.backbone(x.to(prefix.dtype), rope, mask=mask, pos_l=pos, cond_bd=vec)
                hid = hid[:, -1:] if step == 0 else hid
                logits = self.head(self.shuffle.unshuffle(hid)).float()  # (nb, n, s², V)
                if guided:
                    lc, lu = logits.chunk(2)
                    logits = lu + cfg_weight(cfg_schedule, cfg_scale, step, plan.steps) * (lc - lu)
                slots_out[:, sl] = draw(logits, temperature, top_k, top_p, generator)
                if logits_out is not None:
                    logits_out[:, sl] = logits
        finally:
            self.backbone.clear_cache()
        codes = self.slots_to_grid(slots_out)
        return (codes, self.slots_to_grid(logits_out)) if return_logits else codes

    def _visibility(self, dev: torch.device) -> Tensor:
        """(L, P + L − 1) bool: cache positions input t attends (the prefix, and inputs its mask allows)."""
        plan, p = self.plan, self.prefix_len
        L = plan.length
        m = torch.zeros(L, p + L - 1, dtype=torch.bool, device=dev)
        m[:, :p] = True
        inner = plan.mask.to(dev) if plan.mask is not None else torch.ones(L, L, dtype=torch.bool, device=dev).tril()
        m[:, p - 1:] |= inner
        return m

    def _sample_recompute(self, labels_b, cfg_scale, cfg_schedule, temperature, top_k, top_p, generator,
                          return_logits):
        """Reference sampler: no cache, the full teacher-forced forward at every step (for tests/benchmarks)."""
        plan, dev = self.plan, labels_b.device
        b = labels_b.shape[0]
        guided = cfg_scale != 1.0
        codes = torch.zeros(b, *self.grid, dtype=torch.long, device=dev)
        out_logits = torch.zeros(b, *self.grid, self.vocab_size, device=dev) if return_logits else None
        inv_cells = plan.perm.to(dev)
        hp, wp = self.fused
        s = self.shuffle.s
        for step, sl in enumerate(plan.step_slices()):
            if guided:
                null = self.conditioner.null_like(labels_b)
                both = self.forward(torch.cat([codes, codes]), torch.cat([labels_b, null]))
                lc, lu = both.logits_bhwv.chunk(2)
                logits = lu + cfg_weight(cfg_schedule, cfg_scale, step, plan.steps) * (lc - lu)
            else:
                logits = self.forward(codes, labels_b).logits_bhwv
            win_logits = window_grid(logits, s).flatten(1, 2)[:, inv_cells[sl]]  # (B, n, s², V)
            tok = draw(win_logits, temperature, top_k, top_p, generator)  # (B, n, s²)
            win_codes = window_grid(codes, s).flatten(1, 2)
            win_codes[:, inv_cells[sl]] = tok
            codes = grid_from_windows(win_codes.unflatten(1, (hp, wp)), s).contiguous()
            if out_logits is not None:
                wl = window_grid(out_logits, s).flatten(1, 2)
                wl[:, inv_cells[sl]] = win_logits
                out_logits = grid_from_windows(wl.unflatten(1, (hp, wp)), s).contiguous()
        return (codes, out_logits) if return_logits else codes
