"""What ``arlab compare`` (:mod:`arlab.compare`) reads from runs: run discovery and grouping, per-run
quantities (bits per image from the validation CE), the best sampling setting of an eval result, and
the statistics over seeds (mean, sample std, Student-t 95% interval of the mean)."""

from __future__ import annotations

import functools
import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from arlab.errors import ConfigError
from arlab.flops import read_sidecar
from arlab.rundir import CONFIG, RESUMABLE_CHANGES, flat_keys, run_of_checkpoint

QUANTITIES = {  # key -> (column title, metrics.json key or a derived quantity)
    "params": ("parameters", "model/params"),
    "train_flops": ("training FLOPs", "flops/train_total"),
    "train_images_per_s": ("train images/s", "perf/train_images_per_s"),
    "sample_images_per_s": ("sampling images/s", "sample/images_per_s"),
    "steps_per_image": ("steps/image", "sample/steps_per_image"),
    "val_bits_per_image": ("val bits/image", ""),
}
STEP_FILE = re.compile(r"^(?P<name>.+?)[-_@]step-?(?P<step>\d+)$")
IGNORED_FOR_GROUPS = {"run.seed", *RESUMABLE_CHANGES}


def num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def fixed(v: float | None, digits: int = 10) -> float | None:
    """A float rounded to ``digits`` significant digits (stable text in JSON/CSV)."""
    return None if v is None else float(f"{v:.{digits}g}")


# ----------------------------------------------------------------------------- statistics


@functools.cache
def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (p > 0.5) of Student's t with ``df`` degrees of freedom: bisection on its CDF, the
    density integrated by Simpson's rule (about 1e-7 accurate, no scipy)."""
    logc = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def pdf(x: float) -> float:
        return math.exp(logc - (df + 1) / 2 * math.log1p(x * x / df))

    def cdf(x: float, n: int = 4000) -> float:
        h = x / n
        s = pdf(0) + pdf(x) + sum((4 if i % 2 else 2) * pdf(i * h) for i in range(1, n))
        return 0.5 + s * h / 3

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        lo, hi = hi, hi * 2
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


@dataclass
class Stat:
    values: list[float]
    mean: float = math.nan
    std: float | None = None  # sample standard deviation (None for one value)
    ci95: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        n = len(self.values)
        self.mean = statistics.fmean(self.values)
        if n > 1:
            self.std = statistics.stdev(self.values)  # (exact sums: equal values give 0, not rounding noise)
            half = t_quantile(0.975, n - 1) * self.std / math.sqrt(n)
            self.ci95 = (self.mean - half, self.mean + half)

    def cell(self) -> str:
        if self.std is None or self.ci95 is None:
            return f"{self.mean:.4g}"
        return f"{self.mean:.4g} ± {self.std:.2g} [{self.ci95[0]:.4g}, {self.ci95[1]:.4g}]"

    def to_json(self) -> dict[str, Any]:
        return {"n": len(self.values), "mean": fixed(self.mean), "std": fixed(self.std),
                "ci95": None if self.ci95 is None else [fixed(self.ci95[0]), fixed(self.ci95[1])],
                "values": [fixed(v) for v in self.values]}


# ----------------------------------------------------------------------------- runs


@dataclass
class Run:
    path: Path
    tree: dict[str, Any]
    metrics: dict[str, Any]
    flops: dict[str, Any] = field(default_factory=dict)
    evals: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # name -> [final, intermediate...]

    @property
    def name(self) -> str:
        return str(self.tree.get("name", self.path.name))

    @property
    def seed(self) -> int:
        return int((self.tree.get("run") or {}).get("seed", 0))


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        body = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{what} '{path}' is not readable JSON ({e})") from None
    if not isinstance(body, dict):
        raise ConfigError(f"{what} '{path}' holds a {type(body).__name__}, not an object")
    return body


def find_runs(ref: str, runs_root: Path = Path("runs")) -> list[Path]:
    """The run directories ``ref`` names: itself, its sub-folders holding config.yaml, or runs/<ref>/*."""
    for cand in (Path(ref), runs_root / ref):
        if (cand / CONFIG).is_file():
            return [cand]
        if cand.is_dir():
            subs = sorted(p for p in cand.iterdir() if (p / CONFIG).is_file())
            if subs:
                return subs
    raise ConfigError(f"compare: '{ref}' is neither a run directory (with {CONFIG}), a folder of runs, nor an "
                      f"experiment with runs in '{runs_root / ref}'")


def load_run(path: Path) -> Run | None:
    """The run in ``path`` (None when it has no metrics.json: not finished)."""
    import yaml

    if not (path / "metrics.json").is_file():
        return None
    try:
        tree = yaml.safe_load((path / CONFIG).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"compare: '{path / CONFIG}' is not readable YAML ({e})") from None
    run = Run(path, tree, read_json(path / "metrics.json", "metrics"), read_sidecar(path))
    for f in sorted((path / "eval").glob("*.json")):
        body = read_json(f, "eval result")
        m = STEP_FILE.match(f.stem)
        name = m.group("name") if m else f.stem
        run.evals.setdefault(name, [])
        run.evals[name].insert(0 if not m else len(run.evals[name]), {**body, "_final": not m, "_file": str(f)})
    return run


def _upstream_tree(ckpt: str, base: Path) -> tuple[Path, dict] | None:
    """(run directory, config tree) of the run an upstream checkpoint comes from, when its config is readable: the
    path as recorded (relative to where that run was trained, normally the repo root), else relative to ``base``."""
    import yaml

    up = run_of_checkpoint(ckpt)
    for cand in [up] if up.is_absolute() else [up, base / up]:
        try:
            return cand.resolve(), yaml.safe_load((cand / CONFIG).read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
    return None


def recipe(tree: dict, base: Path, _seen: frozenset = frozenset()) -> dict[str, Any]:
    """What makes runs seeds of one configuration: the flat config without ``run.seed`` (and what a resume may
    change). An upstream checkpoint (a ``*_ckpt`` key, e.g. ``task.tokenizer_ckpt``) stands for its run's own
    recipe, flattened under ``<key>:``; the overrides it was trained with (``task.tokenizer_overrides`` beside
    ``task.tokenizer_ckpt``) are then redundant and dropped, and elsewhere only their ``run.seed=…`` entries. So
    generators trained on tokenizers that differ only in their seed (a chain per seed) are seeds of one config,
    and generators on tokenizers of different recipes are not. An upstream whose config cannot be read stays a
    path."""
    out: dict[str, Any] = {}
    for k, v in flat_keys(tree).items():
        if k in IGNORED_FOR_GROUPS:
            continue
        if k.endswith("_overrides") and isinstance(v, list):
            v = [o for o in v if not (isinstance(o, str) and o.partition("=")[0].strip() in IGNORED_FOR_GROUPS)]
        elif k.endswith("_ckpt") and isinstance(v, str) and v:
            up = _upstream_tree(v, base)
            if up is not None and up[0] not in _seen:
                out.update({f"{k}:{uk}": uv for uk, uv in recipe(up[1], up[0], _seen | {up[0]}).items()})
                continue
        out[k] = v
    for k in [k for k in out if k.endswith("_overrides")]:  # how a resolved upstream was made: its recipe says it
        if any(u.startswith(k[: -len("_overrides")] + "_ckpt:") for u in out):
            del out[k]
    return out


def group_key(run: Run, by: str) -> str:
    if by == "run":
        return str(run.path)
    if by == "experiment":
        return run.name
    return json.dumps(recipe(run.tree, run.path), sort_keys=True, default=str)


_UNSET = "(unset)"


def label_groups(groups: dict[str, list[Run]], by: str) -> dict[str, list[Run]]:
    """Readable labels: the experiment name, plus the keys that tell apart groups sharing it."""
    out: dict[str, list[Run]] = {}
    names: dict[str, list[str]] = {}
    for key, runs in groups.items():
        names.setdefault(runs[0].name, []).append(key)
    for name, keys in names.items():
        for key in keys:
            runs = groups[key]
            label = str(runs[0].path) if by == "run" else name
            if len(keys) > 1 and by == "config":
                mine = json.loads(key)  # the group key is the recipe (group_key), upstream configs read once
                others = [json.loads(k) for k in keys if k != key]
                keys_all = set(mine).union(*others)  # a key an older run's config lacks differs too
                diff = sorted(k for k in keys_all if any(o.get(k, _UNSET) != mine.get(k, _UNSET) for o in others))
                label = f"{name} ({', '.join(f'{k}={mine.get(k, _UNSET)}' for k in diff[:3])})"
            out[label] = runs
    return dict(sorted(out.items()))


# ----------------------------------------------------------------------------- per-run values


def tokens_per_image(run: Run) -> float | None:
    """Tokens the validation CE averages over per image: metrics.json, else the tokenizer run's config."""
    if num(run.metrics.get("model/tokens_per_image")):
        return float(run.metrics["model/tokens_per_image"])
    ckpt = ((run.tree.get("task") or {}).get("tokenizer_ckpt")) or ""
    if not ckpt:
        return None
    up = _upstream_tree(ckpt, run.path)
    if up is None:
        return None
    try:
        from arlab.config import validate_component

        node = up[1]["tokenizer"]
        return float(sum(p * p for p in validate_component("tokenizer", node)[1].token_scales()))
    except (KeyError, TypeError, ConfigError):
        return None


def run_quantities(run: Run) -> dict[str, float]:
    out = {}
    for key, (_, metric) in QUANTITIES.items():
        v = num(run.metrics.get(metric)) if metric else None
        if v is not None:
            out[key] = v
    ce, tokens = num(run.metrics.get("val/ce")), tokens_per_image(run)
    if ce is not None and tokens:
        out["val_bits_per_image"] = ce * tokens / math.log(2)
    return out


SPEED_FORMAT = "arlab-speed/1"
SPEED_COLUMNS = {"bench_train_images_per_s": ("train images/s (bench)", "train_images_per_s"),
                 "bench_sample_images_per_s": ("sampling images/s (bench)", "sample_images_per_s")}


def read_speed(path: str | Path) -> dict[str, Any]:
    """A speed file of ``benchmarks/bench_experiments.py --json``: every experiment timed in one process on one
    machine (``format``, ``device``, ``threads``, ``train_batch``, ``sample_batch`` and ``rows`` of
    ``experiment``, ``params``, ``train_images_per_s``, ``sample_images_per_s``)."""
    body = read_json(Path(path), "speed file")
    rows = body.get("rows")
    if body.get("format") != SPEED_FORMAT or not isinstance(rows, list):
        raise ConfigError(f"--speed {path}: not a speed file ('format: {SPEED_FORMAT}' with 'rows'); write one with "
                          "python benchmarks/bench_experiments.py --json FILE")
    for i, r in enumerate(rows):
        missing = [k for k in ("experiment", "params", *(m for _, m in SPEED_COLUMNS.values())) if k not in r]
        if missing:
            raise ConfigError(f"--speed {path}: rows[{i}] lacks {', '.join(missing)}")
    return body


def speed_of(runs: list[Run], speed: dict[str, Any]) -> tuple[dict[str, float], str | None]:
    """The speed file's row for a group of runs: the same experiment name *and* the same trainable parameter
    count (a run trained with other overrides of the experiment is another model; the benchmark builds the
    experiment as it is now). Returns ({column: value}, None) or ({}, why not)."""
    name = runs[0].name
    rows = [r for r in speed["rows"] if r["experiment"] == name]
    if not rows:
        return {}, None
    params = {num(r.metrics.get("model/params")) for r in runs}
    row = next((r for r in rows if {float(r["params"])} == params), None)
    if row is None:
        return {}, (f"{name}: the benchmark's model has {rows[0]['params']:.0f} parameters, the runs "
                    f"{', '.join('?' if p is None else f'{p:.0f}' for p in sorted(params, key=lambda p: p or 0))}")
    return {key: float(row[field]) for key, (_, field) in SPEED_COLUMNS.items()}, None


def setting_text(setting: dict[str, Any]) -> str:
    """A sampling setting as text, keys sorted: ``cfg=2 schedule=half-linear ...``."""
    return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(setting.items()))


def best_settings(ev: dict[str, Any]) -> dict[str, tuple[float, dict[str, Any]]]:
    """Per metric: the best value over the file's ``settings`` by its ``directions`` (min or max; the first
    setting wins ties), and that setting. Metrics without a direction come from the file's ``best``."""
    out: dict[str, tuple[float, dict[str, Any]]] = {}
    directions = ev.get("directions") or {}
    for metric, direction in sorted(directions.items()):
        if direction not in ("min", "max"):
            raise ConfigError(f"eval result {ev.get('_file')}: directions.{metric} is {direction!r}, not min or max")
        best: tuple[float, dict[str, Any]] | None = None
        for s in ev.get("settings") or []:
            v = num((s.get("metrics") or {}).get(metric))
            if v is not None and (best is None or (v < best[0] if direction == "min" else v > best[0])):
                best = (v, s.get("setting") or {})
        if best is not None:
            out[metric] = best
    for metric, b in sorted((ev.get("best") or {}).items()):
        if metric not in out and num((b or {}).get("value")) is not None:
            out[metric] = (float(b["value"]), b.get("setting") or {})
    return out
