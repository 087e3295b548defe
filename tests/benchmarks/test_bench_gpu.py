"""benchmarks/bench_gpu.py --tiny runs end to end on CPU (tiny generators shaped like the four peers: training,
sampling with CFG, VAE decode) and prints its table; the full-size shapes match the peers' parameter counts."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_gpu  # noqa: E402


def test_tiny_run_measures_every_peer_shape(capsys):
    rows = bench_gpu.main(["--tiny"])
    assert [r["model"] for r in rows] == list(bench_gpu.PEER)
    steps = {r["model"]: r["steps_per_image"] for r in rows}
    assert steps == {"GPT-B": 64, "GPT-L": 64, "VAR-d16": 4, "NAR-B": 15}  # raster 8x8, scales 1,2,4,8, 8+8-1
    for r in rows:
        assert r["train_images_per_s"] > 0 and r["sample_s"] > 0 and r["latency_1_s"] > 0
        assert r["mfu"] is None and r["peak_memory_bytes"] is None  # CPU: no peak FLOP/s, no CUDA memory
    out = capsys.readouterr().out
    assert "| GPT-B |" in out and "| NAR-B |" in out and "CPU (" in out
    assert "nan" not in out  # tiny shapes: the ratio columns say "—"


def test_table_ratios_against_the_peers():
    """Training: ours / peer's images/s; sampling: peer's / our seconds (VAR-d16 with its VAE decode)."""
    import argparse

    peer = bench_gpu.PEER["VAR-d16"]
    row = {"model": "VAR-d16", "params": 310e6, "tokens": 680, "train_images_per_s": 2 * peer["train"],
           "mfu": None, "mfu_with_attention": None, "peak_memory_bytes": None, "sample_batch": 64,
           "sample_s": 0.1, "sample_with_decode_s": peer["sample64"] / 4, "latency_1_s": peer["sample1"] / 2}
    line = bench_gpu.table([row], argparse.Namespace(tiny=False)).splitlines()[2]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert (cells[4], cells[10], cells[12]) == ("2.00", "4.00", "2.00")
    tiny_line = bench_gpu.table([row], argparse.Namespace(tiny=True)).splitlines()[2]
    tiny = [c.strip() for c in tiny_line.strip("|").split("|")]
    assert (tiny[4], tiny[10], tiny[12]) == ("—", "—", "—")


def test_bad_model_name_is_refused():
    with pytest.raises(SystemExit, match="unknown model 'GPT-XL'; choose from GPT-B, GPT-L, VAR-d16, NAR-B"):
        bench_gpu.main(["--tiny", "--models", "GPT-XL"])


def test_peak_flops_by_device():
    assert bench_gpu.peak_flops("cpu") is None
    assert dict(bench_gpu.PEAK_BF16)["H100"] == 989e12
