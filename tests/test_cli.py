"""The arlab command: help on every verb, clean user errors (exit 2, no traceback), listings."""

from __future__ import annotations

import subprocess
import sys

import pytest

from arlab import registry


def arlab(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "arlab", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


@pytest.mark.parametrize("verb", [["list"], ["config"], ["check"], ["data", "pack"], ["data", "shapes"],
                                  ["data", "info"]])
def test_every_verb_has_help_with_examples(verb):
    r = arlab(*verb, "--help")
    assert r.returncode == 0 and "examples:" in r.stdout


def test_list_shows_every_component_and_its_parameters():
    r = arlab("list")
    assert r.returncode == 0, r.stderr
    for entry in registry.entries():
        assert f"  {entry.name} " in r.stdout
        for p in registry.params(entry):
            assert f"{p.name}: {p.type} = " in r.stdout
    assert "presets:" in r.stdout and "shapes-tiny" in r.stdout


@pytest.mark.parametrize("args,message", [
    (["config", "shapes/quickstart", "data.batchsize=3"],
     "data.batchsize: unknown parameter of data/tokens (command line). Did you mean 'batch_size'?"),
    (["config", "shapes/quickstrat"], "Did you mean 'shapes/quickstart'?"),
    (["list", "quantiser"], "unknown component kind 'quantiser'"),
    (["data", "info", "/nonexistent/folder"], "no dataset.json in '/nonexistent/folder'"),
])
def test_user_errors_exit_2_without_traceback(args, message):
    r = arlab(*args)
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr


def test_config_prints_resolved_yaml_with_sources():
    r = arlab("config", "shapes/quickstart", "data.batch_size=8", "--where")
    assert r.returncode == 0, r.stderr
    assert "batch_size: 8" in r.stdout and "# command line" in r.stdout
    assert "# registry/backbone/shapes.yaml" in r.stdout and "# experiments/_base/shapes-generator.yaml" in r.stdout


def test_check_validates_the_repo():
    r = arlab("check")
    assert r.returncode == 0, r.stderr
    assert "0 failed" in r.stdout
