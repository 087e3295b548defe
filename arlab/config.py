"""Experiments: composed (:mod:`arlab.compose`), resolved and validated before any work starts; components
built from validated nodes.

An experiment file has one **slot** per component kind and a few plain **sections**::

    base: [../_base/shapes.yaml]      # optional: files merged first, left to right
    description: quick tokenizer on shapes
    data: shapes                      # a preset (registry/data/shapes.yaml) or a component name
    quantizer: {preset: fsq-8-5-5-5, levels: [8, 6, 5]}   # a preset plus overrides
    backbone: {type: llama, depth: 4} # a component directly, with parameters
    trainer: {max_steps: 2000}
    run: {seed: 0}

The result (:class:`Experiment`) is fully explicit: every slot is ``{type: name, **all params}`` with
defaults filled in and ``${...}`` interpolations resolved, so ``config.yaml`` in a run directory
reproduces the run on its own. :func:`build` makes one component from any node form (preset name,
``{preset: ..}``, ``{type: ..}``, a validated Config); it is the one build path, used by experiments
and by components that hold others (a tokenizer its quantizer, a generator its backbone).

Longer than 400 lines because the section schemas (``run``, ``trainer``) with their range checks, the
validation that reports each bad key with its file, and the resolved ``Experiment`` form one API that
:mod:`arlab.compose` feeds; composition itself is in that module.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from arlab import registry

# re-exported: arlab.config is the public API for finding and loading experiments
from arlab.compose import (  # noqa: F401
    CMDLINE,
    META_KEYS,
    Composer,
    Path_t,
    display,
    experiments,
    find_experiment,
    load_with_bases,
    parse_overrides,
    presets,
    search_roots,
)
from arlab.errors import ConfigError, did_you_mean, format_choices

# ----------------------------------------------------------------------------- range checks


def check_range(name: str, value: Any, *, ge: float | None = None, gt: float | None = None,
                le: float | None = None, lt: float | None = None) -> None:
    """A ConfigError ``name=value: must be ...`` unless ``value`` is a finite number within the bounds (a Config's
    ``__post_init__`` calls it, so ``arlab config`` already refuses the value, naming the key and its file)."""
    bounds = [f"{op} {b:g}" for op, b in ((">=", ge), (">", gt), ("<=", le), ("<", lt)) if b is not None]
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (ge is None or value >= ge) and (gt is None or value > gt)
    ok = ok and (le is None or value <= le) and (lt is None or value < lt)
    if not ok:
        raise ConfigError(f"{name}={value!r}: must be a number {' and '.join(bounds)}".rstrip())


# ----------------------------------------------------------------------------- sections


@dataclass
class RunConfig:
    """Where a run writes and how it is seeded."""

    dir: str = ""  # run directory; empty: runs/<experiment>/<YYYYmmdd-HHMMSS>
    seed: int = 0  # global seed (data order, init, sampling); independent of the number of ranks
    resume: str = "auto"  # auto: continue from <dir>/checkpoints/last.ckpt if present; never; or a path

    def __post_init__(self) -> None:
        if self.resume not in ("auto", "never") and not self.resume.endswith(".ckpt"):
            raise ConfigError(f"run.resume must be 'auto', 'never' or a .ckpt path, got {self.resume!r}")
        if not 0 <= self.seed < 2**32:  # Lightning would silently replace it by 0
            raise ConfigError(f"seed={self.seed}: must be in [0, 2**32 - 1]")


@dataclass
class TrainerConfig:
    """Lightning Trainer settings (the subset arlab supports, passed through as keywords)."""

    max_steps: int = 1000  # optimizer steps; -1 for no limit (then max_epochs decides)
    max_epochs: int = -1  # -1: no epoch limit
    accelerator: str = "auto"  # cpu, gpu, auto
    devices: Any = "auto"  # number of devices or 'auto'
    num_nodes: int = 1
    strategy: str = "auto"  # auto, ddp, ddp_spawn, ...
    precision: str = "32-true"  # 32-true, bf16-mixed, 16-mixed; auto-bf16: bf16-mixed where native, else 32-true
    log_every_n_steps: int = 25
    val_check_interval: Any = 1.0  # fraction of an epoch (float) or every N steps (int)
    limit_val_batches: Any = 1.0
    check_val_every_n_epoch: Any = 1  # null with an int val_check_interval counts across epochs
    gradient_clip_val: Any = None
    accumulate_grad_batches: int = 1
    checkpoint_every_n_steps: int = 500  # also saves last.ckpt at the end
    deterministic: bool = False
    enable_progress_bar: bool = True

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"trainer.precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(f"trainer.max_steps must be positive or -1, got {self.max_steps}")
        if self.max_epochs < -1:
            raise ConfigError(f"max_epochs={self.max_epochs}: must be >= 0, or -1 for no epoch limit")
        check_range("log_every_n_steps", self.log_every_n_steps, ge=1)
        check_range("checkpoint_every_n_steps", self.checkpoint_every_n_steps, ge=0)
        check_range("num_nodes", self.num_nodes, ge=1)
        check_range("accumulate_grad_batches", self.accumulate_grad_batches, ge=1)
        for key, bound in (("val_check_interval", {"gt": 0}), ("limit_val_batches", {"ge": 0}),
                           ("check_val_every_n_epoch", {"ge": 1}), ("gradient_clip_val", {"ge": 0})):
            if getattr(self, key) is not None:  # None: Lightning's default
                check_range(key, getattr(self, key), **bound)

    def lightning_kwargs(self) -> dict[str, Any]:
        kw = dataclasses.asdict(self)
        kw.pop("checkpoint_every_n_steps")
        kw["precision"] = resolve_precision(self.precision, self.accelerator)
        return kw


PRECISIONS = ("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "64-true", "auto-bf16")


def cpu_bf16_flags() -> dict[str, bool]:
    """What this CPU offers for bfloat16: ``onednn`` (oneDNN runs bf16 kernels at its effective ISA, which
    ``ONEDNN_MAX_CPU_ISA`` can lower), ``avx512_bf16`` and ``amx`` (native bf16 instructions)."""
    import torch  # here: reading configs does not need torch

    def flag(fn: Any) -> bool:
        return bool(fn()) if fn is not None else False

    return {"onednn": flag(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)),
            "avx512_bf16": flag(getattr(torch.cpu, "_is_avx512_bf16_supported", None)),
            "amx": flag(getattr(torch.cpu, "_is_amx_tile_supported", None))}


def native_bf16(accelerator: str = "auto") -> bool:
    """Whether the device training runs on computes bfloat16 natively: a CUDA GPU with bf16 support, or a CPU
    whose oneDNN has bf16 kernels and which has AVX512-BF16 or AMX. Elsewhere bf16 autocast is emulated: the
    quickstart's tokenizer step took 5.0 s in bf16 against 0.37 s in float32 with oneDNN held to AVX2
    (``ONEDNN_MAX_CPU_ISA=AVX2``), and 0.15 s against 0.25 s with AMX (benchmarks/bench_precision.py,
    docs/results/precision-*.json)."""
    import torch

    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    f = cpu_bf16_flags()
    return f["onednn"] and (f["avx512_bf16"] or f["amx"])


def resolve_precision(precision: str, accelerator: str = "auto") -> str:
    """``auto-bf16`` → ``bf16-mixed`` where :func:`native_bf16`, else ``32-true``; other values unchanged."""
    if precision != "auto-bf16":
        return precision
    return "bf16-mixed" if native_bf16(accelerator) else "32-true"


SECTIONS: dict[str, type] = {"run": RunConfig, "trainer": TrainerConfig}


# ----------------------------------------------------------------------------- validation


def _type_error_message(e: OmegaConfBaseException) -> str:
    msg = str(getattr(e, "msg", "") or e).split("\n")[0]
    return msg


def validate_dataclass(schema: type, node: Mapping[str, Any], *, path: str, where: Any = None,
                       what: str = "") -> Any:
    """``node`` (a plain dict) → an instance of ``schema``, or a ConfigError naming key and file.

    ``where`` maps a key to the file it came from (a callable or a string).
    """
    locate = where if callable(where) else (lambda key, _w=where: _w or "defaults")
    fields = registry.config_fields(schema)
    what = what or path
    for k in node:
        if k not in fields:
            raise ConfigError(
                f"{path}.{k}: unknown parameter of {what} ({locate(k)}).{did_you_mean(k, fields)} "
                f"Valid parameters: {format_choices(fields)}"
            )
    try:
        base = OmegaConf.structured(schema)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path}: {_type_error_message(e)}") from None
    try:
        merged = OmegaConf.merge(base, dict(node))
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        # full_key is "levels[2]" for an item of a list parameter: the parameter is its first name
        full = str(getattr(e, "full_key", "") or getattr(e, "key", "") or "")
        m = re.match(r"\w+", full)
        key = m.group(0) if m else full
        exp_type = fields[key].type if key in fields else "?"
        value = node.get(key, "<missing>")
        if type(e).__name__ == "MissingMandatoryValue":
            raise ConfigError(f"{path}.{key}: required parameter of {what} is missing") from None
        raise ConfigError(
            f"{path}.{key}: {value!r} is not a valid {exp_type} ({locate(key)}): {_type_error_message(e)}"
        ) from None
    except (ConfigError, ValueError, TypeError, AssertionError) as e:
        # a __post_init__ check: blame the parameters its message names, in the order it names them
        msg = str(e)
        raise ConfigError(f"{_post_init_prefix(msg, path, fields)}{msg} ({_blame(msg, node, locate)})") from None
    return obj


def _post_init_prefix(msg: str, path: str, fields: Mapping[str, Any]) -> str:
    """``task.`` before a message that starts with one of its keys (``lr=-1: ...``), else ``task: ``."""
    if msg.startswith(path):
        return ""
    m = re.match(r"(\w+)(\[\d+\])?=", msg)
    return f"{path}." if m and m.group(1) in fields else f"{path}: "


def _blame(msg: str, node: Mapping[str, Any], locate: Any) -> str:
    """The source of the keys a check's message names; ``key: source; ...`` when they come from several
    files (``dim 192 is not divisible by heads 5``: dim from a preset, heads from the command line); the
    key whose value the message quotes when it names none; else the node's own source."""
    hits = [(m.start(), k) for k in node for m in [re.search(rf"(?<![\w.]){re.escape(str(k))}\b", msg)] if m]
    named = [k for _, k in sorted(hits)]
    if not named:  # e.g. "CFG schedule 'foo' does not exist": the key whose value it quotes
        named = [k for k, v in node.items() if isinstance(v, str) and v and f"'{v}'" in msg][:1]
    by_source: dict[str, list[str]] = {}
    for k in named:
        by_source.setdefault(locate(k), []).append(str(k))
    return _sources_text(by_source) if by_source else locate("")


def _sources_text(by_source: Mapping[str, list[str]]) -> str:
    """``file`` when every key came from one file, else ``a, b: file1; c: file2``."""
    if len(by_source) == 1:
        return next(iter(by_source))
    return "; ".join(f"{', '.join(keys)}: {src}" for src, keys in by_source.items())


def validate_component(kind: str, node: Mapping[str, Any], *, where: str = "",
                       path: str | None = None, locate: Any = None) -> tuple[registry.Entry, Any]:
    """A fully expanded node ``{"type": name, **params}`` → (entry, Config instance)."""
    path = path or kind
    if "type" not in node:
        raise ConfigError(f"{path}: missing 'type' ({where or 'defaults'})")
    entry = registry.get(kind, str(node["type"]), where=where)
    params = {k: v for k, v in node.items() if k != "type"}
    return entry, validate_dataclass(entry.config, params, path=path, where=locate or where, what=entry.key)


# ----------------------------------------------------------------------------- experiment


@dataclass
class Experiment:
    """A composed, resolved and validated experiment."""

    name: str
    tree: dict[str, Any]  # explicit, resolved plain config (what config.yaml holds)
    provenance: dict[str, str]  # dotted key -> file it came from
    configs: dict[str, Any] = field(default_factory=dict)  # slot or section -> validated dataclass
    source: str = ""

    @property
    def run(self) -> RunConfig:
        return self.configs["run"]

    @property
    def trainer(self) -> TrainerConfig:
        return self.configs["trainer"]

    def has(self, kind: str) -> bool:
        return kind in self.tree and kind not in SECTIONS

    def config(self, kind: str) -> Any:
        if kind not in self.configs:
            raise ConfigError(
                f"experiment '{self.name}' has no '{kind}' (it has: "
                f"{format_choices(k for k in self.configs if k not in SECTIONS)})"
            )
        return self.configs[kind]

    def build(self, kind: str, *args: Any, **runtime: Any) -> Any:
        """Build the component in slot ``kind`` with its validated config."""
        cfg = self.config(kind)
        entry = registry.get(kind, self.tree[kind]["type"])
        return entry.cls(cfg, *args, **runtime)

    def to_yaml(self, annotate: bool = False, tree: dict[str, Any] | None = None) -> str:
        if not annotate:
            return yaml.dump(tree or self.tree, Dumper=_BlockDictsFlowLists, sort_keys=False, width=100)
        return _annotated_yaml(self.tree, self.provenance)



class _BlockDictsFlowLists(yaml.SafeDumper):
    """Mappings in block style (one key per line), lists of scalars inline: ``levels: [8, 5, 5, 5]``."""


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = all(not isinstance(v, (dict, list)) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_BlockDictsFlowLists.add_representer(list, _represent_list)


def _annotated_yaml(tree: Mapping[str, Any], prov: Mapping[str, str]) -> str:
    lines: list[str] = []

    def emit(node: Mapping[str, Any], prefix: str, indent: int) -> None:
        for k, v in node.items():
            key = f"{prefix}{k}"
            pad = "  " * indent
            if isinstance(v, Mapping) and v:
                lines.append(f"{pad}{k}:")
                emit(v, key + ".", indent + 1)
            else:
                val = yaml.safe_dump(v, default_flow_style=True, width=10_000).strip()
                val = val.removesuffix("\n...").removesuffix("...").strip()
                src = prov.get(key, "default")
                lines.append(f"{pad}{k}: {val}".ljust(48) + f"  # {src}")

    emit(tree, "", 0)
    return "\n".join(lines) + "\n"


def _fill_defaults(composer: Composer, node: dict[str, Any], kind: str, path: Path_t) -> None:
    """Make every parameter explicit (defaults included), recursing into nested component slots."""
    entry = registry.get(kind, node["type"], where=composer.where(path + ("type",)))
    for p in registry.params(entry):
        if p.slot:
            value = node.get(p.name, p.default)
            if isinstance(value, str) and p.name not in node:
                node[p.name] = composer.expand(p.slot, value, f"default of {entry.key}", path + (p.name,))
            elif isinstance(value, str):
                node[p.name] = composer.expand(p.slot, value, composer.where(path + (p.name,)),
                                               path + (p.name,))
            if isinstance(node.get(p.name), dict):
                _fill_defaults(composer, node[p.name], p.slot, path + (p.name,))
        elif p.name not in node and not p.required:
            node[p.name] = copy.deepcopy(p.default)


def _validate_node(composer: Composer, node: Mapping[str, Any], kind: str, path: Path_t) -> Any:
    entry = registry.get(kind, node["type"])
    for p in registry.params(entry):
        if p.slot and isinstance(node.get(p.name), Mapping):
            _validate_node(composer, node[p.name], p.slot, path + (p.name,))
    locate = lambda key: composer.where(path + (key,)) if key else composer.where(path + ("type",))
    return validate_component(kind, node, path=".".join(path), locate=locate)[1]


def _resolve(kind: str, node: Any, source: str, partial: bool) -> tuple[dict[str, Any], Composer]:
    """A node in any accepted form → (fully explicit dict, its composer). ``partial``: keys whose ``${...}``
    point outside the node (e.g. ``${run.seed}`` in a preset) are dropped instead of raising."""
    composer = Composer(SECTIONS)
    expanded = composer.expand(kind, node, source, (kind,))
    _fill_defaults(composer, expanded, kind, (kind,))
    try:
        out = OmegaConf.to_container(OmegaConf.create(expanded), resolve=True)
    except OmegaConfBaseException as e:
        if not partial:
            raise ConfigError(f"{kind}: interpolation failed outside an experiment: {_type_error_message(e)}") from None
        out = {k: v for k, v in expanded.items() if not (isinstance(v, str) and "${" in v)}
    assert isinstance(out, dict)
    return out, composer


def resolve_node(kind: str, node: Any, source: str = "argument") -> dict[str, Any]:
    """A node in any accepted form (name, ``{preset: ...}``, ``{type: ...}``) → fully explicit dict.

    Presets are expanded, nested component slots too, defaults filled in and ``${...}`` resolved
    (interpolations into other slots of an experiment cannot resolve here and raise ConfigError).
    """
    return _resolve(kind, node, source, partial=False)[0]


def validate_preset(kind: str, name: str) -> Any:
    """Expand and validate one preset on its own (interpolations into other slots stay unchecked)."""
    node, composer = _resolve(kind, name, "preset", partial=True)
    return _validate_node(composer, node, kind, (kind,))


def build(kind: str, node: Any, *args: Any, where: str = "", **runtime: Any) -> Any:
    """Build a component from a node: a preset or component name, ``{"preset": p, **overrides}``,
    ``{"type": name, **params}``, or a validated Config instance.

    Keys and types are validated first (nested component slots too); runtime dependencies that are not
    configuration (a vocabulary size, a width) are passed through ``args``/``runtime`` to the constructor.
    """
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        cfg = node
        entry = next((e for e in registry.entries(kind) if isinstance(cfg, e.config)), None)
        if entry is None:
            raise ConfigError(f"{type(cfg).__qualname__} is not the Config of any {kind} component")
    else:
        resolved, composer = _resolve(kind, node, where or "argument", partial=False)
        entry = registry.get(kind, resolved["type"])
        cfg = _validate_node(composer, resolved, kind, (kind,))
    return entry.cls(cfg, *args, **runtime)


def load_experiment(ref: str | os.PathLike, overrides: list[str] | None = None) -> Experiment:
    """Compose, resolve and validate an experiment; raise :class:`ConfigError` on any problem."""
    path = find_experiment(ref)
    composer = Composer(SECTIONS)
    load_with_bases(path, composer)
    for item in overrides or []:  # one layer per item, in order: "x=preset x.k=v" edits the new preset
        composer.apply(parse_overrides([item]), CMDLINE)

    tree = composer.tree
    root = next((r for r in search_roots() if _is_under(path, r / "experiments")), None)
    default_name = (path.resolve().relative_to(root / "experiments").with_suffix("").as_posix()
                    if root else path.stem)
    if path.name == "config.yaml" and "name" in tree:
        default_name = tree["name"]
    tree.setdefault("name", default_name)
    for sec, schema in SECTIONS.items():
        node = tree.setdefault(sec, {})
        for p in registry.params(schema):
            if p.name not in node and not p.required:
                node[p.name] = copy.deepcopy(p.default)
    slots = [k for k in tree if k not in SECTIONS and k not in META_KEYS]
    for k in slots:
        _fill_defaults(composer, tree[k], k, (k,))

    # resolve ${...} interpolations over the explicit tree
    try:
        resolved = OmegaConf.to_container(OmegaConf.create(tree), resolve=True)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "") or ""
        raise ConfigError(f"{key}: interpolation failed ({composer.where(tuple(key.split('.')))}): "
                          f"{_type_error_message(e)}") from None
    assert isinstance(resolved, dict)
    if path.name == "config.yaml" and resolved["run"].get("dir") == ".":
        resolved["run"]["dir"] = str(path.parent)  # a run's config.yaml: the run is the folder holding it
    order = ["name", "description", "run", "trainer"]
    resolved = {k: resolved[k] for k in order if k in resolved} | {
        k: v for k, v in resolved.items() if k not in order}

    configs: dict[str, Any] = {}
    for sec, schema in SECTIONS.items():
        configs[sec] = validate_dataclass(
            schema, resolved[sec], path=sec, what=f"section '{sec}'",
            where=lambda key, _s=sec: composer.where((_s, key)) if key else composer.where((_s,)))
    for k in slots:
        configs[k] = _validate_node(composer, resolved[k], k, (k,))

    prov = {".".join(p): s for p, s in composer.prov.items()}
    exp = Experiment(name=str(resolved["name"]), tree=resolved, provenance=prov, configs=configs,
                     source=display(path))
    for k in slots:  # cross-slot checks: a component's Config may define check(exp)
        check = getattr(configs[k], "check", None)
        if callable(check):
            try:
                check(exp)
            except ConfigError as e:
                raise ConfigError(_with_sources(str(e), composer, prov)) from None
    return exp


def _with_sources(msg: str, composer: Composer, prov: Mapping[str, str]) -> str:
    """A cross-slot check's message with the files of the dotted keys it quotes with their values
    (``tokenizer.image_size=30 ... (command line)``), unless it names a source already."""
    if any(f"({src}" in msg for src in set(prov.values())):
        return msg
    keys = [k for k in dict.fromkeys(re.findall(r"(?<![\w.])(\w+(?:\.\w+)+)=", msg)) if k in prov]
    by_source: dict[str, list[str]] = {}
    for k in keys:
        by_source.setdefault(composer.where(tuple(k.split("."))), []).append(k)
    return f"{msg} ({_sources_text(by_source)})" if by_source else msg


def _is_under(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False
