"""The AR generator: token inputs → Token-Shuffle → order → backbone (+ branch) → unshuffle → heads.

One model for raster AR (LlamaGen), Token-Shuffle (s = 2, 4), VAR's next-scale and NAR's next-neighbour orders;
every part is picked by name. Plain ``nn.Module``: usable without Lightning.

Training (teacher forcing), for tokens ``codes_bn`` (B, N) (or one grid ``codes_bhw``) and a
condition ``cond`` (class labels (B,) or caption ids (B, P)):

1. per-token inputs ``x`` (B, N, d): ``embed(codes)``, or the order's continuous inputs (VAR f̂);
2. the layout's s×s windows, fused by Token-Shuffle: ``cells`` (B, C, d);
3. the order's plan gives the sequence ``[condition (B, P, d), cells[in_cells[1:]] + bias]``
   (B, P + L − 1, d) and its block-causal mask (plus the condition's padding mask);
4. ``hid = backbone(seq)[:, P − 1:]`` (B, L, d) (NAR: also a branch of extra blocks);
5. per head, ``head(unshuffle(hid))`` (B, L, s², V); target t averages the heads that read it
   (``plan.reads``) → logits per token ``logits_bnv`` (B, N, V).

Sampling (:meth:`Generator.sample`) walks the decode schedule derived once from the plan
(:class:`DecodeStep`): :meth:`Generator.prefill` feeds the condition into the backbone's decode state
(a KV cache or a recurrent state) and gives the first step's logits; :meth:`Generator.decode_step`
feeds every input of one order step at once and gives the logits of every target of that step;
:class:`Guidance` mixes the conditional and null halves (CFG in one batch) with a schedule; ``draw``
samples the tokens. :meth:`Generator.sample_recompute` is the state-free reference.

The generator uses its components only through their interfaces (:class:`arlab.backbone.base.Backbone`,
:class:`arlab.order.base.Order`, :class:`arlab.conditioner.base.Conditioner`); the backbone's capabilities are
checked against the order when the generator is built (and, by the generator task, at config time).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from arlab.backbone.base import Backbone, check_serves
from arlab.conditioner.base import Conditioner
from arlab.generator.decoding import DecodeStep, Decoding, StatePool, sample_recompute, with_padding
from arlab.generator.layout import Layout, take
from arlab.generator.linear_ce import linear_cross_entropy
from arlab.generator.sampling import Guidance, check_schedule, draw
from arlab.optim import adamw_only
from arlab.order.base import Order, OrderPlan
from arlab.shuffle.window import TokenShuffle


@dataclass
class GenOut:
    logits_bnv: Tensor | None  # (B, N, V) float32, per token in layout order (None: chunked loss, not kept)
    loss: Tensor  # scalar: CE over every token (+ z-loss)
    ce: Tensor  # scalar CE (chunked loss: not differentiable, only ``loss`` is)
    ce_per_window_pos: Tensor  # (s²,) CE per position inside a Token-Shuffle window
    z_loss: Tensor
    ce_per_scale: Tensor  # (S,) CE per scale (one grid: (1,))
    grid: tuple[int, int] | None = None  # (h, w) of a one-grid layout

    @property
    def logits_bhwv(self) -> Tensor:
        """(B, h, w, V) for a one-grid layout."""
        if self.grid is None or self.logits_bnv is None:
            raise ValueError("no logits on one grid (a multi-scale layout, or return_logits=False)")
        return self.logits_bnv.unflatten(1, self.grid)


class Generator(nn.Module):
    def __init__(self, backbone: Backbone, order: Order, shuffle: TokenShuffle, conditioner: Conditioner,
                 vocab_size: int, scales: list | tuple, z_loss: float = 0.0, token_dropout: float = 0.0,
                 quantizer: nn.Module | None = None, loss_chunk: int = 4096):
        super().__init__()
        self.loss_chunk = int(loss_chunk)  # rows per chunk of the chunked head + CE (0: plain full-logits loss)
        self.backbone, self.order, self.shuffle, self.conditioner = backbone, order, shuffle, conditioner
        if isinstance(scales, tuple) and len(scales) == 2 and all(isinstance(x, int) for x in scales):
            scales = [scales]  # one (h, w) grid
        self.layout = Layout(list(scales), shuffle.s)
        self.vocab_size = vocab_size
        self.grid = None if self.layout.multiscale else self.layout.scales[0]
        self.z_loss_weight = z_loss
        check_serves(type(backbone), backbone.cfg, attention=order.attention, heads=order.heads,
                     order_name=order.registry_key)
        d = backbone.dim
        order.setup(self.layout, d, quantizer)
        plan = order.plan(self.layout)
        self.tok_embedding = None
        if not order.continuous:
            self.tok_embedding = nn.Embedding(vocab_size, d)
            nn.init.normal_(self.tok_embedding.weight, std=0.02)
        self.token_drop = nn.Dropout(token_dropout)
        self.head = nn.Linear(d, vocab_size, bias=False)  # zero-initialised (LlamaGen); AdamW under optimizer=muon
        adamw_only(nn.init.zeros_(self.head.weight))
        self.branch = self.head2 = None
        if plan.heads == 2:  # NAR: a second head after extra layers
            self.branch = backbone.branch(order.extra_layers)
            self.head2 = nn.Linear(d, vocab_size, bias=False)
            adamw_only(nn.init.normal_(self.head2.weight, std=0.02))
        elif plan.heads != 1:
            raise ValueError(f"{plan.heads} prediction heads are not supported (1 or 2)")
        self.adaln = backbone.cond_mode == "adaln"
        p, L = int(conditioner.prefix_len), plan.length
        self.register_buffer("perm", plan.perm.clone(), persistent=False)
        self.register_buffer("inv_perm", torch.argsort(plan.perm), persistent=False)
        self.register_buffer("in_cells", plan.in_cells.clamp(min=0), persistent=False)
        self.register_buffer("reads", plan.reads.clamp(min=0), persistent=False)
        w = (plan.reads >= 0).float()
        self.register_buffer("read_w", w / w.sum(1, keepdim=True), persistent=False)  # (L, H) mean weights
        fed = plan.input_slots()  # the input slots each decoding step feeds
        local = torch.empty(L, dtype=torch.long)  # position of input slot j among its step's inputs
        for f in fed:
            local[f] = torch.arange(len(f))
        self.register_buffer("in_local", local, persistent=False)
        self.register_buffer("in_order", torch.cat(fed), persistent=False)
        ends = torch.tensor([len(f) for f in fed]).cumsum(0).tolist()
        # where head 0 alone reads each target from its own input slot (raster, next-scale), logits need no gather
        identity = plan.heads == 1 and torch.equal(plan.reads[:, 0], torch.arange(L))
        self._direct_train = identity
        self.schedule = [DecodeStep(slice(a, b), sl, identity and torch.equal(f, torch.arange(sl.start, sl.stop)))
                         for a, b, f, sl in zip([0, *ends[:-1]], ends, fed, plan.step_slices())]
        rows, cols = order.input_positions(self.layout, plan)
        self.register_buffer("pos_rows", rows.float(), persistent=False)
        self.register_buffer("pos_cols", cols.float(), persistent=False)
        # (T, T) mask of the training sequence; its row P - 1 + j is what input j sees in the decode state
        self.register_buffer("train_mask", plan.full_mask(p), persistent=False)
        self._causal = plan.causal
        self._masks: dict[str, Any] = {}  # device → the backbone's form of train_mask (Backbone.prepare_mask)
        self._decode_fn: Callable | None = None  # compiled decode_core (compile_decode)
        self._decode_graphs = False
        self._states = StatePool()

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

    def _tables(self, slots: Tensor | slice | None, prefix: int = 0) -> tuple[Tensor, ...]:
        """Backbone position tables for input slots (default all), preceded by ``prefix`` condition positions."""
        rows, cols = self.pos_rows, self.pos_cols
        if slots is not None:
            rows, cols = rows[slots], cols[slots]
        ident = torch.zeros(rows.shape[0], dtype=torch.bool, device=rows.device)
        if prefix:
            z = torch.zeros(prefix, device=rows.device)
            rows, cols = torch.cat([z, rows]), torch.cat([z, cols])
            ident = torch.cat([torch.ones(prefix, dtype=torch.bool, device=rows.device), ident])
        return self.backbone.position_tables(rows, cols, ident)

    def static_mask(self) -> Any:
        """The (T, T) training mask as the backbone's attention kernel takes it (a flex BlockMask for
        ``attn: flex``), built on first use per device and cached; call it once before compiling a step."""
        key = str(self.train_mask.device)
        if key not in self._masks:
            self._masks[key] = self.backbone.prepare_mask(self.train_mask)
        return self._masks[key]

    def embed_windows(self, win_bnk: Tensor) -> Tensor:
        """Tokens of n cells, (B, n, s²) → fused input embeddings (B, n, d)."""
        return self.shuffle.shuffle_windows(self.tok_embedding(win_bnk))

    def _logits(self, hids: list[Tensor], targets: slice, step: int | None = None) -> Tensor:
        """Logits (B, n_t, s², V) float32 (float64 for a float64 model) of the target slots ``targets`` (one
        tensor of hidden states per head): each target averages the heads that read it. ``step`` None: ``hids``
        hold every input slot in order (training); else only the inputs that decoding step fed."""
        per_head = self._head_logits(hids)
        if self._direct_train if step is None else self.schedule[step].direct:
            return per_head[0]
        return self._mix(per_head, self._gather(targets, step))

    def _head_logits(self, hids: list[Tensor]) -> list[Tensor]:
        heads = [self.head] if self.head2 is None else [self.head, self.head2]
        per_head = [head(self.shuffle.unshuffle(h)) for head, h in zip(heads, hids)]
        return [lg if lg.dtype == torch.float64 else lg.float() for lg in per_head]  # float32 at least

    def _gather(self, targets: slice, step: int | None) -> tuple[tuple[Tensor, Tensor], ...]:
        """Per head: the index of the hidden state it reads for each target (among the step's inputs when
        ``step`` is given) and its weight in the mean."""
        out = []
        for k in range(self.reads.shape[1]):
            idx = self.reads[targets, k]
            out.append((idx if step is None else self.in_local[idx], self.read_w[targets, k]))
        return tuple(out)

    @staticmethod
    def _mix(per_head: list[Tensor], gather: tuple[tuple[Tensor, Tensor], ...]) -> Tensor:
        out = 0.0
        for lg, (idx, wk) in zip(per_head, gather):
            out = out + lg[:, idx.clamp(0, lg.shape[1] - 1)] * wk[None, :, None, None]
        return out

    def _slots_to_tokens(self, x_blk: Tensor) -> Tensor:
        """Per target slot (B, L, s², ...) → per token (B, N, ...)."""
        return self.layout.tokens(take(x_blk, self.inv_perm))

    def _shape(self, x_bn: Tensor) -> Tensor:
        return x_bn.unflatten(1, self.grid) if self.grid is not None else x_bn

    # ------------------------------------------------------------------------------ training forward
    def forward(self, codes: Tensor, cond: Tensor, return_logits: bool = True) -> GenOut:
        """``codes`` (B, N) or (B, h, w); ``cond`` labels (B,) or caption ids (B, P) → :class:`GenOut`.

        ``return_logits=False`` (training) with ``loss_chunk`` > 0: the head and CE run chunk by chunk
        (:func:`~arlab.generator.linear_ce.linear_cross_entropy`) and no logits are kept (``logits_bnv`` None)."""
        codes_bn = self.layout.flat(codes).long()
        p = self.prefix_len
        bias = self.order.input_bias()
        prefix, vec, valid = self._condition(cond, bias)
        x = self.order.token_inputs(codes_bn) if self.order.continuous else self.tok_embedding(codes_bn)
        cells = self.shuffle.shuffle_windows(self.layout.windows(x))  # (B, C, d)
        inp = take(cells, self.in_cells[1:])
        if bias is not None:
            inp = inp + bias[1:]
        seq = self.token_drop(torch.cat([prefix.to(inp.dtype), inp], dim=1))  # (B, P + L - 1, d)
        T = seq.shape[1]
        if valid is None:  # the fixed training mask, in the backbone's kernel form (built once per device)
            mask = None if self._causal else self.static_mask()
        else:
            mask = with_padding(self.train_mask, valid, torch.arange(T, device=seq.device))
        tables = self._tables(slice(1, None), p)
        if self.branch is None:
            hids = [self.backbone(seq, tables, mask=mask, cond_bd=vec)]
        else:
            h, trunk = self.backbone(seq, tables, mask=mask, cond_bd=vec, return_trunk=True)
            hids = [h, self.branch(trunk, tables, mask=mask, cond_bd=vec)]
        hids = [h[:, p - 1:] for h in hids]
        if not return_logits and self.loss_chunk > 0:
            return self._chunked_loss(hids, codes_bn)
        L = self.plan.length
        logits_bnv = self._slots_to_tokens(self._logits(hids, slice(0, L)))  # (B, N, V)
        ce_bn = F.cross_entropy(logits_bnv.transpose(1, 2), codes_bn, reduction="none")
        ce = ce_bn.mean()
        z = torch.logsumexp(logits_bnv, dim=-1).pow(2).mean() if self.z_loss_weight > 0 else ce.new_zeros(())
        return self._out(logits_bnv, ce + self.z_loss_weight * z, ce, ce_bn, z)

    def _out(self, logits_bnv: Tensor | None, loss: Tensor, ce: Tensor, ce_bn: Tensor, z: Tensor) -> GenOut:
        per_pos = self.layout.windows(ce_bn.detach()).mean((0, 1))  # (s²,)
        per_scale = torch.stack([c.mean() for c in ce_bn.detach().split(self.layout.scale_tokens(), dim=1)])
        return GenOut(logits_bnv, loss, ce, per_pos, z, per_scale, self.grid)

    def _chunked_loss(self, hids: list[Tensor], codes_bn: Tensor) -> GenOut:
        """The training loss without full logits: the unshuffled per-token states of every target (B, L, s², d)
        — NAR: each head's states gathered at the slots it reads, weighted by ``read_w`` and concatenated along
        d, against the heads' weights concatenated along d (the same averaged logits) — through the chunked
        head + CE over every original token."""
        heads = [self.head] if self.head2 is None else [self.head, self.head2]
        per_head = [self.shuffle.unshuffle(h) for h in hids]  # (B, L, s², d) each
        if self._direct_train:
            h_blkd, w_vd = per_head[0], self.head.weight
        else:
            h_blkd = torch.cat([u[:, self.reads[:, k]] * self.read_w[:, k, None, None].to(u.dtype)
                                for k, u in enumerate(per_head)], dim=-1)
            w_vd = torch.cat([hd.weight for hd in heads], dim=1)
        y_blk = self.layout.windows(codes_bn)[:, self.perm]  # the s² tokens each target slot predicts
        loss, ce_n, lse_n = linear_cross_entropy(h_blkd.flatten(0, 2), w_vd, y_blk.flatten(), self.loss_chunk,
                                                 self.z_loss_weight)
        ce_bn = self._slots_to_tokens(ce_n.view(y_blk.shape))
        z = lse_n.pow(2).mean() if self.z_loss_weight > 0 else loss.new_zeros(()).detach()
        return self._out(None, loss, ce_bn.mean(), ce_bn, z)

    # ------------------------------------------------------------------------------ sampling steps
    def start(self, cond: Tensor, guidance: Guidance) -> Decoding:
        """The sampling context for conditions ``cond``: conditional and null halves in one batch when guided,
        preallocated decode states for the whole sequence, position tables of every input slot."""
        dev = cond.device
        conds = torch.cat([cond, self.conditioner.null_like(cond)]) if guidance.guided else cond
        bias = self.order.input_bias()
        prefix, vec, valid = self._condition(conds, bias)
        nb, total = prefix.shape[0], self.prefix_len + self.plan.length - 1
        dtype = next(self.backbone.parameters()).dtype
        if dev.type != "cpu" and torch.is_autocast_enabled(dev.type):
            dtype = torch.get_autocast_dtype(dev.type)
        states = [m.init_state(nb, total, dtype, dev) for m in (self.backbone, self.branch) if m is not None]
        if self._decode_fn is not None:  # a compiled step: the same state tensors every call
            states = self._states.reuse(states)
        order_state = self.order.start_sampling() if self.order.continuous else None
        return Decoding(cond.shape[0], guidance, prefix, vec, valid, states, self._tables(None), order_state, dtype,
                         bias)

    def _feed(self, states: list, x: Tensor, pos_l: Tensor, tables: tuple[Tensor, ...], mask: Tensor,
              vec: Tensor | None) -> list[Tensor]:
        """Feed new positions into the decode state(s) (``mask`` rows already padded): hidden states per head
        (backbone, and NAR's branch)."""
        call = self.backbone.step if x.shape[1] == 1 else self.backbone.prefill
        if self.branch is None:
            return [call(x, states[0], pos_l, tables, mask, vec)]
        h, trunk = call(x, states[0], pos_l, tables, mask, vec, return_trunk=True)
        branch_call = self.branch.step if x.shape[1] == 1 else self.branch.prefill
        return [h, branch_call(trunk, states[1], pos_l, tables, mask, vec)]

    def prefill(self, ctx: Decoding) -> Tensor:
        """Step 0: the condition tokens, causal among themselves → the first step's logits (nb, n_t, s², V)."""
        p, dev = self.prefix_len, ctx.prefix.device
        pos_l = torch.arange(p, device=dev)
        mask = self.train_mask[:p]  # the condition, causal among itself, over the whole decode state
        tables = self.backbone.position_tables(torch.zeros(p, device=dev), torch.zeros(p, device=dev),
                                               torch.ones(p, dtype=torch.bool, device=dev))
        mask = with_padding(mask, ctx.valid, pos_l)
        hids = [h[:, -1:] for h in self._feed(ctx.states, ctx.prefix.to(ctx.dtype), pos_l, tables, mask, ctx.vec)]
        return self._logits(hids, self.schedule[0].targets, 0)

    def step_inputs(self, ctx: Decoding, step: int, codes_bn: Tensor) -> Tensor:
        """The fused inputs (B, n_in, d) that order step ``step`` ≥ 1 feeds, from the tokens drawn so far."""
        lay, isl = self.layout, self.in_order[self.schedule[step].inputs]
        if self.order.continuous:
            x_tok, off = self.order.step_inputs(ctx.order_state, step, codes_bn)  # (B, n_tok, d)
            buf = x_tok.new_zeros(ctx.batch, lay.num_tokens, x_tok.shape[-1])
            buf[:, off:off + x_tok.shape[1]] = x_tok
            x = self.shuffle.shuffle_windows(buf[:, lay.win_index[self.in_cells[isl]]])
        else:
            x = self.embed_windows(codes_bn[:, lay.win_index[self.in_cells[isl]]])
        return x if ctx.bias is None else x + ctx.bias[isl]

    def decode_step(self, ctx: Decoding, step: int, codes_bn: Tensor) -> Tensor:
        """Order step ``step`` ≥ 1: feed its inputs at their positions → logits of its targets (nb, n_t, s², V).
        The indices come from the schedule here; :meth:`decode_core` (compiled by :meth:`compile_decode`) gets
        tensors only."""
        st = self.schedule[step]
        isl = self.in_order[st.inputs]
        x = self.step_inputs(ctx, step, codes_bn)
        x = torch.cat([x, x]) if ctx.guidance.guided else x
        pos_l = self.prefix_len - 1 + isl
        tables = tuple(t[isl] for t in ctx.tables)
        mask = with_padding(self.train_mask[pos_l], ctx.valid, pos_l)
        gather = () if st.direct else self._gather(st.targets, step)
        if self._decode_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are consumed
        return (self._decode_fn or self.decode_core)(x.to(ctx.dtype), pos_l, tables, mask, ctx.states, ctx.vec,
                                                     gather)

    def decode_core(self, x: Tensor, pos_l: Tensor, tables: tuple[Tensor, ...], mask: Tensor, states: list,
                    vec: Tensor | None, gather: tuple[tuple[Tensor, Tensor], ...]) -> Tensor:
        """The model part of a decode step: inputs (nb, n, d) at positions ``pos_l`` (n,) with ``mask`` rows
        (n, S) or (nb, 1, n, S) through the decode ``states`` → logits (nb, n_t, s², V); ``gather`` () when head 0
        reads each target from its own input, else :meth:`_gather`'s per-head indices. No host syncs."""
        per_head = self._head_logits(self._feed(states, x, pos_l, tables, mask, vec))
        return per_head[0] if not gather else self._mix(per_head, gather)

    def compile_decode(self, mode: str | None = "default", backend: str = "inductor", fullgraph: bool = True
                       ) -> Generator:
        """Compile :meth:`decode_core` with ``torch.compile`` (``mode="reduce-overhead"`` on CUDA: CUDA graphs
        over the static KV cache, whose tensors are then pooled across calls at fixed addresses); ``None``:
        back to eager. Returns the generator."""
        self._decode_graphs = mode == "reduce-overhead"
        self._states = StatePool(static=self._decode_graphs)
        self._decode_fn = None if mode is None else torch.compile(self.decode_core, mode=mode, backend=backend,
                                                                  fullgraph=fullgraph)
        return self

    def place(self, codes_bn: Tensor, tok: Tensor, step: int) -> None:
        """Write the tokens (B, n_t, s²) drawn at ``step`` into ``codes_bn`` (B, N)."""
        codes_bn[:, self.layout.win_index[self.perm[self.schedule[step].targets]].flatten()] = tok.flatten(1)

    @torch.no_grad()
    def sample(self, cond: Tensor, cfg_scale: float = 1.0, cfg_schedule: str = "constant",
               temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
               generator: torch.Generator | None = None, use_cache: bool = True,
               return_logits: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Draw tokens for conditions ``cond`` (labels (B,) or caption ids (B, P)): (B, h, w) for one grid,
        else (B, N); with ``return_logits`` also the guided logits each token was drawn from (…, V).
        ``use_cache=False``: the state-free reference (:meth:`sample_recompute`)."""
        check_schedule(cfg_schedule)
        self.conditioner.check(cond)
        guidance = Guidance(cfg_schedule, cfg_scale, self.plan.steps)
        if not use_cache:
            return self.sample_recompute(cond, guidance, temperature, top_k, top_p, generator, return_logits)
        ctx = self.start(cond, guidance)
        codes_bn = torch.zeros(ctx.batch, self.layout.num_tokens, dtype=torch.long, device=cond.device)
        logits_out = (torch.zeros(ctx.batch, self.plan.length, self.layout.tokens_per_cell, self.vocab_size,
                                  device=cond.device) if return_logits else None)
        for step, st in enumerate(self.schedule):
            logits = self.prefill(ctx) if step == 0 else self.decode_step(ctx, step, codes_bn)
            logits = guidance.mix(logits, step)
            self.place(codes_bn, draw(logits, temperature, top_k, top_p, generator), step)
            if logits_out is not None:
                logits_out[:, st.targets] = logits
        codes = self._shape(codes_bn)
        return (codes, self._shape(self._slots_to_tokens(logits_out))) if return_logits else codes

    def sample_recompute(self, cond: Tensor, guidance: Guidance, temperature: float = 1.0, top_k: int = 0,
                         top_p: float = 1.0, generator: torch.Generator | None = None,
                         return_logits: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Reference sampler: no decode state, the full teacher-forced forward at every step (for tests and
        benchmarks; call it in eval mode, as :meth:`sample`, or dropout stays on)."""
        codes, logits = sample_recompute(self, cond, guidance, temperature, top_k, top_p, generator, return_logits)
        return (self._shape(codes), self._shape(logits)) if return_logits else self._shape(codes)
