"""``data/shards`` and ``data/shapes``: LightningDataModules over arlab image shards.

Batches are dicts: ``image`` (B, 3, H, W) float32 in [-1, 1], ``label`` (B,) int64, ``caption``
(list of B strings, "" when absent) and ``key`` (list of B sample keys). The stream rules (epoch
shard order, per-rank balance, exact resume, corrupt-sample skipping) are in
:mod:`arlab.data.stream`.
"""

from __future__ import annotations

import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image

from arlab.data.images import to_rgb
from arlab.data.memory import MemoryLoader
from arlab.data.pack import pack_imagefolder
from arlab.data.shapes import ensure_shapes
from arlab.data.shards import IMAGE_EXTS, MANIFEST, read_manifest
from arlab.data.stream import ShardLoader, sample_seed
from arlab.errors import ConfigError, DataError
from arlab.registry import register

log = logging.getLogger("arlab.data")

_RESAMPLE = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
             "lanczos": Image.LANCZOS, "box": Image.BOX}


def cache_dir() -> Path:
    """Where generated or packed datasets go by default: ``$ARLAB_CACHE`` or ``./.cache/arlab``."""
    return Path(os.environ.get("ARLAB_CACHE", os.path.join(".cache", "arlab")))


def _dist_rank_world(trainer: Any) -> tuple[int, int]:
    if trainer is not None:
        return int(trainer.global_rank), int(trainer.world_size)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ImageDecoder:
    """Raw shard sample → ``{image, label, caption, key}`` or None when the image is corrupt.

    Resize (shorter side to ``size``), centre crop to ``size``×``size``, then a horizontal flip with
    probability ``flip`` decided by a hash of ``(seed, epoch, key)`` so that resumed runs replay it.
    """

    def __init__(self, size: int, flip: float, seed: int, interpolation: str = "bicubic"):
        self.size, self.flip, self.seed = size, flip, seed
        self.resample = _RESAMPLE[interpolation]

    def __call__(self, sample: dict[str, Any], epoch: int) -> dict[str, Any] | None:
        out = self.load(sample)
        return None if out is None else self.augment(out, epoch)

    def load(self, sample: dict[str, Any]) -> dict[str, Any] | None:
        """Decode, resize and crop (no augmentation); None when the image is corrupt."""
        key = sample["__key__"]
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        try:
            if ext is None:
                raise ValueError("no image member")
            with Image.open(io.BytesIO(sample[ext])) as im:
                im.load()
                im = Image.fromarray(to_rgb(im))  # orientation, 16-bit grey, transparency (data/images.py)
            label = int(sample["cls"]) if "cls" in sample else -1
        except Exception as e:  # noqa: BLE001 -- any decode failure means a corrupt sample
            log.debug("corrupt sample %s (%s): %s", key, sample.get("__url__", "?"), e)
            return None
        w, h = im.size
        if (w, h) != (self.size, self.size):
            scale = self.size / min(w, h)
            nw, nh = max(self.size, round(w * scale)), max(self.size, round(h * scale))
            if (nw, nh) != (w, h):
                im = im.resize((nw, nh), self.resample)
            left, top = (nw - self.size) // 2, (nh - self.size) // 2
            im = im.crop((left, top, left + self.size, top + self.size))
        arr = np.asarray(im, dtype=np.uint8)
        caption = sample["txt"].decode("utf-8") if "txt" in sample else ""
        return {"image": arr, "label": label, "caption": caption, "key": key}

    def augment(self, sample: dict[str, Any], epoch: int) -> dict[str, Any]:
        """The epoch's horizontal flip, decided by a hash of ``(seed, epoch, key)`` (a view, not a copy)."""
        if self.flip > 0 and (sample_seed(self.seed, epoch, sample["key"], "flip") % 1_000_000) < self.flip * 1_000_000:
            return {**sample, "image": sample["image"][:, ::-1]}
        return sample


def collate_images(samples: list[dict[str, Any]]) -> dict[str, Any]:
    images = torch.from_numpy(np.stack([s["image"] for s in samples]))  # (B, H, W, 3) uint8
    image_b3hw = images.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0).contiguous()
    return {"image": image_b3hw, "label": torch.tensor([s["label"] for s in samples], dtype=torch.long),
            "caption": [s["caption"] for s in samples], "key": [s["key"] for s in samples]}


class ManifestInfo:
    """What image- and token-shard data modules share: classes from the manifest, the rank, and the
    train / val / test loaders built by the subclass's ``_loader(split, train)``."""

    cfg: Any
    manifest: dict[str, Any] | None
    _rank: int | None
    _world: int | None
    _train: ShardLoader | MemoryLoader | None

    def setup(self, stage: str | None = None) -> None:  # pragma: no cover - provided by the data module
        raise NotImplementedError

    def _loader(self, split: str, train: bool) -> ShardLoader | MemoryLoader:  # pragma: no cover - the subclass
        raise NotImplementedError

    def train_dataloader(self) -> ShardLoader | MemoryLoader:
        if self._train is None:
            self._train = self._loader(self.cfg.train_split, train=True)
        return self._train

    def val_dataloader(self) -> ShardLoader | MemoryLoader | list:
        return self._loader(self.cfg.val_split, train=False) if self.cfg.val_split else []

    def test_dataloader(self) -> ShardLoader | MemoryLoader | list:
        return self.val_dataloader()

    @property
    def corrupt_skipped(self) -> int:
        return self._train.corrupt if self._train is not None else 0

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def classes(self) -> list[str]:
        self.setup()
        assert self.manifest is not None
        return list(self.manifest["classes"])

    def rank_world(self) -> tuple[int, int]:
        rank, world = _dist_rank_world(getattr(self, "trainer", None))
        return (self._rank if self._rank is not None else rank,
                self._world if self._world is not None else world)


@register("data", "shards")
class ShardDataModule(ManifestInfo, pl.LightningDataModule):
    """Image shards made by 'arlab data pack' (ImageFolder/tar → WebDataset), balanced across DDP ranks."""

    @dataclass
    class Config:
        root: str = ""  # shard folder holding dataset.json
        source: str = ""  # ImageFolder dir or .tar(.gz) packed into root on first use (optional)
        train_split: str = "train"
        val_split: str = "test"  # "" for no validation
        image_size: int = 32  # resize shorter side + centre crop to this
        batch_size: int = 64  # per rank
        val_batch_size: int = 0  # 0: batch_size
        num_workers: int = 2  # DataLoader workers per rank (capped by shards per rank)
        shuffle_buffer: int = 2000  # samples held for shuffling (train); 0 disables
        flip: float = 0.5  # probability of a horizontal flip (train)
        interpolation: str = "bicubic"  # nearest, bilinear, bicubic, lanczos, box
        shard_size: int = 1000  # samples per shard when packing source
        in_memory: bool = False  # the stream's batches, each split decoded once, in-process (data/memory.py)

        def __post_init__(self) -> None:
            for key, lo in (("image_size", 1), ("batch_size", 1), ("val_batch_size", 0), ("shard_size", 1)):
                if getattr(self, key) < lo:
                    raise ConfigError(f"{key}={getattr(self, key)}: must be >= {lo}")
            if not 0.0 <= self.flip <= 1.0:
                raise ConfigError(f"flip is a probability in [0, 1], got {self.flip}")
            if self.interpolation not in _RESAMPLE:
                choices = ", ".join(_RESAMPLE)
                raise ConfigError(f"interpolation {self.interpolation!r} is not one of {choices}")
            for key in ("num_workers", "shuffle_buffer"):
                if getattr(self, key) < 0:
                    raise ConfigError(f"{key}={getattr(self, key)}: must be >= 0")

    def __init__(self, cfg: Config, seed: int = 0, rank: int | None = None, world_size: int | None = None):
        super().__init__()
        self.cfg, self.seed = cfg, seed
        self._rank, self._world = rank, world_size
        self.manifest: dict[str, Any] | None = None
        self._train: ShardLoader | MemoryLoader | None = None

    # --- where the data is -------------------------------------------------------------
    @property
    def root(self) -> Path:
        if not self.cfg.root:
            raise ConfigError("data.root is empty: give the shard folder (made by 'arlab data pack')")
        return Path(self.cfg.root)

    def prepare_data(self) -> None:
        """Pack ``source`` into ``root`` when the shards do not exist yet (rank 0 of each node)."""
        if (self.root / MANIFEST).exists() or not self.cfg.source:
            return
        log.info("packing %s into %s", self.cfg.source, self.root)
        pack_imagefolder(self.cfg.source, self.root, shard_size=self.cfg.shard_size, seed=0)

    def setup(self, stage: str | None = None) -> None:
        if self.manifest is None:
            if not (self.root / MANIFEST).exists() and self.cfg.source:
                self.prepare_data()  # used without a Trainer
            self.manifest = read_manifest(self.root)
            for split in (self.cfg.train_split, self.cfg.val_split):
                if split and split not in self.manifest["splits"]:
                    raise DataError(
                        f"split '{split}' is not in {self.root / MANIFEST} (splits: "
                        f"{', '.join(self.manifest['splits'])})"
                    )
            if self.manifest.get("kind", "images") != "images":
                raise DataError(f"{self.root} holds {self.manifest['kind']} shards, not images")

    def _loader(self, split: str, train: bool) -> ShardLoader | MemoryLoader:
        self.setup()
        assert self.manifest is not None
        info = self.manifest["splits"][split]
        rank, world = self.rank_world()
        decode = ImageDecoder(self.cfg.image_size, self.cfg.flip if train else 0.0, self.seed,
                              self.cfg.interpolation)
        bs = self.cfg.batch_size if train else (self.cfg.val_batch_size or self.cfg.batch_size)
        if self.cfg.in_memory:
            return MemoryLoader([str(self.root / s["name"]) for s in info["shards"]],
                                [s["count"] for s in info["shards"]], batch_size=bs, seed=self.seed, rank=rank,
                                world_size=world, decoder=decode, collate=collate_images, train=train,
                                name=f"{self.manifest['name']}/{split}", num_workers=self.cfg.num_workers,
                                shuffle_buffer=self.cfg.shuffle_buffer)
        return ShardLoader([str(self.root / s["name"]) for s in info["shards"]],
                           [s["count"] for s in info["shards"]], batch_size=bs, seed=self.seed, rank=rank,
                           world_size=world, num_workers=self.cfg.num_workers,
                           shuffle_buffer=self.cfg.shuffle_buffer, decode=decode, collate=collate_images,
                           train=train, name=f"{self.manifest['name']}/{split}")


    def describe(self) -> str:
        self.setup()
        assert self.manifest is not None
        splits = ", ".join(f"{k}: {v['count']} in {len(v['shards'])} shards"
                           for k, v in self.manifest["splits"].items())
        return f"{self.manifest['name']} ({len(self.manifest['classes'])} classes; {splits})"


@register("data", "shapes")
class ShapesDataModule(ShardDataModule):
    """The embedded procedural 'shapes' set (10 shape classes with captions), generated on first use."""

    @dataclass
    class Config(ShardDataModule.Config):
        root: str = ""  # "" → $ARLAB_CACHE/shapes-<size>px-s<gen_seed>-<n_train>-<n_test>
        n_train: int = 10000  # generated training images
        n_test: int = 1000  # generated test images
        gen_seed: int = 0  # seed of the generator (the dataset itself, not the run)
        gen_size: int = 32  # generated image size in pixels

        def __post_init__(self) -> None:
            super().__post_init__()
            for key, lo in (("n_train", 1), ("n_test", 0), ("gen_seed", 0), ("gen_size", 16)):
                if getattr(self, key) < lo:
                    raise ConfigError(f"{key}={getattr(self, key)}: must be >= {lo} (shapes)")

    @property
    def root(self) -> Path:
        if self.cfg.root:
            return Path(self.cfg.root)
        c = self.cfg
        return cache_dir() / f"shapes-{c.gen_size}px-s{c.gen_seed}-{c.n_train}-{c.n_test}"

    def prepare_data(self) -> None:
        c = self.cfg
        ensure_shapes(self.root, n_train=c.n_train, n_test=c.n_test, seed=c.gen_seed, size=c.gen_size,
                      shard_size=c.shard_size)

    def setup(self, stage: str | None = None) -> None:
        if self.manifest is None and not (self.root / MANIFEST).exists():
            self.prepare_data()
        super().setup(stage)


def manifest_summary(root: str | os.PathLike) -> str:
    """Human-readable summary of a shard folder (used by 'arlab data info')."""
    m = read_manifest(root)
    lines = [f"{m['name']}  ({m.get('kind', 'images')}, {len(m['classes'])} classes, format {m['format']})"]
    for split, info in m["splits"].items():
        sizes = ", ".join(f"{k}: {v}" for k, v in list(info.get("image_sizes", {}).items())[:4])
        lines.append(f"  {split:<8} {info['count']:>9} samples  {len(info['shards']):>5} shards  {sizes}")
    if m.get("corrupt"):
        lines.append(f"  corrupt inputs skipped when packing: {len(m['corrupt'])}")
    lines.append("  classes: " + json.dumps(m["classes"])[:200])
    return "\n".join(lines)
