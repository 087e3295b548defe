"""The metric interface: images (and the classes they were asked for) → named numbers.

A metric is built as ``cls(cfg)`` and called by the evaluation code (:mod:`arlab.generator.evaluate`)
with generated images ``images_nhwc`` (N, H, W, 3) uint8, the class each one was asked for
``labels_n`` (N,) int64 (−1 where unknown, e.g. a free-text prompt) and the dataset's ``meta``
(``dataset``, ``classes``, ``image_size``; ``images``, the data preset of the real image set, which the
reference metrics compare with unless their ``reference`` names one). It returns ``{name: value}``; the
caller records ``N`` beside it, so every reported value states its sample count (metrics that use other
counts, e.g. reference images, report them too).

:meth:`Metric.directions` declares, for every output name ``compute`` can return, whether lower (``"min"``)
or higher (``"max"``) is better, or ``None`` for values that are not ranked (counts, standard deviations).
``arlab eval`` picks the best setting of a sweep with it; a registry-parametrized test checks that every
metric declares exactly the names it returns.

:meth:`Metric.check_data` runs at config time on the experiment's ``data`` node: a metric that only
makes sense on some datasets (the shapes checker) refuses the others there, before any training.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Literal

import numpy as np

from arlab.registry import register_kind

Direction = Literal["min", "max"] | None


class Metric(ABC):
    """Base class of ``metric/*`` components."""

    needs_labels: bool = False  # uses labels_n (images without a known class are left out)

    @abstractmethod
    def compute(self, images_nhwc: np.ndarray, labels_n: np.ndarray, meta: dict[str, Any]) -> dict[str, float]:
        """Values on these N images, e.g. ``{"class_acc": 0.93}``."""

    @classmethod
    def directions(cls, cfg: Any) -> dict[str, Direction]:
        """``{output name: "min" | "max" | None}`` for every name :meth:`compute` returns with this ``cfg``
        (``None``: not ranked, e.g. ``fid_n_ref``). Every metric must declare it (checked by the contract test)."""
        return {}

    @classmethod
    def check_data(cls, cfg: Any, data_node: dict[str, Any]) -> None:
        """Raise ConfigError when the experiment's data (its resolved ``data`` node) cannot be scored."""
        return None


register_kind("metric", Metric)
