"""User-facing errors.

Anything a researcher can fix by editing a YAML file, a command line or an input folder raises an
:class:`ArlabError` subclass. The CLI prints its message (no traceback) and exits with code 2;
everything else is a bug in arlab and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ArlabError(Exception):
    """An error caused by user input (config, command line, data); printed without a traceback."""

    exit_code = 2


class ConfigError(ArlabError):
    """A config value, key, preset or component name that cannot work."""


class DataError(ArlabError):
    """An input dataset, shard folder or manifest that cannot be used."""


class Interrupted(ArlabError):
    """The user stopped a command (Ctrl-C); the message says how to continue."""

    exit_code = 130


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest choice, or ``""`` when nothing is close."""
    close = difflib.get_close_matches(str(name), sorted(set(map(str, choices))), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def format_choices(choices: Iterable[str]) -> str:
    items = sorted(set(map(str, choices)))
    return ", ".join(items) if items else "(none)"
