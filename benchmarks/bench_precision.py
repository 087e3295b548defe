"""One training step (forward, loss, backward, optimizer) of an experiment's model in float32 and under bf16
autocast, in one process: what ``trainer.precision: auto-bf16`` decides between.

    python benchmarks/bench_precision.py                                   # shapes/tokenizer-quick
    python benchmarks/bench_precision.py shapes/quickstart                 # its generator
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/bench_precision.py   # as an AVX2-only CPU

The model is built from the experiment's YAML with random weights; the batch is random (images in [-1, 1] for
a tokenizer, random codes and labels for a generator) at the experiment's ``data.batch_size``. The table also
prints the bf16 flags :func:`arlab.config.cpu_bf16_flags` reads and what ``auto-bf16`` resolves to here.

Rows: float32; bf16 autocast as arlab runs it (attention in float32 on CPU, :func:`arlab.layers.attention`); and
bf16 autocast with attention in bf16 too (what autocast alone does, the path before arlab routed it through
float32). For contiguous q/k/v, as in the generator, torch then runs its CPU flash-attention kernel in bf16. For the
tokenizer's transposed views it already gave the float32 values, so there the two bf16 rows time the same work.
"""

from __future__ import annotations

import argparse
from contextlib import contextmanager

import torch
from bench_experiments import tokenizer_layout
from common import print_table, timed, write_json

import arlab.layers
from arlab.config import cpu_bf16_flags, load_experiment, resolve_precision
from arlab.generator.build import build_generator


@contextmanager
def half_attention(on: bool):
    """``on``: attention takes bf16 inputs straight to SDPA (autocast alone), not through float32."""
    saved = arlab.layers._HALF
    arlab.layers._HALF = () if on else saved
    try:
        yield
    finally:
        arlab.layers._HALF = saved


def step_fn(name: str, batch: int | None):
    exp = load_experiment(name, [])
    b = int(batch or exp.tree["data"]["batch_size"])
    torch.manual_seed(0)
    if exp.tree["task"]["type"] == "tokenizer":
        model = exp.build("tokenizer")
        size = int(exp.tree["tokenizer"]["image_size"])
        x = torch.rand(b, 3, size, size) * 2 - 1

        def loss() -> torch.Tensor:
            return (model(x)[0].float() - x).pow(2).mean()
    else:
        vocab, scales, quant = tokenizer_layout(exp)
        model = build_generator(exp.tree, vocab, [(p, p) for p in scales], num_classes=10, quantizer=quant)
        codes = torch.randint(0, vocab, (b, sum(p * p for p in scales)))
        labels = torch.arange(b) % 10

        def loss() -> torch.Tensor:
            return model(codes, labels, return_logits=False).loss
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def make(bf16: bool):
        def step() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = loss()
            opt.zero_grad(set_to_none=True)
            out.backward()
            opt.step()
        return step
    return make, b


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("experiment", nargs="?", default="shapes/tokenizer-quick")
    ap.add_argument("--batch", type=int, default=0, help="default: the experiment's data.batch_size")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    make, b = step_fn(args.experiment, args.batch)
    rows = []
    for name, bf16, half in (("float32", False, False), ("bf16 autocast", True, False),
                             ("bf16 autocast, bf16 attention", True, True)):
        with half_attention(half):
            rows.append({"precision": name, "s_per_step": timed(make(bf16), "cpu", args.repeat)})
    flags = cpu_bf16_flags()
    body = {"experiment": args.experiment, "batch": b, "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "flags": flags,
            "auto_bf16": resolve_precision("auto-bf16", "cpu"), "rows": rows}
    print_table(f"{args.experiment}, batch {b}, {torch.get_num_threads()} threads, ATen {body['cpu_capability']}, "
                f"bf16 flags {flags}: auto-bf16 -> {body['auto_bf16']}", ["precision", "s per step", "vs float32"],
                [[r["precision"], f"{r['s_per_step']:.3f}", f"{rows[0]['s_per_step'] / r['s_per_step']:.2f}x"]
                 for r in rows])
    write_json(args.json, body)
    return body


if __name__ == "__main__":
    main()
