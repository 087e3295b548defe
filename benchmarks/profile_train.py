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

``--variant OVERRIDES`` (repeatable) does the same for configurations: the fit steps of each variant, alternating.

    python benchmarks/profile_train.py shapes/tokenizer-quick --variant "" --variant "tokenizer.autoencoder.attn=false"

The upstream runs (the tokenizer and token shards of a generator) must exist: run the experiment once.
``--top`` prints the profiler's top operators of the model step; ``--by-shape`` splits them by input shape (which
layer's convolution or matrix product the time is in).
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


def time_step(exp, dm, module, n: int, top: int, by_shape: bool = False) -> float:
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
        with profile(activities=[ProfilerActivity.CPU], record_shapes=by_shape) as prof:
            for _ in range(3):
                step()
        print(prof.key_averages(group_by_input_shape=by_shape).table(
            sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=48, max_shapes_column_width=72))
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
    return alternate(name, {p: (overrides, p) for p in paths}, rounds, steps, warmup)


def alternate(name: str, variants: dict[str, tuple[list[str], str]], rounds: int, steps: int,
              warmup: int) -> list[tuple[int, str, float, float]]:
    """(round, label, median s, mean s) of fit steps after ``warmup``; ``variants`` maps a label to (overrides,
    data path), run in turn in every round, so that the machine's drift hits each alike."""
    rows = []
    for r in range(rounds):
        for label, (ov, path) in variants.items():
            t = fit_step_times(name, ov, steps, path)[warmup:]
            rows.append((r, label, statistics.median(t), statistics.fmean(t)))
            print(f"round {r} {label}: median {rows[-1][2] * 1000:.0f} ms, mean {rows[-1][3] * 1000:.0f} ms",
                  flush=True)
    return rows


def print_rounds(title: str, head: str, rows: list[tuple[int, str, float, float]]) -> None:
    print(f"\n{title}")
    print(f"| round | {head} | median (ms) | mean (ms) |")
    print("|---|---|---|---|")
    for r, label, med, mean in rows:
        print(f"| {r} | {label} | {med * 1000:.0f} | {mean * 1000:.0f} |")
    labels = list(dict.fromkeys(label for _, label, _, _ in rows))
    if len(labels) > 1:
        base = {r: med for r, label, med, _ in rows if label == labels[0]}
        for label in labels[1:]:
            ratios = [base[r] / med for r, lb, med, _ in rows if lb == label]
            print(f"{labels[0]} / {label}, per round (medians): " + ", ".join(f"{x:.3f}" for x in ratios))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("experiment")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--steps", type=int, default=60, help="fit steps (the first --warmup not timed)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--threads", default=str(torch.get_num_threads()), help="comma list of torch thread counts")
    ap.add_argument("--workers", default="", help="comma list of data.num_workers (default: the experiment's)")
    ap.add_argument("--top", type=int, default=0, help="print the top operators of the model step")
    ap.add_argument("--by-shape", action="store_true", help="with --top: one row per operator and input shapes")
    ap.add_argument("--data-paths", default="", help=f"comma list of {', '.join(DATA_PATHS)}: fit steps per data path")
    ap.add_argument("--variant", action="append", default=[], metavar="OVERRIDES",
                    help="space-separated overrides of one variant (repeat; '' is the experiment as it is): fit "
                         "steps of each variant, alternating in one process for --rounds")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of --data-paths or --variant")
    args = ap.parse_args()
    if args.data_paths and args.variant:
        ap.error("--data-paths and --variant compare different things: give one (a variant may set data.in_memory)")
    if args.data_paths or args.variant:
        torch.set_num_threads(int(args.threads.split(",")[0]))
        timed = f"{torch.get_num_threads()} threads, {args.steps - args.warmup} steps timed per run"
        if args.variant:
            variants = {v or "(as is)": ([*args.overrides, *v.split()], "") for v in args.variant}
            rows = alternate(args.experiment, variants, args.rounds, args.steps, args.warmup)
            print_rounds(f"{args.experiment}: fit step per variant, {timed}", "variant", rows)
        else:
            rows = compare_data_paths(args.experiment, args.overrides, args.data_paths.split(","), args.rounds,
                                      args.steps, args.warmup)
            print_rounds(f"{args.experiment}: fit step per data path, {timed}", "data path", rows)
        return
    rows = []
    workers = [int(w) for w in args.workers.split(",")] if args.workers else [None]
    for threads, w in product([int(t) for t in args.threads.split(",")], workers):
        torch.set_num_threads(threads)
        ov = [*args.overrides] + ([f"data.num_workers={w}"] if w is not None else [])
        exp, dm, module = _build(args.experiment, ov)
        bs = exp.tree["data"]["batch_size"]
        data_bps = time_data(dm, 30)
        step_s = time_step(exp, dm, module, 10, args.top, args.by_shape)
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
