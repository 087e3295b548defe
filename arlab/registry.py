"""The component registry: every swappable part of arlab, by kind and name.

A component is a class (usually an ``nn.Module``) with a nested ``@dataclass Config`` that lists its
parameters and their defaults. It lives in ``arlab/<kind>/<name>.py`` (or in a plug-in file of your
own, see below), subclasses its kind's interface (``arlab/<kind>/base.py``: :class:`Backbone`,
:class:`Order`, :class:`Conditioner`, :class:`Metric`, :class:`Task`, ...) and registers itself::

    @register("quantizer", "fsq")
    class FSQ(Quantizer):
        '''Finite Scalar Quantization (Mentzer et al. 2023).'''

        @dataclass
        class Config:
            levels: list[int] = field(default_factory=lambda: [8, 5, 5, 5])  # L_i per channel

        def __init__(self, cfg: Config): ...

:func:`arlab.config.build` validates a node against the Config and calls the class. Every module
under an ``arlab/<kind>/`` package is imported by :func:`load_all`, so a new component needs no edit
anywhere else; the kind's one-line description is its package docstring.

**Plug-ins** (components outside the repository): ``ARLAB_PLUGINS`` (``os.pathsep``-separated ``.py``
files, folders of them, or importable module names), ``arlab --plugin FILE_OR_MODULE``, or a package's
``arlab.plugins`` entry point. Each plug-in is imported once, after arlab's own components; its folder
may hold ``registry/<kind>/*.yaml`` presets and ``experiments/`` beside it (:func:`plugin_roots`).

This module imports nothing of arlab but :mod:`arlab.errors`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import inspect
import os
import pkgutil
import re
import sys
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from arlab.errors import ConfigError, did_you_mean, format_choices

# Packages under arlab/ that hold components; each one's docstring describes the kind.
_COMPONENT_PACKAGES = ("data", "autoencoder", "quantizer", "tokenizer", "order", "shuffle", "backbone",
                       "conditioner", "features", "metric", "task")
PLUGIN_ENV = "ARLAB_PLUGINS"
ENTRY_POINT_GROUP = "arlab.plugins"


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
_INTERFACES: dict[str, type] = {}
_PLUGIN_ROOTS: list[Path] = []
_PENDING: list[tuple[str, str]] = []
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


def register_kind(kind: str, interface: type) -> None:
    """Declare ``interface`` (an abstract base class) as what every ``kind`` component must subclass."""
    _INTERFACES[kind] = interface


def interface(kind: str) -> type | None:
    """The interface class of ``kind`` (None for kinds without one, e.g. ``data``)."""
    load_all()
    return _INTERFACES.get(kind)


def register(kind: str, name: str):
    """Class decorator: register ``cls`` (which must have a dataclass ``Config`` and subclass the kind's
    interface, where one is declared) as ``kind/name``."""

    def deco(cls: type) -> type:
        config = getattr(cls, "Config", None)
        if config is None or not dataclasses.is_dataclass(config):
            raise TypeError(f"{cls.__qualname__} must define a @dataclass 'Config' to be registered")
        if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
            raise ValueError(f"component names are lowercase identifiers, got {name!r}")
        base = _INTERFACES.get(kind)
        if base is not None and not issubclass(cls, base):
            raise TypeError(f"{kind}/{name}: {cls.__qualname__} must subclass {base.__module__}.{base.__qualname__}, "
                            f"the {kind} interface")
        if inspect.isabstract(cls):
            missing = ", ".join(sorted(getattr(cls, "__abstractmethods__", ())))
            raise TypeError(f"{kind}/{name}: {cls.__qualname__} does not implement {missing} of the {kind} interface")
        entries = _REGISTRY.setdefault(kind, {})
        if name in entries and entries[name].cls.__qualname__ != cls.__qualname__:
            old = entries[name]
            raise ConfigError(f"{kind}/{name} is registered twice: by {old.module}.{old.cls.__qualname__} and "
                              f"by {cls.__module__}.{cls.__qualname__}; rename one")
        entries[name] = Entry(kind, name, cls, config, cls.__module__)
        cls.registry_key = f"{kind}/{name}"
        return cls

    return deco


def load_all() -> None:
    """Import every module of every component package (eager: no 'registered but not imported'), then the
    plug-ins (``ARLAB_PLUGINS``, ``arlab.plugins`` entry points, :func:`add_plugins`)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for pkg_name in _COMPONENT_PACKAGES:
        full = f"arlab.{pkg_name}"
        pkg = importlib.import_module(full)
        for info in pkgutil.iter_modules(pkg.__path__, prefix=full + "."):
            importlib.import_module(info.name)
    for ep in importlib_metadata.entry_points(group=ENTRY_POINT_GROUP):
        _import_plugin(ep.value, f"entry point {ep.name!r} of group {ENTRY_POINT_GROUP}")
    for ref in os.environ.get(PLUGIN_ENV, "").split(os.pathsep):
        if ref.strip():
            _import_plugin(ref.strip(), PLUGIN_ENV)
    for ref, source in _PENDING:
        _import_plugin(ref, source)
    _PENDING.clear()


def add_plugins(refs: list[str], source: str = "--plugin") -> None:
    """Load plug-ins (files, folders or module names) now, or with :func:`load_all` if it has not run yet."""
    for ref in refs:
        if _loaded:
            _import_plugin(ref, source)
        else:
            _PENDING.append((ref, source))


def plugin_roots() -> list[Path]:
    """Folders of the loaded plug-ins: searched for ``registry/<kind>/*.yaml`` and ``experiments/``."""
    load_all()
    return list(_PLUGIN_ROOTS)


def _import_plugin(ref: str, source: str) -> None:
    path = Path(ref).expanduser()
    if path.suffix == ".py" or path.exists():
        if not path.exists():
            raise ConfigError(f"plug-in '{ref}' ({source}) does not exist")
        files = sorted(path.glob("*.py")) if path.is_dir() else [path]
        for f in files:
            f = f.resolve()
            stem = re.sub(r"\W", "_", f.stem)
            name = f"arlab_plugin_{stem}_{hashlib.sha1(str(f).encode()).hexdigest()[:8]}"
            if name in sys.modules:
                continue
            spec = importlib.util.spec_from_file_location(name, f)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[name]
                raise
        root = path.resolve() if path.is_dir() else path.resolve().parent
    else:
        try:
            module = importlib.import_module(ref)
        except ModuleNotFoundError as e:
            raise ConfigError(f"plug-in '{ref}' ({source}) is neither a file nor an importable module: {e}") from None
        root = Path(module.__file__ or ".").resolve().parent
    if root not in _PLUGIN_ROOTS:
        _PLUGIN_ROOTS.append(root)


def kinds() -> list[str]:
    load_all()
    return sorted(set(k for k, v in _REGISTRY.items() if v) | set(_INTERFACES))


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
