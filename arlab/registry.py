"""The component registry: every swappable part of arlab, by kind and name.

A component is a class (usually an ``nn.Module`` or a ``LightningDataModule``) with a nested
``@dataclass Config`` that lists its parameters and their defaults. It lives in
``arlab/<kind>/<name>.py`` and registers itself::

    @register("quantizer", "fsq")
    class FSQ(nn.Module):
        '''Finite Scalar Quantization (Mentzer et al. 2023).'''

        @dataclass
        class Config:
            levels: list[int] = field(default_factory=lambda: [8, 5, 5, 5])  # L_i per channel

        def __init__(self, cfg: Config): ...

``build("quantizer", {"type": "fsq", "levels": [8, 6, 5]})`` validates the keys and types and
calls ``FSQ(FSQ.Config(levels=[8, 6, 5]))``. Every module under an ``arlab/<kind>/`` package is
imported by :func:`load_all`, so a new component needs no edit anywhere else; the kind's
one-line description is its package docstring.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from arlab.errors import ConfigError, did_you_mean, format_choices

# Packages under arlab/ that hold components; each one's docstring describes the kind.
_COMPONENT_PACKAGES = ("data", "autoencoder", "quantizer", "tokenizer", "order", "shuffle", "backbone", "generator",
                       "conditioner", "sampler", "task")


@dataclass(frozen=True)
class Entry:
    """One registered component."""

    kind: str
    name: str
    cls: type
    config: type  # the dataclass of its parameters
    module: str

    @property
    def doc(self) -> str:
        """First line of the class docstring."""
        return (inspect.getdoc(self.cls) or "").strip().split("\n")[0]

    @property
    def key(self) -> str:
        return f"{self.kind}/{self.name}"


@dataclass(frozen=True)
class Param:
    name: str
    type: str
    default: Any  # dataclasses.MISSING when required
    help: str
    slot: str | None  # kind, when the parameter is itself a component node

    @property
    def required(self) -> bool:
        return self.default is dataclasses.MISSING


_REGISTRY: dict[str, dict[str, Entry]] = {}
_loaded = False


def slot(kind: str, default: Any = None, **kwargs: Any) -> Any:
    """A ``Config`` field whose value is itself a component node of ``kind``.

    The node takes the same forms as a top-level slot: a preset or component name, or a mapping
    with ``preset:`` or ``type:`` plus overrides. ``default`` is a preset/component name.
    """
    metadata = {"arlab_slot": kind, **kwargs.pop("metadata", {})}
    if default is None:
        return dataclasses.field(default=None, metadata=metadata, **kwargs)
    if isinstance(default, Mapping):
        frozen = dict(default)
        return dataclasses.field(default_factory=lambda: dict(frozen), metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def register(kind: str, name: str):
    """Class decorator: register ``cls`` (which must have a dataclass ``Config``) as ``kind/name``."""

    def deco(cls: type) -> type:
        config = getattr(cls, "Config", None)
        if config is None or not dataclasses.is_dataclass(config):
            raise TypeError(f"{cls.__qualname__} must define a @dataclass 'Config' to be registered")
        if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
            raise ValueError(f"component names are lowercase identifiers, got {name!r}")
        entries = _REGISTRY.setdefault(kind, {})
        if name in entries and entries[name].cls.__qualname__ != cls.__qualname__:
            old = entries[name]
            raise RuntimeError(
                f"{kind}/{name} is already registered by {old.module}.{old.cls.__qualname__}"
            )
        entries[name] = Entry(kind, name, cls, config, cls.__module__)
        cls.registry_key = f"{kind}/{name}"
        return cls

    return deco


def load_all() -> None:
    """Import every module of every component package (eager: no 'registered but not imported')."""
    global _loaded
    if _loaded:
        return
    import arlab

    for pkg_name in _COMPONENT_PACKAGES:
        full = f"arlab.{pkg_name}"
        try:
            pkg = importlib.import_module(full)
        except ModuleNotFoundError as e:
            if e.name == full:
                continue  # this kind has no package (yet)
            raise
        for info in pkgutil.iter_modules(pkg.__path__, prefix=full + "."):
            importlib.import_module(info.name)
    _loaded = True
    del arlab


def kinds() -> list[str]:
    load_all()
    return sorted(k for k, v in _REGISTRY.items() if v)


def kind_doc(kind: str) -> str:
    try:
        mod = importlib.import_module(f"arlab.{kind}")
    except ModuleNotFoundError:
        return ""
    return (inspect.getdoc(mod) or "").strip().split("\n")[0]


def names(kind: str) -> list[str]:
    load_all()
    return sorted(_REGISTRY.get(kind, {}))


def get(kind: str, name: str, where: str = "") -> Entry:
    """The entry ``kind/name``; a :class:`ConfigError` naming the choices when unknown."""
    load_all()
    at = f" ({where})" if where else ""
    if kind not in _REGISTRY:
        raise ConfigError(
            f"unknown component kind '{kind}'{at}.{did_you_mean(kind, _REGISTRY)} "
            f"Known kinds: {format_choices(_REGISTRY)}"
        )
    entries = _REGISTRY[kind]
    if name not in entries:
        raise ConfigError(
            f"{kind} '{name}' is not registered{at}.{did_you_mean(name, entries)} "
            f"Known {kind} components: {format_choices(entries)}"
        )
    return entries[name]


def entries(kind: str | None = None) -> list[Entry]:
    load_all()
    ks = [kind] if kind else sorted(_REGISTRY)
    return [e for k in ks for _, e in sorted(_REGISTRY.get(k, {}).items())]


# ----------------------------------------------------------------------------- introspection


def _type_name(tp: Any) -> str:
    if isinstance(tp, str):
        return tp
    if tp is type(None):
        return "None"
    origin = typing.get_origin(tp)
    if origin is None:
        return getattr(tp, "__name__", str(tp))
    args = typing.get_args(tp)
    if origin in (typing.Union,) or str(origin) == "<class 'types.UnionType'>":
        return " | ".join(_type_name(a) for a in args)
    return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type_name(a) for a in args)}]"


def _field_comments(config: type) -> dict[str, str]:
    """Trailing ``# comments`` of the Config's field lines: the parameter's help text."""
    out: dict[str, str] = {}
    for klass in reversed(config.__mro__):  # base classes first, so subclasses override
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            src = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for line in src.splitlines():
            m = re.match(r"\s+(\w+)\s*:[^#]*#\s*(.+)$", line)
            if m:
                out[m.group(1)] = m.group(2).strip()
    return out


def config_fields(config: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(config)}


def params(entry_or_config: Entry | type) -> list[Param]:
    """The parameters of a component (or of any Config dataclass), in declaration order."""
    config = entry_or_config.config if isinstance(entry_or_config, Entry) else entry_or_config
    hints = typing.get_type_hints(config)
    helps = _field_comments(config)
    out = []
    for f in dataclasses.fields(config):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = dataclasses.MISSING
        out.append(Param(f.name, _type_name(hints.get(f.name, f.type)), default,
                         helps.get(f.name, ""), f.metadata.get("arlab_slot")))
    return out


def build(kind: str, node: Any, *args: Any, where: str = "", **runtime: Any) -> Any:
    """Build a component from a node: a preset or component name, ``{"preset": p, **overrides}``,
    ``{"type": name, **params}``, or a validated Config instance.

    Keys and types are validated first (see :func:`arlab.config.validate_component`); runtime
    dependencies that are not configuration (a tokenizer object, a vocabulary size) are passed
    through ``args``/``runtime`` to the constructor.
    """
    from arlab.config import resolve_node, validate_component

    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        cfg = node
        entry = next((e for e in entries(kind) if isinstance(cfg, e.config)), None)
        if entry is None:
            raise ConfigError(f"{type(cfg).__qualname__} is not the Config of any {kind} component")
    else:
        node = resolve_node(kind, node, source=where or "argument")  # presets, nested slots, defaults
        entry, cfg = validate_component(kind, node, where=where)
    return entry.cls(cfg, *args, **runtime)
