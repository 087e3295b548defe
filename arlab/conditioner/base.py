"""The conditioner interface: what a generator is conditioned on (class labels, captions), as model inputs.

A conditioner turns a condition tensor ``cond`` (labels (B,), caption ids (B, P), ...) into
``(prefix_bpd, vec_bd, valid_bp)``: P prefix tokens placed before the image tokens, one vector for
adaLN backbones, and a key-validity mask (None when every prefix token is real). It also knows its
null condition (classifier-free guidance), its training-time CFG dropout, how to read the condition
from a data batch, and how to ask for a class.

Text conditioners additionally set ``accepts_text = True`` and implement :meth:`encode` /
:meth:`decode`; ``needs_captions`` says the dataset must carry captions (or the conditioner a
class template to make them).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor, nn

from arlab.errors import ConfigError
from arlab.registry import register_kind


class Conditioner(nn.Module, ABC):
    """Base class of ``conditioner/*`` components. Constructed as ``cls(cfg, dim=d, num_classes=K)``."""

    registry_key: str = "conditioner/<unregistered>"  # set by @register
    prefix_len: int = 1  # P, prefix tokens per condition
    accepts_text: bool = False  # encode()/decode() captions

    @abstractmethod
    def forward(self, cond: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """``cond`` → (prefix (B, P, d), adaLN vector (B, d), valid keys (B, P) bool or None)."""

    @abstractmethod
    def null_like(self, cond: Tensor) -> Tensor:
        """The null (unconditional) condition, shaped like ``cond``."""

    @abstractmethod
    def drop(self, cond: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Training-time CFG dropout: some conditions replaced by the null one."""

    @abstractmethod
    def check(self, cond: Tensor) -> None:
        """Raise ValueError when ``cond`` is not a valid condition for this conditioner."""

    @abstractmethod
    def from_batch(self, batch: dict, classes: list[str] | None = None) -> Tensor:
        """The condition of a data batch (``label``, ``caption``, ``key``)."""

    @abstractmethod
    def from_labels(self, labels_b: Tensor, classes: list[str] | None = None) -> Tensor:
        """The condition that asks for classes ``labels_b`` (evaluation, ``arlab sample --classes``)."""

    def encode(self, prompts: list[str]) -> Tensor:
        """Captions → condition (text conditioners)."""
        raise ConfigError(f"conditioner {self.registry_key} is conditioned on "
                          "class labels, not text; give classes instead of prompts")

    def decode(self, cond: Tensor) -> list[str]:
        """Condition → captions (text conditioners)."""
        raise ConfigError(f"conditioner {self.registry_key} has no captions")

    def prompts_for_labels(self, labels_b: Tensor, classes: list[str] | None) -> tuple[Tensor, list[str] | None]:
        """The condition asking for ``labels_b`` and, for text conditioners, its prompts."""
        cond = self.from_labels(labels_b, classes)
        return cond, (self.decode(cond) if self.accepts_text else None)

    @classmethod
    def check_data(cls, cfg: Any, data_node: dict) -> None:
        """Config-time check of the data slot (e.g. captions present); default: none."""


register_kind("conditioner", Conditioner)
