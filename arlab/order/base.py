"""The order interface: how a generator walks a token grid.

An order turns an h×w grid of (possibly Token-Shuffle-fused) tokens into an :class:`OrderPlan`:

* ``perm`` (L,): the row-major grid index of the *target* at sequence slot t (L = h·w);
* ``src`` (L,): the slot whose token is the *input* at slot t; ``src[0] = -1`` means slot 0 is
  predicted by the last condition (prefix) token, so the input sequence is
  ``[prefix (P tokens), embed(x[src[1]]), ..., embed(x[src[L-1]])]`` and the hidden state at
  sequence index ``P − 1 + t`` predicts target t (LlamaGen's alignment, generalised);
* ``step_sizes``: how many consecutive slots each decoding step emits (raster: L steps of 1);
* ``mask`` (L, L) bool or None: input t may attend input t' (True = visible); None = plain causal
  (``t' ≤ t``), which lets the backbone take SDPA's causal fast path. Every input always sees the
  whole prefix.

Decoding step k feeds the inputs of its slots (their sources were emitted by earlier steps) at
cache positions ``P − 1 + t`` and reads the targets from their hidden states; step 0 is the prefill
of the prefix. An order whose inputs are not embedded tokens (VAR's continuous f̂) overrides
:meth:`Order.inputs`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class OrderPlan:
    h: int
    w: int
    perm: Tensor  # (L,) int64 grid index (row-major) of target slot t
    src: Tensor  # (L,) int64 slot whose token is input t; -1: the last prefix token
    step_sizes: list[int]  # slots emitted per decoding step, in slot order; sums to L
    mask: Tensor | None  # (L, L) bool, True = input t may attend input t'; None = causal

    @property
    def length(self) -> int:
        return self.h * self.w

    @property
    def steps(self) -> int:
        return len(self.step_sizes)

    def step_slices(self) -> list[slice]:
        out, start = [], 0
        for n in self.step_sizes:
            out.append(slice(start, start + n))
            start += n
        return out

    def rows_cols(self) -> tuple[Tensor, Tensor]:
        """Grid (row, col) of each *input* slot (the cell of its source token; slot 0 gets (0, 0))."""
        cell = self.perm[self.src.clamp(min=0)]
        return cell // self.w, cell % self.w

    def step_of_slot(self) -> Tensor:
        return torch.repeat_interleave(torch.arange(len(self.step_sizes)), torch.tensor(self.step_sizes))

    def full_mask(self, prefix: int, device: torch.device | None = None) -> Tensor:
        """(P + L − 1, P + L − 1) bool mask of the training sequence (prefix causal among itself)."""
        n = prefix + self.length - 1
        m = torch.ones(n, n, dtype=torch.bool, device=device).tril()
        if self.mask is not None:
            m[prefix - 1:, prefix - 1:] = self.mask.to(device)
        return m

    def check(self) -> None:
        """Structural invariants every order must satisfy (tests call this for every registered order)."""
        L = self.length
        assert self.perm.shape == (L,) and torch.equal(self.perm.sort().values, torch.arange(L)), "perm"
        assert self.src.shape == (L,) and int(self.src[0]) == -1, "slot 0 comes from the prefix"
        assert sum(self.step_sizes) == L and all(n > 0 for n in self.step_sizes), "steps"
        step = self.step_of_slot()
        for t in range(1, L):  # an input is known before its slot's step
            assert 0 <= int(self.src[t]) < L and step[int(self.src[t])] < step[t], f"src of slot {t}"
        if self.mask is not None:
            assert self.mask.shape == (L, L) and bool(self.mask.diagonal().all())
            later = step[None, :] > step[:, None]
            assert not bool((self.mask & later).any()), "an input sees a later step"


class Order(nn.Module):
    """Base class of ``order/*`` components: ``plan(h, w)`` → :class:`OrderPlan` (cached per grid)."""

    def __init__(self) -> None:
        super().__init__()
        self._plans: dict[tuple[int, int], OrderPlan] = {}

    def make_plan(self, h: int, w: int) -> OrderPlan:
        raise NotImplementedError

    def plan(self, h: int, w: int) -> OrderPlan:
        if (h, w) not in self._plans:
            p = self.make_plan(h, w)
            p.check()
            self._plans[(h, w)] = p
        return self._plans[(h, w)]
