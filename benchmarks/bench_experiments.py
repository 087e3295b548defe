"""Speed of every generator experiment of a comparison set, in one run on one machine.

    python benchmarks/bench_experiments.py                       # experiments/shapes/*, CPU
    python benchmarks/bench_experiments.py --set cifar10 --device cuda --batch 64

Each experiment's generator is built from its YAML (backbone, order, Token-Shuffle window,
conditioner) with random weights and the token layout of its tokenizer preset (FSQ 8x8 grid, or the
msvq scales; no checkpoint needed: speed does not depend on the weights). Measured per experiment:
training images/s (forward, backward, AdamW step at ``--train-batch``) and sampling images/s (KV
cache, CFG with the experiment's schedule, ``--batch`` images). Ratios are against the first row
(raster). With ``--runs`` the table also shows each trained run's parameters, validation CE and
shapes class accuracy from its ``metrics.json``. ``--json FILE`` writes the rows as a speed file
(``format: arlab-speed/1``, with the device and thread count) that ``arlab compare --speed FILE`` puts
beside the trained runs' quality.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import torch
from common import timed, train_step_fn, write_json

from arlab.config import load_experiment
from arlab.generator.build import build_generator

SETS = {"shapes": ["raster", "tokenshuffle-s2", "tokenshuffle-s4", "var", "nar", "text-tokenshuffle-s2", "mamba-raster",
                   "mamba-tokenshuffle-s2", "mvar"],
        "cifar10": ["raster", "tokenshuffle-s2", "tokenshuffle-s4", "var", "nar", "text-tokenshuffle-s2"]}


def tokenizer_layout(exp) -> tuple[int, list[int], torch.nn.Module | None]:
    """(vocab, scales, msvq or None) of the experiment's tokenizer, from its presets (no checkpoint)."""
    tok_exp = load_experiment(exp.tree["task"]["tokenizer_experiment"], list(exp.tree["task"]["tokenizer_overrides"]))
    tok = tok_exp.build("tokenizer")
    return int(tok.codebook_size), list(tok.scales), (tok.quantizer if tok.multiscale else None)


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    model = ""
    try:
        model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                      if ln.startswith("model name")), "")
    except OSError:
        pass
    return f"cpu ({model or platform.machine()}, {os.cpu_count()} cores)"


def conditions(g, n: int, device: str) -> torch.Tensor:
    labels = torch.arange(n) % 10
    if g.conditioner.accepts_text:
        from arlab.data.shapes import TEST_START, render

        return g.conditioner.encode([render(TEST_START + i).caption for i in range(n)]).to(device)
    return labels.to(device)


def main(argv: list[str] | None = None) -> dict:
    """Time every experiment; print the table; return (and with ``--json`` write) the speed file's body."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", default="shapes", choices=sorted(SETS))
    ap.add_argument("--only", default="", help="comma-separated experiment names (default: the whole set)")
    ap.add_argument("--batch", type=int, default=32, help="images per sampling call")
    ap.add_argument("--train-batch", type=int, default=64, help="images per training step (the experiments' 64)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--runs", default="", help="folder of trained runs (e.g. runs/shapes) to add CE / accuracy")
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    dev = args.device
    names = args.only.split(",") if args.only else SETS[args.set]
    rows = []
    for name in names:
        torch.manual_seed(0)
        exp = load_experiment(f"{args.set}/{name}")
        vocab, scales, quant = tokenizer_layout(exp)
        g = build_generator(exp.tree, vocab, [(p, p) for p in scales], num_classes=10, quantizer=quant).to(dev)
        n_params = sum(p.numel() for p in g.parameters() if p.requires_grad)
        task = exp.tree["task"]
        codes = torch.randint(0, vocab, (args.train_batch, g.layout.num_tokens), device=dev)
        cond_train = conditions(g, args.train_batch, dev)
        g.train()
        t_train = timed(train_step_fn(g, codes, cond_train), dev, args.repeat)
        g.eval()
        cond = conditions(g, args.batch, dev)
        opts = {"cfg_scale": task["sample_cfg"], "cfg_schedule": task["sample_schedule"]}
        t_sample = timed(lambda g=g, c=cond, o=opts: g.sample(c, **o), dev, args.repeat)
        row = {"experiment": f"{args.set}/{name}", "order": g.order.registry_key.split("/")[1], "s": g.layout.s,
               "conditioner": g.conditioner.registry_key.split("/")[1], "params": n_params,
               "tokens": g.layout.num_tokens, "sequence": g.prefix_len + g.plan.length - 1,
               "steps_per_image": g.steps_per_image, "train_images_per_s": args.train_batch / t_train,
               "sample_images_per_s": args.batch / t_sample, "sample_latency_s": t_sample}
        run = Path(args.runs) / name / "metrics.json"
        if args.runs and run.is_file():
            m = json.loads(run.read_text())
            row |= {"run_params": m.get("model/params"), "val_ce": m.get("val/ce"),
                    "class_acc": m.get("sample/class_acc")}
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = rows[0]
    print(f"\n{args.set} experiments, device {dev} ({torch.get_num_threads()} threads), "
          f"train batch {args.train_batch}, sampling batch {args.batch} with each experiment's CFG")
    print("| experiment | order | s | cond | params | steps/image | val CE | class acc | train img/s | vs raster "
          "| sample img/s | vs raster |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ce = f"{r['val_ce']:.2f}" if r.get("val_ce") is not None else "-"
        acc = f"{r['class_acc']:.1%}" if r.get("class_acc") is not None else "-"
        print(f"| {r['experiment']} | {r['order']} | {r['s']} | {r['conditioner']} | {r['params'] / 1e6:.2f} M | "
              f"{r['steps_per_image']} | {ce} | {acc} | {r['train_images_per_s']:.0f} | "
              f"{r['train_images_per_s'] / base['train_images_per_s']:.2f}x | {r['sample_images_per_s']:.1f} | "
              f"{r['sample_images_per_s'] / base['sample_images_per_s']:.2f}x |")
    body = {"format": "arlab-speed/1", "set": args.set, "device": device_name(dev),
            "threads": torch.get_num_threads(), "train_batch": args.train_batch, "sample_batch": args.batch,
            "repeat": args.repeat, "torch": torch.__version__, "rows": rows}
    write_json(args.json, body)
    return body


if __name__ == "__main__":
    main()
