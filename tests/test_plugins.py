"""Plug-ins from outside the package (``tests/plugins``: one file and one preset each, loaded through
``ARLAB_PLUGINS`` by conftest, or ``arlab --plugin``): listed, checked by the registry-parametrized
tests, trained in an experiment, scored, reloaded and sampled; the toy backbone refused with orders it
cannot serve; nothing under ``arlab/`` names them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from arlab import registry
from arlab.cli import main
from arlab.config import load_experiment, presets
from arlab.errors import ConfigError
from arlab.generator.sample import sample_to_files
from arlab.train import fit

REPO = Path(__file__).resolve().parents[1]
PLUGINS = REPO / "tests" / "plugins"
TOYS = {"order": "toy_column", "backbone": "toy_mixer", "metric": "toy_brightness"}


@pytest.mark.parametrize("kind,name", TOYS.items())
def test_plugins_are_registered_with_their_presets(kind, name):
    assert name in registry.names(kind)
    mine = [p for p, f in presets(kind).items() if f.is_relative_to(PLUGINS)]
    assert len(mine) == 1


def test_arlab_list_shows_plugins(capsys):
    assert main(["list", "backbone"]) == 0
    out = capsys.readouterr().out
    assert "toy_mixer" in out and "toy-mixer" in out and "Causal running-mean MLP mixer" in out


def test_the_plugin_flag_loads_a_file_without_the_variable():
    env = {k: v for k, v in os.environ.items() if k != "ARLAB_PLUGINS"}
    run = lambda *a: subprocess.run([sys.executable, "-m", "arlab", *a], capture_output=True, text=True, env=env,
                                    cwd=REPO, timeout=120)
    without = run("list", "order")
    assert without.returncode == 0 and "toy_column" not in without.stdout
    with_flag = run("--plugin", str(PLUGINS / "toy_order.py"), "list", "order")
    assert with_flag.returncode == 0 and "toy_column" in with_flag.stdout and "toy_column.yaml" not in with_flag.stderr
    bad = run("--plugin", "no/such_plugin.py", "list")
    assert bad.returncode == 2 and "plug-in 'no/such_plugin.py' (--plugin) does not exist" in bad.stderr


def test_nothing_under_arlab_names_the_plugins():
    for path in (REPO / "arlab").rglob("*.py"):
        text = path.read_text()
        assert not any(name in text for name in TOYS.values()), path


@pytest.mark.parametrize("order,structure", [("next_scale", "block_causal"), ("neighbor", "arbitrary")])
def test_toy_backbone_is_refused_with_orders_it_cannot_serve(order, structure):
    with pytest.raises(ConfigError, match=f"order order/{order} needs {structure} attention, which backbone "
                                          f"backbone/toy_mixer cannot honour \\(it serves causal\\)"):
        load_experiment("plugins/toy", [f"order={order}"])


def test_plugin_experiment_trains_scores_reloads_and_samples(tmp_path, arlab_cache):
    """The chain (tokenizer, tokens, generator) with the three plug-ins, then ``arlab sample``."""
    tok = tmp_path / "tok" / "checkpoints" / "last.ckpt"
    exp = load_experiment("plugins/toy", [f"task.tokenizer_ckpt={tok}", f"run.dir={tmp_path / 'gen'}",
                                          "trainer.enable_progress_bar=false"])
    metrics = fit(exp)
    assert tok.is_file()
    assert metrics["train/steps"] == 6 and metrics["sample/steps_per_image"] == 64  # 16x16 tokens, s=2 windows
    assert 0 < metrics["sample/brightness"] < 1 and 0 <= metrics["sample/class_acc"] <= 1
    assert metrics["sample/n"] == 10
    saved = json.loads((tmp_path / "gen" / "metrics.json").read_text())
    assert saved["sample/brightness"] == pytest.approx(metrics["sample/brightness"])
    s = sample_to_files(tmp_path / "gen" / "checkpoints" / "last.ckpt", tmp_path / "samples", n=4, seed=0)
    assert s["steps_per_image"] == 64 and 0 < s["brightness"] < 1
    assert (tmp_path / "samples" / "samples.png").is_file()
