"""benchmarks/bench_decode.py at tiny shapes: both backbones timed at every position, the KV cache's size, and the
decode state per layer of every Mamba-2 preset (conv window + SSM state, float32)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_decode  # noqa: E402


def test_decode_table_and_state_memory(tmp_path):
    out = tmp_path / "decode.json"
    body = bench_decode.main(["--dim", "64", "--depth", "2", "--positions", "4,16", "--repeat", "1",
                              "--device", "cpu", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(body))
    llama, mamba = body["rows"]
    assert [llama["backbone"], mamba["backbone"]] == ["llama (KV cache)", "mamba (state)"]
    assert all(len(r["ms_per_token"]) == 2 and min(r["ms_per_token"].values()) > 0 for r in body["rows"])
    # the KV cache is sized for the sequence, p + repeat + 2 positions: 2 (k, v) x depth x length x d floats;
    # the Mamba state does not depend on it
    assert llama["state_bytes_per_seq"] == {4: 2 * 2 * 7 * 64 * 4, 16: 2 * 2 * 19 * 64 * 4}
    assert len(set(mamba["state_bytes_per_seq"].values())) == 1
    by_name = {p["preset"]: p for p in body["presets"]}
    assert {"mamba-tiny", "mamba-shapes", "mamba-s", "mamba-b", "aim-b"} <= set(by_name)
    assert not any("hybrid" in n for n in by_name)  # pure Mamba-2 only: a hybrid also holds a KV cache
    for p in by_name.values():  # conv window (d_conv - 1 inputs) + SSM state (H, P, N), float32, every layer
        per_layer = (p["conv_channels"] * (p["d_conv"] - 1) + p["ssm_heads"] * p["head_dim"] * p["d_state"]) * 4
        assert p["state_bytes_per_layer"] == per_layer and p["state_bytes_per_seq"] == per_layer * p["layers"]
    assert by_name["mamba-shapes"]["state_bytes_per_layer"] == 104448  # (512 x 3 + 8 x 48 x 64) x 4 bytes
    assert torch.get_num_threads() == body["threads"]
