"""``arlab train``: one experiment → one run directory (:mod:`arlab.rundir`), after its upstream runs.

The experiment's ``task`` slot names the :class:`arlab.task.base.Task` (``task/tokenizer``,
``task/generator``); its ``data`` slot the DataModule. :func:`fit` first trains every missing
upstream run the task declares (a generator's tokenizer: the chain *train the tokenizer → tokenize →
train the generator*; tokenizing happens when the token DataModule is first set up), then builds the
data, asks the task for its data meta, builds the task and trains it. A run directory that already
has ``checkpoints/last.ckpt`` is resumed (``run.resume: auto``). After training, on rank 0: the
task's :meth:`~arlab.task.base.Task.evaluate`, ``metrics.json`` and its artifacts. FLOPs per image are counted
from the model at the first training batch (:mod:`arlab.flops`).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger

from arlab.config import Experiment, load_experiment
from arlab.errors import ConfigError, Interrupted
from arlab.flops import FlopCount
from arlab.registry import get
from arlab.rundir import RunLock, check_resume_checkpoint, planned_run_dir, run_dir, run_of_checkpoint, write_metrics
from arlab.task.base import Task, Upstream

log = logging.getLogger("arlab.train")


class Throughput(pl.Callback):
    """Logs training images/s and (when the module reports ``tokens_per_sample``) tokens/s."""

    def __init__(self) -> None:
        self.t0: float | None = None
        self.samples = 0
        self.rate = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.t0 is None:
            self.t0, self.samples = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n = len(batch["label"]) if isinstance(batch, dict) and "label" in batch else 0
        self.samples += n * trainer.world_size
        if trainer.global_step % max(1, trainer.log_every_n_steps) == 0 and self.t0 is not None:
            dt = time.perf_counter() - self.t0
            if dt > 0 and self.samples:
                self.rate = self.samples / dt
                pl_module.log("perf/train_images_per_s", self.rate, rank_zero_only=True)
                tps = pl_module.tokens_per_sample if isinstance(pl_module, Task) else 0
                if tps:
                    pl_module.log("perf/train_tokens_per_s", self.rate * tps, rank_zero_only=True)
            self.t0, self.samples = time.perf_counter(), 0


class FinalCheckpoint(pl.Callback):
    """Saves ``step-<final>.ckpt`` and ``last.ckpt`` when training ends at a step that is not a multiple of
    ``checkpoint_every_n_steps``. Lightning's ModelCheckpoint (2.4–2.6) saves ``last.ckpt`` at the end only if it
    never saved one, so a 1,000-step run checkpointed every 350 steps would otherwise end with ``last.ckpt`` at
    step 700: ``arlab eval``/``sample`` and a resume would read weights 300 steps older than ``metrics.json``.
    Each file is written under a temporary name and renamed, so a kill never leaves a partial checkpoint."""

    def __init__(self, dirpath: Path):
        self.dirpath = Path(dirpath)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        final = self.dirpath / f"step-{step}.ckpt"
        if trainer.interrupted or step == 0 or final.exists():  # saved by ModelCheckpoint at this step (and last)
            return
        tmp = self.dirpath / f".{final.name}.tmp-{os.getpid()}"
        trainer.save_checkpoint(tmp)  # every rank calls it; rank 0 writes
        if trainer.is_global_zero:  # one dump, two names: last.ckpt is a copy of the final step's file
            last_tmp = self.dirpath / f".last.ckpt.tmp-{os.getpid()}"
            shutil.copyfile(tmp, last_tmp)
            os.replace(tmp, final)
            os.replace(last_tmp, self.dirpath / "last.ckpt")


def resume_path(exp: Experiment, run: Path) -> str | None:
    mode = exp.run.resume
    if mode == "never":
        return None
    if mode != "auto":
        if not Path(mode).is_file():
            raise ConfigError(f"run.resume: checkpoint '{mode}' does not exist")
        return mode
    last = run / "checkpoints" / "last.ckpt"
    return str(last) if last.exists() else None


def build_trainer(exp: Experiment, run: Path, callbacks: list[pl.Callback] | None = None) -> pl.Trainer:
    t = exp.trainer
    # no version counter: a last.ckpt from elsewhere is replaced, never shadowed by a last-v1.ckpt
    ckpt = ModelCheckpoint(dirpath=run / "checkpoints", filename="step-{step}", save_last=True, save_top_k=-1,
                           every_n_train_steps=t.checkpoint_every_n_steps, auto_insert_metric_name=False,
                           enable_version_counter=False)
    logger = TensorBoardLogger(save_dir=str(run), name="", version="tb", default_hp_metric=False)
    cbs: list[pl.Callback] = [ckpt, FinalCheckpoint(run / "checkpoints"), LearningRateMonitor(logging_interval="step"),
                              Throughput()]
    kwargs = t.lightning_kwargs()
    if t.precision != kwargs["precision"]:
        log.info("trainer.precision %s: %s on this machine", t.precision, kwargs["precision"])
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*isinstance.treespec, LeafSpec.*")
    # Lightning prints a code example at each periodic checkpoint of a manual-optimisation task (the tokenizer):
    # arlab means step-N.ckpt to hold the weights after N optimizer steps, as the other tasks' checkpoints do
    warnings.filterwarnings("ignore", ".*ModelCheckpoint with manual optimization.*")
    return pl.Trainer(default_root_dir=str(run), logger=logger, callbacks=cbs + (callbacks or []),
                      use_distributed_sampler=False, enable_model_summary=True, **kwargs)


def train_upstream(up: Upstream, exp: Experiment) -> None:
    """Train the experiment an upstream checkpoint comes from into that checkpoint's run directory."""
    run = run_of_checkpoint(up.checkpoint)
    log.info("%s %s missing: training %s into %s first", up.what, up.checkpoint, up.experiment, run)
    overrides = [*up.overrides, f"run.dir={run}", f"trainer.enable_progress_bar={exp.trainer.enable_progress_bar}"]
    fit(load_experiment(up.experiment, overrides))
    if not Path(up.checkpoint).is_file():
        raise ConfigError(f"training {up.experiment} did not produce '{up.checkpoint}'")


def fit(exp: Experiment, callbacks: list[pl.Callback] | None = None) -> dict[str, Any]:
    """Train ``exp`` to ``trainer.max_steps`` (after its missing upstream runs); returns the final metrics
    (also in metrics.json). The run directory is locked while it trains; Ctrl-C raises
    :class:`~arlab.errors.Interrupted` naming the command that resumes the run."""
    if not exp.has("task"):
        raise ConfigError(f"experiment '{exp.name}' has no 'task' (what to train: e.g. task: tokenizer)")
    if not exp.has("data"):
        raise ConfigError(f"experiment '{exp.name}' has no 'data'")
    with RunLock(planned_run_dir(exp)):
        return _fit_locked(exp, callbacks)


def _fit_locked(exp: Experiment, callbacks: list[pl.Callback] | None) -> dict[str, Any]:
    task_cls = get("task", exp.tree["task"]["type"]).cls
    task_cfg = exp.config("task")
    run = run_dir(exp)
    ckpt_path = resume_path(exp, run)
    if ckpt_path:
        check_resume_checkpoint(ckpt_path, exp.tree["task"]["type"])  # readable, same task: before training
    for up in task_cls.upstream(task_cfg, exp):
        train_upstream(up, exp)
    pl.seed_everything(exp.run.seed, workers=True, verbose=False)
    datamodule = exp.build("data", seed=exp.run.seed)
    meta = task_cls.data_meta(task_cfg, datamodule)  # may make the data first (e.g. tokenize): that draws RNG
    pl.seed_everything(exp.run.seed, workers=True, verbose=False)  # so the model's init depends on the seed alone
    module: Task = exp.build("task", experiment=exp.tree, meta=meta)
    flops = FlopCount(run)
    trainer = build_trainer(exp, run, [flops, *(callbacks or [])])
    if ckpt_path:
        log.info("resuming from %s", ckpt_path)
    t0 = time.perf_counter()
    try:
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        except SystemExit:  # Lightning exits(1) after a graceful shutdown on Ctrl-C
            if not trainer.interrupted:
                raise
        if trainer.interrupted:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # Lightning ignores further Ctrl-C
            raise Interrupted(f"interrupted at step {trainer.global_step}; resume with: arlab train "
                              f"{run / 'config.yaml'}")
        wall = time.perf_counter() - t0
        # the training scalars (train/*, perf/*) first: a trainer.validate() call resets callback_metrics to its own
        metrics: dict[str, Any] = {k: v for k, v in trainer.callback_metrics.items()}
        validated_last = module.last_val_step == trainer.global_step
        if datamodule.val_dataloader() != [] and trainer.limit_val_batches and not validated_last:
            trainer.validate(module, datamodule=datamodule, verbose=False)  # final metrics at the last step
            metrics.update(trainer.callback_metrics)
        metrics["train/steps"] = trainer.global_step
        metrics["train/wall_s"] = wall
        metrics.update(flops.metrics(trainer.global_step))
        if trainer.is_global_zero:
            metrics.update(module.evaluate())
            metrics.update(module.final_metrics())
            write_metrics(run, metrics)
            for path in module.save_artifacts(run):
                log.info("wrote %s", path)
    finally:
        # gloo aborts at exit if its process group is still alive
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    log.info("run directory: %s", run)
    return metrics
