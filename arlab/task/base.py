"""The task interface: what ``arlab train`` (:mod:`arlab.train`) calls on the LightningModule it trains.

A task is built as ``cls(cfg, experiment=<resolved tree>, meta=<data_meta(...)>)`` and trained by a
Lightning ``Trainer``; around that the trainer calls, and nothing else:

* :meth:`Task.upstream` (class method, before anything is built): runs that must exist first, e.g. a
  generator's tokenizer (``arlab train`` trains each missing one into its run directory);
* :meth:`Task.data_meta` (class method, with the built DataModule): the plain-dict facts about the data
  the model is sized by (vocabulary, grid, classes); stored in the checkpoint's hyper-parameters;
* ``tokens_per_sample`` (for the tokens/s scalar) and ``last_val_step`` (whether the last step was
  validated);
* for the FLOP count (:mod:`arlab.flops`, at the first training batch): :meth:`Task.flop_loss`,
  :meth:`Task.flop_sample` and :meth:`Task.analytic_flops_per_image`;
* after training, on rank 0: :meth:`Task.evaluate` (end-of-run evaluation, e.g. sample metrics),
  :meth:`Task.final_metrics` (added to ``metrics.json``) and :meth:`Task.save_artifacts`.

Hyper-parameters saved with :meth:`save_hyperparameters` must be plain dicts (a DictConfig breaks
``load_from_checkpoint`` with torch 2.14); arlab's tasks save ``{"experiment": tree, "meta": ...}``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from arlab.layers import decay_groups
from arlab.registry import register_kind
from arlab.schedules import warmup_cosine


@dataclass(frozen=True)
class Upstream:
    """A run another task needs: ``checkpoint`` is made by training ``experiment`` (with ``overrides``) into
    the checkpoint's run directory when it does not exist."""

    checkpoint: str
    experiment: str
    overrides: list[str] = field(default_factory=list)
    what: str = "upstream run"  # for messages, e.g. "tokenizer"


class Task(pl.LightningModule):
    """Base class of ``task/*`` components (the hooks the trainer calls, with their defaults)."""

    tokens_per_sample: int = 0  # tokens per training sample (0: no tokens/s scalar)
    grad_clip: float = 0.0  # max gradient norm under automatic optimization (a task sets it from its config)

    def __init__(self) -> None:
        super().__init__()
        self.last_val_step = -1  # global step of the last (non-sanity) validation

    @classmethod
    def upstream(cls, cfg: Any, experiment: Any) -> list[Upstream]:
        """Runs to train before this one (default: none)."""
        return []

    @classmethod
    def data_meta(cls, cfg: Any, datamodule: Any) -> dict[str, Any]:
        """Facts about the data the model needs at build time (default: none)."""
        return {}

    def adamw_warmup_cosine(self, module: nn.Module, lr: float, betas: list[float], weight_decay: float,
                            warmup_steps: int, lr_schedule: str, min_lr_ratio: float) -> dict[str, Any]:
        """AdamW over ``module`` (decay groups from :mod:`arlab.layers`; the fused CUDA kernel when every parameter
        is on CUDA) with warm-up and constant / cosine decay over the trainer's ``max_steps``: what
        ``configure_optimizers`` returns."""
        groups = decay_groups(module, weight_decay)
        params = [p for g in groups for p in g["params"]]
        cuda = bool(params) and all(p.is_cuda for p in params)  # the fused kernel when every parameter is on CUDA
        opt = torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=cuda or None)
        total = int(self.trainer.max_steps) if self.trainer.max_steps > 0 else 0
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(warmup_steps, total, lr_schedule, min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        if self.grad_clip > 0:
            self.clip_gradients(optimizer, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm")

    def tensorboard(self) -> SummaryWriter | None:
        """The run's TensorBoard writer on rank 0 (None without a TensorBoard logger, and on other ranks)."""
        if isinstance(self.logger, TensorBoardLogger) and self.global_rank == 0:
            return self.logger.experiment
        return None

    def flop_loss(self, batch: dict[str, Any]) -> torch.Tensor | None:
        """The training loss of ``batch`` through the parts one training step runs forward and backward, for
        counting FLOPs: no logging, no optimizer step (default None: not counted)."""
        return None

    def flop_sample(self) -> bool:
        """Draw one image as evaluation samples do, for counting its FLOPs; False when the task does not
        sample (the default)."""
        return False

    def analytic_flops_per_image(self) -> float:
        """Kaplan's ``6·N·T`` training FLOPs per image where the task defines it (default 0: undefined)."""
        return 0.0

    def evaluate(self) -> dict[str, float]:
        """End-of-training evaluation on rank 0 (default: none)."""
        return {}

    def final_metrics(self) -> dict[str, float]:
        """Extra numbers for ``metrics.json`` (default: none)."""
        return {}

    def save_artifacts(self, run: Path) -> list[Path]:
        """Files written into the run directory at the end (default: none)."""
        return []


register_kind("task", Task)
