"""benchmarks/profile_train.py --data-paths: fit steps through the stream, the in-memory loader and cached batches,
on a tiny tokenizer run (every path trains; the timings themselves are not asserted)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import profile_train  # noqa: E402

TINY = ["data=shapes-tiny", "data.batch_size=4", "data.num_workers=1", "tokenizer.autoencoder=tiny"]


def test_every_data_path_runs_the_fit_loop(arlab_cache, capsys):
    rows = profile_train.compare_data_paths("shapes/tokenizer-quick", TINY, ["stream", "memory", "cached"], rounds=1,
                                            steps=6, warmup=2)
    assert [(r, p) for r, p, _, _ in rows] == [(0, "stream"), (0, "memory"), (0, "cached")]
    assert all(0 < med and 0 < mean for _, _, med, mean in rows)
    assert "round 0 memory" in capsys.readouterr().out


def test_each_path_sets_its_loader(arlab_cache, monkeypatch):
    seen = []
    real = profile_train.pl.Trainer.fit

    def spy(self, module, train_dataloaders=None, datamodule=None, **kw):
        seen.append(type(train_dataloaders).__name__ if datamodule is None
                    else type(datamodule.train_dataloader()).__name__)
        return real(self, module, train_dataloaders=train_dataloaders, datamodule=datamodule, **kw)

    monkeypatch.setattr(profile_train.pl.Trainer, "fit", spy)
    for path in profile_train.DATA_PATHS:
        assert len(profile_train.fit_step_times("shapes/tokenizer-quick", TINY, 3, path)) == 3
    assert seen == ["ShardLoader", "MemoryLoader", "Replay"]


def test_an_unknown_data_path_is_refused():
    with pytest.raises(SystemExit, match="disk not in stream, memory, cached"):
        profile_train.compare_data_paths("shapes/tokenizer-quick", TINY, ["disk"], 1, 3, 1)


def test_variants_alternate_with_their_own_overrides(arlab_cache, monkeypatch, capsys):
    """--variant: each variant's fit runs with its overrides (here the tokenizer with and without attention), in
    turn every round; the table's ratio line compares each to the first."""
    built = []
    real = profile_train._build

    def spy(name, overrides):
        exp, dm, module = real(name, overrides)
        built.append(any(type(m).__name__ == "AttnBlock" for m in module.modules()))
        return exp, dm, module

    monkeypatch.setattr(profile_train, "_build", spy)
    variants = {"attn": ([*TINY, "tokenizer.autoencoder.attn=true"], ""),
                "no attn": ([*TINY, "tokenizer.autoencoder.attn=false"], "")}
    rows = profile_train.alternate("shapes/tokenizer-quick", variants, rounds=2, steps=4, warmup=1)
    assert [(r, label) for r, label, _, _ in rows] == [(0, "attn"), (0, "no attn"), (1, "attn"), (1, "no attn")]
    assert built == [True, False, True, False]
    profile_train.print_rounds("title", "variant", rows)
    out = capsys.readouterr().out
    assert "| 1 | no attn |" in out and "attn / no attn, per round (medians): " in out


def test_top_operators_by_input_shape(arlab_cache, capsys):
    """--top N --by-shape: the model step's profiler table, one row per operator and input shapes (the tiny
    tokenizer's 3×3 convolutions at batch 4 show as [4, C, H, W] inputs)."""
    exp, dm, module = profile_train._build("shapes/tokenizer-quick", TINY)
    assert profile_train.time_step(exp, dm, module, 1, top=8, by_shape=True) > 0
    out = capsys.readouterr().out
    assert "Input Shapes" in out and "[[4, " in out


def test_data_paths_and_variants_are_not_mixed(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["profile_train.py", "shapes/tokenizer-quick", "--data-paths", "memory",
                                      "--variant", ""])
    with pytest.raises(SystemExit):
        profile_train.main()
    assert "--data-paths and --variant compare different things" in capsys.readouterr().err
