"""Time of one optimizer step over an experiment's trainable parameters, per kernel: torch's per-tensor loop,
``foreach`` and ``fused`` (what arlab's tasks use where :func:`arlab.task.base.fused_ok` allows) of the task's Adam /
AdamW, and ``muon``: :class:`arlab.optim.MuonAdamW` as ``task.optimizer=muon`` builds it (Muon with its Newton-Schulz
iteration in float32 on the hidden matrices, fused AdamW on the rest).

    python benchmarks/bench_optimizer.py                          # shapes/quickstart's generator, AdamW
    python benchmarks/bench_optimizer.py shapes/tokenizer-quick   # a tokenizer's autoencoder + quantizer, Adam

The model is built from the experiment's YAML with random weights (no checkpoint) and given random gradients;
each kernel runs ``--repeat`` steps after ``--warmup``. The speed-up is against the loop kernel, measured in
the same process.
"""

from __future__ import annotations

import argparse

import torch
from bench_experiments import tokenizer_layout
from common import print_table, timed, write_json

from arlab.config import load_experiment
from arlab.generator.build import build_generator
from arlab.layers import decay_groups
from arlab.optim import MuonAdamW, muon_group, split_hidden

KERNELS = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}, "muon": {}}


def model_of(name: str) -> tuple[torch.nn.Module, type]:
    """The experiment's trainable module and the Adam-family class its task uses (AdamW beside Muon)."""
    exp = load_experiment(name, [])
    if exp.tree["task"]["type"] == "tokenizer":
        adam = exp.tree["task"].get("optimizer", "adam") == "adam"
        return exp.build("tokenizer"), torch.optim.Adam if adam else torch.optim.AdamW
    vocab, scales, quant = tokenizer_layout(exp)
    g = build_generator(exp.tree, vocab, [(p, p) for p in scales], num_classes=10, quantizer=quant)
    return g, torch.optim.AdamW


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("experiment", nargs="?", default="shapes/quickstart")
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--json", default="", help="also write the rows to this file")
    args = ap.parse_args(argv)
    module, cls = model_of(args.experiment)
    n_params = sum(p.numel() for p in module.parameters() if p.requires_grad)
    rows = []
    for kernel, kw in KERNELS.items():
        torch.manual_seed(0)
        groups = decay_groups(module, 0.05)
        for g in groups:
            for p in g["params"]:
                p.grad = torch.randn_like(p)
        if kernel == "muon":
            hidden, rest = split_hidden(module)
            opt = MuonAdamW([muon_group(hidden, 0.02, 0.95, 0.0), {"params": rest}], lr=1e-4, fused=True)
        else:
            opt = cls(groups, lr=1e-4, **kw)
        for _ in range(args.warmup):
            opt.step()
        rows.append({"kernel": kernel, "ms_per_step": timed(opt.step, "cpu", args.repeat) * 1e3})
    base = rows[0]["ms_per_step"]
    for r in rows:
        r["speedup"] = base / r["ms_per_step"]
    body = {"experiment": args.experiment, "optimizer": cls.__name__, "params": n_params,
            "threads": torch.get_num_threads(), "rows": rows}
    print_table(f"{args.experiment}: {cls.__name__} over {n_params / 1e6:.2f}M parameters, "
                f"{torch.get_num_threads()} threads", ["kernel", "ms per step", "vs loop"],
                [[r["kernel"], f"{r['ms_per_step']:.2f}", f"{r['speedup']:.2f}x"] for r in rows])
    write_json(args.json, body)
    return body


if __name__ == "__main__":
    main()
