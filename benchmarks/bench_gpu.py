"""Peer-shaped speed: generators shaped like LlamaGen GPT-B / GPT-L, VAR-d16 and NAR-B, next to the peers'
own figures (../shared/reference/peer-speed.md, one H100) as ratios.

    python benchmarks/bench_gpu.py                 # CUDA: batch 64, bf16 autocast, fused AdamW, torch.compile
    python benchmarks/bench_gpu.py --tiny          # CPU, tiny shapes, a few seconds (CI runs this)
    python benchmarks/bench_gpu.py --models GPT-B,NAR-B --no-compile --json out.json

Weights are random (speed does not depend on them); the tokenizers are randomly initialised with the right
shapes (LlamaGen VQ-16's decoder; VAR's msvq on the same decoder — VAR's own VAE differs), so the VAE decode is
timed too. Per model, measured in this run: training images/s (forward + chunked loss + backward + AdamW),
MFU against the device's dense bf16 peak (6·N·tokens as the peers count it, and with attention FLOPs
12·layers·d·T² per image), peak memory, the time to sample 64 images with CFG (tokens; + VAE decode) and one
image's latency. Peak FLOP/s come from the device name; unknown (e.g. CPU) leaves MFU blank.
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import sys
import time
from typing import Any

import torch

from arlab.config import build
from arlab.generator.build import build_generator
from arlab.task.base import fused_ok

PEER = {  # peer-speed.md: params, tokens, train img/s (b64), MFU, sample 64 imgs with CFG (s), 1 img (s)
    "GPT-B": dict(params=111e6, tokens=256, train=819, mfu=0.14, sample64=2.79, sample1=2.91),
    "GPT-L": dict(params=343e6, tokens=256, train=315, mfu=0.17, sample64=5.23, sample1=5.16),
    "VAR-d16": dict(params=310e6, tokens=680, train=193, mfu=0.25, sample64=0.55, sample1=0.22),
    "NAR-B": dict(params=131e6, tokens=256, train=524, mfu=0.11, sample64=0.59, sample1=0.51),
}
VQ16 = "llamagen-vq16"
VAR_TOK = {"type": "vqgan", "image_size": 256, "autoencoder": "llamagen-f16", "quantizer": "msvq-var"}
SHAPES = {  # backbone, order, tokenizer, sampling options (the peers' settings)
    "GPT-B": ("b", "raster", VQ16, dict(cfg_scale=4.0)),
    "GPT-L": ("l", "raster", VQ16, dict(cfg_scale=4.0)),
    "VAR-d16": ("var-d16", "next_scale", VAR_TOK, dict(cfg_scale=1.5, cfg_schedule="var", top_k=900, top_p=0.96)),
    "NAR-B": ("nar-b", "neighbor", VQ16, dict(cfg_scale=4.0)),
}
TINY_BB = {"type": "llama", "dim": 64, "depth": 2, "heads": 4, "multiple_of": 32}
TINY_VQ = {"type": "vqgan", "image_size": 16, "autoencoder": "tiny", "quantizer": {"type": "vq", "codebook_size": 64,
                                                                                   "code_dim": 8}}
TINY_MSVQ = {"type": "vqgan", "image_size": 16, "autoencoder": "tiny",
             "quantizer": {"type": "msvq", "codebook_size": 64, "code_dim": 8, "patch_nums": [1, 2, 4, 8],
                           "latent_size": 8, "phi_k": 2}}
TINY = {
    "GPT-B": (TINY_BB, "raster", TINY_VQ, dict(cfg_scale=4.0)),
    "GPT-L": ({**TINY_BB, "depth": 3}, "raster", TINY_VQ, dict(cfg_scale=4.0)),
    "VAR-d16": ({**TINY_BB, "cond_mode": "adaln", "rope": False, "qk_norm": True}, "next_scale", TINY_MSVQ,
                dict(cfg_scale=1.5, cfg_schedule="var", top_k=9, top_p=0.96)),
    "NAR-B": (TINY_BB, "neighbor", TINY_VQ, dict(cfg_scale=4.0)),
}
PEAK_BF16 = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12), ("A100", 312e12),
             ("L40S", 362e12), ("A10G", 125e12), ("L4", 121e12)]  # dense bf16 FLOP/s by device-name substring


def peak_flops(device: str) -> float | None:
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16 if k in name), None)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str, repeat: int) -> float:
    fn()  # warm-up (compiles)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / repeat


def flops_per_image(g, n_params: int) -> tuple[float, float]:
    """6·N·tokens (the peers' count) and that plus attention, 12·layers·d·T² (T: the training sequence)."""
    tokens, T = g.layout.num_tokens, g.prefix_len + g.plan.length - 1
    layers = sum(len(m.blocks) for m in (g.backbone, g.branch) if m is not None)
    dense = 6.0 * n_params * tokens
    return dense, dense + 12.0 * layers * g.backbone.dim * T * T


def measure(name: str, spec: tuple, args: argparse.Namespace) -> dict[str, Any]:
    bb, order, tok_node, sampling = spec
    dev, cuda = args.device, args.device == "cuda"
    torch.manual_seed(0)
    tok = build("tokenizer", tok_node).to(dev).eval()
    quant = tok.quantizer if tok.multiscale else None
    scales = [(p, p) for p in tok.scales] if tok.multiscale else (tok.grid, tok.grid)
    exp = {"backbone": bb, "order": order, "shuffle": {"type": "window", "s": 1}, "conditioner": "class"}
    g = build_generator(exp, tok.codebook_size, scales, num_classes=1000, quantizer=quant,
                        loss_chunk=args.loss_chunk).to(dev)
    n_params = sum(p.numel() for p in g.parameters() if p.requires_grad)
    b = args.batch
    codes = torch.randint(0, tok.codebook_size, (b, g.layout.num_tokens), device=dev)
    labels = torch.arange(b, device=dev) % 1000
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)
    params = [p for p in g.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=fused_ok(params) or None)
    g.train()
    g.static_mask()
    fwd = functools.partial(g.forward, return_logits=False)
    fwd = torch.compile(fwd) if args.compile else fwd

    def train_step() -> None:
        with amp:
            loss = fwd(codes, labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t_train = timed(train_step, dev, args.steps)
    peak_mem = torch.cuda.max_memory_allocated() if cuda else None
    g.eval()
    if args.compile_decode:
        g.compile_decode("reduce-overhead" if cuda else "default")
    n_img = args.sample_batch

    def sample(n: int, decode: bool) -> None:
        with torch.no_grad(), amp:
            out = g.sample(labels[:n] if n <= b else torch.arange(n, device=dev) % 1000, **sampling)
            if decode:
                tok.detokenize(tok.unflatten_indices(out.flatten(1)))

    t64 = timed(lambda: sample(n_img, False), dev, 1)
    t64_dec = timed(lambda: sample(n_img, True), dev, 1)
    t1 = timed(lambda: sample(1, name == "VAR-d16"), dev, args.repeat)
    dense, with_attn = flops_per_image(g, n_params)
    peak = peak_flops(dev)
    ips = b / t_train
    return {"model": name, "params": n_params, "tokens": g.layout.num_tokens, "steps_per_image": g.steps_per_image,
            "train_images_per_s": ips, "mfu": ips * dense / peak if peak else None,
            "mfu_with_attention": ips * with_attn / peak if peak else None, "peak_memory_bytes": peak_mem,
            "sample_batch": n_img, "sample_s": t64, "sample_with_decode_s": t64_dec, "latency_1_s": t1}


def fmt(v: float | None, spec: str, none: str = "") -> str:
    return none if v is None else format(v, spec)


def table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    out = ["| model | params | tokens | train img/s | × peer | MFU 6N | MFU +attn | peak mem | "
           f"sample {rows[0]['sample_batch']} (s) | +decode (s) | × peer | 1 img (s) | × peer |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def ratio(ours_over_peer: float | None) -> str:
        return "—" if ours_over_peer is None else f"{ours_over_peer:.2f}"

    for r in rows:
        p = None if args.tiny else PEER[r["model"]]  # tiny: no ratios (the peers' figures are full-size)
        s64 = r["sample_with_decode_s"] if r["model"] == "VAR-d16" else r["sample_s"]  # as the peers timed it
        mem = fmt(r["peak_memory_bytes"] and r["peak_memory_bytes"] / 2**30, ".1f", "n/a") + (
            " GiB" if r["peak_memory_bytes"] else "")
        out.append(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['tokens']} | {r['train_images_per_s']:.1f} | "
                   f"{ratio(p and r['train_images_per_s'] / p['train'])} | {fmt(r['mfu'], '.0%')} | "
                   f"{fmt(r['mfu_with_attention'], '.0%')} | {mem} | {r['sample_s']:.3f} | "
                   f"{r['sample_with_decode_s']:.3f} | {ratio(p and p['sample64'] / s64)} | {r['latency_1_s']:.3f} | "
                   f"{ratio(p and p['sample1'] / r['latency_1_s'])} |")
    note = ("× peer: ours / peer's train img/s, peer's / our sampling time (> 1 = faster); peers: one H100, their "
            "own code, peer-speed.md; sampling compared with VAE decode for VAR-d16, tokens only otherwise.")
    if args.tiny:
        note += " --tiny: tiny shapes, no ratios (the peers' figures are full-size)."
    return "\n".join(out) + "\n\n" + note


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on CPU (seconds), for CI")
    ap.add_argument("--models", default=",".join(PEER))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--sample-batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10, help="timed training steps (after one warm-up step)")
    ap.add_argument("--repeat", type=int, default=3, help="timed one-image samples")
    ap.add_argument("--loss-chunk", type=int, default=4096, help="0: full-logits loss")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="default: on CUDA")
    ap.add_argument("--compile-decode", action=argparse.BooleanOptionalAction, default=None,
                    help="compiled decode step (CUDA graphs on CUDA); default: on CUDA")
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    if args.tiny:
        args.device, args.batch, args.sample_batch, args.steps, args.repeat = "cpu", 4, 4, 2, 1
    cuda = args.device == "cuda"
    args.compile = cuda if args.compile is None else args.compile
    args.compile_decode = cuda if args.compile_decode is None else args.compile_decode
    shapes = TINY if args.tiny else SHAPES
    rows = []
    for name in args.models.split(","):
        if name not in shapes:
            sys.exit(f"bench_gpu: --models: unknown model {name!r}; choose from {', '.join(shapes)}")
        rows.append(measure(name, shapes[name], args))
        print(json.dumps(rows[-1]), flush=True)
    dev = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"\n{dev}; batch {args.batch}; compile {args.compile}; compiled decode {args.compile_decode}; "
          f"loss chunk {args.loss_chunk}; peak RSS {rss:.2f} GiB")
    print(table(rows, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
