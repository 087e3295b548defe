"""Experiments: YAML presets composed, overridden and validated before any work starts.

An experiment file (``experiments/<group>/<name>.yaml``) has one **slot** per component kind and a
few plain **sections**::

    base: [../_base/shapes.yaml]      # optional: files merged first, left to right
    description: quick tokenizer on shapes
    data: shapes                      # a preset (registry/data/shapes.yaml) or a component name
    quantizer: {preset: fsq-8-5-5-5, levels: [8, 6, 5]}   # a preset plus overrides
    backbone: {type: llama, depth: 4} # a component directly, with parameters
    trainer: {max_steps: 2000}
    run: {seed: 0}

Later layers win: the ``base`` files, then the experiment, then command-line dotlists
(``backbone.depth=8 data=cifar10``). A slot given a name, or a mapping with ``preset:`` or
``type:``, is *replaced* by that preset (so no keys of the old component linger); a mapping
without them edits the current node key by key. Each leaf remembers the file that set it, so
every error names the bad key, its file, the valid choices and the closest match.

The result (:class:`Experiment`) is fully explicit: every slot is ``{type: name, **all params}``
with defaults filled in and ``${...}`` interpolations resolved, so ``config.yaml`` in a run
directory reproduces the run on its own.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import json
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
from arlab.errors import ConfigError, did_you_mean, format_choices

CMDLINE = "command line"
META_KEYS = ("name", "description", "base")

Path_t = tuple[str, ...]


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


@dataclass
class TrainerConfig:
    """Lightning Trainer settings (the subset arlab supports, passed through as keywords)."""

    max_steps: int = 1000  # optimizer steps; -1 for no limit (then max_epochs decides)
    max_epochs: int = -1  # -1: no epoch limit
    accelerator: str = "auto"  # cpu, gpu, auto
    devices: Any = "auto"  # number of devices or 'auto'
    num_nodes: int = 1
    strategy: str = "auto"  # auto, ddp, ddp_spawn, ...
    precision: str = "32-true"  # 32-true, bf16-mixed, 16-mixed
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
        if self.precision not in ("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "64-true"):
            raise ConfigError(
                f"trainer.precision {self.precision!r} is not one of 32-true, bf16-mixed, 16-mixed, "
                "bf16-true, 64-true"
            )
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(f"trainer.max_steps must be positive or -1, got {self.max_steps}")

    def lightning_kwargs(self) -> dict[str, Any]:
        kw = dataclasses.asdict(self)
        kw.pop("checkpoint_every_n_steps")
        return kw


SECTIONS: dict[str, type] = {"run": RunConfig, "trainer": TrainerConfig}


def register_section(name: str, schema: type) -> None:
    """Declare a plain (non-component) top-level section validated by the dataclass ``schema``."""
    SECTIONS[name] = schema


# ----------------------------------------------------------------------------- files


def search_roots() -> list[Path]:
    """Folders holding ``registry/`` and ``experiments/``: $ARLAB_HOME entries, cwd, the repo."""
    roots = [Path(p) for p in os.environ.get("ARLAB_HOME", "").split(os.pathsep) if p]
    roots += [Path.cwd(), Path(__file__).resolve().parent.parent]
    out: list[Path] = []
    for r in roots:
        r = r.resolve()
        if r not in out and ((r / "registry").is_dir() or (r / "experiments").is_dir()):
            out.append(r)
    return out


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        for root in search_roots():
            try:
                return str(path.resolve().relative_to(root))
            except ValueError:
                continue
        return str(path)


def presets(kind: str) -> dict[str, Path]:
    """Preset name → file, over ``registry/<kind>/*.yaml`` of every search root (first wins)."""
    out: dict[str, Path] = {}
    for root in search_roots():
        d = root / "registry" / kind
        if d.is_dir():
            for f in sorted(d.glob("*.yaml")):
                out.setdefault(f.stem, f)
    return out


def experiments() -> dict[str, Path]:
    """Experiment name (``group/name``) → file, over every search root."""
    out: dict[str, Path] = {}
    for root in search_roots():
        d = root / "experiments"
        if d.is_dir():
            for f in sorted(d.rglob("*.yaml")):
                rel = f.relative_to(d).with_suffix("").as_posix()
                if not any(part.startswith("_") for part in rel.split("/")):
                    out.setdefault(rel, f)
    return out


def find_experiment(ref: str | os.PathLike) -> Path:
    """An experiment by file path or by name (``shapes/quickstart``)."""
    p = Path(ref)
    for cand in (p, p.with_suffix(".yaml") if p.suffix != ".yaml" else p):
        if cand.is_file():
            return cand
    known = experiments()
    name = str(ref).removesuffix(".yaml").removeprefix("experiments/")
    if name in known:
        return known[name]
    raise ConfigError(
        f"experiment '{ref}' not found (neither a file nor a name under experiments/)."
        f"{did_you_mean(name, known)} Known experiments: {format_choices(known)}"
    )


def load_yaml(path: Path) -> dict[str, Any]:
    """A YAML file as a plain dict, ``${...}`` interpolations kept as strings."""
    try:
        cfg = OmegaConf.load(path)
    except yaml.YAMLError as e:
        raise ConfigError(f"{_display(path)} is not valid YAML: {e}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{_display(path)}: {e}") from None
    data = OmegaConf.to_container(cfg, resolve=False)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{_display(path)} must hold a mapping, not a {type(data).__name__}")
    return data


# ----------------------------------------------------------------------------- composition


def _is_replacement(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, Mapping) and ("preset" in value or "type" in value))


class _Composer:
    """Merges layers into one tree, expanding component nodes and recording provenance."""

    def __init__(self) -> None:
        self.tree: dict[str, Any] = {}
        self.prov: dict[Path_t, str] = {}
        self.slot_kind: dict[Path_t, str] = {}  # path of every component node → its kind
        self._preset_stack: list[str] = []

    # provenance ----------------------------------------------------------------
    def _forget(self, path: Path_t) -> None:
        n = len(path)
        for p in [p for p in self.prov if p[:n] == path]:
            del self.prov[p]
        for p in [p for p in self.slot_kind if p[:n] == path and p != path]:
            del self.slot_kind[p]

    def _mark(self, path: Path_t, value: Any, source: str) -> None:
        self.prov[path] = source
        if isinstance(value, Mapping):
            for k, v in value.items():
                self._mark(path + (str(k),), v, source)

    def where(self, path: Path_t) -> str:
        """The file that set ``path`` (or its closest ancestor)."""
        for n in range(len(path), 0, -1):
            if path[:n] in self.prov:
                return self.prov[path[:n]]
        return "defaults"

    # component nodes ------------------------------------------------------------
    def expand(self, kind: str, value: Any, source: str, path: Path_t) -> dict[str, Any]:
        """A node (name, or mapping with preset/type) → ``{"type": ..., **explicit params}``."""
        dotted = ".".join(path)
        if isinstance(value, str):
            value = {"preset": value}
        if not isinstance(value, Mapping):
            raise ConfigError(
                f"{dotted}: expected a {kind} preset/component name or a mapping, got "
                f"{type(value).__name__} {value!r} ({source})"
            )
        value = dict(value)
        self._forget(path)
        self.slot_kind[path] = kind
        if "preset" in value:
            name = str(value.pop("preset"))
            known = presets(kind)
            if name in known:
                if name in self._preset_stack:
                    raise ConfigError(f"{dotted}: preset cycle {' -> '.join(self._preset_stack + [name])}")
                self._preset_stack.append(name)
                try:
                    node = self.expand(kind, self._preset_body(kind, known[name]), _display(known[name]),
                                       path)
                finally:
                    self._preset_stack.pop()
            elif name in registry.names(kind):
                node = {"type": name}
                self.prov[path + ("type",)] = source
            else:
                choices = set(known) | set(registry.names(kind))
                raise ConfigError(
                    f"{dotted}: unknown {kind} '{name}' ({source}).{did_you_mean(name, choices)} "
                    f"Valid {kind} presets: {format_choices(known)}; "
                    f"components: {format_choices(registry.names(kind))}"
                )
        elif "type" in value:
            name = str(value.pop("type"))
            registry.get(kind, name, where=f"{dotted}.type, {source}")
            node = {"type": name}
            self.prov[path + ("type",)] = source
        else:
            raise ConfigError(
                f"{dotted}: a {kind} node needs 'preset:' or 'type:' ({source}); got keys "
                f"{format_choices(value)}"
            )
        self._merge_node(node, value, source, path)
        return node

    def _preset_body(self, kind: str, path: Path) -> dict[str, Any]:
        body = load_yaml(path)
        if "preset" not in body and "type" not in body:
            raise ConfigError(f"{_display(path)}: a {kind} preset needs 'type:' (or 'preset:' to extend one)")
        return body

    def _slot_fields(self, node: Mapping[str, Any], kind: str) -> dict[str, str]:
        entry = registry.get(kind, node["type"])
        return {f.name: f.metadata["arlab_slot"] for f in dataclasses.fields(entry.config)
                if "arlab_slot" in f.metadata}

    def _merge_node(self, node: dict[str, Any], value: Mapping[str, Any], source: str, path: Path_t) -> None:
        """Merge overrides into an expanded component node of known type."""
        kind = self.slot_kind[path]
        slots = self._slot_fields(node, kind)
        for k, v in value.items():
            k = str(k)
            p = path + (k,)
            if k in ("type", "preset"):
                raise ConfigError(f"{'.'.join(p)}: '{k}' must come with the node, not as an override")
            if k in slots:
                if v is None or _is_replacement(v):
                    node[k] = None if v is None else self.expand(slots[k], v, source, p)
                    if v is None:
                        self._forget(p)
                        self.prov[p] = source
                elif isinstance(v, Mapping):
                    if not isinstance(node.get(k), dict):
                        node[k] = self._default_slot(node, kind, k, p)
                    self._merge_node(node[k], v, source, p)
                else:
                    raise ConfigError(
                        f"{'.'.join(p)}: expected a {slots[k]} name or mapping, got {v!r} ({source})"
                    )
            else:
                self._set(node, k, v, source, p)

    def _default_slot(self, node: Mapping[str, Any], kind: str, key: str, path: Path_t) -> dict[str, Any]:
        entry = registry.get(kind, node["type"])
        default = next(p.default for p in registry.params(entry) if p.name == key)
        if default is None or default is dataclasses.MISSING:
            slot_kind = self._slot_fields(node, kind)[key]
            raise ConfigError(f"{'.'.join(path)}: has no default {slot_kind}; give it a preset or type first")
        return self.expand(self._slot_fields(node, kind)[key], default, f"default of {entry.key}", path)

    def _set(self, dst: dict[str, Any], key: str, value: Any, source: str, path: Path_t) -> None:
        if isinstance(value, Mapping) and isinstance(dst.get(key), dict):
            for k, v in value.items():
                self._set(dst[key], str(k), v, source, path + (str(k),))
        else:
            self._forget(path)
            dst[key] = copy.deepcopy(value)
            self._mark(path, value, source)

    # layers -------------------------------------------------------------------------
    def apply(self, layer: Mapping[str, Any], source: str) -> None:
        kinds = set(registry.kinds())
        valid = set(SECTIONS) | kinds | set(META_KEYS)
        for k, v in layer.items():
            k = str(k)
            p = (k,)
            if k == "base":
                continue
            if k in kinds:
                if v is None:
                    self.tree.pop(k, None)
                    self._forget(p)
                    self.slot_kind.pop(p, None)
                elif _is_replacement(v):
                    self.tree[k] = self.expand(k, v, source, p)
                elif isinstance(v, Mapping):
                    if k not in self.tree:
                        raise ConfigError(
                            f"{k}: overrides {format_choices(v)} given ({source}) but no {k} was chosen; "
                            f"give 'preset:' or 'type:' (presets: {format_choices(presets(k))})"
                        )
                    self._merge_node(self.tree[k], v, source, p)
                else:
                    raise ConfigError(f"{k}: expected a {k} name or mapping, got {v!r} ({source})")
            elif k in SECTIONS:
                if not isinstance(v, Mapping):
                    raise ConfigError(f"{k}: expected a mapping, got {v!r} ({source})")
                self.tree.setdefault(k, {})
                for kk, vv in v.items():
                    self._set(self.tree[k], str(kk), vv, source, p + (str(kk),))
            elif k in META_KEYS:
                self._set(self.tree, k, v, source, p)
            else:
                raise ConfigError(
                    f"unknown top-level key '{k}' ({source}).{did_you_mean(k, valid)} "
                    f"Valid keys: {format_choices(valid)}"
                )


def _load_with_bases(path: Path, composer: _Composer, stack: tuple[Path, ...] = ()) -> None:
    path = path.resolve()
    if path in stack:
        raise ConfigError(f"base cycle: {' -> '.join(_display(p) for p in stack + (path,))}")
    layer = load_yaml(path)
    bases = layer.get("base", [])
    if isinstance(bases, str):
        bases = [bases]
    for b in bases:
        bp = (path.parent / b)
        if not bp.is_file():
            raise ConfigError(f"{_display(path)}: base file '{b}' not found (looked at {_display(bp)})")
        _load_with_bases(bp, composer, stack + (path,))
    composer.apply(layer, _display(path))


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["a.b=1", "data=cifar10"]`` → nested dict (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override '{item}' is not KEY=VALUE (e.g. trainer.max_steps=100)")
        try:
            part = OmegaConf.to_container(OmegaConf.from_dotlist([item]), resolve=False)
        except Exception as e:  # OmegaConf raises several grammar errors
            raise ConfigError(f"override '{item}' could not be parsed: {e}") from None
        out = _deep_merge(out, part)
    return out


def _deep_merge(a: dict[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict) and not _is_replacement(v):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


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
        key = str(getattr(e, "key", "") or getattr(e, "full_key", "") or "").split(".")[-1]
        exp_type = fields[key].type if key in fields else "?"
        value = node.get(key, "<missing>")
        if type(e).__name__ == "MissingMandatoryValue":
            raise ConfigError(f"{path}.{key}: required parameter of {what} is missing") from None
        raise ConfigError(
            f"{path}.{key}: {value!r} is not a valid {exp_type} ({locate(key)}): {_type_error_message(e)}"
        ) from None
    except (ConfigError, ValueError, TypeError, AssertionError) as e:
        # a __post_init__ check: blame the first parameter its message names
        msg = str(e)
        named = [k for k in node if re.search(rf"\b{re.escape(k)}\b", msg)]
        source = locate(named[0] if named else "")
        prefix = "" if msg.startswith(path) else f"{path}: "
        raise ConfigError(f"{prefix}{msg} ({source})") from None
    return obj


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

    def to_yaml(self, annotate: bool = False) -> str:
        if not annotate:
            return yaml.dump(self.tree, Dumper=_BlockDictsFlowLists, sort_keys=False, width=100)
        return _annotated_yaml(self.tree, self.provenance)

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# resolved config of experiment {self.name} (arlab; reload with "
                        f"'arlab config {path}')\n" + self.to_yaml())
        return path


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


def _fill_defaults(composer: _Composer, node: dict[str, Any], kind: str, path: Path_t) -> None:
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


def _validate_node(composer: _Composer, node: Mapping[str, Any], kind: str, path: Path_t) -> Any:
    entry = registry.get(kind, node["type"])
    for p in registry.params(entry):
        if p.slot and isinstance(node.get(p.name), Mapping):
            _validate_node(composer, node[p.name], p.slot, path + (p.name,))
    locate = lambda key: composer.where(path + (key,)) if key else composer.where(path + ("type",))
    return validate_component(kind, node, path=".".join(path), locate=locate)[1]


def resolve_node(kind: str, node: Any, source: str = "argument") -> dict[str, Any]:
    """A node in any accepted form (name, ``{preset: ...}``, ``{type: ...}``) → fully explicit dict.

    Presets are expanded, nested component slots too, defaults filled in and ``${...}`` resolved
    (interpolations into other slots of an experiment cannot resolve here and raise ConfigError).
    """
    composer = _Composer()
    expanded = composer.expand(kind, node, source, (kind,))
    _fill_defaults(composer, expanded, kind, (kind,))
    try:
        out = OmegaConf.to_container(OmegaConf.create(expanded), resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{kind}: interpolation failed outside an experiment: {_type_error_message(e)}") from None
    assert isinstance(out, dict)
    return out


def validate_preset(kind: str, name: str) -> Any:
    """Expand and validate one preset on its own (interpolations into other slots stay unchecked)."""
    composer = _Composer()
    node = composer.expand(kind, name, "preset", (kind,))
    _fill_defaults(composer, node, kind, (kind,))
    try:
        node = OmegaConf.to_container(OmegaConf.create(node), resolve=True)
    except OmegaConfBaseException:
        # a preset may interpolate keys that only an experiment has (e.g. ${run.seed}): check the rest
        node = {k: v for k, v in node.items() if not (isinstance(v, str) and "${" in v)}
    return _validate_node(composer, node, kind, (kind,))


def load_experiment(ref: str | os.PathLike, overrides: list[str] | None = None) -> Experiment:
    """Compose, resolve and validate an experiment; raise :class:`ConfigError` on any problem."""
    path = find_experiment(ref)
    composer = _Composer()
    _load_with_bases(path, composer)
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
                     source=_display(path))
    for k in slots:  # cross-slot checks: a component's Config may define check(exp)
        check = getattr(configs[k], "check", None)
        if callable(check):
            check(exp)
    return exp


def _is_under(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


# ----------------------------------------------------------------------------- run directory


def run_dir(exp: Experiment) -> Path:
    """The run directory (created), with the resolved ``config.yaml`` written into it."""
    d = exp.run.dir or os.path.join("runs", exp.name, _dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
    exp.run.dir = d
    exp.tree["run"]["dir"] = d
    path = Path(d)
    path.mkdir(parents=True, exist_ok=True)
    exp.save(path / "config.yaml")
    return path


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested metrics → flat ``{"a/b": number}``; non-numbers are dropped, tensors become floats."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten_metrics(v, key + "/"))
            continue
        if hasattr(v, "item") and getattr(v, "numel", lambda: 1)() == 1:
            v = v.item()
        if isinstance(v, bool):
            v = int(v)
        if isinstance(v, (int, float)) and math.isfinite(float(v)):
            out[key] = v
    return out


def write_metrics(run: str | os.PathLike, metrics: Mapping[str, Any]) -> Path:
    path = Path(run) / "metrics.json"
    path.write_text(json.dumps(flatten_metrics(metrics), indent=2, sort_keys=True) + "\n")
    return path
