"""The AR generator: token inputs → Token-Shuffle → order → backbone (+ branch) → unshuffle → heads.

One model for raster AR (LlamaGen), Token-Shuffle (s = 2, 4), VAR's next-scale and NAR's
next-neighbour orders; every part is picked by name. Plain ``nn.Module``: usable without Lightning.

Training (teacher forcing), for tokens ``codes_bn`` (B, N) (or one grid ``codes_bhw``) and a
condition ``cond`` (class labels (B,) or caption ids (B, P)):

1. per-token inputs ``x`` (B, N, d): ``embed(codes)``, or the order's continuous inputs (VAR f̂);
2. the layout's s×s windows, fused by Token-Shuffle: ``cells`` (B, C, d);
3. the order's plan gives the sequence ``[condition (B, P, d), cells[in_cells[1:]] + bias]``
   (B, P + L − 1, d) and its block-causal mask (plus the condition's padding mask);
4. ``hid = backbone(seq)[:, P − 1:]`` (B, L, d) (NAR: also a branch of extra blocks);
5. per head, ``head(unshuffle(hid))`` (B, L, s², V); target t averages the heads that read it
   (``plan.reads``) → logits per token ``logits_bnv`` (B, N, V).

Sampling: :meth:`Generator.sample` with the static KV cache, one order step at a time (every input
of the step fed at once, every target of the step drawn in parallel); CFG on logits with a
schedule. :meth:`Generator._sample_recompute` is the cache-free reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from arlab.errors import ConfigError
from arlab.generator.layout import Layout
from arlab.generator.sampling import cfg_weight, check_schedule, draw, is_guided
from arlab.order.base import Order, OrderPlan
from arlab.shuffle.window import TokenShuffle


@dataclass
class GenOut:
    logits_bnv: Tensor  # (B, N, V) float32, per token in layout order
    loss: Tensor  # scalar: CE over every token (+ z-loss)
    ce: Tensor  # scalar CE
    ce_per_window_pos: Tensor  # (s²,) CE per position inside a Token-Shuffle window
    z_loss: Tensor
    ce_per_scale: Tensor  # (S,) CE per scale (one grid: (1,))
    grid: tuple[int, int] | None = None  # (h, w) of a one-grid layout

    @property
    def logits_bhwv(self) -> Tensor:
        """(B, h, w, V) for a one-grid layout."""
        if self.grid is None:
            raise ValueError("a multi-scale layout has no single grid; use logits_bnv")
        return self.logits_bnv.unflatten(1, self.grid)


class Generator(nn.Module):
    def __init__(self, backbone: nn.Module, order: Order, shuffle: TokenShuffle, conditioner: nn.Module,
                 vocab_size: int, scales: list | tuple, z_loss: float = 0.0, token_dropout: float = 0.0,
                 quantizer: nn.Module | None = None):
        super().__init__()
        self.backbone, self.order, self.shuffle, self.conditioner = backbone, order, shuffle, conditioner
        if isinstance(scales, tuple) and len(scales) == 2 and all(isinstance(x, int) for x in scales):
            scales = [scales]  # one (h, w) grid
        self.layout = Layout(list(scales), shuffle.s)
        self.vocab_size = vocab_size
        self.grid = None if self.layout.multiscale else self.layout.scales[0]
        self.z_loss_weight = z_loss
        d = backbone.dim
        order.setup(self.layout, d, quantizer)
        plan = order.plan(self.layout)
        self.tok_embedding = None
        if not order.continuous:
            self.tok_embedding = nn.Embedding(vocab_size, d)
            nn.init.normal_(self.tok_embedding.weight, std=0.02)
        self.token_drop = nn.Dropout(token_dropout)
        self.head = nn.Linear(d, vocab_size, bias=False)
        nn.init.zeros_(self.head.weight)  # LlamaGen: zero-initialised output layer
        self.branch = self.head2 = None
        if plan.heads == 2:  # NAR: a second head after extra blocks
            if not hasattr(backbone, "branch"):
                raise ConfigError(f"order {order.registry_key} needs a backbone with extra layers (branch); "
                                  f"{type(backbone).__name__} has none")
            self.branch = backbone.branch(order.extra_layers)
            self.head2 = nn.Linear(d, vocab_size, bias=False)
            nn.init.normal_(self.head2.weight, std=0.02)
        elif plan.heads != 1:
            raise ConfigError(f"{plan.heads} prediction heads are not supported (1 or 2)")
        self.adaln = getattr(backbone.cfg, "cond_mode", "prefix") == "adaln"
        p, L = int(conditioner.prefix_len), plan.length
        self.register_buffer("perm", plan.perm.clone(), persistent=False)
        self.register_buffer("inv_perm", torch.argsort(plan.perm), persistent=False)
        self.register_buffer("in_cells", plan.in_cells.clamp(min=0), persistent=False)
        self.register_buffer("reads", plan.reads.clamp(min=0), persistent=False)
        w = (plan.reads >= 0).float()
        self.register_buffer("read_w", w / w.sum(1, keepdim=True), persistent=False)  # (L, H) mean weights
        fed = plan.input_slots()  # the input slots each decoding step feeds
        ends = torch.tensor([len(f) for f in fed]).cumsum(0).tolist()
        self._in_bounds = list(zip([0, *ends[:-1]], ends))
        local = torch.empty(L, dtype=torch.long)  # position of input slot j among its step's inputs
        for f in fed:
            local[f] = torch.arange(len(f))
        self.register_buffer("in_order", torch.cat(fed), persistent=False)
        self.register_buffer("in_local", local, persistent=False)
        # where head 0 alone reads each target from its own input slot (raster, next-scale), logits need no gather
        identity = plan.heads == 1 and torch.equal(plan.reads[:, 0], torch.arange(L))
        self._direct_train = identity
        self._direct = [identity and torch.equal(f, torch.arange(sl.start, sl.stop))
                        for f, sl in zip(fed, plan.step_slices())]
        rows, cols = order.rope_positions(self.layout, plan)
        self.register_buffer("rope_rows", rows.float(), persistent=False)
        self.register_buffer("rope_cols", cols.float(), persistent=False)
        # (T, T) mask of the training sequence; its row P - 1 + j is what input j sees in the KV cache
        self.register_buffer("train_mask", plan.full_mask(p), persistent=False)
        self._causal = plan.causal

    # ------------------------------------------------------------------------------ plan helpers
    @property
    def plan(self) -> OrderPlan:
        return self.order.plan(self.layout)

    @property
    def prefix_len(self) -> int:
        return int(self.conditioner.prefix_len)

    @property
    def steps_per_image(self) -> int:
        return self.plan.steps

    def _condition(self, cond: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Condition tokens (B, P, d); the order's ``bias`` of input slot 0 goes on the last one (VAR's start
        token: class embedding + its position and level embeddings)."""
        prefix, vec, valid = self.conditioner(cond)
        if bias is not None:
            prefix = torch.cat([prefix[:, :-1], prefix[:, -1:] + bias[0].to(prefix.dtype)], dim=1)
        return prefix, (vec if self.adaln else None), valid

    def _rope(self, slots: Tensor | slice | None, prefix: int = 0) -> tuple[Tensor, Tensor]:
        """RoPE tables for input slots (default all but slot 0), preceded by ``prefix`` identity positions."""
        rows, cols = self.rope_rows, self.rope_cols
        if slots is not None:
            rows, cols = rows[slots], cols[slots]
        ident = torch.zeros(rows.shape[0], dtype=torch.bool, device=rows.device)
        if prefix:
            z = torch.zeros(prefix, device=rows.device)
            rows, cols = torch.cat([z, rows]), torch.cat([z, cols])
            ident = torch.cat([torch.ones(prefix, dtype=torch.bool, device=rows.device), ident])
        return self.backbone.rope(rows, cols, ident)

    def _padding(self, mask: Tensor, valid: Tensor | None, q_pos: Tensor) -> Tensor:
        """Combine a (Lq, S) mask with the condition's padding (B, P): padded keys are hidden from every
        query but themselves (a padded query then still sees one key). → (B, 1, Lq, S) or ``mask``."""
        if valid is None:
            return mask
        b, S = valid.shape[0], mask.shape[-1]
        keys = torch.ones(b, S, dtype=torch.bool, device=mask.device)
        keys[:, : valid.shape[1]] = valid
        self_pos = torch.arange(S, device=mask.device)[None, :] == q_pos[:, None]  # (Lq, S)
        return ((mask[None] & keys[:, None]) | self_pos[None])[:, None]

    def embed_windows(self, win_bnk: Tensor) -> Tensor:
        """Tokens of n cells, (B, n, s²) → fused input embeddings (B, n, d)."""
        return self.shuffle.shuffle_windows(self.tok_embedding(win_bnk))

    def _run(self, x: Tensor, rope, mask, pos, vec) -> list[Tensor]:
        """Backbone (and NAR's branch): hidden states per head."""
        if self.branch is None:
            return [self.backbone(x, rope, mask=mask, pos_l=pos, cond_bd=vec)]
        h, trunk = self.backbone(x, rope, mask=mask, pos_l=pos, cond_bd=vec, return_trunk=True)
        return [h, self.branch(trunk, rope, mask=mask, pos_l=pos, cond_bd=vec)]

    def _logits(self, hids: list[Tensor], targets: slice, step: int | None = None) -> Tensor:
        """Logits (B, n_t, s², V) float32 of the target slots ``targets`` (one tensor of hidden states per
        head): each target averages the heads that read it. ``step`` None: ``hids`` hold every input slot
        in order (training); else only the inputs that decoding step fed."""
        heads = [self.head] if self.head2 is None else [self.head, self.head2]
        per_head = [head(self.shuffle.unshuffle(h)).float() for head, h in zip(heads, hids)]
        if self._direct_train if step is None else self._direct[step]:
            return per_head[0]
        out = 0.0
        for k, lg in enumerate(per_head):
            idx = self.reads[targets, k]
            idx = idx if step is None else self.in_local[idx]
            wk = self.read_w[targets, k]
            out = out + lg[:, idx.clamp(0, lg.shape[1] - 1)] * wk[None, :, None, None]
        return out

    def _slots_to_tokens(self, x_blk: Tensor) -> Tensor:
        """Per target slot (B, L, s², ...) → per token (B, N, ...)."""
        return self.layout.tokens(x_blk[:, self.inv_perm])

    def _shape(self, x_bn: Tensor) -> Tensor:
        return x_bn.unflatten(1, self.grid) if self.grid is not None else x_bn

    # ------------------------------------------------------------------------------ training forward
    def forward(self, codes: Tensor, cond: Tensor) -> GenOut:
        """``codes`` (B, N) or (B, h, w); ``cond`` labels (B,) or caption ids (B, P) → :class:`GenOut`."""
        codes_bn = self.layout.flat(codes).long()
        p = self.prefix_len
        bias = self.order.input_bias()
        prefix, vec, valid = self._condition(cond, bias)
        x = self.order.token_inputs(codes_bn) if self.order.continuous else self.tok_embedding(codes_bn)
        cells = self.shuffle.shuffle_windows(self.layout.windows(x))  # (B, C, d)
        inp = cells[:, self.in_cells[1:]]
        if bias is not None:
            inp = inp + bias[1:]
        seq = self.token_drop(torch.cat([prefix.to(inp.dtype), inp], dim=1))  # (B, P + L - 1, d)
        T = seq.shape[1]
        mask = None if (self._causal and valid is None) else self._padding(self.train_mask, valid,
                                                                              torch.arange(T, device=seq.device))
        hids = [h[:, p - 1:] for h in self._run(seq, self._rope(slice(1, None), p), mask, None, vec)]
        L = self.plan.length
        logits_bnv = self._slots_to_tokens(self._logits(hids, slice(0, L)))  # (B, N, V)
        ce_bn = F.cross_entropy(logits_bnv.transpose(1, 2), codes_bn, reduction="none")
        ce = ce_bn.mean()
        z = torch.logsumexp(logits_bnv, dim=-1).pow(2).mean() if self.z_loss_weight > 0 else ce.new_zeros(())
        per_pos = self.layout.windows(ce_bn.detach()).mean((0, 1))  # (s²,)
        per_scale = torch.stack([c.mean() for c in ce_bn.detach().split(self.layout.scale_tokens(), dim=1)])
        return GenOut(logits_bnv, ce + self.z_loss_weight * z, ce, per_pos, z, per_scale, self.grid)

    # ------------------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, cond: Tensor, cfg_scale: float = 1.0, cfg_schedule: str = "constant",
               temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
               generator: torch.Generator | None = None, use_cache: bool = True,
               return_logits: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Draw tokens for conditions ``cond`` (labels (B,) or caption ids (B, P)): (B, h, w) for one grid,
        else (B, N); with ``return_logits`` also the guided logits each token was drawn from (…, V)."""
        check_schedule(cfg_schedule)
        self.conditioner.check(cond)
        if not use_cache:
            return self._sample_recompute(cond, cfg_scale, cfg_schedule, temperature, top_k, top_p, generator,
                                          return_logits)
        plan, p, dev, lay = self.plan, self.prefix_len, cond.device, self.layout
        b, k = cond.shape[0], lay.tokens_per_cell
        guided = is_guided(cfg_schedule, cfg_scale)
        conds = torch.cat([cond, self.conditioner.null_like(cond)]) if guided else cond
        bias = self.order.input_bias()
        prefix, vec, valid = self._condition(conds, bias)
        nb, total = prefix.shape[0], p + plan.length - 1
        dtype = next(self.backbone.parameters()).dtype
        if dev.type != "cpu" and torch.is_autocast_enabled(dev.type):
            dtype = torch.get_autocast_dtype(dev.type)
        for m in (self.backbone, self.branch):
            if m is not None:
                m.setup_cache(nb, total, dtype, dev)
        codes_bn = torch.zeros(b, lay.num_tokens, dtype=torch.long, device=dev)
        logits_out = torch.zeros(b, plan.length, k, self.vocab_size, device=dev) if return_logits else None
        cos_all, sin_all = self._rope(None)  # every input slot, once, on device
        state = self.order.start_sampling() if self.order.continuous else None
        try:
            for step, ((a, b_), tsl) in enumerate(zip(self._in_bounds, plan.step_slices())):
                isl = self.in_order[a:b_]  # the input slots this step feeds (on device)
                if step == 0:  # prefill: the condition, causal among itself
                    pos = torch.arange(p, device=dev)
                    mask = torch.ones(p, total, dtype=torch.bool, device=dev).tril()
                    x = prefix
                    rope = self.backbone.rope(torch.zeros(p, device=dev), torch.zeros(p, device=dev),
                                              torch.ones(p, dtype=torch.bool, device=dev))
                else:
                    pos = p - 1 + isl
                    mask = self.train_mask[pos]
                    if self.order.continuous:
                        x_tok, off = self.order.step_inputs(state, step, codes_bn)  # (B, n_tok, d)
                        buf = x_tok.new_zeros(b, lay.num_tokens, x_tok.shape[-1])
                        buf[:, off:off + x_tok.shape[1]] = x_tok
                        x = self.shuffle.shuffle_windows(buf[:, lay.win_index[self.in_cells[isl]]])
                    else:
                        x = self.embed_windows(codes_bn[:, lay.win_index[self.in_cells[isl]]])
                    if bias is not None:
                        x = x + bias[isl]
                    x = torch.cat([x, x]) if guided else x
                    rope = (cos_all[isl], sin_all[isl])
                hids = self._run(x.to(dtype), rope, self._padding(mask, valid, pos), pos, vec)
                if step == 0:
                    hids = [h[:, -1:] for h in hids]
                logits = self._logits(hids, tsl, step)  # (nb, n_t, s², V)
                if guided:
                    lc, lu = logits.chunk(2)
                    logits = lu + cfg_weight(cfg_schedule, cfg_scale, step, plan.steps) * (lc - lu)
                tok = draw(logits, temperature, top_k, top_p, generator)  # (B, n_t, s²)
                codes_bn[:, lay.win_index[self.perm[tsl]].flatten()] = tok.flatten(1)
                if logits_out is not None:
                    logits_out[:, tsl] = logits
        finally:
            for m in (self.backbone, self.branch):
                if m is not None:
                    m.clear_cache()
        codes = self._shape(codes_bn)
        return (codes, self._shape(self._slots_to_tokens(logits_out))) if return_logits else codes

    def _sample_recompute(self, cond, cfg_scale, cfg_schedule, temperature, top_k, top_p, generator, return_logits):
        """Reference sampler: no cache, the full teacher-forced forward at every step (for tests/benchmarks;
        call it in eval mode, as :meth:`sample`, or dropout stays on)."""
        plan, dev, lay = self.plan, cond.device, self.layout
        b = cond.shape[0]
        guided = is_guided(cfg_schedule, cfg_scale)
        codes = torch.zeros(b, lay.num_tokens, dtype=torch.long, device=dev)
        out_logits = torch.zeros(b, lay.num_tokens, self.vocab_size, device=dev) if return_logits else None
        for step, tsl in enumerate(plan.step_slices()):
            if guided:
                both = self.forward(torch.cat([codes, codes]), torch.cat([cond, self.conditioner.null_like(cond)]))
                lc, lu = both.logits_bnv.chunk(2)
                logits = lu + cfg_weight(cfg_schedule, cfg_scale, step, plan.steps) * (lc - lu)
            else:
                logits = self.forward(codes, cond).logits_bnv
            tok_idx = lay.win_index[self.perm[tsl]]  # (n, s²) token positions of this step's cells
            win_logits = logits[:, tok_idx]  # (B, n, s², V)
            tok = draw(win_logits, temperature, top_k, top_p, generator)
            codes[:, tok_idx.flatten()] = tok.flatten(1)
            if out_logits is not None:
                out_logits[:, tok_idx.flatten()] = win_logits.flatten(1, 2)
        return (self._shape(codes), self._shape(out_logits)) if return_logits else self._shape(codes)
