"""``arlab compare``: runs grouped over seeds → one Markdown table (mean ± std, 95% interval) and plots.

Inputs: run directories (holding ``config.yaml``), folders of runs (the ``seed<k>`` siblings of
``arlab train --seeds``: every sub-folder holding ``config.yaml``), or experiment names whose runs lie
in ``runs/<experiment>/``. Runs without ``metrics.json`` (unfinished) are listed as skipped.

Groups (``--group-by``): ``config`` (default) puts together runs whose configs differ only in
``run.*`` (seed, folder) and cosmetic keys (seed siblings form one group; two experiments with the same
name but other overrides do not); ``experiment`` groups by experiment name alone; ``run`` keeps each run
alone. Per group and quantity: the mean, the sample standard deviation and the 95% interval of the
mean (Student t with n − 1 degrees of freedom) over its n runs.

Quantities, from each run's ``metrics.json`` (:mod:`arlab.flops` for FLOPs): parameters, training
FLOPs, training and sampling images/s, sampling steps per image, and the validation loss in **bits
per image** = ``val/ce`` (nats per token) × tokens per image / ln 2 (comparable across tokenizers;
tokens per image from ``model/tokens_per_image``, else from the tokenizer config of the run's
``task.tokenizer_ckpt``). Then every metric of ``<run>/eval/<name>.json`` (``arlab eval``) at the run's
best sampling setting for that metric (picked over ``settings`` by the file's ``directions``), with
the setting. With ``--speed FILE`` (``benchmarks/bench_experiments.py --json``) two more columns give each
model's training and sampling images/s from one benchmark process on one machine, so the ratios between
rows are not load noise of the training runs; a row is matched by experiment name and trainable parameter
count. Evaluations of intermediate checkpoints, named ``<name>-step<N>.json`` (any file with the
same ``name`` prefix and a ``step``), give the quality-vs-training-compute curve.

Outputs in ``--out``: ``compare.md``, ``compare.csv`` (one row per group and quantity),
``compare.json`` (everything, including the curves) and PNG plots (:mod:`arlab.compare_plots`).
The same runs give byte-identical files: groups and keys sorted, floats written with fixed precision.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from arlab.compare_runs import (
    QUANTITIES,
    SPEED_COLUMNS,
    Run,
    Stat,
    best_settings,
    find_runs,
    fixed,
    group_key,
    label_groups,
    load_run,
    num,
    read_speed,
    run_quantities,
    setting_text,
    speed_of,
    tokens_per_image,
)
from arlab.errors import ConfigError
from arlab.utils import atomic_write

MAX_CURVE_POINTS = 400


@dataclass
class Result:
    markdown: str
    files: list[Path]
    data: dict[str, Any]


def final_eval(run: Run, name: str) -> dict[str, Any] | None:
    """``eval/<name>.json``, else the evaluation of the latest step."""
    evs = run.evals.get(name) or []
    finals = [e for e in evs if e["_final"]]
    if finals:
        return finals[0]
    return max(evs, key=lambda e: num(e.get("step")) or -1.0, default=None)


def mean_points(points: list[tuple[Any, dict[str, float]]]) -> list[dict[str, Any]]:
    """Points keyed by ``key`` (a setting or a step) from several runs → one point per key, each field averaged
    over the runs that have it (a run trained before FLOPs were counted still adds its value; the FLOPs of a
    step come from the runs that counted them)."""
    by: dict[Any, list[dict[str, float]]] = {}
    for key, p in points:
        by.setdefault(key, []).append(p)
    out = []
    for key in sorted(by, key=lambda k: (isinstance(k, str), k)):
        ps = by[key]
        point: dict[str, Any] = {"key": key, "n": len(ps)}
        for f in sorted(set.union(*(set(p) for p in ps))):
            values = [p[f] for p in ps if f in p]
            point[f] = fixed(sum(values) / len(values))
        out.append(point)
    return out


def tb_curve(run: Run) -> tuple[str, dict[int, float]]:
    """The run's training-loss scalars from TensorBoard: ``train/ce`` (generator) or ``train/loss``."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return "", {}
    if not (run.path / "tb").is_dir():
        return "", {}
    logging.getLogger("tensorboard").setLevel(logging.WARNING)  # one INFO line per event file otherwise
    ev = EventAccumulator(str(run.path / "tb"), size_guidance={"scalars": 0})
    ev.Reload()
    tags = ev.Tags().get("scalars", [])
    tag = next((t for t in ("train/ce", "train/loss") if t in tags), "")
    return tag, ({e.step: float(e.value) for e in ev.Scalars(tag)} if tag else {})


def group_curve(runs: list[Run]) -> dict[str, Any]:
    """Mean training loss over the group's runs at the steps they all logged, in bits per image for a CE;
    x also in training FLOPs where the runs recorded them."""
    curves = [(r, *tb_curve(r)) for r in runs]
    tags = {tag for _, tag, _ in curves}
    if len(tags) != 1 or "" in tags:
        return {}
    tag = tags.pop()
    steps = sorted(set.intersection(*(set(c) for _, _, c in curves)))
    stride = max(1, math.ceil(len(steps) / MAX_CURVE_POINTS))
    steps = steps[::stride]
    tokens = [tokens_per_image(r) if tag == "train/ce" else None for r, _, _ in curves]
    scale = [t / math.log(2) if t else None for t in tokens]
    bits = all(s is not None for s in scale)
    values = [sum(c[s] * (k if bits else 1.0) for (_, _, c), k in zip(curves, scale)) / len(curves) for s in steps]
    out = {"tag": tag, "unit": "bits/image" if bits else tag, "step": steps, "value": [fixed(v) for v in values]}
    per_step = [num(r.flops.get("train_per_step")) for r in runs]
    if all(per_step):
        mean_step = sum(per_step) / len(per_step)  # type: ignore[arg-type]
        out["flops"] = [fixed(s * mean_step) for s in steps]
    return out


def eval_columns(runs: list[Run], name: str, prefix: str) -> dict[str, dict[str, Any]]:
    """Per metric of ``eval/<name>.json``: values at each run's best setting, the settings, the
    (setting → images/s, value) points and the (step → training FLOPs, best value) points."""
    cols: dict[str, dict[str, Any]] = {}
    for run in runs:
        ev = final_eval(run, name)
        if ev is None:
            continue
        for metric, (value, setting) in best_settings(ev).items():
            c = cols.setdefault(prefix + metric, {"values": [], "settings": [], "sampling": [], "compute": []})
            c["values"].append(value)
            c["settings"].append(setting_text(setting))
            for s in ev.get("settings") or []:
                v, ips = num((s.get("metrics") or {}).get(metric)), num(s.get("images_per_s"))
                if v is not None and ips is not None:
                    c["sampling"].append((setting_text(s.get("setting") or {}), {"images_per_s": ips, "value": v}))
        per_step = num(run.flops.get("train_per_step"))
        for e in run.evals.get(name) or []:
            step = num(e.get("step"))
            for metric, (value, _) in best_settings(e).items():
                if step is not None and prefix + metric in cols:
                    point = {"value": value, **({"flops": step * per_step} if per_step else {})}
                    cols[prefix + metric]["compute"].append((int(step), point))
    return cols


def build(refs: list[str], evals: list[str] | None = None, group_by: str = "config",
          runs_root: Path = Path("runs"), speed: str | Path | None = None) -> dict[str, Any]:
    """Everything ``compare.json`` holds."""
    bench = read_speed(speed) if speed else None
    paths = sorted({p for ref in refs for p in find_runs(ref, runs_root)}, key=str)
    loaded = [(p, load_run(p)) for p in paths]
    runs = [r for _, r in loaded if r is not None]
    skipped = [str(p) for p, r in loaded if r is None]
    if not runs:
        raise ConfigError(f"compare: no finished run (with metrics.json) among {', '.join(map(str, paths))}")
    found = sorted({n for r in runs for n in r.evals})
    names = list(evals) if evals else found
    for n in names:
        if n not in found:
            raise ConfigError(f"compare: --eval {n}: no run has eval/{n}.json (found: {', '.join(found) or 'none'})")
    grouped: dict[str, list[Run]] = {}
    for r in runs:
        grouped.setdefault(group_key(r, group_by), []).append(r)
    groups, columns = [], {k: t for k, (t, _) in QUANTITIES.items()}
    if bench is not None:
        columns |= {k: t for k, (t, _) in SPEED_COLUMNS.items()}
    unmatched = []
    for label, grs in label_groups(grouped, group_by).items():
        g: dict[str, Any] = {"label": label, "experiment": grs[0].name, "runs": [str(r.path) for r in grs],
                             "seeds": [r.seed for r in grs], "quantities": {}, "settings": {}, "sampling": {},
                             "compute": {}}
        per_run = [run_quantities(r) for r in grs]
        for key in QUANTITIES:
            values = [q[key] for q in per_run if key in q]
            if values:
                g["quantities"][key] = Stat(values).to_json()
        if bench is not None:
            g["bench"], why = speed_of(grs, bench)
            if why:
                unmatched.append(why)
        for name in names:
            for col, c in eval_columns(grs, name, f"{name}/" if len(names) > 1 else "").items():
                columns.setdefault(col, col)
                g["quantities"][col] = Stat(c["values"]).to_json()
                g["settings"][col] = sorted(set(c["settings"]))
                g["sampling"][col] = mean_points(c["sampling"])
                g["compute"][col] = mean_points(c["compute"])
        g["curve"] = group_curve(grs)
        groups.append(g)
    data = {"eval": names, "group_by": group_by, "columns": columns, "groups": groups, "skipped": skipped}
    if bench is not None:
        data["speed"] = {"file": str(speed), "unmatched": unmatched,
                         **{k: bench.get(k) for k in ("device", "threads", "train_batch", "sample_batch")}}
    return data


def stat_of(q: dict[str, Any]) -> Stat:
    return Stat([float(v) for v in q["values"]])


def markdown(data: dict[str, Any], plots: list[str]) -> str:
    cols = data["columns"]
    head = ["model", "n (seeds)", *cols.values()]
    lines = ["# Comparison", "",
             "Mean ± std over the n runs of each group [95% interval of the mean, Student t with n − 1 degrees of "
             "freedom]; a cell from fewer runs says (n=k). Validation loss in bits per image = val CE (nats/token) × "
             "tokens per image / ln 2. Eval metrics (" + (", ".join(data["eval"]) or "none") + ") at each run's "
             "best sampling setting.", ""]
    sp = data.get("speed")
    if sp:
        lines += [f"Columns marked (bench): one process of benchmarks/bench_experiments.py ({sp['file']}) timed every "
                  f"model on one machine ({sp['device']}, {sp['threads']} threads; training: forward, backward and "
                  f"AdamW at batch {sp['train_batch']}; sampling: KV-cached with CFG, {sp['sample_batch']} images per "
                  "call; random weights), so their ratios are not load noise; the other images/s columns are "
                  "the training runs' own, measured under whatever else ran.", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in data["groups"]:
        n = len(g["runs"])
        cells = [g["label"], f"{n} ({','.join(map(str, g['seeds']))})"]
        for key in cols:
            q, b = g["quantities"].get(key), (g.get("bench") or {}).get(key)
            if b is not None:
                cells.append(f"{b:.4g}")
                continue
            cells.append("—" if q is None else stat_of(q).cell() + (f" (n={q['n']})" if q["n"] != n else ""))
        lines.append("| " + " | ".join(cells) + " |")
    settings = [(g["label"], col, s) for g in data["groups"] for col, s in sorted(g["settings"].items())]
    if settings:
        lines += ["", "Best sampling settings (per metric, by the eval file's directions):", "",
                  "| model | metric | setting |", "|---|---|---|"]
        lines += [f"| {label} | {col} | {'; '.join(s)} |" for label, col, s in settings]
    lines += ["", "Runs:", ""] + [f"- {g['label']}: {', '.join(g['runs'])}" for g in data["groups"]]
    if data["skipped"]:
        lines += ["", "Skipped (no metrics.json: not finished): " + ", ".join(data["skipped"])]
    if sp and sp["unmatched"]:
        lines += ["", "No benchmark speed (another model than the benchmark's): " + "; ".join(sp["unmatched"])]
    if plots:
        lines += ["", "Plots: " + ", ".join(plots)]
    return "\n".join(lines) + "\n"


def csv_text(data: dict[str, Any]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["group", "quantity", "n", "mean", "std", "ci95_low", "ci95_high", "setting"])
    for g in data["groups"]:
        for key in data["columns"]:
            b = (g.get("bench") or {}).get(key)
            if b is not None:
                w.writerow([g["label"], key, 1, f"{b:.10g}", "", "", "", ""])
                continue
            q = g["quantities"].get(key)
            if q is None:
                continue
            ci = q["ci95"] or ["", ""]
            row = [q["mean"], "" if q["std"] is None else q["std"], *ci]
            w.writerow([g["label"], key, q["n"], *(f"{v:.10g}" if isinstance(v, float) else v for v in row),
                        "; ".join(g["settings"].get(key, []))])
    return buf.getvalue()


def compare(refs: list[str], out: str | Path = "runs/compare", evals: list[str] | None = None,
            group_by: str = "config", runs_root: Path = Path("runs"), speed: str | Path | None = None) -> Result:
    """``arlab compare``: reads the runs, writes compare.md / .csv / .json and the plots into ``out``."""
    from arlab.compare_plots import write_plots

    data = build(refs, evals, group_by, runs_root, speed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plots, note = write_plots(data, out)
    md = markdown(data, [p.name for p in plots] or [note])
    files = [atomic_write(out / "compare.md", md), atomic_write(out / "compare.csv", csv_text(data)),
             atomic_write(out / "compare.json", json.dumps(data, indent=2, sort_keys=True) + "\n"), *plots]
    return Result(md, files, data)
