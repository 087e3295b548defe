"""Reference statistics of real images for the metrics that compare with real data (FID, KID, precision/recall).

:func:`reference_stats` computes, for one image set (a ``data`` preset or node), one split, one image size
and one feature network, the feature mean and covariance over the split's images (or its first
``max_images`` in manifest order) and a feature bank (the first ``bank_size`` feature vectors, float32) for
KID and precision/recall, and caches them as ``$ARLAB_CACHE/reference/<dataset>-<split>-<net>-<key>.npz``.

The key is a SHA-256 over: the bytes of the set's ``dataset.json`` (so a changed manifest — repacked,
regenerated, another source — gives a new key and the statistics are recomputed), the split, the image
size and resize filter the images are decoded at (the generated images' size), the feature network's
``identity()`` (name and weights hash) and ``preprocessing``, ``max_images``, ``bank_size`` and a format
version. A file is only used when the key stored inside it matches. Files are written to a temporary
name and renamed (``os.replace``), under a file lock, so concurrent evaluations never read half a file and
compute a reference once.

:class:`ReferenceMetric` is the base of those metrics: ``compute`` featurises the images and resolves the
reference, :meth:`ReferenceMetric.score_features` compares the two (``arlab eval --images A --reference B``
calls it with a :class:`Reference` made from B's features by :func:`reference_from_features`).
:class:`ReferenceConfig` holds the fields the reference metrics share (feature network, reference set,
split, sizes); :func:`reference_for` resolves a metric's reference from its Config and the ``meta`` the
evaluation passes (``meta["images"]``: the image set the experiment's tokens came from, used when the
Config's ``reference`` is empty; ``meta["image_size"]``: the size reference images are decoded at).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from abc import abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from arlab.config import build
from arlab.data.datamodule import ImageDecoder, ShardDataModule, cache_dir
from arlab.data.shards import MANIFEST, iter_shard
from arlab.errors import ConfigError
from arlab.features.base import FeatureNet
from arlab.metric.base import Metric
from arlab.registry import slot
from arlab.utils import FileLock

log = logging.getLogger("arlab.metric")

FORMAT_VERSION = 1
CHUNK = 500  # images decoded and featurised at a time


@dataclass
class ReferenceConfig:
    """Fields shared by the metrics that compare generated images with a real image set."""

    features: Any = slot("features", default="inception")  # feature network preset or node
    reference: str = ""  # data preset of the real images; "" = the image set of the experiment (meta images)
    split: str = "train"  # split of the reference set
    max_reference: int = 0  # reference images (first N of the split, manifest order); 0 = the whole split
    bank_size: int = 10000  # reference feature vectors kept for KID and precision/recall
    batch_size: int = 64  # feature-network batch size
    suffix: str = ""  # appended to the output names (e.g. _cnn: fid_cnn) so two feature networks can coexist

    def __post_init__(self) -> None:
        if self.max_reference < 0 or self.bank_size < 1 or self.batch_size < 1:
            raise ConfigError(f"max_reference must be >= 0, bank_size and batch_size >= 1; got {self.max_reference}, "
                              f"{self.bank_size}, {self.batch_size}")


@dataclass
class Reference:
    """Statistics of real images: ``mu`` (D,), ``sigma`` (D, D) float64 over ``n`` images; ``bank`` (M, D)."""

    mu: np.ndarray
    sigma: np.ndarray
    bank: np.ndarray
    n: int
    key: str
    path: Path | None


def reference_from_features(features_nd: np.ndarray, bank_size: int = 10000) -> Reference:
    """The statistics of an in-memory reference set of (N, D) features (mean, unbiased covariance, first bank)."""
    f = np.asarray(features_nd, np.float64)
    if len(f) < 2:
        raise ConfigError(f"a reference set needs at least 2 images, got {len(f)}")
    sigma = np.atleast_2d(np.cov(f, rowvar=False))
    return Reference(mu=f.mean(axis=0), sigma=sigma, bank=f[:bank_size].astype(np.float32), n=len(f), key="",
                     path=None)


def reference_data(cfg: ReferenceConfig, images: Any) -> Any:
    """The data node of the reference set: ``cfg.reference`` or, when empty, ``images`` (the experiment's)."""
    ref = cfg.reference or images
    if not ref:
        raise ConfigError("the metric's reference set is unknown: set its 'reference' to a data preset "
                          "(e.g. reference: shapes) or evaluate a model whose meta names its image set")
    return ref


def check_reference(cfg: ReferenceConfig, data_node: dict[str, Any], what: str) -> None:
    """Config-time check of a reference metric: a reference set is known and the feature network can be built."""
    if not cfg.reference and not data_node.get("images"):
        raise ConfigError(f"metric {what} compares with real images, but data is {data_node.get('type')} without "
                          "'images'; set the metric's reference to a data preset (e.g. reference: shapes)")
    build("features", cfg.features, where=f"metric {what}.features")


def fingerprint(manifest_bytes: bytes, **parts: Any) -> str:
    """SHA-256 over the manifest bytes and the other parts of the cache key."""
    h = hashlib.sha256(manifest_bytes)
    h.update(json.dumps(parts, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:40]


def split_images(dm: ShardDataModule, split: str, size: int, limit: int):
    """(images uint8 (n, size, size, 3), labels (n,) int64) chunks of the split in manifest order (no flips), at
    most ``limit`` images (−1: all)."""
    assert dm.manifest is not None
    decode = ImageDecoder(size, 0.0, 0, dm.cfg.interpolation)
    chunk: list[np.ndarray] = []
    labels: list[int] = []
    seen = 0
    for shard in dm.manifest["splits"][split]["shards"]:
        for raw in iter_shard(dm.root / shard["name"]):
            sample = decode(raw, 0)
            if sample is None:
                continue
            chunk.append(sample["image"])
            labels.append(sample["label"])
            seen += 1
            if len(chunk) == CHUNK or seen == limit:
                yield np.stack(chunk), np.array(labels, np.int64)
                chunk, labels = [], []
            if seen == limit:
                return
    if chunk:
        yield np.stack(chunk), np.array(labels, np.int64)


def reference_stats(data: Any, split: str, net: FeatureNet, image_size: int, *, max_images: int = 0,
                    bank_size: int = 10000, batch_size: int = 64) -> Reference:
    """Mean, covariance and feature bank of ``split`` of the image set ``data`` (a preset or node), decoded at
    ``image_size`` px, by ``net``; read from the cache when its key matches, else computed and cached."""
    dm = build("data", data, seed=0, where="metric reference")
    if not isinstance(dm, ShardDataModule):
        raise ConfigError(f"the metric reference must be an image set (shapes, shards, cifar10, ...), not "
                          f"{type(dm).__name__}")
    dm.setup()
    assert dm.manifest is not None
    if split not in dm.manifest["splits"]:
        raise ConfigError(f"reference split '{split}' is not in {dm.root / MANIFEST} (splits: "
                          f"{', '.join(dm.manifest['splits'])})")
    manifest_bytes = (dm.root / MANIFEST).read_bytes()
    key = fingerprint(manifest_bytes, version=FORMAT_VERSION, split=split, image_size=int(image_size),
                      interpolation=dm.cfg.interpolation, features=net.identity(), preprocessing=net.preprocessing,
                      max_images=int(max_images), bank_size=int(bank_size))
    folder = cache_dir() / "reference"
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{_safe(dm.manifest['name'])}-{_safe(split)}-{_safe(net.identity().split(':')[0])}-{key[:16]}.npz"
    path = folder / name
    ref = _load(path, key)
    if ref is not None:
        return ref
    with FileLock(path.with_suffix(".lock")):
        ref = _load(path, key)  # another process may have made it while we waited
        if ref is not None:
            return ref
        log.info("computing reference statistics of %s/%s with %s into %s", dm.manifest["name"], split,
                 net.identity(), path)
        ref = _compute(dm, split, net, image_size, max_images, bank_size, batch_size, key, path)
        _save(ref, manifest_bytes)
    return ref


def _compute(dm: ShardDataModule, split: str, net: FeatureNet, image_size: int, max_images: int, bank_size: int,
             batch_size: int, key: str, path: Path) -> Reference:
    n, shift = 0, None
    s1 = s2 = None
    bank: list[np.ndarray] = []
    kept = 0
    for images, _ in split_images(dm, split, image_size, max_images or -1):
        f = net.features_and_logits(images, batch_size, remember=False)[0]
        if shift is None:  # sums of shifted values: the covariance keeps its precision when |mean| >> std
            shift = f.mean(axis=0)
            s1, s2 = np.zeros(f.shape[1]), np.zeros((f.shape[1], f.shape[1]))
        d = f - shift
        s1 += d.sum(axis=0)
        s2 += d.T @ d
        n += len(f)
        if kept < bank_size:
            bank.append(f[: bank_size - kept].astype(np.float32))
            kept += len(bank[-1])
    if n < 2:
        raise ConfigError(f"reference split '{split}' of {dm.root} has {n} readable images; need at least 2")
    assert s1 is not None and s2 is not None and shift is not None
    m = s1 / n
    sigma = (s2 - n * np.outer(m, m)) / (n - 1)
    return Reference(mu=shift + m, sigma=(sigma + sigma.T) / 2, bank=np.concatenate(bank), n=n, key=key, path=path)


def _load(path: Path, key: str) -> Reference | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            return Reference(mu=z["mu"], sigma=z["sigma"], bank=z["bank"], n=int(z["n"]), key=key, path=path)
    except (OSError, ValueError, KeyError) as e:
        log.warning("ignoring unreadable reference cache %s: %s", path, e)
        return None


def _save(ref: Reference, manifest_bytes: bytes) -> None:
    tmp = ref.path.with_name(f"{ref.path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(f, mu=ref.mu, sigma=ref.sigma, bank=ref.bank, n=np.int64(ref.n), key=np.str_(ref.key),
                 manifest_sha256=np.str_(hashlib.sha256(manifest_bytes).hexdigest()))
    os.replace(tmp, ref.path)


def reference_for(cfg: ReferenceConfig, net: FeatureNet, meta: dict[str, Any]) -> Reference:
    """The reference statistics a metric with ``cfg`` needs for images described by ``meta``."""
    return reference_stats(reference_data(cfg, meta.get("images")), cfg.split, net, int(meta["image_size"]),
                           max_images=cfg.max_reference, bank_size=cfg.bank_size, batch_size=cfg.batch_size)


class ReferenceMetric(Metric):
    """A metric comparing the features of generated images with a real image set's :class:`Reference`."""

    cfg: ReferenceConfig

    @abstractmethod
    def score_features(self, gen_nd: np.ndarray, ref: Reference) -> dict[str, float]:
        """The values for generated features (N, D) float64 against ``ref`` (same feature network)."""

    def compute(self, images_nhwc: np.ndarray, labels_n: np.ndarray, meta: dict[str, Any]) -> dict[str, float]:
        net = build("features", self.cfg.features)
        ref = reference_for(self.cfg, net, meta)
        return self.score_features(net.features(images_nhwc, self.cfg.batch_size), ref)
