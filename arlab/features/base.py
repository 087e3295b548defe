"""The feature-network interface: uint8 images → float64 feature vectors (and, for classifiers, logits).

A feature network is built as ``cls(cfg)`` (cheaply: a missing weights file or package raises a one-line
:class:`~arlab.errors.ConfigError` here, the network itself loads on first use) and called by the
metrics (:mod:`arlab.metric`) and the reference statistics (:mod:`arlab.metric.reference`):

* :meth:`FeatureNet.features` ``(images_nhwc uint8 (N, H, W, 3), batch_size) → (N, dim) float64``;
* :meth:`FeatureNet.logits` ``→ (N, num_classes) float64`` where ``has_logits`` (class accuracy, IS);
* ``dim``: the feature width; ``classes``: class names in logit order (classifiers); ``preprocessing``: how
  images become network inputs (resize method, input range), a string that goes into cache keys;
  :meth:`FeatureNet.identity`: the network and a hash of its weights, also in cache keys, so cached
  reference statistics never outlive the weights they came from.

Subclasses implement :meth:`FeatureNet.extract` (features and logits of one batch of images in one
pass); the base class batches, converts to float64 and remembers the last few results, so the FID, KID
and precision/recall of one set of generated images run the network once.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections import OrderedDict

import numpy as np

from arlab.errors import ConfigError
from arlab.registry import register_kind

_MEMO: OrderedDict[tuple, tuple[np.ndarray, np.ndarray | None]] = OrderedDict()
_MEMO_SIZE = 2


def file_sha1(path: str, chunk: int = 1 << 22) -> str:
    """SHA-1 of a file's bytes (weights identities)."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class FeatureNet(ABC):
    """Base class of ``features/*`` components."""

    has_logits: bool = False  # logits() gives class logits (class accuracy, Inception Score)

    @property
    @abstractmethod
    def dim(self) -> int:
        """Width D of the feature vectors."""

    @property
    @abstractmethod
    def preprocessing(self) -> str:
        """How uint8 images become network inputs (resize method and size, input range); part of cache keys."""

    @property
    def classes(self) -> list[str]:
        """Class names in logit order where ``has_logits`` and known (else empty)."""
        return []

    @abstractmethod
    def identity(self) -> str:
        """The network and a hash of its weights, e.g. ``inception-tf-fid:a16e4d89c0ec``; part of cache keys."""

    @abstractmethod
    def extract(self, images_nhwc: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Features (B, dim) and logits (B, classes) or None of one batch of uint8 (B, H, W, 3) images."""

    # ----------------------------------------------------------------------------- what callers use
    def features(self, images_nhwc: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """(N, dim) float64 features of uint8 (N, H, W, 3) images."""
        return self.features_and_logits(images_nhwc, batch_size)[0]

    def logits(self, images_nhwc: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """(N, num_classes) float64 class logits; only where ``has_logits``."""
        if not self.has_logits:
            raise ConfigError(f"feature network {self.identity()} has no class logits; use a classifier "
                              "(features: {type: classifier, checkpoint: ...})")
        logits = self.features_and_logits(images_nhwc, batch_size)[1]
        assert logits is not None
        return logits

    def features_and_logits(self, images_nhwc: np.ndarray, batch_size: int = 64,
                            remember: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """Both in one pass. ``remember``: keep the result for the next call on the same images (the
        metrics of one evaluation share it); chunked reference passes turn it off."""
        images = np.ascontiguousarray(images_nhwc)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"feature networks take uint8 (N, H, W, 3) images, got {images.dtype} {images.shape}")
        key = (self.identity(), self.preprocessing, images.shape, hashlib.sha1(images.data).hexdigest())
        if remember and key in _MEMO:
            _MEMO.move_to_end(key)
            return _MEMO[key]
        feats, logits = [], []
        for i in range(0, len(images), max(1, batch_size)):
            f, lg = self.extract(images[i: i + batch_size])
            feats.append(np.asarray(f, dtype=np.float64))
            if lg is not None:
                logits.append(np.asarray(lg, dtype=np.float64))
        out_f = np.concatenate(feats) if feats else np.zeros((0, self.dim))
        out_l = np.concatenate(logits) if logits else None
        if not remember:
            return out_f, out_l
        _MEMO[key] = (out_f, out_l)
        while len(_MEMO) > _MEMO_SIZE:
            _MEMO.popitem(last=False)
        return out_f, out_l


register_kind("features", FeatureNet)
