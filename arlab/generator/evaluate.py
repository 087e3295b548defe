"""Scoring generated images: balanced evaluation conditions and the registered metrics.

:func:`eval_conditions` gives ``n`` conditions with balanced classes (a text model on shapes gets the
captions of the first ``n`` test images, whose class the caption names; otherwise class labels, or the
conditioner's class template); :func:`score` runs the ``metric/*`` components named in the task's
``eval_metrics`` and reports each value with its sample count.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from arlab.conditioner.base import Conditioner
from arlab.config import build
from arlab.data.shapes import TEST_START, class_from_caption, render


def is_shapes(meta: dict[str, Any]) -> bool:
    return str(meta.get("dataset", "")).startswith("shapes")


def eval_conditions(conditioner: Conditioner, meta: dict[str, Any], n: int) -> tuple[Tensor, Tensor, list[str] | None]:
    """``n`` conditions with balanced classes: (cond, labels (n,), prompts or None)."""
    labels = torch.arange(n) % meta["num_classes"]
    if not conditioner.accepts_text:
        return labels, labels, None
    if is_shapes(meta):
        prompts = [render(TEST_START + i, size=meta["image_size"]).caption for i in range(n)]
        return conditioner.encode(prompts), torch.tensor([class_from_caption(t) for t in prompts]), prompts
    cond, prompts = conditioner.prompts_for_labels(labels, meta["classes"])
    return cond, labels, prompts


def labels_of_prompts(prompts: list[str], meta: dict[str, Any]) -> Tensor:
    """The class each free-text prompt asks for where the dataset says (shapes captions), else −1."""
    if is_shapes(meta):
        return torch.tensor([class_from_caption(t) for t in prompts])
    return torch.full((len(prompts),), -1)


def score(metrics: list[str], images_nhwc: np.ndarray, labels_n: np.ndarray, meta: dict[str, Any],
          prefix: str = "sample/") -> dict[str, float]:
    """Every named metric on these images: ``{prefix + name: value}`` plus ``{prefix + "n": N}``."""
    out: dict[str, float] = {}
    for name in metrics:
        metric = build("metric", name)
        out.update({f"{prefix}{k}": float(v) for k, v in metric.compute(images_nhwc, labels_n, meta).items()})
    if metrics:
        out[f"{prefix}n"] = float(len(images_nhwc))
    return out
