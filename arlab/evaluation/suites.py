"""Which metrics ``arlab eval`` computes: the ones named, or the run's ``task.eval_metrics`` plus its dataset's
standard suite; their directions, feature networks and reference splits; the ``--metrics list`` text.

A **suite** is ``registry/eval-suite/<name>.yaml`` (``datasets``: prefixes of dataset names, ``metrics``:
metric presets or names, ``features``: the feature network of rFID and ``--images``). A suite metric that
cannot be built here (e.g. its classifier checkpoint has not been trained) is left out with its reason,
which the report records under ``"skipped"``; a metric named explicitly must work.
"""

from __future__ import annotations

import logging
from dataclasses import fields, is_dataclass
from typing import Any

import yaml

from arlab import registry
from arlab.config import build, presets, resolve_node, validate_component
from arlab.errors import ArlabError, ConfigError
from arlab.metric.reference import ReferenceConfig

log = logging.getLogger("arlab.eval")
SUITES = "eval-suite"


def suite_for(dataset: str) -> dict[str, Any] | None:
    """The suite whose ``datasets`` prefixes match ``dataset`` (first by file name), or None."""
    for name, path in presets(SUITES).items():
        body = yaml.safe_load(path.read_text()) or {}
        if not isinstance(body, dict) or not isinstance(body.get("metrics", []), list):
            raise ConfigError(f"{path}: an eval suite is a mapping with 'datasets', 'metrics' (a list), 'features'")
        if any(str(dataset).startswith(str(p)) for p in body.get("datasets", [])):
            return {"name": name, **body}
    return None


def metric_config(name: str, where: str = "--metrics") -> tuple[registry.Entry, Any]:
    """(entry, validated Config) of a metric preset or name; a one-line error naming ``where`` otherwise."""
    return validate_component("metric", resolve_node("metric", name, source=where), where=where)


def features_of(cfg: Any) -> Any | None:
    """The ``features`` node of a metric Config that has one."""
    if is_dataclass(cfg) and "features" in {f.name for f in fields(cfg)}:
        return cfg.features
    return None


def usable(name: str) -> str | None:
    """None when metric ``name`` can run here, else why not (one line)."""
    try:
        _, cfg = metric_config(name, where=f"eval suite metric {name}")
        feats = features_of(cfg)
        if feats is not None:
            build("features", feats, where=f"metric {name}.features")
    except ArlabError as e:
        return str(e)
    return None


def choose_metrics(named: list[str] | None, task_metrics: list[str], dataset: str) -> tuple[list[str], dict[str, str]]:
    """(metric names, {skipped suite metric: reason}); ``named`` (``--metrics``) replaces the default."""
    if named:
        for name in named:
            metric_config(name)
        return list(named), {}
    names, skipped = list(task_metrics), {}
    suite = suite_for(dataset)
    for name in (suite or {}).get("metrics", []):
        if name in names:
            continue
        why = usable(name)
        if why is None:
            names.append(name)
        else:
            skipped[name] = why
            log.warning("eval suite %s: leaving out %s (%s)", suite["name"], name, why)
    if not names:
        raise ConfigError(f"no metrics to compute: the run has no task.eval_metrics and dataset '{dataset}' no usable "
                          "eval suite; name them with --metrics (arlab eval --metrics list)")
    return names, skipped


def directions(names: list[str]) -> dict[str, str]:
    """``{output: "min" | "max"}`` of the ranked outputs of these metrics."""
    out: dict[str, str] = {}
    for name in names:
        entry, cfg = metric_config(name)
        out.update({k: v for k, v in entry.cls.directions(cfg).items() if v is not None})
    return out


def provenance(names: list[str], images: str | None) -> tuple[dict[str, str], dict[str, str]]:
    """({metric: feature-network identity}, {metric: "reference:split"}) of the metrics that have them."""
    feats, refs = {}, {}
    for name in names:
        _, cfg = metric_config(name)
        node = features_of(cfg)
        if node is not None:
            feats[name] = build("features", node).identity()
        if isinstance(cfg, ReferenceConfig):
            refs[name] = f"{cfg.reference or images}:{cfg.split}"
    return feats, refs


def joined(by_metric: dict[str, str]) -> str:
    """The distinct values, in order, joined by ", " (the report's one-string ``features`` / ``reference``)."""
    return ", ".join(dict.fromkeys(by_metric.values()))


def listing() -> str:
    """``arlab eval --metrics list``: registered metrics with their ranked outputs, presets, suites."""
    lines = ["metrics (registered components; name one, or a preset, in --metrics):"]
    for entry in registry.entries("metric"):
        try:
            dirs = entry.cls.directions(entry.cls.Config())
        except (ArlabError, TypeError):
            dirs = {}
        ranked = ", ".join(f"{k} ({v})" for k, v in dirs.items() if v) or "-"
        lines.append(f"  {entry.name:<18} {entry.doc}  [ranks: {ranked}]")
    lines.append("presets (registry/metric/*.yaml):")
    for name, path in presets("metric").items():
        first = next((s.lstrip("# ").strip() for s in path.read_text().splitlines() if s.startswith("#")), "")
        lines.append(f"  {name:<28} {first}")
    lines.append("suites (registry/eval-suite/*.yaml; the default adds the dataset's suite to task.eval_metrics):")
    for name, path in presets(SUITES).items():
        body = yaml.safe_load(path.read_text()) or {}
        lines.append(f"  {name:<10} datasets {body.get('datasets')}: {', '.join(body.get('metrics', []))}; "
                     f"features {body.get('features')}")
    return "\n".join(lines)
