"""Training and sampling FLOPs counted from the model itself, with ``torch.utils.flop_counter``.

At the first training batch (also after a resume), :class:`FlopCount` runs one extra forward and backward
of the task's model on the first ``probe_images`` samples of that batch (the training batch shape, fewer
rows) under :class:`~torch.utils.flop_counter.FlopCounterMode` and divides by the rows: the training
FLOPs per image (``flops/train_per_image``, forward + backward). The task says what that pass is
(:meth:`arlab.task.base.Task.flop_loss`: a generator's conditioner, backbone and heads on the token
sequence; a tokenizer's autoencoder and quantizer, without perceptual net and discriminator). Where
the task can sample (:meth:`~arlab.task.base.Task.flop_sample`), one full sampling of one image at the
run's sampling settings is counted as well (``flops/sample_per_image``, decoding to pixels included).
The probe changes nothing: gradients, buffers (e.g. EMA codebooks) and the RNG are restored after it.

Counted are matrix products, convolutions and attention (the counter's convention: elementwise work
is not counted; attention scores count in full whatever the mask). CPU's fused attention kernel is
added here (torch counts only the CUDA ones). For comparison the task's analytic Kaplan estimate
``6·N·T`` (N: parameters outside embedding tables, T: positions per image the backbone runs) is kept as
``flops/analytic_6nt_per_image``.

Training FLOPs so far at step ``k`` are ``k · images_per_step · train_per_image``
(``images_per_step``: batch × ranks × accumulation). ``<run>/checkpoints/flops.json`` holds the
per-image numbers and the value at every saved checkpoint's step; ``metrics.json`` gets
``flops/train_total`` at the end.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils import flop_counter as fc

from arlab.task.base import Task
from arlab.utils import atomic_write

SIDECAR = "flops.json"
_aten = torch.ops.aten


def _cpu_attention(q, k, v, *args, out_shape=None, **kwargs) -> int:
    return fc.sdpa_flop_count(q, k, v)


def _cpu_attention_backward(grad_out, q, k, v, *args, out_shape=None, **kwargs) -> int:
    return fc.sdpa_backward_flop_count(grad_out, q, k, v)


CUSTOM = {_aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention,
          _aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward}


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of the matrix products, convolutions and attention ``fn()`` runs (forward and, if it calls
    ``backward``, backward)."""
    mode = fc.FlopCounterMode(display=False, custom_mapping=CUSTOM)
    with mode:
        fn()
    return int(mode.get_total_flops())


def slice_batch(batch: Any, n: int) -> Any:
    """The first ``n`` samples of a collated batch (a dict of tensors and lists, or a tensor / list)."""
    if isinstance(batch, Mapping):
        return {k: slice_batch(v, n) for k, v in batch.items()}
    if isinstance(batch, (torch.Tensor, list, tuple)):
        return batch[:n]
    return batch


def batch_rows(batch: Any) -> int:
    """Samples in a collated batch: the length of its first tensor."""
    if isinstance(batch, Mapping):
        return next((batch_rows(v) for v in batch.values() if isinstance(v, (torch.Tensor, Mapping))), 0)
    return len(batch) if isinstance(batch, torch.Tensor) and batch.ndim else 0


def side_effect_free(module: nn.Module, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` and restore ``module``'s gradients, parameter values, buffers and the RNG (CPU and the
    module's device) as they were: a probe leaves the training trajectory unchanged. Parameter values too,
    because some forwards write them in place (a VQ codebook's EMA update or dead-code restart); the copy
    is made at the first batch, before the optimizer has allocated its state."""
    params = list(module.parameters())
    grads = [p.grad for p in params]
    for p in params:
        p.grad = None
    buffers = {n: b.detach().clone() for n, b in module.named_buffers()}
    values = [p.detach().clone() for p in params]
    device = next(iter(params), torch.empty(0)).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            return fn()
        finally:
            for p, g in zip(params, grads):
                p.grad = g
            with torch.no_grad():
                for p, v in zip(params, values):
                    p.copy_(v)
                for n, b in module.named_buffers():
                    if n in buffers:
                        b.copy_(buffers[n])


def train_flops_per_image(task: Task, batch: Any, probe_images: int = 2) -> float | None:
    """Forward + backward FLOPs of the task's :meth:`~arlab.task.base.Task.flop_loss` per image, counted
    on the first ``probe_images`` samples of ``batch``; None when the task does not say its pass."""
    n = min(probe_images, batch_rows(batch))
    if n < 1:
        return None
    small = slice_batch(batch, n)
    found: list[bool] = []

    def step() -> None:
        loss = task.flop_loss(small)
        found.append(loss is not None)
        if loss is not None:
            loss.backward()

    flops = side_effect_free(task, lambda: count_flops(step))
    return flops / n if found and found[0] else None


def sample_flops_per_image(task: Task) -> float | None:
    """FLOPs of one full sampling of one image (the task's :meth:`~arlab.task.base.Task.flop_sample`)."""
    found: list[bool] = []
    flops = side_effect_free(task, lambda: count_flops(lambda: found.append(task.flop_sample())))
    return float(flops) if found and found[0] else None


class FlopCount(pl.Callback):
    """Counts the FLOPs per image at the first training batch; writes ``checkpoints/flops.json`` and gives
    the ``flops/*`` entries of ``metrics.json`` (:meth:`metrics`). Its numbers travel in the checkpoint, so a
    resumed run that trains no further step still reports them."""

    def __init__(self, run: str | Path, probe_images: int = 2):
        self.path = Path(run) / "checkpoints" / SIDECAR
        self.probe_images = probe_images
        self.info: dict[str, Any] = {}
        self.counted = False
        self.at_step: dict[str, float] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.counted or not isinstance(pl_module, Task):
            return
        self.counted = True
        per_image = train_flops_per_image(pl_module, batch, self.probe_images)
        if per_image is None:
            return
        rows = batch_rows(batch)
        images_per_step = rows * trainer.world_size * trainer.accumulate_grad_batches
        self.info = {"train_per_image": per_image, "images_per_step": images_per_step,
                     "train_per_step": per_image * images_per_step,
                     "analytic_6nt_per_image": float(pl_module.analytic_flops_per_image()),
                     "probe_images": min(self.probe_images, rows)}
        sample = sample_flops_per_image(pl_module)
        if sample is not None:
            self.info["sample_per_image"] = sample
        if trainer.is_global_zero:
            self._write()

    def train_total(self, step: int) -> float:
        return float(step) * float(self.info["train_per_step"])

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if self.info:
            self.at_step[str(trainer.global_step)] = self.train_total(trainer.global_step)
            if trainer.is_global_zero:
                self._write()

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        body = {**self.info, "train_at_step": dict(sorted(self.at_step.items(), key=lambda kv: int(kv[0])))}
        atomic_write(self.path, json.dumps(body, indent=2, sort_keys=True) + "\n")

    def state_dict(self) -> dict[str, Any]:
        return {"info": dict(self.info), "at_step": dict(self.at_step)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.info = dict(state_dict.get("info", {}))
        self.at_step = dict(state_dict.get("at_step", {}))

    def metrics(self, step: int) -> dict[str, float]:
        """``flops/*`` for ``metrics.json`` at global step ``step`` (empty when nothing was counted)."""
        if not self.info:
            return {}
        out = {f"flops/{k}": float(v) for k, v in self.info.items() if k != "probe_images"}
        out["flops/train_total"] = self.train_total(step)
        return {k: v for k, v in out.items() if math.isfinite(v)}


def read_sidecar(run: str | Path) -> dict[str, Any]:
    """``<run>/checkpoints/flops.json`` (empty when absent or unreadable)."""
    path = Path(run) / "checkpoints" / SIDECAR
    try:
        body = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return body if isinstance(body, dict) else {}
