"""Learning-rate schedules shared by the training tasks."""

from __future__ import annotations

import math
from collections.abc import Callable


def warmup_cosine(warmup: int, total: int, schedule: str, floor: float) -> Callable[[int], float]:
    """LR multiplier per step: linear warm-up over ``warmup`` steps, then constant or cosine to ``floor``.

    ``schedule``: ``constant`` or ``cosine``; ``total`` (0 = unknown: constant after warm-up) is the
    number of optimizer steps of the run. For ``torch.optim.lr_scheduler.LambdaLR``.
    """
    warmup = max(1, warmup)

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant" or total <= warmup:
            return 1.0
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))

    return f
