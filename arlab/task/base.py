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
from pytorch_lightning.plugins.precision import MixedPrecision
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from arlab.layers import decay_groups
from arlab.optim import MuonAdamW, muon_group, split_hidden
from arlab.registry import register_kind
from arlab.schedules import warmup_cosine


def fused_ok(params: list[torch.Tensor]) -> bool:
    """Whether Adam/AdamW can take ``fused=True`` for ``params``: all on CUDA or all on the CPU (torch's fused CPU
    kernel), floating point. One kernel per step instead of a loop over tensors: on 2 CPU cores, 1.35 ms against
    4.26 ms per AdamW step of the quickstart generator's 2.33M parameters (benchmarks/bench_optimizer.py), about
    2.5% of its training step."""
    if not params or any(not p.is_floating_point() for p in params):
        return False
    return all(p.is_cuda for p in params) or all(p.device.type == "cpu" for p in params)


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
                            warmup_steps: int, lr_schedule: str, min_lr_ratio: float,
                            muon: dict[str, float] | None = None) -> dict[str, Any]:
        """AdamW over ``module`` (decay groups from :mod:`arlab.layers`; the fused kernel, :meth:`fused_optimizer`) with
        warm-up and constant / cosine decay over the trainer's ``max_steps``: what ``configure_optimizers`` returns.
        ``muon`` (``lr``, ``momentum``, ``weight_decay``): the hidden matrices on Muon instead, in one
        :class:`arlab.optim.MuonAdamW` (:func:`arlab.optim.split_hidden`); the schedule scales both rules."""
        groups = decay_groups(module, weight_decay)
        hidden: list[nn.Parameter] = []
        if muon is not None:
            hidden = split_hidden(module)[0]
            ids = {id(p) for p in hidden}
            for g in groups:
                g["params"] = [p for p in g["params"] if id(p) not in ids]
        params = hidden + [p for g in groups for p in g["params"]]
        fused = self.fused_optimizer(params) or None
        if muon is not None:
            groups = [muon_group(hidden, muon["lr"], muon["momentum"], muon["weight_decay"]),
                      *(g for g in groups if g["params"])]
            opt: torch.optim.Optimizer = MuonAdamW(groups, lr=lr, betas=tuple(betas), fused=fused)
        else:
            opt = torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=fused)
        total = int(self.trainer.max_steps) if self.trainer.max_steps > 0 else 0
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(warmup_steps, total, lr_schedule, min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        self.clip_grad_norm(optimizer, self.grad_clip or gradient_clip_val or 0.0)

    def fused_optimizer(self, params: list[torch.Tensor]) -> bool:
        """:func:`fused_ok`, except under ``16-mixed``: its GradScaler would leave the gradients scaled when they
        are clipped (a fused kernel unscales inside its step)."""
        trainer = self._trainer
        return fused_ok(params) and not (trainer is not None and trainer.precision == "16-mixed")

    def clip_grad_norm(self, optimizer: torch.optim.Optimizer, max_norm: float) -> None:
        """Clip the gradients of ``optimizer``'s parameters to total norm ``max_norm`` (0: no clipping). Under bf16
        autocast (no GradScaler: the gradients are the true ones) they are clipped here, because Lightning's
        ``clip_gradients`` refuses fused optimizers under any mixed precision, bf16 included; elsewhere Lightning
        clips."""
        if max_norm <= 0:
            return
        plugin = self._trainer.precision_plugin if self._trainer is not None else None
        if isinstance(plugin, MixedPrecision) and plugin.scaler is None:  # bf16 autocast, one device or DDP
            params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, max_norm)
        else:  # float32, 16-mixed (Lightning unscales first), sharded strategies (their own norm)
            self.clip_gradients(optimizer, gradient_clip_val=max_norm, gradient_clip_algorithm="norm")

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
