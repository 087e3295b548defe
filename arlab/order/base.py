"""The order interface: how a generator walks the cells of a token layout.

Cells are the Token-Shuffle-fused positions of :class:`arlab.generator.layout.Layout` (one grid, or
VAR's scales). An order turns a layout into an :class:`OrderPlan` over ``L`` target slots and ``L``
input slots:

* ``perm`` (L,): the cell of the *target* at slot t; targets are emitted in slot order,
  ``step_sizes`` of them per decoding step;
* input slot j is fed at sequence index ``P − 1 + j`` after the P condition tokens: slot 0 *is* the
  last condition token; slot j ≥ 1 carries the input of cell ``in_cells[j]`` — the embedded token
  of that cell (``src[j]`` = the target slot that emitted it) or, for an order with continuous
  inputs (VAR's f̂), whatever :meth:`Order.token_inputs` gives there (``src`` is None);
* ``in_step`` (L,): the decoding step that feeds input j (step 0 feeds slot 0 alone, the prefill;
  inputs need not be fed in slot order: NAR keeps the raster order in its sequence); the attention
  mask is block-causal over it: input j sees input j' iff
  ``in_step[j'] <= in_step[j]`` (plain causal when every step feeds one input, which lets the
  backbone take SDPA's causal fast path). Every input sees the whole condition.
* ``reads`` (L, H): the input slot whose hidden state head h reads for target t (−1 = head h does
  not predict t); a target's logits are the mean over its heads (NAR's two heads). A target of step
  k reads only inputs fed at step k, so a KV-cached decoder needs just that step's hidden states.

Raster: ``in_cells[j] = perm[j − 1]``, one input and one target per step, ``reads[t] = t``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from arlab.backbone.base import ARBITRARY, ATTENTION_STRUCTURES, BLOCK_CAUSAL, CAUSAL
from arlab.errors import ConfigError
from arlab.registry import register_kind


@dataclass
class OrderPlan:
    perm: Tensor  # (L,) int64 cell of target slot t
    step_sizes: list[int]  # targets emitted per decoding step, in slot order; sums to L
    in_cells: Tensor  # (L,) int64 cell whose input feeds input slot j (slot 0: -1, the last condition token)
    in_step: Tensor  # (L,) int64 decoding step that feeds input slot j (its KV-cache position is P - 1 + j)
    reads: Tensor  # (L, H) int64 input slot read by head h for target t; -1 = none
    src: Tensor | None = None  # (L,) target slot whose token input j embeds (-1 at j = 0); None: continuous

    @classmethod
    def walk(cls, perm: Tensor) -> OrderPlan:
        """One cell per decoding step in the order of ``perm`` (L,) (raster, snake): causal mask, one head; input
        j is the token of target slot j − 1."""
        L = int(perm.shape[0])
        return cls(perm=perm, step_sizes=[1] * L, in_cells=torch.cat([perm.new_tensor([-1]), perm[:-1]]),
                   in_step=torch.arange(L), reads=torch.arange(L)[:, None], src=torch.arange(-1, L - 1))

    @property
    def length(self) -> int:
        return int(self.perm.shape[0])

    @property
    def steps(self) -> int:
        return len(self.step_sizes)

    @property
    def heads(self) -> int:
        return int(self.reads.shape[1])

    @property
    def causal(self) -> bool:
        """True when the mask is plain causal (one input per step)."""
        return bool((self.in_step[1:] > self.in_step[:-1]).all())

    @property
    def attention(self) -> str:
        """The attention structure the plan's mask has: causal, block_causal (every step feeds a contiguous run
        of input slots) or arbitrary."""
        if self.causal:
            return CAUSAL
        return BLOCK_CAUSAL if bool((self.in_step[1:] >= self.in_step[:-1]).all()) else ARBITRARY

    @property
    def mask(self) -> Tensor | None:
        """(L, L) bool, True = input j may attend input j' (block-causal over ``in_step``); None = causal."""
        if self.causal:
            return None
        return self.in_step[None, :] <= self.in_step[:, None]

    def step_slices(self) -> list[slice]:
        """Target slots of each decoding step."""
        out, start = [], 0
        for n in self.step_sizes:
            out.append(slice(start, start + n))
            start += n
        return out

    def input_slots(self) -> list[Tensor]:
        """Input slots fed at each decoding step, ascending (int64 index tensors)."""
        order = torch.argsort(self.in_step, stable=True)
        return list(order.split(torch.bincount(self.in_step, minlength=self.steps).tolist()))

    def step_of_slot(self) -> Tensor:
        """(L,) decoding step that emits target slot t."""
        return torch.repeat_interleave(torch.arange(len(self.step_sizes)), torch.tensor(self.step_sizes))

    def full_mask(self, prefix: int, device: torch.device | None = None) -> Tensor:
        """(P + L − 1, P + L − 1) bool mask of the training sequence (prefix causal among itself)."""
        n = prefix + self.length - 1
        m = torch.ones(n, n, dtype=torch.bool, device=device).tril()
        inner = self.mask
        if inner is not None:
            m[prefix - 1:, prefix - 1:] = inner.to(device)
        return m

    def check(self) -> None:
        """Structural invariants every order must satisfy (tests call this for every registered order)."""
        L = self.length
        assert self.perm.shape == (L,) and torch.equal(self.perm.sort().values, torch.arange(L)), "perm"
        assert sum(self.step_sizes) == L and all(n > 0 for n in self.step_sizes), "steps"
        assert self.in_cells.shape == (L,) and int(self.in_cells[0]) == -1, "input slot 0 is the condition"
        assert self.in_step.shape == (L,) and int(self.in_step[0]) == 0, "step 0 feeds the condition"
        assert L == 1 or int(self.in_step[1:].min()) >= 1, "step 0 feeds only the condition token"
        assert int(self.in_step.max()) < self.steps, "an input fed after the last step"
        step = self.step_of_slot()
        assert self.reads.ndim == 2 and self.reads.shape[0] == L, "reads"
        assert bool((self.reads >= 0).any(1).all()), "every target is read by at least one head"
        read_step = self.in_step[self.reads.clamp(min=0)]
        ok = (self.reads < 0) | (read_step == step[:, None])
        assert bool(ok.all()), "a target reads an input not fed at its own step"
        if self.src is not None:
            assert self.src.shape == (L,) and int(self.src[0]) == -1
            for j in range(1, L):  # an input token is drawn before the step that feeds it
                t = int(self.src[j])
                assert 0 <= t < L and step[t] < self.in_step[j], f"input {j} comes from a later step"
                assert int(self.in_cells[j]) == int(self.perm[t]), f"in_cells of input {j}"


class Order(nn.Module, ABC):
    """Base class of ``order/*`` components: ``plan(layout)`` → :class:`OrderPlan` (cached per layout).

    Declared by every order, as class attributes (read at config time, before anything is built):

    * ``attention``: the attention structure its plan needs from a backbone (``causal``,
      ``block_causal`` or ``arbitrary``; :mod:`arlab.backbone.base`); the plan is checked against it;
    * ``multiscale``: None (one grid only) or True (needs VAR's scales from an msvq tokenizer);
    * ``heads``: prediction heads (2: the second reads ``extra_layers`` more backbone layers, NAR);
    * ``continuous``: inputs come from :meth:`token_inputs` / :meth:`step_inputs` (VAR's f̂) instead of
      the generator's token embedding; such an order must implement :meth:`token_inputs`,
      :meth:`start_sampling` and :meth:`step_inputs`, and receives the tokenizer's quantizer in
      :meth:`setup` (``needs_quantizer``).

    The generator calls :meth:`setup` once (layout, width, quantizer), then :meth:`plan`,
    :meth:`input_bias`, :meth:`input_positions` and, for continuous orders, the three input methods.
    """

    registry_key: str = "order/<unregistered>"  # set by @register
    attention: str = CAUSAL
    multiscale: bool | None = None
    heads: int = 1
    extra_layers: int = 0  # backbone layers before the second head (NAR)
    continuous: bool = False
    needs_quantizer: bool = False

    _CONTINUOUS_METHODS = ("token_inputs", "start_sampling", "step_inputs")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.attention not in ATTENTION_STRUCTURES:
            raise TypeError(f"{cls.__qualname__}.attention {cls.attention!r} is not one of {ATTENTION_STRUCTURES}")
        if cls.continuous:
            missing = [m for m in cls._CONTINUOUS_METHODS if getattr(cls, m) is getattr(Order, m)]
            if missing:
                raise TypeError(f"{cls.__qualname__} is a continuous order but does not implement {', '.join(missing)}")

    def __init__(self) -> None:
        super().__init__()
        self._plans: dict[tuple, OrderPlan] = {}

    @abstractmethod
    def make_plan(self, layout) -> OrderPlan:
        """The :class:`OrderPlan` of ``layout`` (called once per layout; :meth:`plan` caches and checks it)."""

    def check_layout(self, layout) -> None:
        name = getattr(self, "registry_key", type(self).__name__).split("/")[-1]
        if self.multiscale is None and layout.multiscale:
            raise ConfigError(f"order {name!r} walks one token grid, but the tokenizer is multi-scale (scales "
                              f"{layout.scales}); use order next_scale, or a single-grid tokenizer (vq, fsq)")
        if self.multiscale and not layout.multiscale:
            raise ConfigError(f"order {name!r} predicts scale by scale and needs a multi-scale tokenizer (msvq); "
                              f"this one has a single {layout.scales[0][0]}x{layout.scales[0][1]} grid")

    def plan(self, layout) -> OrderPlan:
        key = (tuple(layout.fused),)
        if key not in self._plans:
            self.check_layout(layout)
            p = self.make_plan(layout)
            p.check()
            needed = ATTENTION_STRUCTURES.index(p.attention)
            if needed > ATTENTION_STRUCTURES.index(self.attention):
                raise TypeError(f"{type(self).__qualname__} declares attention {self.attention!r} but its plan "
                                f"needs {p.attention!r}; declare the larger structure")
            self._plans[key] = p
        return self._plans[key]

    def setup(self, layout, dim: int, quantizer: nn.Module | None = None) -> None:
        """Create layout-dependent parameters (none for token orders)."""

    def input_bias(self) -> Tensor | None:
        """Optional (L, d) additive embedding per input slot (VAR's level + position embeddings)."""
        return None

    def input_positions(self, layout, plan: OrderPlan) -> tuple[Tensor, Tensor]:
        """(row, col) float (L,) of each input slot for the backbone's position tables (the cell of its input)."""
        cells = plan.in_cells.clamp(min=0).to(layout.cell_row.device)
        return layout.cell_row[cells].float(), layout.cell_col[cells].float()

    # ---------------------------------------------------------------- continuous orders (VAR) implement these
    def token_inputs(self, codes_bn: Tensor) -> Tensor:
        """Training: per-token inputs (B, N, d) for codes (B, N) (rows never fed may be anything)."""
        raise NotImplementedError(f"{type(self).__name__} is not a continuous order")

    def start_sampling(self) -> Any:
        """Sampling: a fresh per-call state for :meth:`step_inputs`."""
        raise NotImplementedError(f"{type(self).__name__} is not a continuous order")

    def step_inputs(self, state: Any, step: int, codes_bn: Tensor) -> tuple[Tensor, int]:
        """Sampling: the per-token inputs (B, n, d) of decoding step ``step`` ≥ 1 from the tokens drawn so far
        (``codes_bn`` (B, N)), and the token offset where they start."""
        raise NotImplementedError(f"{type(self).__name__} is not a continuous order")


register_kind("order", Order)
