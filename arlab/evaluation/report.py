"""The ``eval/<name>.json`` report (format in docs/evaluation.md, "arlab eval"), written atomically, and its
TensorBoard copy: scalars ``eval/<name>/<setting>/<metric>`` and ``eval/<name>/best/<metric>`` at the
checkpoint's global step, and an image grid of the best setting, in ``<run>/tb/eval``."""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from arlab.evaluation.settings import best_per_metric
from arlab.utils import atomic_write, image_grid

FORMAT_VERSION = 1


def make_report(*, name: str, kind: str, checkpoint: str | None, step: int | None, run: str | None, n: int,
                features: dict[str, str], reference: dict[str, str], results: list[dict[str, Any]],
                directions: dict[str, str], **extra: Any) -> dict[str, Any]:
    """The report: the keys ``arlab compare`` reads, then ``extra`` (seed, chunk, metric list, skipped ...)."""
    ranked = {k: v for k, v in directions.items() if any(k in r["metrics"] for r in results)}
    return {"format": FORMAT_VERSION, "name": name, "kind": kind, "checkpoint": checkpoint, "step": step, "run": run,
            "n": n, "features": ", ".join(dict.fromkeys(features.values())),
            "reference": ", ".join(dict.fromkeys(reference.values())),
            "features_by_metric": features, "reference_by_metric": reference, "settings": results,
            "best": best_per_metric(results, ranked), "directions": ranked,
            "created": _dt.datetime.now().astimezone().isoformat(timespec="seconds"), **extra}


def _clean(x: Any) -> Any:
    """NaN/inf → None (JSON has no such numbers), numpy scalars → Python."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_report(path: str | os.PathLike, report: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, json.dumps(_clean(report), indent=2) + "\n")


def primary_setting(report: dict[str, Any], metric_order: list[str]) -> str | None:
    """The id of the best setting by the first ranked metric in ``metric_order`` (else the first setting)."""
    for m in metric_order:
        if m in report["best"]:
            best = report["best"][m]["setting"]
            return next(r["id"] for r in report["settings"] if r["setting"] == best)
    return report["settings"][0]["id"] if report["settings"] else None


def log_tensorboard(run: Path, report: dict[str, Any], grid_images: np.ndarray | None, nrow: int,
                    best_id: str | None) -> Path:
    """Scalars of every setting and the best values at the report's step; the best setting's image grid."""
    from torch.utils.tensorboard import SummaryWriter

    folder = run / "tb" / "eval"
    step, name = int(report.get("step") or 0), report["name"]
    with SummaryWriter(str(folder)) as w:
        for r in report["settings"]:
            for k, v in r["metrics"].items():
                if v is not None and math.isfinite(v):
                    w.add_scalar(f"eval/{name}/{r['id']}/{k}", v, step)
        for k, b in report["best"].items():
            w.add_scalar(f"eval/{name}/best/{k}", b["value"], step)
        if grid_images is not None and len(grid_images):
            w.add_image(f"eval/{name}/best/{best_id}", image_grid(grid_images, nrow=nrow), step, dataformats="HWC")
    return folder
