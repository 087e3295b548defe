"""Run directories and the files in them: ``config.yaml``, ``metrics.json``, checkpoints.

A run directory (``runs/<experiment>/<time>`` unless ``run.dir`` names one) holds::

    config.yaml              the resolved config (reproduces the run on its own)
    checkpoints/last.ckpt    resumable (model, optimizers, data position, RNG); plus step-N.ckpt
    tb/                      TensorBoard scalars and image grids
    metrics.json             final metrics, flat keys, numbers only
    .lock                    held by the ``arlab train`` writing it (a second one is refused)

Run directories tell the truth: ``config.yaml`` stores ``run.dir: .`` (the folder holding it), so a
copied or moved run resumes where it is; resuming with a config that differs from the saved one is
refused with the differing keys listed (a new ``run.dir`` starts a new run); files are written
atomically.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
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
import yaml

from arlab.errors import ConfigError
from arlab.utils import atomic_write

CONFIG = "config.yaml"
# keys that may differ when a run is resumed: they do not change what trains
RESUMABLE_CHANGES = ("run.dir", "run.resume", "trainer.enable_progress_bar", "description")


def flat_keys(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A config tree → ``{"a.b.c": leaf}`` (an empty mapping is a leaf): what config diffs and run grouping
    compare."""
    if isinstance(tree, Mapping) and tree:
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flat_keys(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def config_differences(saved: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``key: old → new`` for every key whose value differs (keys in RESUMABLE_CHANGES excepted)."""
    a, b = flat_keys(saved), flat_keys(new)
    out = []
    for key in sorted(set(a) | set(b)):
        if key in RESUMABLE_CHANGES or a.get(key, "<absent>") == b.get(key, "<absent>"):
            continue
        out.append(f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
    return out


def has_checkpoints(run: Path) -> bool:
    return any((run / "checkpoints").glob("*.ckpt"))


def planned_run_dir(exp: Any) -> Path:
    """The run directory ``exp`` will use (``run.dir``, else ``runs/<experiment>/<time>``; set in ``exp``);
    nothing is created."""
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
    return path


def run_dir(exp: Any) -> Path:
    """The run directory of experiment ``exp`` (created), with its resolved ``config.yaml`` written into it.

    An existing run directory with checkpoints is only reused by the experiment it holds: a config that
    differs (other than :data:`RESUMABLE_CHANGES`) is refused with the differing keys, before anything
    is written."""
    path = planned_run_dir(exp)
    d = exp.run.dir
    saved_path = path / CONFIG
    if saved_path.is_file() and has_checkpoints(path):
        check_same_config(path, exp)
        if exp.run.resume == "never":
            raise ConfigError(f"run.resume=never would train from scratch over the checkpoints in '{d}'; give a new "
                              "run.dir for a new run (or resume: auto)")
    path.mkdir(parents=True, exist_ok=True)
    tree = json.loads(json.dumps(exp.tree))
    tree["run"]["dir"] = "."  # the folder holding config.yaml: the run moves with its folder
    atomic_write(saved_path, f"# resolved config of experiment {exp.name} (arlab; resume or reproduce with "
                             f"'arlab train {saved_path}')\n" + exp.to_yaml(tree=tree))
    return path


def check_same_config(run: Path, exp: Any) -> None:
    """Refuse ``exp`` for the run in ``run`` when its saved ``config.yaml`` differs (other than
    :data:`RESUMABLE_CHANGES`): one line with the differing keys."""
    saved_path = Path(run) / CONFIG
    try:
        saved = yaml.safe_load(saved_path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{saved_path} is not readable YAML ({e}); this run directory cannot be resumed: "
                          "choose another run.dir") from None
    diff = config_differences(saved or {}, exp.tree)
    if diff:
        more = "; ..." if len(diff) > 8 else ""
        raise ConfigError(f"run directory '{exp.run.dir}' holds a run with another config ({'; '.join(diff[:8])}"
                          f"{more}): resume it unchanged with 'arlab train {saved_path}', or give a new run.dir for a "
                          "new run")


class RunLock:
    """An exclusive lock on a run directory, held while ``arlab train`` writes it: a second writer is
    refused in one line naming the holder's pid (the lock goes with the process, even when killed)."""

    def __init__(self, run: Path):
        self.path = Path(run) / ".lock"
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ConfigError(f"run directory '{self.path.parent}' is in use by another arlab train (pid {holder}); "
                              "wait for it to finish or give another run.dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


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
    text = json.dumps(flatten_metrics(metrics), indent=2, sort_keys=True) + "\n"
    return atomic_write(Path(run) / "metrics.json", text)


def _load_error(e: BaseException) -> str:
    """A one-line reason from what ``torch.load`` raised on a bad file."""
    text = str(e).strip()
    m = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    if m:  # weights_only refused the pickle: not a checkpoint (or not one arlab writes)
        return f"unpickling failed: {m.group(1).strip()}"
    first = text.splitlines()[0].split(". This is an internal")[0].strip() if text else ""
    return f"{type(e).__name__}: {first}"[:200] if first else type(e).__name__


def read_task_checkpoint(path: str | os.PathLike, task: str | tuple[str, ...], map_location: str = "cpu",
                         mmap: bool = False) -> tuple[Any, Any]:
    """Load a Lightning checkpoint written by ``arlab train`` for a ``task: <task>`` experiment: returns
    (checkpoint, its hyper-parameters); a :class:`ConfigError` naming the file when it is missing, is not a
    readable checkpoint (empty, truncated, another format) or is of another task. ``mmap``: map the tensors
    instead of reading them (a cheap check of a large file). ``task`` may be a tuple of accepted tasks."""
    tasks = (task,) if isinstance(task, str) else tuple(task)
    task = " or ".join(tasks)
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
    if found not in tasks:
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
