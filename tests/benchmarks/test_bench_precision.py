"""benchmarks/bench_precision.py: float32 and bf16-autocast steps of a tokenizer and a generator, and the
precision auto-bf16 picks on this machine."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_precision  # noqa: E402
import torch  # noqa: E402

from arlab.config import resolve_precision  # noqa: E402


def test_both_precisions_are_timed_for_a_tokenizer_and_a_generator():
    for name in ("shapes/tokenizer-quick", "shapes/quickstart"):
        body = bench_precision.main([name, "--batch", "4", "--repeat", "1"])
        assert [r["precision"] for r in body["rows"]] == ["float32", "bf16 autocast", "bf16 autocast, bf16 attention"]
        assert all(r["s_per_step"] > 0 for r in body["rows"]) and body["batch"] == 4
        assert body["auto_bf16"] == resolve_precision("auto-bf16", "cpu")


def test_the_bf16_attention_row_restores_the_float32_route():
    import arlab.layers

    before = arlab.layers._HALF
    with bench_precision.half_attention(True):
        assert arlab.layers._HALF == ()
    assert arlab.layers._HALF == before == (torch.bfloat16, torch.float16)
