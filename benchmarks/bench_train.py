"""Training speed of Llama against Mamba-2 and the attention/Mamba hybrid, on the shapes experiments' shapes.

    OMP_NUM_THREADS=2 python benchmarks/bench_train.py               # CPU, 2 threads, batch 64
    python benchmarks/bench_train.py --device cuda --batch 256

For each order, the experiment's generator is built from its YAML with each backbone (the
parameter-matched presets: ``shapes``, ``mamba-shapes``, ``hybrid-shapes``; a pure Mamba only where the
order is causal), random weights and the token layout of its tokenizer preset (no checkpoint). One
training step (forward, backward, AdamW) on the same fixed batch is timed ``--repeat`` times after a
warm-up, in one process with the threads pinned (``--threads``, default ``OMP_NUM_THREADS`` or 1).
Prints images/s per row and the ratio to the Llama row of the same order; ``--json`` writes the rows.
"""

from __future__ import annotations

import argparse
import os

import torch
from bench_experiments import tokenizer_layout
from common import timed, train_step_fn, write_json

from arlab.config import load_experiment
from arlab.generator.build import build_generator

# (experiment, backbone override) per row; the first of each order is the Llama reference
ROWS = [("raster", "shapes"), ("raster", "mamba-shapes"), ("raster", "hybrid-shapes"),
        ("tokenshuffle-s2", "shapes"), ("tokenshuffle-s2", "mamba-shapes"), ("tokenshuffle-s2", "hybrid-shapes"),
        ("var", "shapes"), ("var", "hybrid-shapes"),
        ("nar", "shapes"), ("nar", "hybrid-shapes")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64, help="images per training step (the shapes experiments' 64)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--only", default="", help="comma-separated experiments (default: all of ROWS)")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    only = set(args.only.split(",")) if args.only else None
    rows, ref = [], {}
    for name, backbone in ROWS:
        if only and name not in only:
            continue
        torch.manual_seed(0)
        exp = load_experiment(f"shapes/{name}", [f"backbone={backbone}"])
        vocab, scales, quant = tokenizer_layout(exp)
        g = build_generator(exp.tree, vocab, [(p, p) for p in scales], num_classes=10, quantizer=quant)
        g = g.to(args.device).train()
        codes = torch.randint(0, vocab, (args.batch, g.layout.num_tokens), device=args.device)
        cond = (torch.arange(args.batch) % 10).to(args.device)
        sec = timed(train_step_fn(g, codes, cond), args.device, args.repeat)
        ips = args.batch / sec
        ref.setdefault(name, ips)
        rows.append({"experiment": name, "backbone": g.backbone.registry_key, "preset": backbone,
                     "params": sum(p.numel() for p in g.parameters() if p.requires_grad),
                     "sequence": g.prefix_len + g.plan.length - 1, "step_s": sec, "train_images_per_s": ips,
                     "vs_llama": ips / ref[name]})
        r = rows[-1]
        print(f"{name:16s} {r['backbone']:18s} {r['params'] / 1e6:6.2f}M  L={r['sequence']:4d}  "
              f"{sec * 1000:8.1f} ms/step  {ips:8.1f} img/s  x{r['vs_llama']:.2f}", flush=True)
    print(f"\n{args.device}, {args.threads} thread(s), batch {args.batch}, {args.repeat} timed steps after a warm-up")
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
