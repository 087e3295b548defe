"""Run directories and the files in them: ``config.yaml``, ``metrics.json``, checkpoints.

A run directory (``runs/<experiment>/<time>`` unless ``run.dir`` names one) holds::

    config.yaml              the resolved config (reproduces the run on its own)
    checkpoints/last.ckpt    resumable (model, optimizers, data position, RNG); plus step-N.ckpt
    tb/                      TensorBoard scalars and image grids
    metrics.json             final metrics, flat keys, numbers only
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from arlab.errors import ConfigError


def run_dir(exp: Any) -> Path:
    """The run directory of experiment ``exp`` (created), with its resolved ``config.yaml`` written into it."""
    d = exp.run.dir or os.path.join("runs", exp.name, _dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
    exp.run.dir = d
    exp.tree["run"]["dir"] = d
    path = Path(d)
    path.mkdir(parents=True, exist_ok=True)
    exp.save(path / "config.yaml")
    return path


def run_of_checkpoint(ckpt: str | os.PathLike) -> Path:
    """The run directory a checkpoint belongs to (``<run>/checkpoints/x.ckpt`` → ``<run>``)."""
    ckpt = Path(ckpt)
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested metrics → flat ``{"a/b": number}``; non-numbers are dropped, tensors become floats."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten_metrics(v, key + "/"))
            continue
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        if isinstance(v, bool):
            v = int(v)
        if isinstance(v, (int, float)) and math.isfinite(float(v)):
            out[key] = v
    return out


def write_metrics(run: str | os.PathLike, metrics: Mapping[str, Any]) -> Path:
    """``<run>/metrics.json``: the flattened numeric metrics, sorted keys."""
    path = Path(run) / "metrics.json"
    path.write_text(json.dumps(flatten_metrics(metrics), indent=2, sort_keys=True) + "\n")
    return path


def read_task_checkpoint(path: str | os.PathLike, task: str, map_location: str = "cpu") -> tuple[dict, dict[str, Any]]:
    """Load a Lightning checkpoint written by ``arlab train`` for a ``task: <task>`` experiment: returns
    (checkpoint, its hyper-parameters); a :class:`ConfigError` naming the file when it is missing or of
    another task."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{task} checkpoint '{path}' does not exist")
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    hp = ckpt.get("hyper_parameters") or {}
    found = (hp.get("experiment") or {}).get("task", {}).get("type")
    if found != task:
        raise ConfigError(f"'{path}' is not a {task} checkpoint (its task is {found!r}); give the checkpoint of a "
                          f"'task: {task}' run (runs/<experiment>/checkpoints/last.ckpt)")
    return ckpt, hp
