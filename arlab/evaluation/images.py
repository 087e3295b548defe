"""``arlab eval --images A --reference B``: two image sets scored against each other, so that arlab's numbers
can be checked against other tools and real-vs-real floors measured.

An image set (:func:`load_image_set`) is one of:

* a folder of image files (png, jpg, jpeg, bmp, webp; searched recursively, sorted by path; one size);
* an ``.npz`` with ``images`` (N, H, W, 3) uint8 and optionally ``labels`` (N,) (what ``arlab sample`` writes);
* a packed split: a data preset or a shard folder (``dataset.json``), ``NAME:SPLIT`` (``shapes:test``); without
  ``:SPLIT`` the manifest's only split. Decoded at the other set's image size (else the data's), no flips.

Reference metrics (``fid``, ``kid``, ``precision_recall`` and their presets) compare A's features with
statistics of B's (:meth:`~arlab.metric.reference.ReferenceMetric.score_features`) on ``--features`` (else
the metric's own network); other metrics (``shapes_checker``, ``class_acc``, ...) score A alone, with its
labels.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from arlab.config import build, presets
from arlab.data.datamodule import ShardDataModule
from arlab.data.images import to_rgb
from arlab.data.shards import MANIFEST
from arlab.errors import ConfigError, DataError, did_you_mean
from arlab.evaluation.report import make_report, write_report
from arlab.evaluation.suites import directions, metric_config
from arlab.metric.reference import ReferenceConfig, ReferenceMetric, reference_from_features, split_images

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
DEFAULT_METRICS = ["fid", "kid", "precision_recall"]


@dataclass
class ImageSet:
    """Images (N, H, W, 3) uint8 with labels (N,) (−1: unknown), where they came from and their classes."""

    images: np.ndarray
    labels: np.ndarray
    source: str
    classes: list[str] = field(default_factory=list)
    data: str | None = None  # the data preset or shard folder of a packed split


def _folder(path: Path, limit: int, what: str) -> ImageSet:
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"{what} '{path}' holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    files = files[:limit] if limit > 0 else files
    out = []
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
                arr = to_rgb(im)
        except OSError as e:
            raise DataError(f"{what}: cannot read image '{f}' ({e})") from None
        if out and arr.shape != out[0].shape:
            raise DataError(f"{what}: '{f}' is {arr.shape[1]}x{arr.shape[0]}, but '{files[0]}' is "
                            f"{out[0].shape[1]}x{out[0].shape[0]}; the images of a folder must share one size")
        out.append(arr)
    return ImageSet(np.stack(out), np.full(len(out), -1, np.int64), str(path))


def _npz(path: Path, limit: int, what: str) -> ImageSet:
    try:
        with np.load(path, allow_pickle=False) as z:
            if "images" not in z:
                raise DataError(f"{what} '{path}' has no 'images' array (it has: {', '.join(z.files)})")
            images = z["images"]
            labels = z["labels"] if "labels" in z else np.full(len(images), -1)
    except (OSError, ValueError) as e:
        raise DataError(f"{what} '{path}' is not a readable .npz ({e})") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise DataError(f"{what} '{path}': 'images' must be (N, H, W, 3) uint8, got {images.dtype} {images.shape}")
    if len(labels) != len(images):
        raise DataError(f"{what} '{path}': {len(labels)} labels for {len(images)} images")
    n = limit if limit > 0 else len(images)
    return ImageSet(images[:n], np.asarray(labels[:n], np.int64), str(path))


def _split_of(spec: str) -> tuple[str, str | None]:
    """``NAME:SPLIT`` → (NAME, SPLIT); a spec that exists as a path, or has no colon, has no split."""
    if Path(spec).exists() or ":" not in spec:
        return spec, None
    name, split = spec.rsplit(":", 1)
    return name, split


def _packed(spec: str, size: int | None, limit: int, what: str) -> ImageSet:
    name, split = _split_of(spec)
    if Path(name).is_dir():
        node: Any = {"type": "shards", "root": name}
    elif name in presets("data"):
        node = name
    else:
        raise DataError(f"{what} '{spec}' is neither an image folder, an .npz, a shard folder nor a data preset"
                        f"{did_you_mean(name, presets('data'))} (data presets: {', '.join(presets('data'))}; "
                        "a split as NAME:SPLIT, e.g. shapes:test)")
    dm = build("data", node, seed=0, where=what)
    if not isinstance(dm, ShardDataModule):
        raise ConfigError(f"{what} '{spec}' is not an image set (its data module is {type(dm).__name__})")
    dm.setup()
    assert dm.manifest is not None
    splits = list(dm.manifest["splits"])
    if split is None:
        if len(splits) != 1:
            raise DataError(f"{what} '{spec}' has splits {', '.join(splits)}: name one, e.g. {name}:{splits[-1]}")
        split = splits[0]
    if split not in splits:
        raise DataError(f"{what} '{spec}': split '{split}' is not in {dm.root / MANIFEST} (splits: "
                        f"{', '.join(splits)})")
    parts = list(split_images(dm, split, int(size or dm.cfg.image_size), limit if limit > 0 else -1))
    if not parts:
        raise DataError(f"{what} '{spec}': split '{split}' has no readable images")
    return ImageSet(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), f"{name}:{split}",
                    list(dm.manifest.get("classes", [])), name)


def is_fixed_size(spec: str) -> bool:
    """Whether the set's image size is fixed by its files (folder of images, .npz), not chosen at decoding."""
    p = Path(spec)
    return p.suffix == ".npz" or (p.is_dir() and not (p / MANIFEST).exists())


def load_image_set(spec: str, size: int | None = None, limit: int = 0, what: str = "--images") -> ImageSet:
    """The image set ``spec`` (see the module docstring); a packed split is decoded at ``size`` when given."""
    p = Path(os.path.expanduser(spec))
    if p.suffix == ".npz":
        if not p.is_file():
            raise DataError(f"{what} '{spec}' does not exist")
        return _npz(p, limit, what)
    if p.is_dir() and not (p / MANIFEST).exists():
        return _folder(p, limit, what)
    return _packed(str(p) if p.exists() else spec, size, limit, what)


def load_pair(images: str, reference: str, n: int = 0, n_ref: int = 0) -> tuple[ImageSet, ImageSet]:
    """Both sets at one image size: a fixed-size side sets the size the other side's packed split is decoded at."""
    if is_fixed_size(reference) and not is_fixed_size(images):
        b = load_image_set(reference, None, n_ref, "--reference")
        a = load_image_set(images, b.images.shape[1], n, "--images")
    else:
        a = load_image_set(images, None, n, "--images")
        b = load_image_set(reference, a.images.shape[1], n_ref, "--reference")
    if a.images.shape[1:] != b.images.shape[1:]:
        raise DataError(f"--images are {a.images.shape[2]}x{a.images.shape[1]} but --reference "
                        f"{b.images.shape[2]}x{b.images.shape[1]}; compare sets of one size (a packed split adapts)")
    return a, b


def score_pair(a: ImageSet, b: ImageSet, metrics: list[str], features: str | None = None
               ) -> tuple[dict[str, float], dict[str, str]]:
    """(values, {metric: feature identity}) of ``metrics`` for A against B."""
    values: dict[str, float] = {}
    feats: dict[str, str] = {}
    net_override = build("features", features, where="--features") if features else None
    ref_cache: dict[tuple[str, int], Any] = {}
    meta = {"image_size": a.images.shape[1], "classes": a.classes or b.classes,
            "num_classes": len(a.classes or b.classes), "images": b.data or a.data, "dataset": b.data or a.data or ""}
    for name in metrics:
        entry, cfg = metric_config(name)
        metric = entry.cls(cfg)
        if isinstance(metric, ReferenceMetric):
            assert isinstance(cfg, ReferenceConfig)
            net = net_override or build("features", cfg.features, where=f"metric {name}.features")
            key = (net.identity(), cfg.bank_size)
            if key not in ref_cache:
                ref_cache[key] = reference_from_features(net.features(b.images, cfg.batch_size), cfg.bank_size)
            values.update(metric.score_features(net.features(a.images, cfg.batch_size), ref_cache[key]))
            feats[name] = net.identity()
        else:
            values.update(metric.compute(a.images, a.labels, meta))
    return {k: float(v) for k, v in values.items()}, feats


def eval_images(images: str, reference: str, *, metrics: list[str] | None = None, features: str | None = None,
                n: int = 0, n_ref: int = 0, out: str | os.PathLike | None = None, name: str = "images"
                ) -> tuple[dict[str, Any], Path | None]:
    """Score A against B and write the report to ``out`` (when given); returns (report, path)."""
    names = list(metrics or DEFAULT_METRICS)
    for m in names:
        metric_config(m)
    a, b = load_pair(images, reference, n, n_ref)
    values, feats = score_pair(a, b, names, features)
    refs = {m: b.source for m in feats}
    result = {"id": "images", "setting": {"cfg": None, "schedule": None, "temperature": None, "top_k": None,
                                          "top_p": None},
              "metrics": values, "n": len(a.images), "images_per_s": None}
    report = make_report(name=name, kind="images", checkpoint=None, step=None, run=None, n=len(a.images),
                         features=feats, reference=refs, results=[result], directions=directions(names),
                         images=a.source, reference_set=b.source, n_reference=len(b.images),
                         image_size=int(a.images.shape[1]), metrics_used=names)
    return report, (write_report(out, report) if out else None)
