"""Outputs appear complete or not at all: a failed or killed pack / tokenize keeps the old dataset, never
mixes two; --splits keeps the other splits; leftovers of killed runs are removed; input = output refused."""

from __future__ import annotations

import os

import pytest
import torch

from arlab.config import load_experiment
from arlab.data import shards as shards_mod
from arlab.data.pack import pack_imagefolder
from arlab.data.shards import read_manifest
from arlab.data.tokenize import tokenize_shards
from arlab.errors import DataError
from arlab.train import fit
from arlab.utils import atomic_dir, clean_leftovers

from .common import digest, make_imagefolder, manifest, tokenizer_experiment


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("out")
    src = make_imagefolder(tmp / "src")
    out = tmp / "packed"
    pack_imagefolder(src, out, shard_size=10, workers=1, progress=False)
    return tmp, src, out


@pytest.fixture(scope="module")
def tokenizer(packed):
    tmp, _, out = packed
    run = tmp / "tok"
    fit(load_experiment(tokenizer_experiment(tmp, out, run)))
    return run / "checkpoints" / "last.ckpt"


class Boom(RuntimeError):
    pass


def fail_after(monkeypatch, n: int) -> None:
    """Make the n-th sample written to any shard raise (a crash mid-way)."""
    real = shards_mod.ShardWriter.write
    count = {"n": 0}

    def write(self, sample):
        count["n"] += 1
        if count["n"] == n:
            raise Boom("killed")
        return real(self, sample)

    monkeypatch.setattr(shards_mod.ShardWriter, "write", write)


def test_pack_overwrite_failing_midway_keeps_the_old_dataset(packed, tmp_path, monkeypatch):
    _, src, out = packed
    copy = tmp_path / "copy"
    pack_imagefolder(src, copy, shard_size=10, workers=1, progress=False)
    before = digest(copy)
    fail_after(monkeypatch, 30)
    with pytest.raises(Boom):
        pack_imagefolder(src, copy, shard_size=7, workers=1, progress=False, overwrite=True)
    assert digest(copy) == before  # the complete old dataset, untouched
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".copy.")]  # no leftovers


def test_pack_splits_overwrite_keeps_the_other_splits(packed, tmp_path):
    _, src, _ = packed
    out = tmp_path / "ds"
    pack_imagefolder(src, out, shard_size=10, workers=1, progress=False)
    test_before = {k: v for k, v in digest(out).items() if k.startswith("test/")}
    m = pack_imagefolder(src, out, shard_size=5, workers=1, progress=False, splits=["train"], overwrite=True)
    assert sorted(m["splits"]) == ["test", "train"] and m["splits"]["train"]["shards"][0]["count"] == 5
    assert {k: v for k, v in digest(out).items() if k.startswith("test/")} == test_before
    read_manifest(out)  # every listed shard exists


def test_leftovers_of_a_killed_writer_are_removed_or_restored(tmp_path):
    out = tmp_path / "data"
    (tmp_path / ".data.tmp-999999999-0123abcd" / "input").mkdir(parents=True)  # a killed build (dead pid)
    (tmp_path / ".data.old-999999999-0123abcd").mkdir()  # killed between the renames: the old dataset
    (tmp_path / ".data.old-999999999-0123abcd" / "dataset.json").write_text("{}")
    clean_leftovers(out)
    assert (out / "dataset.json").read_text() == "{}"  # restored
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    live = tmp_path / f".data.tmp-{os.getppid()}-0123abcd"  # a live writer's build is left alone
    live.mkdir()
    clean_leftovers(out)
    assert live.exists()


def test_atomic_dir_replaces_in_one_step(tmp_path):
    out = tmp_path / "x"
    with atomic_dir(out) as b:
        (b / "f").write_text("1")
    with pytest.raises(Boom), atomic_dir(out) as b:
        (b / "f").write_text("2")
        raise Boom
    assert (out / "f").read_text() == "1"
    with atomic_dir(out) as b:
        (b / "g").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == ["g"]


@pytest.mark.parametrize("where", ["same", "inside"])
def test_pack_refuses_output_that_is_its_input(packed, where):
    _, src, _ = packed
    out = src if where == "same" else src / "train" / "packed"
    with pytest.raises(DataError, match="same folder or one holds the other"):
        pack_imagefolder(src, out, workers=1, progress=False)


def test_tokenize_refuses_output_that_is_its_input(packed, tokenizer):
    _, _, out = packed
    with pytest.raises(DataError, match="same folder or one holds the other"):
        tokenize_shards(tokenizer, out, out / "tokens", progress=False)


def test_tokenize_overwrite_failing_midway_keeps_the_old_tokens(packed, tokenizer, tmp_path, monkeypatch):
    _, _, out = packed
    tokens = tmp_path / "tokens"
    tokenize_shards(tokenizer, out, tokens, progress=False, batch_size=8)
    before = digest(tokens)
    fail_after(monkeypatch, 20)
    with pytest.raises(Boom):
        tokenize_shards(tokenizer, out, tokens, progress=False, batch_size=8, flip=True, overwrite=True)
    assert digest(tokens) == before and manifest(tokens)["flip"] is False
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tokens.")]


def test_tokenize_output_is_deterministic(packed, tokenizer, tmp_path):
    _, _, out = packed
    tokenize_shards(tokenizer, out, tmp_path / "a", progress=False, batch_size=8)
    tokenize_shards(tokenizer, out, tmp_path / "b", progress=False, batch_size=5)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")


def test_a_run_ending_between_checkpoint_steps_saves_its_final_weights(packed, tmp_path):
    """3 steps, a checkpoint every 2: last.ckpt must hold step 3 (Lightning alone leaves it at step 2), and
    step-3.ckpt exists for the compute curves; no temporary file is left behind."""
    _, _, out = packed
    run = tmp_path / "tok3"
    fit(load_experiment(tokenizer_experiment(tmp_path, out, run, steps=3)))
    ck = run / "checkpoints"
    assert sorted(p.name for p in ck.iterdir() if p.suffix == ".ckpt" or p.name.startswith(".")) == [
        "last.ckpt", "step-2.ckpt", "step-3.ckpt"]
    load = {p: torch.load(ck / p, map_location="cpu", weights_only=False) for p in ("last.ckpt", "step-3.ckpt")}
    assert load["last.ckpt"]["global_step"] == load["step-3.ckpt"]["global_step"] == 3
    assert all(torch.equal(v, load["step-3.ckpt"]["state_dict"][k]) for k, v in load["last.ckpt"]["state_dict"].items())
    assert torch.load(ck / "step-2.ckpt", map_location="cpu", weights_only=False)["global_step"] == 2
