"""Behaviour pin: a tiny generator of every order (and Token-Shuffle window, adaLN, text prefix) trained a few
steps from a fixed seed gives the same losses, logits, sampled tokens, state-dict keys and weight-decay
exemptions as the code before the contracts refactor (values recorded at commit ea2c991 in
``golden/behaviour.json``; the same on 1 and 2 threads). Same state-dict keys and shapes mean checkpoints
trained before still load; same tokens from the same weights mean they sample identically.

Regenerate only for an intended change of behaviour: ``python tests/generator/test_behaviour_pin.py record``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from arlab.config import build
from arlab.generator.model import Generator
from arlab.layers import is_decayed

GOLDEN = Path(__file__).parent / "golden" / "behaviour.json"

CASES = {
    "raster-s1": dict(order="raster", s=1, grid=(4, 4), cond="class"),
    "raster-s2": dict(order="raster", s=2, grid=(4, 4), cond="class"),
    "raster-s4": dict(order="raster", s=4, grid=(8, 8), cond="class"),
    "neighbor-s1": dict(order="neighbor", s=1, grid=(4, 4), cond="class"),
    "neighbor-s2": dict(order="neighbor", s=2, grid=(8, 8), cond="class"),
    "next_scale-s1": dict(order="next_scale", s=1, patch=[1, 2, 3, 4], cond="class"),
    "next_scale-adaln": dict(order="next_scale", s=1, patch=[1, 2, 3, 4], cond="class", adaln=True),
    "text-raster-s2": dict(order="raster", s=2, grid=(4, 4), cond="text"),
}
V, B, K = 16, 4, 3


def no_decay_names(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad and not is_decayed(p)}


def run_case(name: str, chunked: bool = False) -> dict:
    """Build (seed 0), train 5 AdamW steps on fixed random tokens (``chunked``: through the chunked head + CE,
    as task/generator trains), then sample with and without CFG."""
    c = CASES[name]
    torch.manual_seed(0)
    bb = {"type": "llama", "dim": 32, "depth": 2, "heads": 2, "multiple_of": 32}
    if c.get("adaln"):
        bb.update(cond_mode="adaln", rope=False, qk_norm=True)
    backbone = build("backbone", bb)
    order = build("order", c["order"])
    shuffle = build("shuffle", {"type": "window", "s": c["s"], "blocks": 1}, dim=32)
    cnode = "class" if c["cond"] == "class" else {"type": "text", "max_bytes": 8}
    cond_mod = build("conditioner", cnode, dim=32, num_classes=K)
    quant = None
    if "patch" in c:
        quant = build("quantizer", {"type": "msvq", "codebook_size": V, "code_dim": 8, "patch_nums": c["patch"]})
        scales = [(p, p) for p in c["patch"]]
    else:
        scales = c["grid"]
    model = Generator(backbone, order, shuffle, cond_mod, V, scales, z_loss=1e-4, quantizer=quant)
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(V, (B, model.layout.num_tokens), generator=g)
    labels = torch.tensor([0, 1, 2, 0])
    cond = labels if c["cond"] == "class" else cond_mod.encode(["red ring", "a blue", "", "a large green square"])
    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    nd = no_decay_names(model)
    opt = torch.optim.AdamW([{"params": [p for k, p in named if k not in nd], "weight_decay": 0.05},
                             {"params": [p for k, p in named if k in nd], "weight_decay": 0.0}], lr=1e-2)
    model.train()
    losses = []
    for _ in range(5):
        torch.manual_seed(len(losses))
        out = model(codes, cond, return_logits=not chunked)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    model.eval()
    with torch.no_grad():
        lg = model(codes, cond).logits_bnv
    sched = "var" if c["order"] == "next_scale" else "half-linear"
    g = torch.Generator().manual_seed(1)
    tok_cfg = model.sample(cond, cfg_scale=2.0, cfg_schedule=sched, generator=g)
    tok_plain = model.sample(cond, cfg_scale=0.0 if sched == "var" else 1.0, cfg_schedule=sched, top_k=5,
                             temperature=0.9, generator=g)
    return {
        "losses": losses,
        "logits_sum": float(lg.double().sum()), "logits_abs": float(lg.double().abs().sum()),
        "tokens_cfg": tok_cfg.flatten().tolist(), "tokens_plain": tok_plain.flatten().tolist(),
        "state_dict": {k: list(v.shape) for k, v in model.state_dict().items()},
        "no_decay": sorted(nd),
        "steps": model.plan.steps,
    }


@pytest.mark.parametrize("name", sorted(CASES))
def test_behaviour_is_unchanged(name):
    want = json.loads(GOLDEN.read_text())[name]
    got = run_case(name)
    assert got["state_dict"] == want["state_dict"]  # old checkpoints load
    assert got["no_decay"] == want["no_decay"]  # the same parameters are exempt from weight decay
    assert got["steps"] == want["steps"]
    assert got["losses"] == pytest.approx(want["losses"], rel=1e-5, abs=1e-6)
    assert got["logits_sum"] == pytest.approx(want["logits_sum"], rel=1e-4, abs=1e-3)
    assert got["logits_abs"] == pytest.approx(want["logits_abs"], rel=1e-5)
    assert got["tokens_cfg"] == want["tokens_cfg"]
    assert got["tokens_plain"] == want["tokens_plain"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_chunked_training_loss_keeps_the_behaviour(name):
    """Training through the chunked head + CE (the task's default) follows the same trajectory: the same
    losses (to float32 rounding), logits and sampled tokens."""
    want = json.loads(GOLDEN.read_text())[name]
    got = run_case(name, chunked=True)
    assert got["losses"] == pytest.approx(want["losses"], rel=1e-5, abs=1e-5)
    assert got["logits_abs"] == pytest.approx(want["logits_abs"], rel=1e-4)
    assert got["tokens_cfg"] == want["tokens_cfg"]
    assert got["tokens_plain"] == want["tokens_plain"]


if __name__ == "__main__" and sys.argv[1:] == ["record"]:
    GOLDEN.write_text(json.dumps({name: run_case(name) for name in CASES}, indent=1))
