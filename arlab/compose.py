"""Composition of experiment YAML: files, presets, ``base:`` layers, command-line overrides, provenance.

An experiment file (``experiments/<group>/<name>.yaml``) has one **slot** per component kind and a
few plain **sections**; later layers win: the ``base`` files, then the experiment, then command-line
dotlists (``backbone.depth=8 data=cifar10``). A slot given a name, or a mapping with ``preset:`` or
``type:``, is *replaced* by that preset (so no keys of the old component linger); a mapping without
them edits the current node key by key. Each leaf remembers the file that set it (:class:`Composer`
``prov``), so every error names the bad key and its file. Validation and building are in
:mod:`arlab.config`.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Collection, Mapping
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


# ----------------------------------------------------------------------------- files


def search_roots() -> list[Path]:
    """Folders holding ``registry/`` and ``experiments/``: $ARLAB_HOME entries, cwd, the repo, plug-in folders."""
    roots = [Path(p) for p in os.environ.get("ARLAB_HOME", "").split(os.pathsep) if p]
    roots += [Path.cwd(), Path(__file__).resolve().parent.parent, *registry.plugin_roots()]
    out: list[Path] = []
    for r in roots:
        r = r.resolve()
        if r not in out and ((r / "registry").is_dir() or (r / "experiments").is_dir()):
            out.append(r)
    return out


def display(path: Path) -> str:
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
    except UnicodeDecodeError as e:
        raise ConfigError(f"{display(path)} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                          "save it as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"{display(path)} cannot be read: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{display(path)} is not valid YAML: {e}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{display(path)}: {e}") from None
    data = OmegaConf.to_container(cfg, resolve=False)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{display(path)} must hold a mapping, not a {type(data).__name__}")
    return data


# ----------------------------------------------------------------------------- composition


def is_replacement(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, Mapping) and ("preset" in value or "type" in value))


class Composer:
    """Merges layers into one tree, expanding component nodes and recording provenance."""

    def __init__(self, sections: Collection[str] = ()) -> None:
        self.sections = tuple(sections)  # plain top-level sections (run, trainer)
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
                    node = self.expand(kind, self._preset_body(kind, known[name]), display(known[name]),
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
            raise ConfigError(f"{display(path)}: a {kind} preset needs 'type:' (or 'preset:' to extend one)")
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
                if v is None or is_replacement(v):
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
        _check_keys(layer, source)
        kinds = set(registry.kinds())
        valid = set(self.sections) | kinds | set(META_KEYS)
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
                elif is_replacement(v):
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
            elif k in self.sections:
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


def _check_keys(node: Mapping[str, Any], source: str, prefix: str = "") -> None:
    """Refuse an empty key anywhere in a layer (``trainer: {"": 1}``; ``trainer..x=1`` on the command line)."""
    for k, v in node.items():
        if k is None or not str(k).strip():
            raise ConfigError(f"'{prefix}{'' if k is None else k}': malformed key (an empty part) ({source})")
        if isinstance(v, Mapping):
            _check_keys(v, source, f"{prefix}{k}.")


def load_with_bases(path: Path, composer: Composer, stack: tuple[Path, ...] = ()) -> None:
    path = path.resolve()
    if path in stack:
        raise ConfigError(f"base cycle: {' -> '.join(display(p) for p in stack + (path,))}")
    layer = load_yaml(path)
    bases = layer.get("base", [])
    if isinstance(bases, str):
        bases = [bases]
    for b in bases:
        bp = (path.parent / b)
        if not bp.is_file():
            raise ConfigError(f"{display(path)}: base file '{b}' not found (looked at {display(bp)})")
        load_with_bases(bp, composer, stack + (path,))
    composer.apply(layer, display(path))


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["a.b=1", "data=cifar10"]`` → nested dict (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override '{item}' is not KEY=VALUE (e.g. trainer.max_steps=100)")
        key = item.split("=", 1)[0].strip()
        if any(not part.strip() for part in key.split(".")):
            raise ConfigError(f"override '{item}': the key '{key}' is malformed (an empty part between dots); "
                              "write KEY.SUBKEY=VALUE, e.g. trainer.max_steps=100")
        try:
            part = OmegaConf.to_container(OmegaConf.from_dotlist([item]), resolve=False)
        except Exception as e:  # OmegaConf raises several grammar errors
            raise ConfigError(f"override '{item}' could not be parsed: {e}") from None
        out = _deep_merge(out, part)
    return out


def _deep_merge(a: dict[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict) and not is_replacement(v):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out
