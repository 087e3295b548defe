"""The ``arlab`` command line.

User errors (bad config keys, unknown names, unusable data, damaged checkpoints) print one clear message
and exit with code 2, without a traceback; ``arlab --debug`` or ``ARLAB_DEBUG=1`` shows the traceback too.
Option values out of range are refused by the parser itself (exit 2, naming the option).
``--plugin FILE_OR_MODULE`` (repeatable; or ``ARLAB_PLUGINS``) loads components from outside arlab before
the command runs.

Commands import their modules when they run (not at start-up), so ``arlab --help`` and ``arlab list``
stay fast without loading Lightning.

Longer than 400 lines because every verb's parser (its options, their checked ranges and examples) is
declared here, in one place a user reads top to bottom; the work itself lives in the modules it calls.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import textwrap
import time
from collections.abc import Callable, Sequence

from arlab import __version__
from arlab.errors import ArlabError, Interrupted

EPILOG = {
    "list": """examples:
  arlab list                 every kind, component and preset
  arlab list data            data components with their parameters and defaults""",
    "config": """examples:
  arlab config shapes/quickstart
  arlab config experiments/shapes/quickstart.yaml data.batch_size=16 trainer.max_steps=100
  arlab config shapes/quickstart data=cifar10 --where     annotate each value with its file""",
    "check": """examples:
  arlab check                validate every preset in registry/ and experiment in experiments/""",
    "data pack": """examples:
  arlab data pack ../shared/data/cifar10-jpg.tar.gz data/cifar10
  arlab data pack ~/imagenet data/imagenet --shard-size 2000 --splits train,val""",
    "data shapes": """examples:
  arlab data shapes data/shapes --n-train 10000 --n-test 1000""",
    "train": """examples:
  arlab train shapes/tokenizer-fsq
  arlab train shapes/tokenizer-vq trainer.max_steps=500 run.dir=runs/vq-try
  arlab train runs/vq-try/config.yaml          resume that run from its last checkpoint
  arlab train shapes/raster --seeds 0,1,2      runs/shapes/raster/seed0, seed1, seed2 (a re-run skips finished ones)""",
    "compare": """examples:
  arlab compare shapes/raster shapes/tokenshuffle-s2 --eval main --out runs/compare
  arlab compare runs/shapes/raster runs/try/seed0 --group-by experiment
  arlab compare runs/cmp/raster runs/cmp/var --speed runs/bench-shapes.json   # images/s from one benchmark run""",
    "tokenize": """examples:
  arlab tokenize runs/vq-try/checkpoints/last.ckpt shapes runs/vq-try/tokens --flip
  arlab tokenize runs/vq-try/checkpoints/last.ckpt data/cifar10 data/cifar10-vq-tokens""",
    "sample": """examples:
  arlab sample runs/shapes/tokenshuffle-s2/checkpoints/last.ckpt --n 100 --out runs/shapes/tokenshuffle-s2/samples
  arlab sample CKPT --classes 0,3 --cfg 3 --cfg-schedule half-linear --top-k 100 --seed 1
  arlab sample runs/shapes/text-tokenshuffle-s2/checkpoints/last.ckpt --prompt 'a large red ring in the center'""",
    "eval": """examples:
  arlab eval runs/shapes/tokenshuffle-s2 --n 1000                  task.eval_metrics + the dataset's suite
  arlab eval CKPT --cfg 1,2,4 --cfg-schedule constant,half-linear --top-k 0,100 --name sweep
  arlab eval runs/shapes/tokenizer                                 PSNR, SSIM, codebook usage, rFID
  arlab eval --images shapes:test --reference shapes:train --features shapes-cnn
  arlab eval --images samples.npz --reference my_pngs/ --metrics fid,kid --out fid.json
  arlab eval --metrics list                                        registered metrics, presets, suites
An interrupted generator eval continues where it stopped: finished chunks in <run>/eval/<name>/samples/ are
reused (same images as an uninterrupted run). The report is <run>/eval/<name>.json (docs/evaluation.md).""",
    "data info": """examples:
  arlab data info data/cifar10""",
}


# ----------------------------------------------------------------------------- commands


def cmd_list(args: argparse.Namespace) -> int:
    from arlab import registry
    from arlab.config import presets

    kinds = registry.kinds()
    if args.kind:
        if args.kind not in kinds:
            registry.get(args.kind, "")  # raises with the known kinds
        kinds = [args.kind]
    for kind in kinds:
        print(f"{kind}: {registry.kind_doc(kind)}")
        for entry in registry.entries(kind):
            print(f"  {entry.name:<14} {entry.doc}")
            for p in registry.params(entry):
                default = "(required)" if p.required else json.dumps(p.default)
                line = f"      {p.name}: {p.type} = {default}"
                print(line + (f"  # {p.help}" if p.help else ""))
        names = presets(kind)
        if names:
            print("  presets:")
            for name, path in names.items():
                print(f"    {name:<20} {_preset_summary(path)}")
        print()
    return 0


def _preset_summary(path) -> str:
    first = ""
    target = ""
    for line in path.read_text(errors="replace").splitlines():  # a non-UTF-8 file: arlab check names it
        s = line.strip()
        if s.startswith("#") and not first:
            first = s.lstrip("# ").strip()
        elif s.startswith(("type:", "preset:")) and not target:
            target = s.replace(" ", "")
    return f"[{target}] {first}".strip()


def cmd_config(args: argparse.Namespace) -> int:
    from arlab.config import load_experiment

    exp = load_experiment(args.experiment, args.overrides)
    sys.stdout.write(exp.to_yaml(annotate=args.where))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from arlab import registry
    from arlab.config import experiments, load_experiment, presets, validate_preset

    n, failures = 0, []
    for kind in registry.kinds():
        for name in presets(kind):
            n += 1
            try:
                validate_preset(kind, name)
            except ArlabError as e:
                failures.append(f"preset {kind}/{name}: {e}")
    for name in experiments():
        n += 1
        try:
            load_experiment(name)
        except ArlabError as e:
            failures.append(f"experiment {name}: {e}")
    for f in failures:
        print(f"FAIL {f}", file=sys.stderr)
    print(f"checked {n} presets and experiments: {n - len(failures)} ok, {len(failures)} failed")
    return 2 if failures else 0


def cmd_train(args: argparse.Namespace) -> int:
    from arlab.config import load_experiment
    from arlab.train import fit

    if args.seeds is not None:
        from arlab.seeds import train_seeds

        for r in train_seeds(args.experiment, args.overrides, args.seeds):
            print(f"seed {r.seed}: {r.run} ({r.status})")
        return 0
    exp = load_experiment(args.experiment, args.overrides)
    metrics = fit(exp)
    print(f"run directory: {exp.run.dir}")
    for k in sorted(metrics):
        if k.startswith(("val/", "perf/", "train/steps")):
            print(f"  {k}: {float(metrics[k]):.4g}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from arlab.compare import compare

    result = compare(args.runs, out=args.out, evals=args.eval, group_by=args.group_by, speed=args.speed)
    sys.stdout.write(result.markdown)
    print(f"wrote {', '.join(str(p) for p in result.files)}")
    return 0


def _shard_folder(ref: str) -> str:
    """A shard folder, or a data preset name (e.g. 'shapes') whose shards are made if needed."""
    from pathlib import Path

    if Path(ref).exists():
        return ref
    from arlab.config import presets

    if ref in presets("data"):
        from arlab.config import build

        dm = build("data", ref)
        dm.prepare_data()
        return str(dm.root)
    from arlab.errors import DataError, did_you_mean

    raise DataError(f"'{ref}' is neither a shard folder nor a data preset.{did_you_mean(ref, presets('data'))} "
                    f"Data presets: {', '.join(presets('data'))}")


def cmd_tokenize(args: argparse.Namespace) -> int:
    from arlab.data.tokenize import tokenize_shards

    splits = [s for s in args.splits.split(",") if s] or None
    shards = _shard_folder(args.shards)
    m = tokenize_shards(args.ckpt, shards, args.out, splits=splits, flip=args.flip,
                        batch_size=args.batch_size, device=args.device, overwrite=args.overwrite,
                        progress=not args.quiet)
    for split, info in m["splits"].items():
        print(f"{split}: {info['count']} token sequences of {m['tokenizer']['tokens_per_image']} tokens "
              f"({m['samples_per_s'][split]:.0f} samples/s)")
    if m["corrupt"]:
        print(f"skipped {len(m['corrupt'])} corrupt image(s) (listed in {args.out}/dataset.json)")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from arlab.generator.sample import sample_to_files

    classes = args.classes
    from arlab.rundir import run_of_checkpoint

    out = args.out or str(run_of_checkpoint(args.ckpt) / "samples")
    s = sample_to_files(args.ckpt, out, n=args.n, batch_size=args.batch_size, classes=classes, cfg=args.cfg,
                        cfg_schedule=args.cfg_schedule, top_k=args.top_k, top_p=args.top_p,
                        temperature=args.temperature, seed=args.seed, device=args.device,
                        use_cache=not args.no_cache, prompts=args.prompt or None)
    acc = f", shapes checker accuracy {s['class_acc']:.1%}" if "class_acc" in s else ""
    print(f"{s['n']} samples in {s['steps_per_image']} steps each, {s['images_per_s']:.1f} images/s{acc}")
    print(f"wrote {out}/samples.png and {out}/samples.npz")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from arlab.evaluation.run import command

    return command(args)


def cmd_data_pack(args: argparse.Namespace) -> int:
    from arlab.data.pack import pack_imagefolder

    t0 = time.perf_counter()
    splits = [s for s in args.splits.split(",") if s] if args.splits else None
    m = pack_imagefolder(args.src, args.out, shard_size=args.shard_size, seed=args.seed, splits=splits,
                         name=args.name, workers=args.workers, progress=not args.quiet,
                         overwrite=args.overwrite)
    dt = time.perf_counter() - t0
    total = sum(s["count"] for s in m["splits"].values())
    for split, info in m["splits"].items():
        print(f"{split}: {info['count']} samples in {len(info['shards'])} shards")
    for w in m.get("warnings", []):
        print(f"warning: {w}", file=sys.stderr)
    bad = m.get("corrupt", [])
    if bad:
        print(f"skipped {len(bad)} corrupt or unreadable file(s) (listed in {args.out}/dataset.json):")
        for item in bad[:20]:
            print(f"  {item['split']}/{item['path']}: {item['error']}")
        if len(bad) > 20:
            print(f"  ... and {len(bad) - 20} more")
    print(f"packed {total} images from {args.src} into {args.out} in {dt:.1f} s ({total / dt:.0f} images/s)")
    return 0


def cmd_data_shapes(args: argparse.Namespace) -> int:
    from arlab.data.shapes import write_shapes

    t0 = time.perf_counter()
    m = write_shapes(args.out, n_train=args.n_train, n_test=args.n_test, seed=args.seed, size=args.size,
                     shard_size=args.shard_size, progress=not args.quiet)
    dt = time.perf_counter() - t0
    total = sum(s["count"] for s in m["splits"].values())
    print(f"wrote {total} shapes images into {args.out} in {dt:.1f} s ({total / dt:.0f} images/s)")
    return 0


def cmd_data_info(args: argparse.Namespace) -> int:
    from arlab.data.datamodule import manifest_summary

    print(manifest_summary(args.root))
    return 0


# ----------------------------------------------------------------------------- option values
# argparse calls these on the option's text; an ArgumentTypeError becomes "argument --x: <message>", exit 2.


def int_at_least(lo: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {value}")
        return value

    parse.__name__ = f"int >= {lo}"
    return parse


def float_in(lo: float, hi: float = math.inf, lo_open: bool = False) -> Callable[[str], float]:
    """A finite float in [lo, hi] ((lo, hi] with ``lo_open``)."""
    if math.isfinite(hi):
        span = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
    else:
        span = f"{'>' if lo_open else '>='} {lo:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number {span}, got {text}")
        if value < lo or (lo_open and value == lo) or value > hi:
            raise argparse.ArgumentTypeError(f"must be {span}, got {value:g}")
        return value

    parse.__name__ = "float"
    return parse


def class_list(text: str) -> list[int] | None:
    """``"0,3"`` → [0, 3]; ``""`` → None (every class)."""
    items = [c.strip() for c in text.split(",") if c.strip()]
    out = []
    for c in items:
        try:
            out.append(int(c))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{c!r} is not a class index (give comma-separated integers, e.g. "
                                             "0,3)") from None
        if out[-1] < 0:
            raise argparse.ArgumentTypeError(f"class index {out[-1]} is negative")
    return out or None


def comma_list(item: Callable[[str], object], example: str) -> Callable[[str], list]:
    """``"1,2,4"`` → [item("1"), item("2"), item("4")] (a sweep's values); each item checked by ``item``."""

    def parse(text: str) -> list:
        parts = [t.strip() for t in text.split(",")]
        if not all(parts):
            raise argparse.ArgumentTypeError(f"{text!r} has an empty item; give comma-separated values, e.g. "
                                             f"{example}")
        return [item(t) for t in parts]

    parse.__name__ = "list"
    return parse


def metric_names(text: str) -> list[str]:
    """``"fid,kid-shapes-cnn"`` → names (checked when the command runs); ``list`` prints the choices."""
    return comma_list(str, "fid,kid or list")(text)


def seed_list(text: str) -> list[int]:
    """``"0,1,2"`` → [0, 1, 2] (distinct, >= 0)."""
    out = []
    for c in (c.strip() for c in text.split(",")):
        if not c.isdigit():
            raise argparse.ArgumentTypeError(f"{c!r} is not a seed (give distinct comma-separated integers >= 0, "
                                             "e.g. 0,1,2)")
        if int(c) in out:
            raise argparse.ArgumentTypeError(f"seed {c} is repeated")
        out.append(int(c))
    return out


def cfg_schedule(text: str) -> str:
    from arlab.generator.sampling import check_schedule

    try:
        check_schedule(text)
    except ArlabError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def device_name(text: str) -> str:
    """A torch device available here (cpu needs no torch import, so ``--help`` stays fast)."""
    if text == "cpu":
        return text
    from arlab.utils import check_device

    try:
        return check_device(text)
    except ArlabError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# ----------------------------------------------------------------------------- parser


def _add(sub, name: str, func: Callable, help: str, key: str | None = None) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help, epilog=EPILOG.get(key or name),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=func)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="arlab",
        description=textwrap.dedent("""\
            arlab: autoregressive image generation lab (Token-Shuffle, VAR, NAR, raster AR).
            Components are registered by kind and name; experiments are YAML files that pick presets
            and override keys; every command validates its config before doing any work."""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="run 'arlab COMMAND --help' for a command's options and examples",
    )
    parser.add_argument("--version", action="version", version=f"arlab {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of a user error too (also ARLAB_DEBUG=1)")
    parser.add_argument("--plugin", action="append", default=[], metavar="FILE_OR_MODULE",
                        help="load components (and presets beside them) from a .py file, a folder of them or a "
                             "module; repeatable; also ARLAB_PLUGINS")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = _add(sub, "list", cmd_list, "list component kinds, components (parameters, defaults) and presets")
    p.add_argument("kind", nargs="?", help="only this kind (e.g. data, quantizer, order)")

    p = _add(sub, "config", cmd_config, "print the fully resolved config of an experiment")
    p.add_argument("experiment", help="experiment name (shapes/quickstart) or YAML file")
    p.add_argument("overrides", nargs="*", help="dotlist overrides KEY=VALUE (slot=PRESET replaces a slot)")
    p.add_argument("--where", action="store_true", help="annotate each value with the file that set it")

    _add(sub, "check", cmd_check, "validate every preset and experiment")

    data = sub.add_parser("data", help="make and inspect dataset shards",
                          description="make and inspect WebDataset shards")
    dsub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    data.set_defaults(func=lambda a: (data.print_help(), 2)[1])

    p = _add(dsub, "pack", cmd_data_pack, "pack an ImageFolder (dir or .tar/.tar.gz) into WebDataset shards",
             "data pack")
    p.add_argument("src", help="ImageFolder root (split/class/image) or a .tar/.tar.gz of one")
    p.add_argument("out", help="output folder (gets dataset.json and <split>/shard-NNNNNN.tar)")
    p.add_argument("--shard-size", type=int_at_least(1), default=1000, help="samples per shard (default 1000)")
    p.add_argument("--seed", type=int_at_least(0), default=0, help="seed of the sample-order shuffle (default 0)")
    p.add_argument("--splits", default="", help="comma-separated splits to pack (default: all)")
    p.add_argument("--name", default=None, help="dataset name in the manifest (default: from SRC)")
    p.add_argument("--workers", type=int_at_least(0), default=0, help="decode workers (default 0: one per CPU)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing shard folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = _add(dsub, "shapes", cmd_data_shapes, "write the embedded procedural shapes dataset as shards",
             "data shapes")
    p.add_argument("out", help="output folder (gets dataset.json, train/ and test/)")
    p.add_argument("--n-train", type=int_at_least(1), default=10000, help="training images (default 10000)")
    p.add_argument("--n-test", type=int_at_least(0), default=1000, help="test images (default 1000)")
    p.add_argument("--seed", type=int_at_least(0), default=0, help="generator seed (default 0)")
    p.add_argument("--size", type=int_at_least(16), default=32, help="image side in pixels, >= 16 (default 32)")
    p.add_argument("--shard-size", type=int_at_least(1), default=1000, help="samples per shard (default 1000)")
    p.add_argument("--quiet", action="store_true")

    p = _add(dsub, "info", cmd_data_info, "summarise a shard folder's manifest", "data info")
    p.add_argument("root")

    p = _add(sub, "train", cmd_train, "train an experiment (its task: tokenizer, generator, ...)")
    p.add_argument("experiment", help="experiment name (shapes/tokenizer-vq) or YAML file (a run's config.yaml "
                                      "resumes that run)")
    p.add_argument("overrides", nargs="*", help="dotlist overrides KEY=VALUE")
    p.add_argument("--seeds", type=seed_list, default=None, metavar="0,1,2",
                   help="train once per seed into <run.dir or runs/EXPERIMENT>/seed<k>, one after the other")

    p = _add(sub, "compare", cmd_compare, "compare runs: a table over seeds (mean, std, t interval) and plots")
    p.add_argument("runs", nargs="+", metavar="RUN_OR_EXPERIMENT",
                   help="a run directory, a folder of runs (seed<k> siblings) or an experiment with runs in runs/")
    p.add_argument("--eval", action="append", default=[], metavar="NAME",
                   help="eval/NAME.json results to include (repeatable; default: every name found)")
    p.add_argument("--out", default="runs/compare", help="output folder (default runs/compare)")
    p.add_argument("--speed", default=None, metavar="FILE",
                   help="images/s columns from one benchmark process (benchmarks/bench_experiments.py --json FILE)")
    p.add_argument("--group-by", choices=("config", "experiment", "run"), default="config",
                   help="config: runs that differ only in run.seed (default); experiment: by experiment name; "
                        "run: every run alone")

    p = _add(sub, "tokenize", cmd_tokenize, "encode image shards into token shards with a tokenizer checkpoint")
    p.add_argument("ckpt", help="checkpoint of a 'task: tokenizer' run")
    p.add_argument("shards", help="image shard folder (dataset.json) or a data preset name (shapes, cifar10)")
    p.add_argument("out", help="output token shard folder")
    p.add_argument("--splits", default="", help="comma-separated splits (default: all)")
    p.add_argument("--flip", action="store_true", help="also encode each image mirrored (key suffix _f)")
    p.add_argument("--batch-size", type=int_at_least(1), default=256, help="images per batch (default 256)")
    p.add_argument("--device", type=device_name, default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")

    p = _add(sub, "sample", cmd_sample, "draw class- or caption-conditional samples from a generator checkpoint")
    p.add_argument("ckpt", help="checkpoint of a 'task: generator' run")
    p.add_argument("--n", type=int_at_least(1), default=100, help="number of images (default 100)")
    p.add_argument("--batch-size", type=int_at_least(1), default=100, help="images per batch (default 100)")
    p.add_argument("--classes", type=class_list, default=None,
                   help="comma-separated class indices, cycled (default: all)")
    p.add_argument("--cfg", type=float_in(0.0), default=None,
                   help="CFG scale >= 0 (1: no guidance; var schedule: 0) (default: the run's task.sample_cfg)")
    p.add_argument("--cfg-schedule", type=cfg_schedule, default=None,
                   help="constant, linear, half-linear, cosine or var (default: the run's task.sample_schedule)")
    p.add_argument("--top-k", type=int_at_least(0), default=None,
                   help="keep the k most likely tokens; 0 = all (default: the run's task.sample_top_k)")
    p.add_argument("--top-p", type=float_in(0.0, 1.0, lo_open=True), default=1.0,
                   help="nucleus sampling mass in (0, 1]; 1 = off (default 1)")
    p.add_argument("--temperature", type=float_in(0.0), default=None,
                   help="softmax temperature >= 0; 0 = greedy (argmax) (default: the run's task.sample_temperature)")
    p.add_argument("--seed", type=int_at_least(0), default=0, help="sampling seed (default 0)")
    p.add_argument("--device", type=device_name, default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--no-cache", action="store_true", help="recompute the full sequence each step (reference)")
    p.add_argument("--prompt", action="append", default=[],
                   help="caption for a text-conditioned generator (repeat for several; cycled over --n)")
    p.add_argument("--out", default=None, help="output folder (default: <run>/samples)")

    p = _add(sub, "eval", cmd_eval, "score a generator (sampling sweeps) or tokenizer run, or two image sets, "
             "into <run>/eval/<name>.json")
    p.add_argument("target", nargs="?", metavar="RUN|CKPT",
                   help="run directory (uses checkpoints/last.ckpt) or checkpoint of a generator or tokenizer run")
    p.add_argument("--n", type=int_at_least(1), default=None,
                   help="images: generator samples (default: the run's task.eval_samples, else 1000); tokenizer: "
                        "split images (default all); --images: the first N of A (default all)")
    p.add_argument("--metrics", type=metric_names, default=None,
                   help="comma-separated metric presets or names; 'list' prints them (default: generator: "
                        "task.eval_metrics + the dataset's eval suite; --images: fid,kid,precision_recall)")
    p.add_argument("--name", default=None, help="report name: <run>/eval/<name>.json (default: n<N>; tokenizer: "
                                                "reconstruction)")
    p.add_argument("--seed", type=int_at_least(0), default=0,
                   help="sampling seed; chunk i draws with a seed derived from (seed, i) (default 0)")
    p.add_argument("--batch-size", type=int_at_least(1), default=100, help="images per batch (default 100)")
    p.add_argument("--chunk", type=int_at_least(1), default=250,
                   help="images per saved chunk, the unit a resumed eval skips (default 250)")
    p.add_argument("--device", type=device_name, default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    sweep = p.add_argument_group("sampling sweep (generator; comma-separated values, every combination is drawn)")
    sweep.add_argument("--cfg", type=comma_list(float_in(0.0), "1,2,4"), default=None,
                       help="CFG scales >= 0 (default: the run's task.sample_cfg)")
    sweep.add_argument("--cfg-schedule", type=comma_list(cfg_schedule, "constant,half-linear"), default=None,
                       help="constant, linear, half-linear, cosine, var (default: the run's task.sample_schedule)")
    sweep.add_argument("--temperature", type=comma_list(float_in(0.0), "1.0,0.9"), default=None,
                       help="softmax temperatures >= 0 (default: the run's task.sample_temperature)")
    sweep.add_argument("--top-k", type=comma_list(int_at_least(0), "0,100"), default=None,
                       help="top-k values, 0 = all (default: the run's task.sample_top_k)")
    sweep.add_argument("--top-p", type=comma_list(float_in(0.0, 1.0, lo_open=True), "1.0,0.95"), default=None,
                       help="nucleus masses in (0, 1] (default 1)")
    sweep.add_argument("--no-cache", action="store_true", help="recompute the full sequence each step (reference)")
    sweep.add_argument("--best-of", default=None, metavar="NAME[:METRIC]",
                       help="draw at the best setting of the run's eval/NAME.json for METRIC (default: its FID), "
                            "e.g. --n 10000 --best-of sweep1k")
    other = p.add_argument_group("tokenizer runs and image sets")
    other.add_argument("--split", default=None, help="tokenizer: split reconstructed (default: the data's val split)")
    other.add_argument("--features", default=None,
                       help="feature network preset of rFID and --images (inception, shapes-cnn, cifar10-cnn; "
                            "default: the dataset's eval suite / each metric's own)")
    other.add_argument("--images", default=None, metavar="A",
                       help="image set A: a folder of png/jpg (recursive), an .npz (images, labels), or a packed "
                            "split (shapes:test, a shard folder[:split])")
    other.add_argument("--reference", default=None, metavar="B", help="image set B, as A")
    other.add_argument("--n-ref", type=int_at_least(0), default=0, help="--images: the first N of B (default all)")
    other.add_argument("--out", default=None, help="--images: write the report to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("ARLAB_LOG", "INFO"),
                        format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # `arlab train EXP --seeds 0,1 k=v`: overrides after an option
        if getattr(args, "func", None) is not cmd_train or any("=" not in e or e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        if args.plugin:
            from arlab import registry

            registry.add_plugins(args.plugin, "--plugin")
        return int(args.func(args) or 0)
    except ArlabError as e:
        if args.debug or os.environ.get("ARLAB_DEBUG", "") not in ("", "0"):
            raise
        print(f"arlab: {'' if isinstance(e, Interrupted) else 'error: '}{e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("arlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

