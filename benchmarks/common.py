"""Shared helpers of the benchmark scripts (run them as ``python benchmarks/<script>.py``)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import torch

from arlab.task.base import fused_ok


def timed(fn: Callable[[], object], device: str, repeat: int) -> float:
    """Mean seconds per call of ``fn`` after one warm-up call (CUDA synchronised)."""
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeat


def train_step_fn(g: torch.nn.Module, codes: torch.Tensor, cond: torch.Tensor) -> Callable[[], None]:
    """One generator training step (forward, backward, AdamW) on fixed inputs, through the path the generator
    task trains with (fused AdamW where the task fuses it; ``return_logits=False``: the chunked head + CE when
    the model's ``loss_chunk`` > 0)."""
    params = [p for p in g.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=fused_ok(params) or None)  # the kernel the task uses

    def step() -> None:
        out = g(codes, cond, return_logits=False)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()

    return step


def write_json(path: str, rows: list[dict] | dict) -> None:
    """Write the benchmark rows (or a speed file's body) to ``path`` (nothing when ``path`` is empty)."""
    if path:
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    """Print ``title`` and a Markdown table."""
    print(title)
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(r) + " |")
