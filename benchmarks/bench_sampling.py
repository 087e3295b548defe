"""Sampling and training speed of the generator: KV cache vs full recomputation, Token-Shuffle s = 2, 4 vs s = 1.

    python benchmarks/bench_sampling.py                     # the shapes backbone, 8x8 grid, vocab 1000
    python benchmarks/bench_sampling.py --backbone b --grid 16 --vocab 16384 --device cuda --batch 64

Every number is measured in this run on this machine (weights are random: speed does not depend on
them). Prints a table and the ratios; ``--json`` writes the rows.
"""

from __future__ import annotations

import argparse
import json

import torch
from common import timed, train_step_fn

from arlab.generator.build import build_generator


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="shapes")
    ap.add_argument("--grid", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--cfg", type=float, default=2.0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-recompute", action="store_true", help="skip the (slow) no-cache baseline")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = args.device
    rows = []
    labels = torch.arange(args.batch, device=dev) % 10
    for s in (1, 2, 4):
        exp = {"backbone": args.backbone, "order": "raster", "shuffle": {"preset": f"s{s}", "mlp_ratio": 0.5},
               "conditioner": "class"}
        g = build_generator(exp, args.vocab, (args.grid, args.grid), num_classes=10).to(dev)
        n_params = sum(p.numel() for p in g.parameters())
        codes = torch.randint(0, args.vocab, (args.batch, args.grid, args.grid), device=dev)
        g.train()
        t_train = timed(train_step_fn(g, codes, labels), dev, args.repeat)
        g.eval()
        t_cache = timed(lambda g=g: g.sample(labels, cfg_scale=args.cfg), dev, args.repeat)
        row = {"s": s, "params": n_params, "steps_per_image": g.steps_per_image,
               "train_images_per_s": args.batch / t_train, "sample_images_per_s": args.batch / t_cache,
               "sample_latency_s": t_cache}
        if not args.no_recompute:
            t_full = timed(lambda g=g: g.sample(labels, cfg_scale=args.cfg, use_cache=False), dev, 1)
            row["sample_images_per_s_recompute"] = args.batch / t_full
            row["kv_cache_speedup"] = t_full / t_cache
        rows.append(row)
        print(json.dumps(row))
    base = rows[0]
    print(f"\n{args.backbone} backbone, {args.grid}x{args.grid} grid, vocab {args.vocab}, batch {args.batch}, "
          f"CFG {args.cfg}, device {dev} ({torch.get_num_threads()} threads)")
    print("| s | params | steps/image | train img/s | vs s=1 | sample img/s | vs s=1 | KV cache speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        kv = f"{r['kv_cache_speedup']:.1f}x" if "kv_cache_speedup" in r else "-"
        print(f"| {r['s']} | {r['params'] / 1e6:.2f}M | {r['steps_per_image']} | {r['train_images_per_s']:.0f} | "
              f"{r['train_images_per_s'] / base['train_images_per_s']:.2f}x | {r['sample_images_per_s']:.1f} | "
              f"{r['sample_images_per_s'] / base['sample_images_per_s']:.2f}x | {kv} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
