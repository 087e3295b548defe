"""``conditioner/class``: class-label conditioning with a null class for classifier-free guidance.

LlamaGen ``LabelEmbedder``: ``nn.Embedding(num_classes + 1, d)``; in training each label is
replaced by the null class ``num_classes`` with probability ``dropout`` (0.1), so one model learns
p(x | c) and p(x). Gives one prefix token (B, 1, d) and the adaLN vector (B, d).

The conditioner interface (``conditioner/*``): ``from_batch(batch, classes)`` → the condition tensor
``cond`` of a batch; ``forward(cond)`` → (prefix (B, P, d), adaLN vector (B, d), key validity (B, P)
bool or None); ``drop`` (training CFG dropout), ``null_like``, ``check``, ``prefix_len``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from arlab.conditioner.base import Conditioner
from arlab.errors import ConfigError
from arlab.registry import register


@register("conditioner", "class")
class ClassConditioner(Conditioner):
    """Class label → one prefix token and an adaLN vector; null class num_classes; label dropout for CFG."""

    @dataclass
    class Config:
        num_classes: int = 0  # 0 = from the dataset's manifest
        dropout: float = 0.1  # probability of replacing a training label by the null class (LlamaGen 0.1)

        def __post_init__(self) -> None:
            if self.num_classes < 0:
                raise ConfigError(f"num_classes {self.num_classes} must be >= 0 (0 = from the dataset)")
            if not 0 <= self.dropout < 1:
                raise ConfigError(f"dropout {self.dropout} must be in [0, 1)")

    prefix_len = 1

    def __init__(self, cfg: Config, dim: int, num_classes: int):
        super().__init__()
        if cfg.num_classes and cfg.num_classes != num_classes:
            raise ConfigError(f"conditioner.num_classes={cfg.num_classes} but the dataset has {num_classes} classes")
        self.cfg, self.num_classes = cfg, num_classes
        self.embedding = nn.Embedding(num_classes + 1, dim)
        nn.init.normal_(self.embedding.weight, std=0.02)

    @property
    def null(self) -> int:
        return self.num_classes

    def check(self, labels_b: Tensor) -> None:
        bad = (labels_b < 0) | (labels_b > self.num_classes)
        if bool(bad.any()):
            raise ValueError(f"class labels {labels_b[bad].unique().tolist()} are outside 0..{self.num_classes - 1} "
                             f"(null class {self.num_classes})")

    def drop(self, labels_b: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Training-time CFG dropout: each label becomes the null class with probability ``dropout``."""
        if self.cfg.dropout <= 0:
            return labels_b
        u = torch.rand(labels_b.shape, device=labels_b.device, generator=generator)
        return torch.where(u < self.cfg.dropout, torch.full_like(labels_b, self.null), labels_b)

    def forward(self, labels_b: Tensor) -> tuple[Tensor, Tensor, None]:
        """Labels (B,) (null allowed) → (prefix tokens (B, 1, d), adaLN vector (B, d), no padding)."""
        e = self.embedding(labels_b)
        return e[:, None], e, None

    def from_batch(self, batch: dict, classes: list[str] | None = None) -> Tensor:
        return batch["label"]

    def from_labels(self, labels_b: Tensor, classes: list[str] | None = None) -> Tensor:
        """The condition that asks for classes ``labels_b`` (for evaluation and ``arlab sample``)."""
        return labels_b

    def null_like(self, labels_b: Tensor) -> Tensor:
        return torch.full_like(labels_b, self.null)
