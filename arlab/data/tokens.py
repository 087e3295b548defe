"""``data/tokens``: token shards made by ``arlab tokenize``, streamed like image shards.

Batches: ``tokens`` (B, L) int64 (the index map flattened row-major, or every scale of a
multi-scale tokenizer, coarsest first), ``label`` (B,), ``caption`` (B strings), ``key``. The same
stream rules as image shards (per-rank balance, per-epoch order, exact resume, corrupt samples
counted and skipped).

When ``root`` has no manifest yet, the shards are made first: the image set ``images`` (a
``data`` preset, e.g. ``shapes``) is encoded with the frozen tokenizer ``tokenizer_ckpt`` into
``root`` (default ``<tokenizer run>/tokens/<images>``).
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from arlab.config import build
from arlab.data.datamodule import ManifestInfo
from arlab.data.memory import MemoryLoader
from arlab.data.shards import MANIFEST, read_manifest
from arlab.data.stream import ShardLoader
from arlab.data.tokenize import tokenize_shards
from arlab.errors import ConfigError, DataError
from arlab.registry import register
from arlab.rundir import run_of_checkpoint
from arlab.utils import FileLock

log = logging.getLogger("arlab.data")


class TokenDecoder:
    """Raw token-shard sample → ``{tokens, label, caption, key}``, or None when it does not parse. Tokens carry
    no augmentation (flips are made when tokenizing), so ``augment`` is the identity."""

    def __call__(self, sample: dict[str, Any], epoch: int) -> dict[str, Any] | None:
        return decode_tokens(sample, epoch)

    def load(self, sample: dict[str, Any]) -> dict[str, Any] | None:
        return decode_tokens(sample, 0)

    def augment(self, sample: dict[str, Any], epoch: int) -> dict[str, Any]:
        return sample


def decode_tokens(sample: dict[str, Any], epoch: int) -> dict[str, Any] | None:
    try:
        tokens = np.load(io.BytesIO(sample["tokens.npy"]), allow_pickle=False).astype(np.int64)
        label = int(sample["cls"]) if "cls" in sample else -1
        if tokens.ndim != 1:
            raise ValueError(f"tokens of shape {tokens.shape}")
    except Exception as e:  # noqa: BLE001 -- any parse failure is a corrupt sample
        log.debug("corrupt token sample %s: %s", sample.get("__key__"), e)
        return None
    caption = sample["txt"].decode("utf-8") if "txt" in sample else ""
    return {"tokens": tokens, "label": label, "caption": caption, "key": sample["__key__"]}


def collate_tokens(samples: list[dict[str, Any]]) -> dict[str, Any]:
    return {"tokens": torch.from_numpy(np.stack([s["tokens"] for s in samples])),
            "label": torch.tensor([s["label"] for s in samples], dtype=torch.long),
            "caption": [s["caption"] for s in samples], "key": [s["key"] for s in samples]}


def default_token_root(tokenizer_ckpt: str, images: str) -> Path:
    return run_of_checkpoint(tokenizer_ckpt) / "tokens" / images.replace("/", "-")


@register("data", "tokens")
class TokenDataModule(ManifestInfo, pl.LightningDataModule):
    """Token shards from 'arlab tokenize' (made on first use from an image set and a tokenizer checkpoint)."""

    @dataclass
    class Config:
        root: str = ""  # token shard folder; "" = <tokenizer run>/tokens/<images>
        images: str = "shapes"  # data preset to tokenize when root has no dataset.json
        tokenizer_ckpt: str = ""  # the frozen tokenizer (usually ${task.tokenizer_ckpt})
        flip: bool = False  # also encode mirrored images (doubles the set)
        train_split: str = "train"
        val_split: str = "test"  # "" for no validation
        batch_size: int = 64  # per rank
        val_batch_size: int = 0  # 0: batch_size
        num_workers: int = 1
        shuffle_buffer: int = 2000
        in_memory: bool = False  # the stream's batches, each split decoded once, in-process (data/memory.py)

        def __post_init__(self) -> None:
            for key, lo in (("batch_size", 1), ("val_batch_size", 0), ("num_workers", 0), ("shuffle_buffer", 0)):
                if getattr(self, key) < lo:
                    raise ConfigError(f"{key}={getattr(self, key)}: must be >= {lo}")
            if not self.root and not self.tokenizer_ckpt:
                raise ConfigError("data/tokens needs root (token shards) or tokenizer_ckpt (to make them)")

    def __init__(self, cfg: Config, seed: int = 0, rank: int | None = None, world_size: int | None = None):
        super().__init__()
        self.cfg, self.seed, self._rank, self._world = cfg, seed, rank, world_size
        self.manifest: dict[str, Any] | None = None
        self._train: ShardLoader | MemoryLoader | None = None

    @property
    def root(self) -> Path:
        return Path(self.cfg.root) if self.cfg.root else default_token_root(self.cfg.tokenizer_ckpt, self.cfg.images)

    def prepare_data(self) -> None:
        if (self.root / MANIFEST).exists():
            return
        if not self.cfg.tokenizer_ckpt or not Path(self.cfg.tokenizer_ckpt).is_file():
            raise ConfigError(f"no token shards at '{self.root}' and no tokenizer checkpoint to make them "
                              f"(data.tokenizer_ckpt='{self.cfg.tokenizer_ckpt}')")
        self.root.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(self.root.parent / f".{self.root.name}.lock"):  # DDP ranks / parallel runs: one tokenizes
            if (self.root / MANIFEST).exists():
                return
            images = build("data", self.cfg.images, seed=0)
            images.setup()
            log.info("tokenizing %s with %s into %s", images.root, self.cfg.tokenizer_ckpt, self.root)
            tokenize_shards(self.cfg.tokenizer_ckpt, images.root, self.root, flip=self.cfg.flip, progress=True,
                            overwrite=True)

    def setup(self, stage: str | None = None) -> None:
        if self.manifest is not None:
            return
        if not (self.root / MANIFEST).exists():
            self.prepare_data()
        m = read_manifest(self.root)
        if m.get("kind") != "tokens":
            raise DataError(f"{self.root} holds {m.get('kind', 'images')} shards; data/tokens needs token shards "
                            "made by 'arlab tokenize'")
        for split in (self.cfg.train_split, self.cfg.val_split):
            if split and split not in m["splits"]:
                raise DataError(f"split '{split}' is not in {self.root / MANIFEST} (splits: {', '.join(m['splits'])})")
        self.manifest = m

    @property
    def tokenizer_meta(self) -> dict[str, Any]:
        self.setup()
        assert self.manifest is not None
        return dict(self.manifest["tokenizer"])

    def _loader(self, split: str, train: bool) -> ShardLoader | MemoryLoader:
        self.setup()
        assert self.manifest is not None
        info = self.manifest["splits"][split]
        rank, world = self.rank_world()
        bs = self.cfg.batch_size if train else (self.cfg.val_batch_size or self.cfg.batch_size)
        if self.cfg.in_memory:
            return MemoryLoader([str(self.root / s["name"]) for s in info["shards"]],
                                [s["count"] for s in info["shards"]], batch_size=bs, seed=self.seed, rank=rank,
                                world_size=world, decoder=TokenDecoder(), collate=collate_tokens, train=train,
                                name=f"{self.manifest['name']}-tokens/{split}", num_workers=self.cfg.num_workers,
                                shuffle_buffer=self.cfg.shuffle_buffer)
        return ShardLoader([str(self.root / s["name"]) for s in info["shards"]], [s["count"] for s in info["shards"]],
                           batch_size=bs, seed=self.seed, rank=rank, world_size=world,
                           num_workers=self.cfg.num_workers, shuffle_buffer=self.cfg.shuffle_buffer,
                           decode=decode_tokens, collate=collate_tokens, train=train,
                           name=f"{self.manifest['name']}-tokens/{split}")
