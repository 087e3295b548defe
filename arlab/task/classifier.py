"""``task/classifier``: trains the small CNN of ``features/classifier`` on an image set's class labels.

The trained checkpoint is a feature network (:class:`arlab.features.classifier.ClassifierFeatures`):
penultimate features for a cheap FID/KID/precision-recall and logits for class accuracy and the
Inception Score of generated images. Cross-entropy (optional label smoothing; images whose label is −1
are ignored), AdamW with decay on conv/linear weights only, linear warm-up then cosine. Logs
``train/loss``, ``train/acc``, ``val/loss``, ``val/acc`` (the validation split, ``test`` by default:
over the whole split when ``trainer.limit_val_batches`` is 1.0); :meth:`final_metrics` reports the last
``val/acc`` and ``val/loss``.

Hyper-parameters: ``{"experiment": tree, "meta": data facts, "net": SmallCNN arguments}`` (plain dicts),
so the feature network rebuilds the CNN from the checkpoint alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from arlab.config import validate_component
from arlab.data.datamodule import ShardDataModule
from arlab.errors import ConfigError
from arlab.features.classifier import SmallCNN
from arlab.registry import register
from arlab.task.base import Task


@register("task", "classifier")
class ClassifierModule(Task):
    """Train a small CNN classifier on image labels (the features/classifier network): CE, AdamW."""

    @dataclass
    class Config:
        widths: list[int] = field(default_factory=lambda: [32, 64, 128])  # channels of the conv blocks
        depth: int = 2  # 3x3 convs per block (then a 2x2 max-pool)
        feature_dim: int = 128  # penultimate (feature) width
        dropout: float = 0.1  # before the classifier layer
        lr: float = 2e-3  # peak AdamW learning rate
        betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
        weight_decay: float = 0.05  # on conv and linear weights (not norms, biases)
        warmup_steps: int = 100
        lr_schedule: str = "cosine"  # after warm-up: cosine (to min_lr_ratio·lr) or constant
        min_lr_ratio: float = 0.05
        label_smoothing: float = 0.0
        grad_clip: float = 1.0  # max grad norm (0 disables)

        def __post_init__(self) -> None:
            if not self.widths or min(self.widths) < 1 or self.feature_dim < 1 or self.depth < 1:
                raise ConfigError(f"widths must be a non-empty list of positive channels, depth and feature_dim "
                                  f"positive, got {self.widths}, {self.depth}, {self.feature_dim}")
            if self.lr_schedule not in ("cosine", "constant"):
                raise ConfigError(f"lr_schedule {self.lr_schedule!r} is not one of cosine, constant")
            if len(self.betas) != 2:
                raise ConfigError(f"betas must be two numbers, got {self.betas}")

        def check(self, exp) -> None:
            if not exp.has("data"):
                raise ConfigError("task 'classifier' needs a 'data' slot (an image set with labels, e.g. data: shapes)")

    @classmethod
    def data_meta(cls, cfg: Config, datamodule: Any) -> dict[str, Any]:
        if not isinstance(datamodule, ShardDataModule):
            raise ConfigError(f"task 'classifier' trains on image shards (data: shapes, shards, ...), not on "
                              f"{type(datamodule).__name__}")
        datamodule.setup()
        return {"num_classes": datamodule.num_classes, "classes": datamodule.classes,
                "dataset": datamodule.manifest["name"], "image_size": int(datamodule.cfg.image_size)}

    def __init__(self, cfg: Config | None = None, experiment: dict[str, Any] | None = None,
                 meta: dict[str, Any] | None = None, net: dict[str, Any] | None = None):
        # net: the saved SmallCNN arguments (passed back by load_from_checkpoint); rebuilt here from cfg and meta
        super().__init__()
        if experiment is None or meta is None:
            raise ConfigError("ClassifierModule needs the experiment config and the data meta (experiment=, meta=)")
        self.cfg = cfg if cfg is not None else validate_component("task", experiment["task"])[1]
        self.grad_clip = self.cfg.grad_clip
        if meta["num_classes"] < 2:
            raise ConfigError(f"task 'classifier' needs at least 2 classes; {meta.get('dataset')} has "
                              f"{meta['num_classes']}")
        c = self.cfg
        self.net = SmallCNN(meta["num_classes"], c.widths, c.feature_dim, c.dropout, meta["image_size"], c.depth)
        self.save_hyperparameters({"experiment": experiment, "meta": meta, "net": self.net.args})
        self.meta = meta
        self.last_val: dict[str, float] = {}

    def configure_optimizers(self):
        c = self.cfg  # decay on >= 2-D weights except those a component marks exempt; a bound msvq is frozen
        return self.adamw_warmup_cosine(self.net, c.lr, c.betas, c.weight_decay, c.warmup_steps, c.lr_schedule,
                                        c.min_lr_ratio)

    def _step(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor, int]:
        y = batch["label"]
        logits = self.net(batch["image"])[1]
        loss = F.cross_entropy(logits, y, ignore_index=-1, label_smoothing=self.cfg.label_smoothing)
        known = y >= 0
        acc = (logits.argmax(-1)[known] == y[known]).float().mean() if known.any() else torch.zeros(())
        return loss, acc, int(known.sum())

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss, acc, n = self._step(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite classifier loss at step {self.global_step} (batch {batch_idx})")
        self.log_dict({"train/loss": loss.detach(), "train/acc": acc}, batch_size=max(n, 1))
        self.log("acc", acc, prog_bar=True, logger=False, batch_size=max(n, 1))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss, acc, n = self._step(batch)
        if n:
            self.log_dict({"val/loss": loss, "val/acc": acc}, batch_size=n, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.last_val_step = self.global_step
        self.last_val = {k: float(v) for k, v in self.trainer.callback_metrics.items()
                         if k in ("val/acc", "val/loss")}

    def final_metrics(self) -> dict[str, float]:
        return dict(self.last_val)
