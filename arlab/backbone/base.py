"""The backbone interface: a sequence model over the generator's input sequence, with a decode state.

A backbone maps ``x_bld`` (B, L, d) to hidden states ``h_bld`` (B, L, d) (final norm applied). The
generator calls nothing else than what :class:`Backbone` declares:

* **capabilities**, checked at config time against the order (:meth:`Backbone.capabilities`, a class
  method of the Config, so nothing is built): which attention structures it honours
  (:data:`CAUSAL` — each position sees itself and earlier ones; :data:`BLOCK_CAUSAL` — positions fed
  in one decoding step see each other, contiguous steps, VAR; :data:`ARBITRARY` — any boolean mask,
  e.g. NAR's proximity mask over a raster sequence), which conditioning modes (``prefix`` tokens,
  ``adaln`` modulation) and whether it can grow a :meth:`branch` (NAR's second head);
* :meth:`position_tables`: per-position tables (e.g. 2D RoPE cos/sin), each with the positions as its
  first dimension so the generator can index them per decoding step; ``()`` when none are used;
* :meth:`forward` for training (the whole sequence and its mask);
* a **decode state** for sampling, which a KV cache and a recurrent state both implement:
  :meth:`init_state` (preallocated, constant shapes), :meth:`prefill` (a block of new positions
  — the condition, a Token-Shuffle window, a whole next-scale step — written into the state) and
  :meth:`step` (one new position; by default a one-position prefill).

``mask`` conventions: ``None`` means plain causal over the given positions; otherwise a bool tensor
(Lq, S) or (B, 1, Lq, S), True = may attend; with a state, S is the state's maximum length and
``pos_l`` (Lq,) gives the absolute positions of the new inputs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from arlab.errors import ConfigError
from arlab.registry import register_kind

CAUSAL, BLOCK_CAUSAL, ARBITRARY = "causal", "block_causal", "arbitrary"
ATTENTION_STRUCTURES = (CAUSAL, BLOCK_CAUSAL, ARBITRARY)  # each needs the ones before it


@dataclass(frozen=True)
class Capabilities:
    """What a backbone (with a given config) can serve."""

    attention: frozenset[str] = frozenset({CAUSAL})  # attention structures it honours
    cond_modes: frozenset[str] = frozenset({"prefix"})  # prefix tokens and/or adaln modulation
    cond_mode: str = "prefix"  # the one this config uses
    branch: bool = False  # can grow extra layers for a second head (NAR)
    notes: dict[str, str] = field(default_factory=dict)  # structure → how to get it ("use backbone/hybrid")


class DecodeState:
    """Whatever a backbone keeps between decoding calls (a KV cache per layer, a recurrent state).

    Created by :meth:`Backbone.init_state` with every buffer preallocated for ``max_len`` positions;
    the backbone alone reads and writes it. ``nbytes`` reports its memory (per the whole batch)."""

    def tensors(self) -> list[Tensor]:
        return [t for t in vars(self).values() if isinstance(t, Tensor)] + [
            t for v in vars(self).values() if isinstance(v, (list, tuple)) for x in v
            for t in (x.tensors() if isinstance(x, DecodeState) else [x] if isinstance(x, Tensor) else [])]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


class Backbone(nn.Module, ABC):
    """Base class of ``backbone/*`` components (see the module docstring for the contract)."""

    dim: int  # model width d
    registry_key: str = "backbone/<unregistered>"  # set by @register

    @classmethod
    @abstractmethod
    def capabilities(cls, cfg: Any) -> Capabilities:
        """What this backbone class can serve with config ``cfg`` (called before anything is built)."""

    @property
    def caps(self) -> Capabilities:
        return self.capabilities(self.cfg)  # type: ignore[attr-defined]

    @property
    def cond_mode(self) -> str:
        return self.caps.cond_mode

    def position_tables(self, rows: Tensor, cols: Tensor, identity: Tensor) -> tuple[Tensor, ...]:
        """Per-position tables for positions (rows, cols) (L,) float; ``identity`` (L,) bool marks condition
        tokens (no position). Each table has L as its first dimension. Default: none."""
        return ()

    def prepare_mask(self, mask_ss: Tensor) -> Any:
        """A fixed (S, S) training mask in the form this backbone's attention kernel takes (e.g. a flex
        attention BlockMask); the caller builds it once and passes it to :meth:`forward` as ``mask``.
        Default: the boolean mask itself."""
        return mask_ss

    def branch(self, depth: int) -> Backbone:
        """``depth`` more layers fed the trunk's pre-norm stream (``forward(..., return_trunk=True)``), with
        their own final norm: NAR's extra layers before the second head."""
        raise ConfigError(f"{type(self).__name__} cannot grow a branch of extra layers (a second prediction "
                          "head); use a backbone whose capabilities include branch")

    @abstractmethod
    def forward(self, x_bld: Tensor, pos: tuple[Tensor, ...], mask: Tensor | None = None,
                cond_bd: Tensor | None = None, return_trunk: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Training / full-sequence pass: ``x_bld`` (B, L, d) → ``h_bld`` (B, L, d); with ``return_trunk``
        also the last layer's output before the final norm (the input of a :meth:`branch`)."""

    @abstractmethod
    def init_state(self, batch: int, max_len: int, dtype: torch.dtype, device: torch.device) -> DecodeState:
        """A fresh decode state for ``batch`` sequences of at most ``max_len`` positions."""

    @abstractmethod
    def prefill(self, x_bld: Tensor, state: DecodeState, pos_l: Tensor, pos: tuple[Tensor, ...],
                mask: Tensor | None, cond_bd: Tensor | None = None,
                return_trunk: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Feed a block of L new positions ``pos_l`` (L,) (absolute, ascending) through the model, updating
        ``state``; ``mask`` (L, S) / (B, 1, L, S) says what each new position sees among all S state
        positions. Returns their hidden states (B, L, d) (and the trunk, as :meth:`forward`)."""

    def step(self, x_b1d: Tensor, state: DecodeState, pos_l: Tensor, pos: tuple[Tensor, ...],
             mask: Tensor | None, cond_bd: Tensor | None = None,
             return_trunk: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """One new position (B, 1, d): a one-position :meth:`prefill` unless the backbone has a faster path."""
        return self.prefill(x_b1d, state, pos_l, pos, mask, cond_bd, return_trunk)


def check_serves(backbone_cls: type[Backbone], backbone_cfg: Any, *, attention: str, heads: int,
                 cond_mode_needed: str | None = None, order_name: str = "", backbone_name: str = "") -> None:
    """A ConfigError, naming both components, when a backbone cannot serve an order's needs."""
    caps = backbone_cls.capabilities(backbone_cfg)
    bname = backbone_name or backbone_cls.registry_key
    if attention not in caps.attention:
        hint = caps.notes.get(attention, "")
        raise ConfigError(f"order {order_name} needs {attention} attention, which backbone {bname} cannot honour "
                          f"(it serves {', '.join(sorted(caps.attention))}){'; ' + hint if hint else ''}")
    if heads > 1 and not caps.branch:
        raise ConfigError(f"order {order_name} predicts with {heads} heads and needs a backbone that can grow a "
                          f"branch of extra layers; backbone {bname} cannot")
    if cond_mode_needed and cond_mode_needed not in caps.cond_modes:
        raise ConfigError(f"backbone {bname} does not support cond_mode {cond_mode_needed}")


register_kind("backbone", Backbone)
