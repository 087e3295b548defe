"""``arlab train EXP --seeds 0,1,2``: one experiment trained once per seed, into sibling run directories.

Layout: ``<base>/seed<k>`` for seed ``k``, where ``<base>`` is ``run.dir`` when given, else
``runs/<experiment>`` (a fixed folder, not a time-stamped one, so that the same command finds its runs
again). Each seed's run is an ordinary run directory (``run.seed=k``, ``run.dir=<base>/seed<k>``); the
seeds train one after the other. Re-running the command skips every seed whose run has finished
(``metrics.json`` written, same config) and resumes an interrupted one from its ``last.ckpt``; a
finished or started run with another config is refused with the differing keys (as ``arlab train``
refuses one). Upstream runs (a generator's tokenizer) are named by the experiment, not by the seed, so
the first seed trains a missing one and the others reuse it. ``arlab compare <base>`` then reads the
siblings as one group.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from arlab.config import load_experiment
from arlab.errors import ConfigError
from arlab.rundir import CONFIG, check_same_config, has_checkpoints

log = logging.getLogger("arlab.seeds")


@dataclass
class SeedRun:
    seed: int
    run: Path
    status: str  # trained, resumed or skipped (finished before)
    metrics: dict[str, Any] = field(default_factory=dict)


def seed_dir(base: str | Path, seed: int) -> Path:
    return Path(base) / f"seed{seed}"


def base_dir(experiment: str, overrides: list[str]) -> tuple[Path, str]:
    """The folder holding the seed runs of ``experiment`` with ``overrides``, and the experiment's name."""
    for item in overrides:
        if item.split("=", 1)[0].strip() == "run.seed":
            raise ConfigError(f"--seeds and the override '{item}' both set run.seed; drop one")
    exp = load_experiment(experiment, overrides)
    base = Path(exp.run.dir) if exp.run.dir else Path("runs") / exp.name
    if (base / CONFIG).is_file():
        raise ConfigError(f"--seeds: '{base}' is a run directory (it holds {CONFIG}); give the experiment (a name or "
                          "YAML file) and a new run.dir (or none) for the folder of seed<k> runs")
    return base, exp.name


def train_seeds(experiment: str, overrides: list[str], seeds: list[int]) -> list[SeedRun]:
    """Train ``experiment`` once per seed into ``<base>/seed<k>`` (see the module docstring); returns one
    :class:`SeedRun` per seed, in the order given."""
    from arlab.train import fit  # (Lightning loads only when training)

    if not seeds:
        raise ConfigError("--seeds: give at least one seed, e.g. --seeds 0,1,2")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {','.join(map(str, seeds))}: a seed is repeated")
    base, name = base_dir(experiment, overrides)
    out = []
    for k in seeds:
        run = seed_dir(base, k)
        exp = load_experiment(experiment, [*overrides, f"run.seed={k}", f"run.dir={run}"])
        if (run / "metrics.json").is_file() and (run / CONFIG).is_file():
            check_same_config(run, exp)
            log.info("seed %d: %s has finished; skipped", k, run)
            out.append(SeedRun(k, run, "skipped"))
            continue
        status = "resumed" if has_checkpoints(run) else "trained"
        log.info("seed %d of %s: %s into %s", k, name, "resuming" if status == "resumed" else "training", run)
        out.append(SeedRun(k, run, status, fit(exp)))
    return out
