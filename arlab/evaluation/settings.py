"""Sampling settings of an ``arlab eval`` sweep and the choice of the best one per metric.

A :class:`Setting` is one point of the sweep (CFG scale and schedule, temperature, top-k, top-p); the sweep
is the Cartesian product of the option lists, each value left unset taken from the run's task defaults
(``sample_cfg``, ...), duplicates dropped, in the order the options were given. :func:`best_per_metric`
picks, for every ranked metric (direction ``min`` or ``max``), the setting with the best value.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from arlab.generator.sample import sampling_options


@dataclass(frozen=True)
class Setting:
    """One sampling setting; ``asdict`` gives the JSON ``setting`` object."""

    cfg: float
    schedule: str
    temperature: float
    top_k: int
    top_p: float

    @property
    def id(self) -> str:
        """A folder-safe name, e.g. ``cfg2-half-linear-t1-k0-p0.95``."""
        return f"cfg{self.cfg:g}-{self.schedule}-t{self.temperature:g}-k{self.top_k}-p{self.top_p:g}"

    def options(self) -> dict[str, Any]:
        """Keyword arguments of :meth:`Generator.sample`."""
        return {"cfg_scale": self.cfg, "cfg_schedule": self.schedule, "temperature": self.temperature,
                "top_k": self.top_k, "top_p": self.top_p}

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def sweep(task_cfg: Any, cfgs: Sequence[float] | None = None, schedules: Sequence[str] | None = None,
          temperatures: Sequence[float] | None = None, top_ks: Sequence[int] | None = None,
          top_ps: Sequence[float] | None = None) -> list[Setting]:
    """The Cartesian product of the given values (None or empty: the run's default), duplicates dropped."""
    out: list[Setting] = []
    for c, s, t, k, p in itertools.product(cfgs or [None], schedules or [None], temperatures or [None],
                                           top_ks or [None], top_ps or [1.0]):
        o = sampling_options(task_cfg, c, s, t, k, p)
        setting = Setting(float(o["cfg_scale"]), str(o["cfg_schedule"]), float(o["temperature"]), int(o["top_k"]),
                          float(o["top_p"]))
        if setting not in out:
            out.append(setting)
    return out


def best_per_metric(results: Sequence[dict[str, Any]], directions: dict[str, str]) -> dict[str, dict[str, Any]]:
    """``{metric: {"value", "setting"}}`` over ``results`` (each ``{"setting": {...}, "metrics": {...}}``) for
    every metric with a direction; non-finite values never win; the first setting wins a tie."""
    best: dict[str, dict[str, Any]] = {}
    for name, direction in directions.items():
        sign = -1.0 if direction == "max" else 1.0
        for r in results:
            v = r["metrics"].get(name)
            if v is None or not math.isfinite(v):
                continue
            if name not in best or sign * v < sign * best[name]["value"]:
                best[name] = {"value": v, "setting": r["setting"]}
    return best
