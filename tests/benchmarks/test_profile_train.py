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
