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
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from arlab.errors import ConfigError


def run_dir(exp: Any) -> Path:
    """The run directory of experiment ``exp`` (created), with its resolved ``config.yaml`` written into it."""
    d = exp.run.dir or os.path.join("runs", exp.name, _dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
    path = Path(d)
    clash = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if clash is not None:
        what = "is an existing file" if clash == path else f"is under '{clash}', an existing file"
        raise ConfigError(f"run.dir '{d}' {what}; give a folder (or leave run.dir empty for runs/<experiment>/<time>)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        if (path / "config.yaml").is_dir():
            raise IsADirectoryError(f"'{path / 'config.yaml'}' is a folder")
    except OSError as e:
        raise ConfigError(f"run.dir '{d}' cannot be used as a run directory: {e.strerror or e}") from None
    exp.run.dir = d
    exp.tree["run"]["dir"] = d
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


def _load_error(e: BaseException) -> str:
    """A one-line reason from what ``torch.load`` raised on a bad file."""
    text = str(e).strip()
    m = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    if m:  # weights_only refused the pickle: not a checkpoint (or not one arlab writes)
        return f"unpickling failed: {m.group(1).strip()}"
    first = text.splitlines()[0].split(". This is an internal")[0].strip() if text else ""
    return f"{type(e).__name__}: {first}"[:200] if first else type(e).__name__


def read_task_checkpoint(path: str | os.PathLike, task: str, map_location: str = "cpu",
                         mmap: bool = False) -> tuple[Any, Any]:
    """Load a Lightning checkpoint written by ``arlab train`` for a ``task: <task>`` experiment: returns
    (checkpoint, its hyper-parameters); a :class:`ConfigError` naming the file when it is missing, is not a
    readable checkpoint (empty, truncated, another format) or is of another task. ``mmap``: map the tensors
    instead of reading them (a cheap check of a large file)."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a checkpoint file" if path.is_dir() else "does not exist"
        raise ConfigError(f"{task} checkpoint '{path}' {what}")
    if path.stat().st_size == 0:
        raise ConfigError(f"'{path}' is not a readable checkpoint (the file is empty)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True,
                          mmap=mmap and zipfile.is_zipfile(path))  # (only torch's zip format maps)
    except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError, KeyError, IndexError, TypeError,
            AttributeError, ImportError, OSError) as e:  # what torch.load raises on files it cannot read
        raise ConfigError(f"'{path}' is not a readable checkpoint ({_load_error(e)}); give the checkpoint of a "
                          f"'task: {task}' run (runs/<experiment>/checkpoints/last.ckpt)") from None
    if not isinstance(ckpt, Mapping):
        raise ConfigError(f"'{path}' is not a readable checkpoint (it holds a {type(ckpt).__name__}, not a "
                          "Lightning checkpoint written by 'arlab train')")
    hp = ckpt.get("hyper_parameters")
    experiment = hp.get("experiment") if isinstance(hp, Mapping) else None
    if not isinstance(experiment, Mapping) or not isinstance(ckpt.get("state_dict"), Mapping):
        missing = "hyper_parameters.experiment" if not isinstance(experiment, Mapping) else "state_dict"
        raise ConfigError(f"'{path}' is not a readable checkpoint (it has no {missing}: not written by "
                          f"'arlab train'); give the checkpoint of a 'task: {task}' run")
    task_node = experiment.get("task")
    found = task_node.get("type") if isinstance(task_node, Mapping) else None
    if found != task:
        raise ConfigError(f"'{path}' is not a {task} checkpoint (its task is {found!r}); give the checkpoint of a "
                          f"'task: {task}' run (runs/<experiment>/checkpoints/last.ckpt)")
    return ckpt, hp


def check_resume_checkpoint(path: str | os.PathLike, task: str) -> None:
    """Refuse, before any training, a checkpoint that cannot resume a ``task: <task>`` run: unreadable
    (empty, truncated, not a checkpoint), of another task, or holding weights only (no optimizer state)."""
    try:
        ckpt, _ = read_task_checkpoint(path, task, mmap=True)
    except ConfigError as e:
        raise ConfigError(f"run.resume: {e} (or train into a new run.dir)") from None
    if "optimizer_states" not in ckpt:
        raise ConfigError(f"run.resume: '{path}' holds weights only (no optimizer state), so it cannot resume a "
                          "run; give a checkpoint that 'arlab train' wrote (checkpoints/last.ckpt or step-N.ckpt)")
