"""Sampling helpers: CFG schedules, top-k / top-p filtering, categorical draws.

CFG on logits (LlamaGen): ``l = l_u + w(t) · (l_c − l_u)`` with the step fraction
``t = k / (T − 1)`` over the T decoding steps and the schedules (Token-Shuffle's half-linear is its
default; arlab notes §3.7):

* ``constant``: w
* ``linear``: 1 + (w − 1)·t
* ``half-linear``: 1 + (w − 1)·min(1, 2t)  (ramp over the first half of the steps, then hold)
* ``cosine``: 1 + (w − 1)·(1 − cos πt)/2
* ``var``: 1 + w·t — VAR's own ramp (``autoregressive_infer_cfg``: ``t = cfg·si/(S−1)``,
  ``logits = (1 + t)·c − t·u``), guidance growing linearly with the scale index from none at the
  first scale; ``w`` is VAR's ``cfg`` (its README's 1.5 means 2.5 at the last scale).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from arlab.errors import ConfigError, did_you_mean

CFG_SCHEDULES = ("constant", "linear", "half-linear", "cosine", "var")


def check_schedule(name: str) -> None:
    if name not in CFG_SCHEDULES:
        raise ConfigError(f"CFG schedule {name!r} does not exist; choose one of {', '.join(CFG_SCHEDULES)}."
                          f"{did_you_mean(name, CFG_SCHEDULES)}")


def cfg_weight(schedule: str, scale: float, step: int, steps: int) -> float:
    """The guidance weight at decoding step ``step`` of ``steps`` (a Python float: no device sync)."""
    check_schedule(schedule)
    t = step / (steps - 1) if steps > 1 else 1.0
    if schedule == "constant":
        ramp = 1.0
    elif schedule == "linear":
        ramp = t
    elif schedule == "half-linear":
        ramp = min(1.0, 2.0 * t)
    elif schedule == "var":
        return 1.0 + scale * t
    else:
        ramp = (1.0 - math.cos(math.pi * t)) / 2.0
    return 1.0 + (scale - 1.0) * ramp


def is_guided(schedule: str, scale: float) -> bool:
    """Whether any step's weight differs from 1 (``var``: scale 0 is unguided; others: scale 1)."""
    return scale != (0.0 if schedule == "var" else 1.0)


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance over ``steps`` decoding steps: whether the batch carries a null half, and the
    per-step mix ``l_u + w(t)·(l_c − l_u)`` of the conditional (first) and null (second) halves."""

    schedule: str
    scale: float
    steps: int

    @property
    def guided(self) -> bool:
        return is_guided(self.schedule, self.scale)

    def mix(self, logits: Tensor, step: int) -> Tensor:
        """(2B, ...) conditional-then-null logits → (B, ...) guided logits; unguided logits pass through."""
        if not self.guided:
            return logits
        lc, lu = logits.chunk(2)
        return lu + cfg_weight(self.schedule, self.scale, step, self.steps) * (lc - lu)


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Keep the ``top_k`` largest logits and the smallest set whose probability reaches ``top_p``; -inf elsewhere."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_l, idx = logits.sort(dim=-1, descending=True)
        cum = sorted_l.softmax(-1).cumsum(-1)
        remove = cum - sorted_l.softmax(-1) >= top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(remove.scatter(-1, idx, remove), float("-inf"))
    return logits


def draw(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
         generator: torch.Generator | None = None) -> Tensor:
    """Sample indices from ``logits`` (..., V); temperature 0 = argmax. Returns (...) int64."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = logits.softmax(-1)
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])
