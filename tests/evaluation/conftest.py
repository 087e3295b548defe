"""A tiny trained generator and tokenizer for the ``arlab eval`` tests: the experiments of
tests/generator/test_module.py on a 240-image shapes set, a few steps each (the numbers are not the point,
the files are)."""

from __future__ import annotations

from pathlib import Path

import pytest

from arlab.config import build, load_experiment
from arlab.data.tokenize import tokenize_shards
from arlab.train import fit
from tests.conftest import pinned_threads
from tests.generator.test_module import generator_body, tokenizer_body, write

MICRO = {"preset": "shapes", "n_train": 200, "n_test": 40, "shard_size": 100, "num_workers": 0, "batch_size": 8,
         "shuffle_buffer": 64}


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory, arlab_cache) -> tuple[Path, Path]:
    """(generator run directory, tokenizer checkpoint): a 2-step FSQ tokenizer, a 2-step s=2 generator on its
    tokens (eval_samples 0: arlab eval draws them)."""
    tmp = tmp_path_factory.mktemp("evalruns")
    tok = tokenizer_body(tmp / "tok")
    tok["data"] = dict(MICRO)
    tok["trainer"].update({"max_steps": 2, "val_check_interval": 2, "checkpoint_every_n_steps": 2})
    ckpt = tmp / "tok" / "checkpoints" / "last.ckpt"
    gen = generator_body(tmp, ckpt, write(tmp / "tok.yaml", tok), "gen", steps=2)
    gen["data"]["root"] = str(tmp / "tokens")
    gen["task"]["eval_samples"] = 0
    with pinned_threads():
        fit(load_experiment(tmp / "tok.yaml"))
        images = build("data", MICRO)
        images.setup()
        tokenize_shards(ckpt, images.root, tmp / "tokens", progress=False)
        fit(load_experiment(write(tmp / "gen.yaml", gen)))
    return tmp / "gen", ckpt
