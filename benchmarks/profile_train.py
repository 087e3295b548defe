"""Where a training step of an experiment spends its time: data, model step, and the Lightning loop around them.

    python benchmarks/profile_train.py shapes/tokenshuffle-s2            # the quickstart generator
    python benchmarks/profile_train.py shapes/tokenizer-fsq --steps 40
    python benchmarks/profile_train.py shapes/tokenshuffle-s2 --threads 1,2 --workers 0,1

For each (threads, data workers) setting, in one run on this machine:

1. ``data``: batches/s of the experiment's training loader alone (decode, shuffle buffer, collation);
2. ``step``: the task's training step on one cached batch (forward, loss, backward, optimizer step), the
   same code Lightning calls, without Lightning;
3. ``fit``: ``trainer.fit`` for ``--steps`` steps (data + step + Lightning: logging, progress bar,
   callbacks), its per-step time after the first ``--warmup`` steps;

and prints the share of a fit step that ``step`` explains (the rest is data waiting and loop overhead).

``--data-paths stream,memory,cached --rounds 2`` instead times ``trainer.fit`` steps per data path, alternating
in one process (the machine's drift hits every path alike): ``stream`` (the shard stream and its workers),
``memory`` (``data.in_memory=true``) and ``cached`` (8 real batches replayed from a list: no data cost at all).
It prints the median and mean step of each path in each round.

    python benchmarks/profile_train.py shapes/quickstart --data-paths stream,memory,cached --rounds 2

The upstream runs (the tokenizer and token shards of a generator) must exist: run the experiment once.
``--top`` prints the profiler's top operators of the model step.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from itertools import islice, product

import pytorch_lightning as pl
import torch

from arlab.config import load_experiment
from arlab.registry import get


class StepTimer(pl.Callback):
    """Wall time of every training batch from the end of the previous one (data wait included)."""

    def __init__(self) -> None:
        self.t: list[float] = []
        self.last = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self.last:
            self.last = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        self.t.append(now - self.last)
        self.last = now


def _build(name: str, overrides: list[str]):
    exp = load_experiment(name, overrides)
    task_cls = get("task", exp.tree["task"]["type"]).cls
    task_cfg = exp.config("task")
    dm = exp.build("data", seed=0)
    meta = task_cls.data_meta(task_cfg, dm)
    module = exp.build("task", experiment=exp.tree, meta=meta)
    return exp, dm, module


def time_data(dm, n: int) -> float:
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    next(it)
    t0 = time.perf_counter()
    k = sum(1 for _ in islice(it, n))
    return k / (time.perf_counter() - t0)


def time_step(exp, dm, module, n: int, top: int) -> float:
    """Seconds per training step on one cached batch, through a 1-step trainer so that the task's hooks
    (manual optimisation, schedulers) are set up exactly as in training."""
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(default_root_dir=tmp, max_steps=1, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                             num_sanity_val_steps=0)
        trainer.fit(module, datamodule=dm)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    module.train()
    module.log = module.log_dict = lambda *a, **k: None  # outside the loop Lightning has no result collection
    opt = module.optimizers()
    automatic = module.automatic_optimization

    def step() -> None:
        if automatic:
            opt.zero_grad(set_to_none=True)
            module.training_step(batch, 0).backward()
            opt.step()
        else:
            module.training_step(batch, 0)

    for _ in range(2):
        step()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    dt = (time.perf_counter() - t0) / n
    if top:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))
    return dt


DATA_PATHS = ("stream", "memory", "cached")


class Replay:
    """``n`` batches cycled from a list: a loader with no data cost (a plain list would be read by Lightning as a
    list of loaders)."""

    def __init__(self, batches: list, n: int) -> None:
        self.batches, self.n = batches, n

    def __iter__(self):
        return (self.batches[i % len(self.batches)] for i in range(self.n))

    def __len__(self) -> int:
        return self.n


def fit_step_times(name: str, overrides: list[str], steps: int, data: str = "") -> list[float]:
    """Seconds of every ``trainer.fit`` step (validation off); ``data``: "" (the experiment's loader) or one of
    :data:`DATA_PATHS`."""
    extra = {"stream": ["data.in_memory=false"], "memory": ["data.in_memory=true"]}.get(data, [])
    with tempfile.TemporaryDirectory() as tmp:
        exp, dm, module = _build(name, [*overrides, *extra, f"trainer.max_steps={steps}", f"run.dir={tmp}/run"])
        timer = StepTimer()
        trainer = pl.Trainer(default_root_dir=tmp, callbacks=[timer], enable_checkpointing=False,
                             **{**exp.trainer.lightning_kwargs(), "val_check_interval": None,
                                "check_val_every_n_epoch": 10**6, "num_sanity_val_steps": 0})
        if data == "cached":
            dm.setup("fit")
            batches = list(islice(iter(dm.train_dataloader()), 8))
            trainer.fit(module, train_dataloaders=Replay(batches, steps + 1))
        else:
            trainer.fit(module, datamodule=dm)
    return timer.t


def time_fit(name: str, overrides: list[str], steps: int, warmup: int) -> float:
    t = fit_step_times(name, overrides, steps)[warmup:]
    return sum(t) / max(1, len(t))


def compare_data_paths(name: str, overrides: list[str], paths: list[str], rounds: int, steps: int,
                       warmup: int) -> list[tuple[int, str, float, float]]:
    """(round, path, median s, mean s) of fit steps after ``warmup``, the paths alternating in each round."""
    bad = [p for p in paths if p not in DATA_PATHS]
    if bad:
        raise SystemExit(f"--data-paths: {', '.join(bad)} not in {', '.join(DATA_PATHS)}")
    rows = []
    for r in range(rounds):
        for path in paths:
            t = fit_step_times(name, overrides, steps, path)[warmup:]
            rows.append((r, path, statistics.median(t), statistics.fmean(t)))
            print(f"round {r} {path}: median {rows[-1][2] * 1000:.0f} ms, mean {rows[-1][3] * 1000:.0f} ms", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("experiment")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--steps", type=int, default=60, help="fit steps (the first --warmup not timed)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--threads", default=str(torch.get_num_threads()), help="comma list of torch thread counts")
    ap.add_argument("--workers", default="", help="comma list of data.num_workers (default: the experiment's)")
    ap.add_argument("--top", type=int, default=0, help="print the top operators of the model step")
    ap.add_argument("--data-paths", default="", help=f"comma list of {', '.join(DATA_PATHS)}: fit steps per data path")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of --data-paths")
    args = ap.parse_args()
    if args.data_paths:
        torch.set_num_threads(int(args.threads.split(",")[0]))
        rows = compare_data_paths(args.experiment, args.overrides, args.data_paths.split(","), args.rounds,
                                  args.steps, args.warmup)
        print(f"\n{args.experiment}: fit step per data path, {torch.get_num_threads()} threads, "
              f"{args.steps - args.warmup} steps timed per run")
        print("| round | data path | median (ms) | mean (ms) |")
        print("|---|---|---|---|")
        for r, path, med, mean in rows:
            print(f"| {r} | {path} | {med * 1000:.0f} | {mean * 1000:.0f} |")
        return
    rows = []
    workers = [int(w) for w in args.workers.split(",")] if args.workers else [None]
    for threads, w in product([int(t) for t in args.threads.split(",")], workers):
        torch.set_num_threads(threads)
        ov = [*args.overrides] + ([f"data.num_workers={w}"] if w is not None else [])
        exp, dm, module = _build(args.experiment, ov)
        bs = exp.tree["data"]["batch_size"]
        data_bps = time_data(dm, 30)
        step_s = time_step(exp, dm, module, 10, args.top)
        fit_s = time_fit(args.experiment, ov, args.steps, args.warmup)
        rows.append((threads, exp.tree["data"].get("num_workers"), bs, data_bps, step_s, fit_s))
    print(f"\n{args.experiment}: per training step (batch {rows[0][2]}), torch {torch.__version__}")
    print("| threads | data workers | data batches/s | model step (s) | fit step (s) | fit images/s | "
          "model step / fit step |")
    print("|---|---|---|---|---|---|---|")
    for threads, w, bs, dbps, step_s, fit_s in rows:
        print(f"| {threads} | {w} | {dbps:.1f} | {step_s:.3f} | {fit_s:.3f} | {bs / fit_s:.0f} | "
              f"{step_s / fit_s:.0%} |")


if __name__ == "__main__":
    main()
