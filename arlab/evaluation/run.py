"""``arlab eval``'s entry point: what to evaluate (a run directory or checkpoint of a generator or tokenizer,
or two image sets) and the summary it prints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from arlab.errors import ConfigError
from arlab.evaluation.suites import listing
from arlab.rundir import read_task_checkpoint, run_of_checkpoint

TASKS = ("generator", "tokenizer")
SWEEP_OPTIONS = {"cfgs": "--cfg", "schedules": "--cfg-schedule", "temperatures": "--temperature", "top_ks": "--top-k",
                 "top_ps": "--top-p"}  # eval_generator's sweep_opts keys → their command-line options


def resolve_target(target: str) -> tuple[Path, Path]:
    """(checkpoint, run directory) of RUN (uses ``checkpoints/last.ckpt``) or CKPT."""
    p = Path(target)
    if p.is_dir():
        ckpt = p / "checkpoints" / "last.ckpt"
        if not ckpt.is_file():
            raise ConfigError(f"'{target}' is a folder without checkpoints/last.ckpt: give a run directory or a "
                              "checkpoint file")
        return ckpt, p
    if not p.exists():
        raise ConfigError(f"'{target}' does not exist: give a run directory (runs/<experiment>/<time>) or a "
                          "checkpoint (.../checkpoints/last.ckpt)")
    return p, run_of_checkpoint(p)


def best_setting(run: Path, spec: str) -> dict[str, list[Any]]:
    """The sweep options that redraw the best setting of an earlier report: ``spec`` is ``NAME`` or
    ``NAME:METRIC`` for ``<run>/eval/NAME.json``; METRIC defaults to the report's first FID metric."""
    name, _, metric = spec.partition(":")
    path = run / "eval" / f"{name}.json"
    if not path.is_file():
        have = sorted(p.stem for p in (run / "eval").glob("*.json")) if (run / "eval").is_dir() else []
        raise ConfigError(f"--best-of {spec}: no report {path} (reports of this run: {', '.join(have) or 'none'})")
    best = json.loads(path.read_text()).get("best") or {}
    if not metric:
        fids = [m for m in best if m.startswith("fid")]
        if not fids:
            raise ConfigError(f"--best-of {spec}: {path} has no FID metric; name one: "
                              f"--best-of {name}:METRIC with METRIC in {', '.join(best) or 'none'}")
        metric = fids[0]
    if metric not in best:
        raise ConfigError(f"--best-of {spec}: {path} has no best setting for '{metric}' "
                          f"(metrics: {', '.join(best) or 'none'})")
    s = best[metric]["setting"]
    if s.get("cfg") is None:
        raise ConfigError(f"--best-of {spec}: {path} is not a sampling sweep (no CFG setting)")
    return {"cfgs": [float(s["cfg"])], "schedules": [str(s["schedule"])], "temperatures": [float(s["temperature"])],
            "top_ks": [int(s["top_k"])], "top_ps": [float(s.get("top_p", 1.0))]}


def checkpoint_kind(ckpt: Path) -> tuple[str, int]:
    """(task type, global step) of a generator or tokenizer checkpoint, read without loading its tensors."""
    c, hp = read_task_checkpoint(ckpt, TASKS, mmap=True)
    return str(hp["experiment"]["task"]["type"]), int(c.get("global_step", 0))


def evaluate_target(target: str, *, name: str | None, n: int | None, metrics: list[str] | None,
                    sweep_opts: dict[str, Any], seed: int, batch_size: int, chunk: int, device: str, split: str | None,
                    features: str | None, progress: bool, use_cache: bool = True) -> tuple[dict[str, Any], Path]:
    """Evaluate a generator or tokenizer run; returns (report, JSON path)."""
    ckpt, run = resolve_target(target)
    kind, step = checkpoint_kind(ckpt)
    if kind == "tokenizer":
        given = [SWEEP_OPTIONS[k] for k, v in sweep_opts.items() if v]
        if given or metrics:
            what = given[0] if given else "--metrics"
            raise ConfigError(f"{what} applies to generator runs; '{target}' is a tokenizer (scored by PSNR, SSIM, "
                              "codebook usage and rFID)")
        from arlab.evaluation.tokenizer import eval_tokenizer

        return eval_tokenizer(ckpt, run, name or "reconstruction", step=step, n=n or 0, split=split, features=features,
                              batch_size=batch_size, device=device)
    if split or features:
        raise ConfigError(f"{'--split' if split else '--features'} applies to tokenizer runs and --images; "
                          f"'{target}' is a generator (its metrics name their feature networks)")
    from arlab.evaluation.generator import eval_generator

    return eval_generator(ckpt, run, name, n=n, metrics=metrics, sweep_opts=sweep_opts, seed=seed,
                          batch_size=batch_size, chunk=chunk, device=device, progress=progress, use_cache=use_cache)


def summary(report: dict[str, Any], path: Path | None) -> str:
    """A few lines: each setting's ranked metrics, then the best per metric."""
    dirs = report["directions"]
    lines = [f"{report['kind']} eval '{report['name']}': N = {report['n']}"
             + (f", step {report['step']}" if report.get("step") is not None else "")
             + (f", features {report['features']}" if report.get("features") else "")]
    for r in report["settings"]:
        vals = ", ".join(f"{k} {v:.4g}" for k, v in r["metrics"].items() if k in dirs and v is not None)
        rate = f" ({r['images_per_s']:.1f} images/s)" if r.get("images_per_s") else ""
        lines.append(f"  {r['id']}: {vals}{rate}")
    if len(report["settings"]) > 1:
        for k, b in report["best"].items():
            s = b["setting"]
            lines.append(f"  best {k} ({dirs[k]}): {b['value']:.4g} at cfg {s['cfg']:g} {s['schedule']} "
                         f"T {s['temperature']:g} top-k {s['top_k']} top-p {s['top_p']:g}")
    for k, why in (report.get("skipped") or {}).items():
        lines.append(f"  left out {k}: {why}")
    if path is not None:
        lines.append(f"wrote {path}")
    return "\n".join(lines)


def command(args: Any) -> int:
    """``arlab eval`` with its parsed options (arlab/cli.py): evaluate, print the summary."""
    if args.metrics == ["list"]:
        print(listing())
        return 0
    sweep_opts = {"cfgs": args.cfg, "schedules": args.cfg_schedule, "temperatures": args.temperature,
                  "top_ks": args.top_k, "top_ps": args.top_p}
    if args.images or args.reference:
        from arlab.evaluation.images import eval_images

        if not (args.images and args.reference) or args.target:
            raise ConfigError("--images A needs --reference B, and scores those two sets instead of a run: give "
                              "either RUN|CKPT or --images A --reference B")
        given = [SWEEP_OPTIONS[k] for k, v in sweep_opts.items() if v] + (["--split"] if args.split else [])
        if given:
            raise ConfigError(f"{given[0]} applies to runs, not to --images/--reference")
        report, path = eval_images(args.images, args.reference, metrics=args.metrics, features=args.features,
                                   n=args.n or 0, n_ref=args.n_ref, out=args.out, name=args.name or "images")
    else:
        if not args.target:
            raise ConfigError("nothing to evaluate: give RUN|CKPT, or --images A --reference B (arlab eval --help)")
        if args.out or args.n_ref:
            raise ConfigError(f"{'--out' if args.out else '--n-ref'} applies to --images/--reference; a run's report "
                              "goes to <run>/eval/<name>.json")
        if args.best_of:
            given = [SWEEP_OPTIONS[k] for k, v in sweep_opts.items() if v]
            if given:
                raise ConfigError(f"--best-of draws one setting of an earlier report; drop {given[0]}")
            sweep_opts = best_setting(resolve_target(args.target)[1], args.best_of)
        report, path = evaluate_target(args.target, name=args.name, n=args.n, metrics=args.metrics,
                                       sweep_opts=sweep_opts, seed=args.seed, batch_size=args.batch_size,
                                       chunk=args.chunk, device=args.device, split=args.split,
                                       features=args.features, progress=not args.quiet, use_cache=not args.no_cache)
    print(summary(report, path))
    if path is None:
        print(json.dumps(report, indent=2))
    return 0
