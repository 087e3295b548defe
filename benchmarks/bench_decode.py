"""Per-token decode time at growing positions: Llama (KV cache) against Mamba-2 (recurrent state).

    python benchmarks/bench_decode.py                         # d 256, 4 blocks, batch 1, CPU
    python benchmarks/bench_decode.py --dim 768 --depth 12 --batch 64 --device cuda

Both backbones get the same width and depth. For each position p a state sized for a sequence of p
positions (plus the timed steps) is filled with p positions (one prefill), then ``--repeat``
single-position ``step`` calls are timed; the table gives ms per token and the decode-state memory per
sequence. Llama's static KV cache is preallocated for the whole sequence and every step attends over
all of it under a mask (gpt-fast's design: fixed shapes, no host sync), so its step costs what a
sequence of that length costs; Mamba's conv and SSM state is the same at every position. Weights are
random: speed does not depend on them.
Last, the decode-state memory per sequence and per layer of the registered Mamba-2 presets (float32).
"""

from __future__ import annotations

import argparse
import time

import torch
from common import write_json

from arlab.config import build, presets, resolve_node


def mamba_presets() -> list[str]:
    """Every registered backbone preset of type ``mamba`` (pure Mamba-2: no attention KV cache)."""
    return [p for p in presets("backbone") if resolve_node("backbone", p)["type"] == "mamba"]


def per_token_ms(bb, batch: int, pos: int, max_len: int, repeat: int, device: str) -> float:
    state = bb.init_state(batch, max_len, torch.float32, torch.device(device))
    x = torch.randn(batch, pos, bb.dim, device=device)
    mask = torch.ones(max_len, max_len, dtype=torch.bool, device=device).tril()
    tables = bb.position_tables(torch.arange(max_len, device=device).float(), torch.zeros(max_len, device=device),
                                torch.zeros(max_len, dtype=torch.bool, device=device))
    take = lambda idx: tuple(t[idx] for t in tables)
    idx = torch.arange(pos, device=device)
    bb.prefill(x, state, idx, take(idx), mask[idx])
    step_x = torch.randn(batch, 1, bb.dim, device=device)
    times = []
    for r in range(repeat + 1):  # the first call warms up
        i = torch.tensor([pos + r], device=device)
        t0 = time.perf_counter()
        bb.step(step_x, state, i, take(i), mask[i])
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 1000 * sorted(times[1:])[len(times[1:]) // 2]  # median


@torch.no_grad()
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--positions", default="64,256,1024,4096")
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    positions = [int(p) for p in args.positions.split(",")]
    heads = max(1, args.dim // 64)
    models = {"llama (KV cache)": {"type": "llama", "dim": args.dim, "depth": args.depth, "heads": heads},
              "mamba (state)": {"type": "mamba", "dim": args.dim, "depth": args.depth}}
    rows = []
    print(f"threads {torch.get_num_threads()}, device {args.device}, batch {args.batch}, d {args.dim}, "
          f"depth {args.depth}")
    print(f"{'backbone':<18}" + "".join(f"{'p=' + str(p):>10}" for p in positions)
          + f"{'state/seq at p=' + str(positions[-1]):>22}")
    for name, node in models.items():
        torch.manual_seed(0)
        bb = build("backbone", node).to(args.device).eval()
        lens = [p + args.repeat + 2 for p in positions]  # the sequence each position's state is sized for
        ms = [per_token_ms(bb, args.batch, p, n, args.repeat, args.device) for p, n in zip(positions, lens)]
        mem = [bb.init_state(1, n, torch.float32, torch.device(args.device)).nbytes for n in lens]
        rows.append({"backbone": name, "ms_per_token": dict(zip(positions, ms)),
                     "state_bytes_per_seq": dict(zip(positions, mem)),
                     "params": sum(p.numel() for p in bb.parameters())})
        print(f"{name:<18}" + "".join(f"{v:>10.2f}" for v in ms) + f"{mem[-1] / 2**20:>11.2f} MiB")
    for r in rows:
        ms = list(r["ms_per_token"].values())
        print(f"{r['backbone']}: p={positions[-1]} / p={positions[0]} = {ms[-1] / ms[0]:.2f}x")
    rows_p = []
    print(f"\n{'mamba preset':<14}{'d':>6}{'layers':>8}{'state/seq':>12}{'per layer':>12}")
    for name in mamba_presets():
        bb = build("backbone", name)
        mem = bb.init_state(1, 1, torch.float32, torch.device("cpu")).nbytes
        depth = len(bb.blocks)
        mx = bb.blocks[0].mixer
        rows_p.append({"preset": name, "dim": bb.dim, "layers": depth, "state_bytes_per_seq": mem,
                       "state_bytes_per_layer": mem // depth, "conv_channels": mx.conv.in_channels,
                       "d_conv": mx.d_conv, "ssm_heads": mx.heads, "head_dim": mx.head_dim, "d_state": mx.d_state})
        print(f"{name:<14}{bb.dim:>6}{depth:>8}{mem / 2**10:>8.0f} KiB{mem / depth / 2**10:>8.1f} KiB")
    body = {"threads": torch.get_num_threads(), "device": args.device, "batch": args.batch, "dim": args.dim,
            "depth": args.depth, "rows": rows, "presets": rows_p}
    write_json(args.json, body)
    return body


if __name__ == "__main__":
    main()
