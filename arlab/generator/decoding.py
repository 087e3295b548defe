"""The generator's decode schedule, its per-call context, and what a compiled decode step needs.

:class:`DecodeStep` is one order step (the input slots it feeds, the target slots it emits);
:class:`Decoding` the per-call sampling context. A compiled decode step
(:meth:`arlab.generator.model.Generator.compile_decode`) takes only tensors (inputs, positions, position
tables, mask rows, the decode states, the adaLN vector, the heads' gather indices), so one compiled graph
serves every step of a given size, and it never reads a tensor's value on the host (no ``.item()``, no
branching on values: ``fullgraph=True`` compiles). With ``mode="reduce-overhead"`` (CUDA graphs) the decode
states must keep their addresses from call to call: :class:`StatePool` keeps one set per shape, refilled
from a fresh ``init_state`` at every call and marked static for the compiler.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from arlab.backbone.base import DecodeState
from arlab.generator.sampling import Guidance, draw


@dataclass(frozen=True)
class DecodeStep:
    """One order step of the decode schedule: the input slots it feeds (ascending, ``in_order[inputs]``) and
    the target slots it emits."""

    inputs: slice  # range of Generator.in_order holding the input slots fed
    targets: slice  # target slots emitted
    direct: bool  # head 0 alone reads each target from its own input slot, in order (no gather)


@dataclass
class Decoding:
    """Per-call sampling context: the doubled (CFG) conditions, the decode states, the position tables."""

    batch: int
    guidance: Guidance
    prefix: Tensor  # (nb, P, d)
    vec: Tensor | None  # (nb, d) adaLN vector
    valid: Tensor | None  # (nb, P) condition key validity
    states: list[DecodeState]  # backbone (and branch)
    tables: tuple[Tensor, ...]  # position tables of every input slot
    order_state: Any
    dtype: torch.dtype
    bias: Tensor | None  # the order's per-input-slot embeddings, computed once per call


def with_padding(mask: Tensor, valid: Tensor | None, q_pos: Tensor) -> Tensor:
    """Combine a (Lq, S) mask with the condition's padding (B, P): padded keys are hidden from every
    query but themselves (a padded query then still sees one key). → (B, 1, Lq, S) or ``mask``."""
    if valid is None:
        return mask
    b, S = valid.shape[0], mask.shape[-1]
    keys = torch.ones(b, S, dtype=torch.bool, device=mask.device)
    keys[:, : valid.shape[1]] = valid
    self_pos = torch.arange(S, device=mask.device)[None, :] == q_pos[:, None]  # (Lq, S)
    return ((mask[None] & keys[:, None]) | self_pos[None])[:, None]


@dataclass
class StatePool:
    """Decode states reused across sampling calls (same tensors, same addresses), keyed by their shapes."""

    static: bool = False  # mark the tensors as static addresses (CUDA graphs)
    pool: dict[tuple, list[DecodeState]] = field(default_factory=dict)

    def reuse(self, fresh: list[DecodeState]) -> list[DecodeState]:
        """The pooled states of ``fresh``'s shapes, refilled with ``fresh``'s values (``fresh`` itself the first
        time)."""
        tensors = [t for s in fresh for t in s.tensors()]
        key = tuple((tuple(t.shape), t.dtype, str(t.device)) for t in tensors)
        kept = self.pool.get(key)
        if kept is None:
            if self.static:
                for t in tensors:
                    torch._dynamo.mark_static_address(t)
            self.pool[key] = fresh
            return fresh
        with torch.no_grad():
            for dst, src in zip([t for s in kept for t in s.tensors()], tensors):
                dst.copy_(src)
        return kept


def sample_recompute(model: Any, cond: Tensor, guidance: Guidance, temperature: float, top_k: int, top_p: float,
                     generator: torch.Generator | None, return_logits: bool) -> tuple[Tensor, Tensor | None]:
    """The reference sampler of a :class:`~arlab.generator.model.Generator`: no decode state, the full
    teacher-forced forward at every step → tokens (B, N) and, with ``return_logits``, the logits they were
    drawn from (B, N, V)."""
    lay = model.layout
    codes = torch.zeros(cond.shape[0], lay.num_tokens, dtype=torch.long, device=cond.device)
    out_logits = (torch.zeros(cond.shape[0], lay.num_tokens, model.vocab_size, device=cond.device)
                  if return_logits else None)
    for step, st in enumerate(model.schedule):
        if guidance.guided:
            both = model(torch.cat([codes, codes]), torch.cat([cond, model.conditioner.null_like(cond)]))
            logits = guidance.mix(both.logits_bnv, step)
        else:
            logits = model(codes, cond).logits_bnv
        tok_idx = lay.win_index[model.perm[st.targets]]  # (n, s²) token positions of this step's cells
        win_logits = logits[:, tok_idx]  # (B, n, s², V)
        codes[:, tok_idx.flatten()] = draw(win_logits, temperature, top_k, top_p, generator).flatten(1)
        if out_logits is not None:
            out_logits[:, tok_idx.flatten()] = win_logits.flatten(1, 2)
    return codes, out_logits
