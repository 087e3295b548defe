"""benchmarks/bench_optimizer.py: every kernel timed over the experiment's own parameters and optimizer."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_optimizer  # noqa: E402


def test_kernels_are_timed_over_the_generator_and_the_tokenizer():
    gen = bench_optimizer.main(["shapes/quickstart", "--repeat", "2", "--warmup", "1"])
    assert gen["optimizer"] == "AdamW" and 2.0e6 < gen["params"] < 2.5e6  # the quickstart generator: 2.33M
    assert [r["kernel"] for r in gen["rows"]] == ["loop", "foreach", "fused", "muon"]
    assert all(r["ms_per_step"] > 0 for r in gen["rows"]) and gen["rows"][0]["speedup"] == 1.0
    tok = bench_optimizer.main(["shapes/tokenizer-quick", "--repeat", "1", "--warmup", "1"])
    assert tok["rows"][3]["kernel"] == "muon" and tok["rows"][3]["ms_per_step"] > 0  # MuonAdamW over the same params
    assert tok["optimizer"] in ("Adam", "AdamW")
    assert 0.8e6 < tok["params"] < 0.9e6  # shapes-fsq with ch_mult [1, 1, 2]: 0.85M
